"""dshal inside someone else's process (a notebook, a training script): the commands run
in-process through ``dshal.cli.main`` and the library calls leave the caller's global state
as they found it: torch's thread count, torch's global RNG stream, the active dshal runtime."""

from __future__ import annotations

import torch

import dshal
import dshal.runtime
from dshal.cli import main as cli
from dshal.perf.measure import measure_matmul_flops

BENCH = ["bench", "--backend", "cpu", "--ops", "rms_norm", "--warmup", "1", "--runs", "1", "--min-runs", "1",
         "--time-per-case", "0", "--no-reference", "--no-torch", "--no-progress"]


def test_bench_threads_and_global_rng_are_the_callers_again_after_it(tmp_path):
    """`--threads 1` held for the rest of the caller's process, and measuring the matmul peak
    drew its inputs from torch's global generator: a seeded training script's next draw moved."""
    torch.set_num_threads(2)  # differs from --threads 1 on any machine (the autouse fixture restores it)
    torch.manual_seed(1234)
    rng = torch.random.get_rng_state()
    assert cli([*BENCH, "--threads", "1", "--output", str(tmp_path / "b.html")]) == 0
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_measure_matmul_flops_draws_from_its_own_generator():
    backend = dshal.use(backend="cpu").backend
    torch.manual_seed(7)
    rng = torch.random.get_rng_state()
    assert measure_matmul_flops(torch.device("cpu"), torch.float32, backend, size=32) > 0
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_run_gives_back_the_callers_active_runtime():
    """`dshal run --backend cpu` in-process replaced the caller's own dshal.use() runtime."""
    mine = dshal.use(backend="cpu")
    assert cli(["run", "--backend", "cpu", "--new-tokens", "1", "--prompt-len", "2", "--no-progress"]) == 0
    assert dshal.current() is mine


def test_a_command_leaves_no_runtime_active_where_none_was():
    dshal.runtime.reset()
    assert cli(["run", "--backend", "cpu", "--new-tokens", "1", "--prompt-len", "2", "--no-progress"]) == 0
    assert dshal.runtime._state["active"] is None


def test_active_kept_restores_through_an_exception():
    mine = dshal.use(backend="cpu")
    try:
        with dshal.runtime.active_kept():
            dshal.use(backend="cpu")
            raise KeyError("inside")
    except KeyError:
        pass
    assert dshal.current() is mine
