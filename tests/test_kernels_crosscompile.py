"""``dshal kernels``: every shipped Triton kernel config cross-compiles for sm_90a, gfx942 and
gfx950 (the real NVIDIA / AMD code generators, no GPU), fits, does not spill and uses the
tensor cores. Compiles run in 2 worker processes; results are cached by kernel source."""

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


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return cross_compile(TARGETS, jobs=2, cache_dir=default_cache_dir())


@pytest.mark.parametrize("name", TARGETS)
def test_every_shipped_config_lowers_fits_and_uses_the_tensor_cores(rows, name):
    mine = [r for r in rows if r["target"] == name]
    failed = [(r["kernel"], r["config"], r["problems"]) for r in mine if not r["ok"]]
    assert not failed, f"{name}: shipped configs fail: {failed}"
    table = COMPILE_TARGETS[name].kernel_target()
    gemm = [r for r in mine if r["kernel"].startswith("fp8_block_gemm")]
    assert len(gemm) == len(table.shipped_gemm_tiles())  # one row per tile, none dropped
    moe = [r for r in mine if r["kernel"].startswith("grouped_moe_experts")]
    assert len(moe) == 2
    for r in gemm + moe:
        assert r["tensor_core"], r
        assert r["shared_bytes"] <= r["shared_limit"] and r["spills"] == 0
        assert r["num_stages"] < 2 or r["async_copy"], r
    # the JIT's specializations were applied: multi-stage pipelines were built
    assert all(r["stages_built"] >= 1 for r in gemm)


def test_sm90a_uses_wgmma_for_warpgroup_tiles_and_cp_async(rows):
    gemm = [r for r in rows if r["target"] == "sm_90a" and r["kernel"].startswith("fp8_block_gemm")]
    big = [r for r in gemm if "BLOCK_M=64" in r["config"] or "BLOCK_M=128" in r["config"]]
    assert big and all(any(m.startswith("wgmma.mma_async") for m in r["tensor_core"]) for r in big)
    assert all("cp.async" in r["async_copy"] and r["stages_built"] == r["num_stages"] for r in big)
    # decode tiles: 16 rows (mma.sync: wgmma needs 64) and split-K, still pipelined
    decode = [r for r in gemm if r["kernel"] == "fp8_block_gemm (decode)"]
    assert decode and all("BLOCK_M=16" in r["config"] and r["tensor_core"] for r in decode)
    assert any("SPLIT_K=4" in r["config"] for r in decode)


def test_a_spilling_tile_is_reported_as_a_failure():
    """gfx942 256x256 (shipped before this check existed) uses all 64 KB of LDS and spills
    hundreds of VGPRs: the check must catch it, not the autotuner at run time."""
    spilling = TileConfig(256, 256, num_warps=8, num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16)
    rows = cross_compile(["gfx942"], jobs=1, cache_dir=default_cache_dir(), gemm_tiles=[spilling])
    (gemm,) = [r for r in rows if r["kernel"] == "fp8_block_gemm" and "BLOCK_M=256" in r["config"]]
    assert gemm["lowered"] and gemm["spills"] > 100 and not gemm["ok"]
    assert any("spills" in p for p in gemm["problems"])


def test_cli_writes_json_and_exits_0(tmp_path):
    from dshal.cli import main

    out = tmp_path / "k.json"
    assert main(["kernels", "--target", "gfx942", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "dshal.kernels/1" and report["targets"] == ["gfx942"]
    assert report["rows"] and all(r["ok"] for r in report["rows"])
