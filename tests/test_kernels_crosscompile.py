"""``dshal kernels``: every shipped Triton kernel config cross-compiles for sm_90a, gfx942 and
gfx950 (the real NVIDIA / AMD code generators, no GPU), fits, does not spill and uses the
tensor cores. One test runs the command for the three targets (so pytest-xdist cannot split
the compile work across its workers); compiles run in 2 processes, cached by kernel source."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dshal.kernels.triton.crosscompile import COMPILE_TARGETS, cross_compile, default_cache_dir
from dshal.kernels.triton.target import TileConfig

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.timeout(600),
]
TARGETS = ("sm_90a", "gfx942", "gfx950")


def test_dshal_kernels_every_shipped_config_lowers_fits_and_uses_the_tensor_cores(tmp_path, capsys):
    from dshal.cli import main

    out = tmp_path / "kernels.json"
    argv = ["kernels", *(arg for t in TARGETS for arg in ("--target", t)), "--json", str(out)]
    rc = main(argv)
    report = json.loads(out.read_text())
    rows = report["rows"]
    failed = [(r["target"], r["kernel"], r["config"], r["problems"]) for r in rows if not r["ok"]]
    assert rc == 0 and not failed, f"shipped configs fail: {failed}"
    assert report["schema"] == "dshal.kernels/1" and report["targets"] == list(TARGETS)
    assert "configs ok" in capsys.readouterr().out

    for name in TARGETS:
        mine = [r for r in rows if r["target"] == name]
        table = COMPILE_TARGETS[name].kernel_target()
        gemm = [r for r in mine if r["kernel"].startswith("fp8_block_gemm")]
        assert len(gemm) == len(table.shipped_gemm_tiles())  # one row per tile, none dropped
        moe = [r for r in mine if r["kernel"].startswith("grouped_moe_experts")]
        assert len(moe) == 4  # gate/up and down, top-8 and one choice per token (the EP path)
        for r in gemm + moe:
            assert r["tensor_core"], r
            assert r["shared_bytes"] <= r["shared_limit"] and r["spills"] == 0
            assert r["stages_built"] >= 1 and r["async_copy"], r  # pipelined: specializations applied
        assert {r["kernel"] for r in mine} >= {"rms_norm (residual)", "fp8_quantize_blocks (1x128)", "rotary_embedding"}

    # sm_90a: wgmma for warpgroup tiles, cp.async with every stage built
    hopper = [r for r in rows if r["target"] == "sm_90a" and r["kernel"].startswith("fp8_block_gemm")]
    big = [r for r in hopper if "BLOCK_M=64" in r["config"] or "BLOCK_M=128" in r["config"]]
    assert big and all(any(m.startswith("wgmma.mma_async") for m in r["tensor_core"]) for r in big)
    assert all("cp.async" in r["async_copy"] and r["stages_built"] == r["num_stages"] for r in big)
    # decode tiles: 16 rows (mma.sync: wgmma needs 64) and split-K
    decode = [r for r in hopper if r["kernel"] == "fp8_block_gemm (decode)"]
    assert decode and all("BLOCK_M=16" in r["config"] and r["tensor_core"] for r in decode)
    assert any("SPLIT_K=4" in r["config"] for r in decode)


def test_a_spilling_tile_is_reported_as_a_failure():
    """gfx942 256x256 (shipped before this check existed) uses all 64 KB of LDS and spills
    hundreds of VGPRs: the check must catch it, not the autotuner at run time."""
    spilling = TileConfig(256, 256, num_warps=8, num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16)
    rows = cross_compile(["gfx942"], jobs=1, cache_dir=default_cache_dir(), gemm_tiles=[spilling], only="fp8_block_gemm")
    (gemm,) = [r for r in rows if "BLOCK_M=256" in r["config"]]
    assert gemm["lowered"] and gemm["spills"] > 100 and not gemm["ok"]
    assert any("spills" in p for p in gemm["problems"])


def test_workers_are_capped_at_the_cpus_and_a_bad_json_path_is_refused_first(tmp_path, monkeypatch, capsys):
    """`--jobs 10000` started 10000 Python + Triton workers (a 2-core machine froze); and a
    `--json` that is a folder was a traceback after all the compiling."""
    import subprocess

    from dshal.cli import main
    from dshal.kernels.triton import crosscompile

    started = []
    real_popen = subprocess.Popen

    def counting_popen(*args, **kwargs):
        started.append(args[0])
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(crosscompile.subprocess, "Popen", counting_popen)
    rows = cross_compile(["sm_90a"], jobs=10_000, cache_dir=None, only="no kernel has this name")
    assert rows == [] and 1 <= len(started) == min(10_000, crosscompile._cpus())

    started.clear()
    assert main(["kernels", "--target", "sm_90a", "--json", str(tmp_path)]) == 1
    assert f"--json: {tmp_path} is a directory, expected a file path" in capsys.readouterr().err
    assert started == []  # refused before any worker


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A parent killed by a signal that skips its cleanup (`timeout`, SIGKILL) leaves no
    compile worker running on as an orphan: they die with it (PR_SET_PDEATHSIG), even while
    still importing torch and Triton, when their own watcher does not run yet (under load
    that took past 5 s: a full test run's failure)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("from dshal.kernels.triton.crosscompile import cross_compile; "
            "cross_compile(['sm_90a', 'gfx942', 'gfx950'], jobs=2, cache_dir=None)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code])

    def children(pid: int) -> list[int]:
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        return found

    deadline = time.monotonic() + 60
    while len(workers := children(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)  # the workers are importing
    parent.wait()
    killed = time.monotonic()
    alive = workers
    while alive and time.monotonic() < killed + 1:  # at once (after their imports, 2-6 s, before)
        time.sleep(0.1)
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and _not_zombie(w)]
    assert alive == [], f"compile workers {alive} still run 1 s after their parent was killed"


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
