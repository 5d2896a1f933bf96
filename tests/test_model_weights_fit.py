"""A checkpoint whose weights cannot fit the device is refused before any tensor is read
(``dshal.model.loader.check_weights_fit``): past the memory the device can ever hold (on the
host its RAM or the container's cgroup limit) a DeviceError, past what is free now a warning.
The estimate is the load itself run on the meta device (``dshal.plan.simulate.weight_bytes``).
Real cgroups cannot be made in a test: the reader is pointed at fixture folders
(``DSHAL_CGROUP_ROOT``, as in tests/test_core_cgroups.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dshal
from dshal.cgroups import CGROUP_ROOT_ENV
from dshal.comm import SimulatedGroup
from dshal.model import CheckpointReader, from_pretrained, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint
from dshal.model.loader import check_weights_fit, checkpoint_args, estimate_weight_bytes
from dshal.parallel.groups import ParallelGroups, plan_groups
from dshal.parallel.loading import build_parallel
from dshal.plan.simulate import held_bytes

MIB = 2**20
ARGS = tiny_args(num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                 num_nextn_predict_layers=1, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny random model (with its MTP layer) in bf16 and in FP8 (128x128 blocks)."""
    state = random_checkpoint(ARGS, seed=0, std=0.1)
    root = tmp_path_factory.mktemp("weights_fit")
    return {"bf16": save_checkpoint(root / "bf16", ARGS, state),
            "fp8": save_checkpoint(root / "fp8", ARGS, quantize_checkpoint_fp8(state))}


def cgroup(folder: Path, limit: int, used: int = 0) -> Path:
    """A cgroup v2 mount whose root cgroup allows ``limit`` bytes, ``used`` of them in use."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("cgroup.controllers", "memory"), ("memory.max", str(limit)), ("memory.current", str(used)),
                       ("memory.stat", "anon 1\ninactive_file 0\n")):
        (folder / name).write_text(f"{text}\n")
    return folder


def resident(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("mtp", [0, 1])
def test_the_estimate_is_what_the_loaded_parameters_hold(checkpoints, kind, mtp):
    """Within 1 % of the bytes of the loaded model's parameters and buffers (it is exact: the
    same loader and precision policy, run on the meta device); the MTP layer counts when loaded."""
    runtime = dshal.current()
    args = checkpoint_args(checkpoints[kind], runtime, mtp_layers=mtp)
    estimate = estimate_weight_bytes(args, CheckpointReader(checkpoints[kind]), runtime.config.precision)
    model = from_pretrained(checkpoints[kind], mtp_layers=mtp)
    assert abs(estimate - resident(model)) <= 0.01 * resident(model), (estimate, resident(model))
    if kind == "fp8":  # 1 byte per FP8 weight: well under the bf16 model's bytes
        assert {p.dtype for p in model.parameters()} >= {torch.float8_e4m3fn}
        bf16 = estimate_weight_bytes(checkpoint_args(checkpoints["bf16"], runtime, mtp_layers=mtp),
                                     CheckpointReader(checkpoints["bf16"]), runtime.config.precision)
        assert estimate < 0.9 * bf16


def test_a_tensor_parallel_ranks_estimate_is_its_share(checkpoints):
    """Under TP=2 each rank's estimate is what that rank's part of the model holds, about half."""
    runtime = dshal.current()
    path = checkpoints["bf16"]
    args = checkpoint_args(path, runtime)
    whole = estimate_weight_bytes(args, CheckpointReader(path), runtime.config.precision)
    for rank in range(2):
        groups = ParallelGroups(tp=SimulatedGroup(2, rank, "tp"), ep=None, tp_size=2, ep_size=1, plan=plan_groups(2, 2, 1))
        estimate = estimate_weight_bytes(args, CheckpointReader(path), runtime.config.precision, groups)
        part = build_parallel(args, CheckpointReader(path), groups)
        assert abs(estimate - held_bytes(part)) <= 0.01 * held_bytes(part), (rank, estimate, held_bytes(part))
        assert estimate < 0.75 * whole


def test_a_checkpoint_past_the_containers_memory_limit_is_refused_before_any_tensor_is_read(
    checkpoints, tmp_path, monkeypatch
):
    root = cgroup(tmp_path / "cg", 1 * MIB)
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))
    read = []
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: read.append(name))
    monkeypatch.setattr(CheckpointReader, "get_slice", lambda self, name, slices: read.append(name))
    path = checkpoints["bf16"]
    with pytest.raises(dshal.DeviceError) as refused:
        from_pretrained(path)
    assert read == []
    message = str(refused.value)
    need = estimate_weight_bytes(checkpoint_args(path, dshal.current()), CheckpointReader(path),
                                 dshal.current().config.precision)
    assert message.startswith(f"checkpoint {path}: its weights need {need / MIB:,.2f} MiB on cpu, expected at most "
                              f"the 1.00 MiB of the container's memory limit (memory.max; {root / 'memory.max'}): ")
    assert "more memory" in message and "--tp N" in message and "FP8" in message


def test_dshal_run_refuses_a_checkpoint_past_the_containers_memory_limit(checkpoints, tmp_path):
    """One line on stderr, exit 1, no traceback (the kernel's SIGKILL in a real container)."""
    root = cgroup(tmp_path / "cg", 1 * MIB)
    env = {**os.environ, CGROUP_ROOT_ENV: str(root), "OMP_NUM_THREADS": "1", "DSHAL_BACKEND": "cpu"}
    done = subprocess.run([sys.executable, "-m", "dshal", "run", "--checkpoint", str(checkpoints["bf16"]),
                           "--no-progress"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"dshal run: error: checkpoint {checkpoints['bf16']}: its weights need "), lines[0]
    assert f"of the container's memory limit (memory.max; {root / 'memory.max'})" in lines[0]


def test_weights_past_the_free_memory_but_within_the_limit_load_with_a_warning(
    checkpoints, tmp_path, monkeypatch, caplog
):
    """1 GiB allowed, all but 64 KiB of it in use: 'free' is soft (page cache, other processes)."""
    root = cgroup(tmp_path / "cg", 1024 * MIB, used=1024 * MIB - 64 * 1024)
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))
    with caplog.at_level(logging.WARNING, logger="dshal.model.loader"):
        model = from_pretrained(checkpoints["fp8"])
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == ARGS.vocab_size
    warned = [r.getMessage() for r in caplog.records if r.name == "dshal.model.loader"]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"dshal: checkpoint {checkpoints['fp8']}: its weights need ")
    assert ("more than the 0.06 MiB free there now (of 1.00 GiB, the container's memory limit (memory.max; "
            f"{root / 'memory.max'})); loading anyway") in warned[0]


def test_weights_within_the_free_memory_load_without_a_word(checkpoints, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(cgroup(tmp_path / "cg", 1024 * MIB)))
    with caplog.at_level(logging.WARNING, logger="dshal.model.loader"):
        from_pretrained(checkpoints["bf16"])
    assert [r for r in caplog.records if r.name == "dshal.model.loader"] == []


def test_an_unknown_limit_is_never_a_refusal(checkpoints, tmp_path, monkeypatch):
    """A host that says neither its memory nor what is free (no sysconf, no /proc/meminfo, no
    cgroup limit): the weights load, and the estimate is not even made."""
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(tmp_path))  # a mount with no limit files

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", no_sysconf)
    monkeypatch.setattr(dshal.current().backend, "memory_stats", lambda: {})
    asked = []
    assert check_weights_fit("ckpt", lambda: asked.append(1) or 10**30, torch.device("cpu")) is None
    assert asked == []
    assert from_pretrained(checkpoints["bf16"]).args.num_hidden_layers == ARGS.num_hidden_layers


def test_check_weights_fit_refuses_one_byte_past_the_limit_and_gives_ranks_their_share(tmp_path, monkeypatch):
    root = cgroup(tmp_path / "cg", 4 * MIB)
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))
    cpu = torch.device("cpu")
    assert check_weights_fit("ckpt", lambda: 4 * MIB, cpu) == 4 * MIB  # exactly the limit: fits
    with pytest.raises(dshal.DeviceError, match=r"^checkpoint ckpt: its weights need 4.00 MiB on cpu, expected at most "
                       r"the 4.00 MiB of the container's memory limit"):
        check_weights_fit("ckpt", lambda: 4 * MIB + 1, cpu)
    with pytest.raises(dshal.DeviceError, match=r"^checkpoint ckpt: this rank's weights need 3.00 MiB on cpu, expected "
                       r"at most the 2.00 MiB of the container's memory limit .* \(the 2 ranks on it share 4.00 MiB\): "):
        check_weights_fit("ckpt", lambda: 3 * MIB, cpu, "this rank's weights", sharing=2)
    assert check_weights_fit("ckpt", lambda: 10**30, torch.device("meta")) is None  # not the runtime's device


def test_a_tensor_parallel_rank_is_checked_for_its_own_share(checkpoints, tmp_path, monkeypatch):
    """A limit between a TP=2 rank's part and the whole model: one process is refused, each
    rank loads its part; below the part, the rank is refused in its own terms."""
    runtime = dshal.current()
    path = checkpoints["bf16"]
    args = checkpoint_args(path, runtime)
    groups = ParallelGroups(tp=SimulatedGroup(2, 0, "tp"), ep=None, tp_size=2, ep_size=1, plan=plan_groups(2, 2, 1))
    whole = estimate_weight_bytes(args, CheckpointReader(path), runtime.config.precision)
    part = estimate_weight_bytes(args, CheckpointReader(path), runtime.config.precision, groups)
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(cgroup(tmp_path / "between", (whole + part) // 2)))
    with pytest.raises(dshal.DeviceError, match=r"its weights need"):
        from_pretrained(path)
    assert held_bytes(build_parallel(args, CheckpointReader(path), groups)) == part
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(cgroup(tmp_path / "below", part - 1)))
    with pytest.raises(dshal.DeviceError, match=rf"^checkpoint {path}: this rank's weights \(TP=2 x EP=1\) need "):
        build_parallel(args, CheckpointReader(path), groups)
