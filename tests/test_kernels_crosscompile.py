"""``dshal kernels``: every shipped Triton kernel config cross-compiles for sm_90a, sm_100a,
sm_120a, gfx942 and gfx950 (the real NVIDIA / AMD code generators, no GPU), fits, does not spill
and uses the tensor cores. One test runs the command for the five targets (so pytest-xdist
cannot split the compile work across its workers); compiles run in 2 processes, cached by
kernel source."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from dshal.kernels.triton.crosscompile import COMPILE_TARGETS, cross_compile, default_cache_dir
from dshal.kernels.triton.target import TileConfig

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.timeout(600),
]
TARGETS = ("sm_90a", "sm_100a", "sm_120a", "gfx942", "gfx950")
#: A bfloat16 tensor-core instruction: Hopper's warpgroup MMA, Blackwell's tcgen05 (f16 kind), mma.sync, AMD's MFMA.
BF16_MMA = r"wgmma\.mma_async\S*\.bf16\S*|tcgen05\.mma\S*kind::f16|mma\.sync\.aligned\S*\.bf16\S*|v_mfma_f32_\w*bf16"


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
        gemm = [r for r in mine if r["kernel"].startswith("fp8_block_gemm") and "widened" not in r["kernel"]]
        assert len(gemm) == len(table.shipped_gemm_tiles())  # one row per tile, none dropped
        # FP8 formats the dot cannot take (AMD): the widened space and the decode tiles, widened too
        widened = [r for r in mine if r["kernel"].startswith("fp8_block_gemm") and "widened" in r["kernel"]]
        want = len(dict.fromkeys(table.gemm_widened_tiles + table.gemm_decode_tiles)) if table.gemm_widened_tiles else 0
        assert len(widened) == want and (want > 0) == (COMPILE_TARGETS[name].backend != "cuda"), name
        assert all(r["tensor_core"] and "f16" in r["tensor_core"][0] for r in widened), widened
        gemm += widened
        moe = [r for r in mine if r["kernel"].startswith("grouped_moe_experts")]
        assert len(moe) == 4  # gate/up and down, top-8 and one choice per token (the EP path)
        for r in gemm + moe:
            assert r["tensor_core"], r
            assert r["shared_bytes"] <= r["shared_limit"] and r["spills"] == 0
            assert r["stages_built"] >= 1 and r["async_copy"], r  # pipelined: specializations applied
        assert {r["kernel"] for r in mine} >= {"rms_norm (residual)", "fp8_quantize_blocks (1x128)", "rotary_embedding"}
        # DeepSeek-V3.2's sparse MLA (decode and an MTP step): bfloat16 tensor-core dots, no spill
        sparse = [r for r in mine if r["kernel"].startswith("sparse_mla_attention")]
        assert len(sparse) == 2 and all(r["spills"] == 0 and r["shared_bytes"] <= r["shared_limit"] for r in sparse), sparse
        assert all(any(re.fullmatch(BF16_MMA, m) for m in r["mma"]) for r in sparse), sparse
        index = [r for r in mine if r["kernel"].startswith("indexer_topk scores")]  # the indexer: decode, prefill
        assert len(index) == 2 and all(r["spills"] == 0 and r["shared_bytes"] <= r["shared_limit"] for r in index), index
        assert all(any(re.fullmatch(BF16_MMA, m) for m in r["mma"]) for r in index), index

    # sm_90a: wgmma for warpgroup tiles, cp.async with every stage built
    hopper = [r for r in rows if r["target"] == "sm_90a" and r["kernel"].startswith("fp8_block_gemm")]
    big = [r for r in hopper if "BLOCK_M=64" in r["config"] or "BLOCK_M=128" in r["config"]]
    assert big and all(any(m.startswith("wgmma.mma_async") for m in r["tensor_core"]) for r in big)
    assert all("cp.async" in r["async_copy"] and r["stages_built"] == r["num_stages"] for r in big)
    # decode tiles: 16 rows (mma.sync: wgmma needs 64) and split-K
    decode = [r for r in hopper if r["kernel"] == "fp8_block_gemm (decode)"]
    assert decode and all("BLOCK_M=16" in r["config"] and r["tensor_core"] for r in decode)
    assert any("SPLIT_K=4" in r["config"] for r in decode)

    # sm_100a (B200 / B300): tcgen05 for 64 rows and more (GEMM and MoE), every stage built;
    # the decode tiles on mma.sync
    blackwell = [r for r in rows if r["target"] == "sm_100a" and r["tensor_core_required"]]
    wide = [r for r in blackwell if "BLOCK_M=16 " not in r["config"] and "BLOCK_M=32 " not in r["config"]]
    assert wide and all(r["tensor_core"][0].startswith("tcgen05.mma") for r in wide), wide
    assert all(r["stages_built"] == r["num_stages"] for r in wide if r["kernel"].startswith("fp8_block_gemm"))
    assert all(r["tensor_core"][0].startswith("mma.sync") for r in blackwell if r not in wide)
    assert not any(m.startswith("wgmma") for r in blackwell for m in r["mma"])
    # sm_120a (RTX PRO 6000 / RTX 50): FP8 mma.sync everywhere, within its 99 KB of shared memory
    consumer = [r for r in rows if r["target"] == "sm_120a" and r["tensor_core_required"]]
    assert consumer and all(".e4m3.e4m3." in r["tensor_core"][0] for r in consumer), consumer
    assert all(r["shared_limit"] == 99 * 1024 and r["shared_bytes"] <= r["shared_limit"] for r in consumer)
    assert not any(m.startswith(("wgmma", "tcgen05")) for r in consumer for m in r["mma"])


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
    assert rows == [] and 1 <= len(started) == min(10_000, crosscompile.host_usable_cpus())

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


def _a_folder_nobody_can_make(tmp_path):
    """A path whose parent is a regular file: mkdir fails there for anyone, root included."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "folder"


def test_an_unwritable_home_gives_triton_a_cache_in_the_runs_temp_folder(tmp_path, monkeypatch):
    """HOME not writable (nobody's /nonexistent) and TRITON_CACHE_DIR unset: every config was
    "does not lower: PermissionError: ... '/nonexistent'" (Triton's ~/.triton/cache), blaming the
    kernels. Triton's cache is only written here (every compile is forced), so the workers get
    one in the run's temporary folder."""
    monkeypatch.setenv("HOME", str(_a_folder_nobody_can_make(tmp_path)))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_HOME", raising=False)
    rows = cross_compile(["sm_90a"], jobs=1, cache_dir=None, only="rms_norm")
    assert rows and all(r["lowered"] and r["ok"] for r in rows), rows


def test_an_os_error_outside_tritons_cache_is_not_blamed_on_the_cache():
    """Any OSError from triton.compile was said to be the cache's: a missing or non-executable
    ptxas got "set TRITON_CACHE_DIR to a writable folder"."""
    import errno

    from dshal.kernels.triton.crosscompile import _triton_cache_error

    cache = "/home/u/.triton/cache"
    tool = _triton_cache_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/opt/triton/bin/ptxas"), cache)
    assert "expected the compilers Triton bundles to be installed and executable" in str(tool)
    assert "TRITON_CACHE_DIR" not in str(tool)
    for err in (PermissionError(errno.EACCES, "Permission denied", "/home/u"),  # a folder on the way to the cache
                PermissionError(errno.EACCES, "Permission denied", f"{cache}/ab/cd.json"),
                OSError(errno.ENOSPC, "No space left on device")):
        assert "Triton's compile cache is" in str(_triton_cache_error(err, cache)), err


def test_an_unwritable_triton_cache_dir_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    """TRITON_CACHE_DIR set to a folder that cannot be made: one error naming it, not a
    "does not lower" row per config and a report blaming the kernels."""
    from dshal.cli import main

    folder = _a_folder_nobody_can_make(tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(folder))
    report = tmp_path / "kernels.json"
    assert main(["kernels", "--target", "sm_90a", "--no-cache", "--jobs", "1", "--json", str(report)]) == 1
    captured = capsys.readouterr()
    assert "dshal kernels: error: triton.compile failed with NotADirectoryError" in captured.err
    assert f"Triton's compile cache is TRITON_CACHE_DIR={str(folder)!r}, expected a writable folder" in captured.err
    assert captured.err.count("error:") == 1
    assert "does not lower" not in captured.out and not report.exists()


def test_a_result_cache_that_cannot_be_written_is_turned_off_not_fatal(tmp_path, monkeypatch, capsys):
    """dshal's result cache read-only, uncreatable or full: the run died after seconds of
    compiling with a worker's OSError from the cache write. Now an unusable folder is found
    before any worker starts (said once: "result cache off"), and a write that fails anyway
    (the disk filled meanwhile) loses the cache entry, not the compile."""
    from dshal.kernels.triton import crosscompile

    monkeypatch.setenv("DSHAL_CACHE_DIR", str(_a_folder_nobody_can_make(tmp_path)))
    rows = cross_compile(["sm_90a"], jobs=1, cache_dir=default_cache_dir(), only="rms_norm")
    assert rows and all(r["ok"] and not r.get("cached") for r in rows), rows
    err = capsys.readouterr().err
    assert err.count("result cache off") == 1, err
    assert f"dshal kernels: result cache off: dshal's cache (DSHAL_CACHE_DIR): {tmp_path / 'a-file'} is a file" in err

    # an entry that cannot be read (another user's, damaged) is compiled again
    good = tmp_path / "good"
    fresh = cross_compile(["sm_90a"], jobs=1, cache_dir=good, only="rms_norm")
    # a fresh row says cached: false, as a cached one says true (the key was missing: a diff of
    # a cold and a warm `dshal kernels --json` saw it come and go)
    assert fresh and all(r["cached"] is False for r in fresh), fresh
    entries = list(good.glob("*.json"))
    assert entries
    for entry in entries:
        entry.write_text("{")
    rows = cross_compile(["sm_90a"], jobs=1, cache_dir=good, only="rms_norm")
    assert rows and all(r["ok"] and not r.get("cached") for r in rows), rows

    # a folder that passed the check and cannot be written when the result comes
    monkeypatch.setattr(crosscompile, "usable_cache_dir", lambda folder: folder)
    rows = cross_compile(["sm_90a"], jobs=1, cache_dir=default_cache_dir(), only="rms_norm")
    assert rows and all(r["ok"] for r in rows), rows


def test_sigterm_removes_the_runs_temporary_folder(sigterm_once_made):
    """`timeout` / `kill` send SIGTERM, whose default ends Python without its cleanup: each
    such run left a /tmp/dshal-kernels-* folder behind. It now ends with 143 and removes it."""
    sigterm_once_made(["kernels", "--target", "sm_90a", "--no-cache"], "dshal-kernels-")
