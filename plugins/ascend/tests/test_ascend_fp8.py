"""Emulated FP8 (910B has none): bit-exact decode and rounding, and the plugin's FP8 ops.

The emulated FP8 ops (``dequantize_fp8``, ``fp8_gemm``, ``linear`` with an FP8 weight) are
pure torch -- no torch_npu call -- so the plugin's own functions run here on CPU tensors
and are compared with the reference ops.
"""

from __future__ import annotations

import pytest
import torch

import dshal.ops.reference as ref
from dshal.errors import DTypeError
from dshal.ops.spec import FP8_DTYPES
from dshal_ascend.fp8emu import FORMATS, decode_fp8, fake_quantize_fp8, round_to_fp8_grid
from dshal_ascend.npu_ops import AscendOps
from dshal_ascend.releases import MINIMUM_RELEASE, kernel_features

# No kernel module: these paths must not touch torch_npu (touching it would import it and fail here).
npu_ops = AscendOps(kernel_features(MINIMUM_RELEASE))


@pytest.mark.parametrize("fmt", sorted(FP8_DTYPES))
def test_ascend_decode_fp8_every_code_point(fmt):
    q = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt])
    want, got = q.float(), decode_fp8(q)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("fmt", sorted(FP8_DTYPES))
def test_ascend_round_to_fp8_grid_matches_cast(fmt):
    torch.manual_seed(1)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt]).float()
    grid = grid[torch.isfinite(grid)].sort().values
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact ties: round half to even
    fmax = FORMATS[fmt].max
    v = torch.cat([grid, midpoints, torch.randn(20000) * fmax / 8, torch.randn(2000) * 1e-3, torch.tensor([2 * fmax, -3 * fmax])])
    want = v.clamp(-fmax, fmax).to(FP8_DTYPES[fmt]).float()
    assert torch.equal(round_to_fp8_grid(v, fmt), want)
    assert torch.isnan(round_to_fp8_grid(torch.tensor([float("nan")]), fmt)).all()


@pytest.mark.parametrize("block", [(1, 128), (1, -1), None])
def test_ascend_fake_quantize_matches_reference_round_trip(block):
    x = torch.randn(5, 300) * 4
    x[2] = 0.0
    q, s = ref.quantize_fp8(x, block, "e4m3fn")
    assert torch.equal(fake_quantize_fp8(x, block, "e4m3fn"), ref.dequantize_fp8(q, s, block, torch.float32))


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, -1), None])
def test_ascend_emulated_dequantize_fp8(block):
    q, s = ref.quantize_fp8(torch.randn(130, 260), block, "e4m3fn")
    got = npu_ops.dequantize_fp8(q, s, block, torch.float32)
    assert torch.equal(got, ref.dequantize_fp8(q, s, block, torch.float32))
    with pytest.raises(DTypeError, match="float64"):
        npu_ops.dequantize_fp8(q, s, block, torch.float64)


@pytest.mark.parametrize("scheme", ["block", "row", "tensor"])
def test_ascend_emulated_fp8_gemm_close_to_reference(scheme):
    torch.manual_seed(2)
    blocks = {"block": ((1, 128), (128, 128)), "row": ((1, -1), (1, -1)), "tensor": (None, None)}[scheme]
    a, a_s = ref.quantize_fp8(torch.randn(33, 256), blocks[0], "e4m3fn")
    b, b_s = ref.quantize_fp8(torch.randn(40, 256), blocks[1], "e4m3fn")
    got = npu_ops.fp8_gemm(a, a_s, b, b_s, torch.float32)
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    # bf16 operands (8-bit mantissa) on top of FP8 values: DeepGEMM's similarity bound.
    similarity = 2 * (got.double() * want.double()).sum() / (got.double().pow(2) + want.double().pow(2)).sum()
    assert 1 - similarity < 1e-3


@pytest.mark.parametrize("scheme", ["block", "row"])
def test_ascend_emulated_fp8_linear_close_to_reference(scheme):
    torch.manual_seed(4)
    w_block = (128, 128) if scheme == "block" else (1, -1)
    w, w_s = ref.quantize_fp8(torch.randn(96, 256) * 0.05, w_block, "e4m3fn")
    x, bias = torch.randn(2, 5, 256, dtype=torch.bfloat16), torch.randn(96)
    got = npu_ops.linear(x, w, bias, w_s).float()
    want = ref.linear(x, w, bias, w_s).float()
    assert got.shape == (2, 5, 96)
    assert (got - want).norm() / want.norm() < 1e-2


def test_ascend_fp8_linear_weight_decoded_once():
    torch.manual_seed(4)
    ops = AscendOps(kernel_features(MINIMUM_RELEASE))
    w, w_s = ref.quantize_fp8(torch.randn(64, 256), (128, 128), "e4m3fn")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    first = ops.linear(x, w, None, w_s)
    assert len(ops.prepared) == 1
    assert torch.equal(ops.linear(x, w, None, w_s), first) and len(ops.prepared) == 1
    del w
    import gc

    gc.collect()
    assert len(ops.prepared) == 0  # dropped with its weight
