"""Tensor / expert parallel model core across real local processes (gloo, free ports).

A random tiny DeepSeek-V3 checkpoint is written once; every rank loads the
single-process model from it as the oracle and checks its parallel model (logits within
1e-5 relative, identical greedy tokens, only its own slices read). One launch per world
size covers every layout of that size.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dshal.kernels import cpu as cpu_kernels
from dshal.parallel.launch import LocalJob

WORKER = Path(__file__).with_name("parallel_worker.py")
COMM_ERROR_EXIT = 17
KILL_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 checkpoint, and beside it (``fp8/``) its FP8 128x128-block version and, with
    the dshal-ascend plugin installed, (``int8/``) the W8A8 checkpoint its converter makes."""
    from dshal.model import tiny_args
    from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint

    args = tiny_args()
    path = tmp_path_factory.mktemp("parallel_ckpt")
    tensors = random_checkpoint(args, seed=5)
    save_checkpoint(path, args, tensors)
    save_checkpoint(path / "fp8", args, quantize_checkpoint_fp8(tensors))
    try:
        from dshal_ascend.convert import convert_checkpoint  # lazy: an optional plugin's converter
    except ImportError:
        return path
    convert_checkpoint(path / "fp8", path / "int8")
    return path


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_matches_single_process(tmp_path: Path, checkpoint: Path, world: int) -> None:
    job = LocalJob([sys.executable, str(WORKER), "models", str(tmp_path), str(checkpoint)], world, capture=True)
    with job:
        runs = job.communicate(timeout_s=150)
    assert [code for code, _, _ in runs] == [0] * world, [err[-3000:] for _, _, err in runs]
    expected = {f"TP={world} x EP=1 from checkpoint", f"TP=1 x EP={world} from checkpoint"}
    expected |= {"TP=2 x EP=2 from checkpoint", "live TP then EP", "live EP then TP"} if world == 4 else {
        "live tensor_parallel", "live expert_parallel", "live tensor_parallel with attention biases",
        "TP=2 x EP=1 from FP8 checkpoint", "TP=1 x EP=2 from FP8 checkpoint",
        "ranks take rank 0's tokens (TP=2, each rank choosing its own)",
        "live tensor_parallel of DeepSeek-V3.2 (sparse attention)",
        "TP=2 x EP=1 DeepSeek-V3.2 (sparse attention) from checkpoint",
        "TP=1 x EP=2 DeepSeek-V3.2 (sparse attention) from checkpoint",
        "trusted TP decode steps exchange no agreement records"}
    if world == 2 and cpu_kernels.status().available:
        expected.add("EP=2 decode step: a row's logits alone and in a batch of 3, bit for bit")  # C kernels: README
    for rank in range(world):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())["checks"]
        assert expected <= set(checks), sorted(checks)
        assert any(name.startswith("uneven all_to_all dispatch") for name in checks)
        failed = {name: why for name, why in checks.items() if why != "ok"}
        assert not failed, f"rank {rank}: {failed}"
    assert job.leaked() == []


def test_parallel_equals_single_process_in_every_precision_mode(tmp_path: Path, checkpoint: Path) -> None:
    """TP=2 and EP=2 (gloo) equal the single process (logits within 1e-5 relative, same
    greedy tokens) with FP8 / int8 applied on load and with the FP8 and W8A8 checkpoints as
    stored, on a hidden-128 model whose TP shards cut 128-blocks. The W8A8 one is read in
    slices (each rank read the whole checkpoint), also with a row-parallel layer kept in high
    precision (its shard quantized its input as W8A8 all the same: 1e-2 off)."""
    job = LocalJob([sys.executable, str(WORKER), "precision", str(tmp_path), str(checkpoint)], 2, capture=True)
    with job:
        runs = job.communicate(timeout_s=240)
    assert [code for code, _, _ in runs] == [0, 0], [err[-3000:] for _, _, err in runs]
    for rank in range(2):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())["checks"]
        assert len(checks) == (16 if (checkpoint / "int8").is_dir() else 12), sorted(checks)
        assert "TP=2 x EP=1 auto from fp8 checkpoint" in checks and "TP=2 x EP=1 int8 from float32 checkpoint" in checks
        failed = {name: why for name, why in checks.items() if why != "ok"}
        assert not failed, f"rank {rank}: {failed}"
    assert job.leaked() == []


def test_parallel_sigkill_during_forward(tmp_path: Path, checkpoint: Path) -> None:
    """TP=2 x EP=2: rank 3 is SIGKILLed while the ranks run forward passes; every other
    rank exits with CommError within timeout_s + 10 s, naming a collective and a group."""
    world = 4
    argv = [sys.executable, str(WORKER), "kill", str(tmp_path), str(checkpoint), str(KILL_TIMEOUT_S)]
    with LocalJob(argv, world, capture=True) as job:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in range(world)):
            assert all(p.poll() is None for p in job.procs), "a rank died before the kill"
            assert time.monotonic() < deadline, "ranks never got ready"
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the forward loop
        victim = job.procs[3]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        exit_after = {}
        while len(exit_after) < world - 1 and time.monotonic() - killed_at < KILL_TIMEOUT_S + 10:
            for rank, proc in enumerate(job.procs[:3]):
                if rank not in exit_after and proc.poll() is not None:
                    exit_after[rank] = time.monotonic() - killed_at
            time.sleep(0.02)
        runs = job.communicate(timeout_s=5)
    assert sorted(exit_after) == [0, 1, 2], f"still running {KILL_TIMEOUT_S + 10} s after the kill: {runs}"
    assert [code for code, _, _ in runs] == [COMM_ERROR_EXIT] * 3 + [-signal.SIGKILL], [err[-2000:] for _, _, err in runs]
    for rank in range(3):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert any(c in error for c in ("all_reduce", "all_gather", "all_to_all")), error
        assert "group" in error and "global rank" in error, error
    assert max(exit_after.values()) < KILL_TIMEOUT_S + 10
    assert job.leaked() == []
