"""Row-wise Triton kernels (RMSNorm, SwiGLU, rotary) on CPU tensors under the interpreter,
against the reference ops."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest
from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError  # noqa: E402
from dshal.kernels.triton.activation import silu_and_mul, silu_and_mul_fp8_quant  # noqa: E402
from dshal.kernels.triton.norm import rms_norm  # noqa: E402
from dshal.kernels.triton.quant import fp8_quantize_blocks  # noqa: E402
from dshal.kernels.triton.rotary import rotary_embedding  # noqa: E402
from dshal.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FP8 = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(dtype):
    x, w = rand(3, 5, 96, dtype=dtype), rand(96, dtype=dtype, seed=1)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_matches_reference(dtype):
    x, w, res = rand(4, 200, dtype=dtype), rand(200, dtype=dtype, seed=1), rand(4, 200, dtype=dtype, seed=2)
    y, summed = rms_norm(x, w, residual=res)
    y_ref, summed_ref = ref.rms_norm(x, w, residual=res)
    assert torch.equal(summed, summed_ref)  # the sum rounded to x's dtype (nearest even), exactly
    torch.testing.assert_close(y, y_ref)


def test_rms_norm_edge_shapes_and_layouts():
    w = rand(64, seed=1)
    x = rand(64, 7).T  # non-contiguous rows
    torch.testing.assert_close(rms_norm(x, w), ref.rms_norm(x, w))
    one = rand(1, 64)
    torch.testing.assert_close(rms_norm(one, w.to(torch.bfloat16)), ref.rms_norm(one, w.to(torch.bfloat16)))
    assert rms_norm(torch.empty(0, 64), w).shape == (0, 64)
    y, s = rms_norm(torch.empty(0, 64), w, residual=torch.empty(0, 64))
    assert y.shape == s.shape == (0, 64)
    zeros = torch.zeros(2, 64)
    assert torch.equal(rms_norm(zeros, w), zeros)  # eps keeps 0/0 away


NORM_BAD = [
    (lambda: rms_norm(rand(2, 8), rand(9)), ShapeError, "'weight' has size 9"),
    (lambda: rms_norm(rand(2, 8), rand(8), residual=rand(3, 8)), ShapeError, "'residual' has shape [3, 8]"),
    (lambda: rms_norm(rand(2, 8), rand(8), residual=rand(2, 8).half()), DTypeError, "'residual' has dtype"),
    (lambda: rms_norm(rand(2, 8), rand(8), eps=-1.0), ArgumentError, "'eps' is -1.0"),
    (lambda: rms_norm(rand(2, 8), rand(8), eps=float("inf")), ArgumentError, "'eps' is inf"),
    (lambda: rms_norm(rand(2, 8).int(), rand(8)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: rms_norm(rand(2, 8).to("meta"), rand(8).to("meta")), DeviceError, "'x' is on meta"),
    (lambda: rms_norm(rand(2, 8), rand(8).to("meta")), DeviceError, "'weight' is on meta"),
]


@pytest.mark.parametrize("call, error, fragment", NORM_BAD, ids=[f"bad{i}" for i in range(len(NORM_BAD))])
def test_rms_norm_rejects_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


# ---------------------------------------------------------------- silu_and_mul (+ fp8 quant)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_matches_reference(dtype):
    x = rand(3, 4, 2 * 72, dtype=dtype) * 3
    out = silu_and_mul(x)
    assert out.shape == (3, 4, 72) and out.dtype == dtype
    torch.testing.assert_close(out, ref.silu_and_mul(x))
    strided = rand(2 * 72, 5, dtype=dtype).T  # non-contiguous
    torch.testing.assert_close(silu_and_mul(strided), ref.silu_and_mul(strided))
    assert silu_and_mul(torch.empty(0, 8, dtype=dtype)).shape == (0, 4)


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scale", "ue8m0"])
def test_silu_and_mul_fp8_quant_equals_unfused_pair(fmt, ue8m0):
    x = rand(1, 3, 2 * 200, dtype=torch.bfloat16) * 3  # d = 200: a partial 128-block
    x[0, 0, :200] = 0.0  # an all-zero output row: scale 1
    q, scale = silu_and_mul_fp8_quant(x, FP8[fmt], ue8m0)
    # bit-exact against the unfused kernels ...
    q_unfused, scale_unfused = fp8_quantize_blocks(silu_and_mul(x), (1, 128), FP8[fmt], ue8m0)
    assert torch.equal(q.view(torch.uint8), q_unfused.view(torch.uint8))
    assert torch.equal(scale, scale_unfused)
    assert scale.shape == (1, 3, 2) and scale[0, 0].tolist() == [1.0, 1.0]
    # ... and close to the reference ops' pair
    q_ref, scale_ref = ref.quantize_fp8(ref.silu_and_mul(x), (1, 128), fmt, "ue8m0" if ue8m0 else None)
    got = ref.dequantize_fp8(q, scale, (1, 128), torch.float32)
    want = ref.dequantize_fp8(q_ref, scale_ref, (1, 128), torch.float32)
    torch.testing.assert_close(got, want, rtol=0.07, atol=1e-3)
    if fmt == "e4m3fnuz":
        assert not (q.view(torch.uint8) == 0x80).any()


ACT_BAD = [
    (lambda: silu_and_mul(rand(2, 7)), ShapeError, "last dim 7"),
    (lambda: silu_and_mul(rand(2, 8).long()), DTypeError, "'x' has dtype torch.int64"),
    (lambda: silu_and_mul(rand(2, 8).to("meta")), DeviceError, "'x' is on meta"),
    (lambda: silu_and_mul_fp8_quant(rand(2, 8), torch.bfloat16), DTypeError, "'fp8_dtype' is torch.bfloat16"),
    (lambda: silu_and_mul_fp8_quant(rand(2, 8), ue8m0=1), ArgumentError, "'ue8m0' is 1"),
    (lambda: silu_and_mul_fp8_quant(rand(2, 9)), ShapeError, "last dim 9"),
]


@pytest.mark.parametrize("call, error, fragment", ACT_BAD, ids=[f"bad{i}" for i in range(len(ACT_BAD))])
def test_silu_and_mul_rejects_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


# ---------------------------------------------------------------- rotary_embedding
def angles(t: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    theta = rand(t, half, seed=7) * 3
    return theta.cos(), theta.sin()


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rotary_layouts_match_reference(interleaved, dtype):
    cos, sin = angles(5, 8)
    bhtd = rand(2, 3, 5, 16, dtype=dtype)  # [B, H, T, D], cos [T, D/2]
    want = ref.rotary_embedding(bhtd, cos, sin, interleaved)
    torch.testing.assert_close(rotary_embedding(bhtd, cos, sin, interleaved), want)
    thd = rand(3, 5, 16, dtype=dtype).transpose(0, 1)  # [T, H, D], non-contiguous; cos [T, 1, D/2]
    got = rotary_embedding(thd, cos[:, None], sin[:, None], interleaved)
    assert got.is_contiguous() and got.shape == thd.shape
    torch.testing.assert_close(got, ref.rotary_embedding(thd, cos[:, None], sin[:, None], interleaved))
    bthd = rand(2, 5, 3, 16, dtype=dtype)  # [B, T, H, D] with per-batch positions [B, T, 1, D/2]
    cos_b, sin_b = torch.stack([cos, cos.flip(0)])[:, :, None], torch.stack([sin, sin.flip(0)])[:, :, None]
    want = ref.rotary_embedding(bthd, cos_b, sin_b, interleaved)
    torch.testing.assert_close(rotary_embedding(bthd, cos_b, sin_b, interleaved), want)


def test_rotary_conventions_differ_and_preserve_norms():
    cos, sin = angles(4, 4)
    x = rand(4, 8)
    a, b = rotary_embedding(x, cos, sin, True), rotary_embedding(x, cos, sin, False)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a[:, 0::2].square() + a[:, 1::2].square(), x[:, 0::2].square() + x[:, 1::2].square())
    torch.testing.assert_close(b[:, :4].square() + b[:, 4:].square(), x[:, :4].square() + x[:, 4:].square())
    assert rotary_embedding(torch.empty(0, 8), cos[:0], sin[:0]).shape == (0, 8)


ROPE_BAD = [
    (lambda: rotary_embedding(rand(4, 7), *angles(4, 3)), ShapeError, "last dim 7"),
    # x [T, H, D] needs cos [T, 1, D/2]
    (lambda: rotary_embedding(rand(2, 4, 8), *angles(2, 4)), ShapeError, "'cos' has shape [2, 4]"),
    (lambda: rotary_embedding(rand(4, 8), angles(4, 4)[0], angles(4, 5)[1]), ShapeError, "'sin' has shape [4, 5]"),
    (lambda: rotary_embedding(rand(1, 1, 1, 1, 1, 8), *angles(1, 4)), ShapeError, "at most 5 dims"),
    (lambda: rotary_embedding(rand(4, 8), *angles(4, 4), interleaved="yes"), ArgumentError, "'interleaved' is 'yes'"),
    (lambda: rotary_embedding(rand(4, 8, dtype=torch.half).to("meta"), *angles(4, 4)), DeviceError, "is on"),
]


@pytest.mark.parametrize("call, error, fragment", ROPE_BAD, ids=[f"bad{i}" for i in range(len(ROPE_BAD))])
def test_rotary_rejects_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


# ---------------------------------------------------------------- trusted mode
TRUSTED_CALLS = {
    "rms_norm": lambda: rms_norm(rand(3, 5, 96, dtype=torch.bfloat16), rand(96, seed=1), 1e-5),
    "rms_norm-residual": lambda: rms_norm(
        rand(4, 200, dtype=torch.float16), rand(200, dtype=torch.float16, seed=1), residual=rand(4, 200, dtype=torch.float16, seed=2)
    ),
    "silu_and_mul": lambda: silu_and_mul(rand(5, 2, 300, dtype=torch.bfloat16)[:, 1]),
    "silu_and_mul_fp8_quant": lambda: silu_and_mul_fp8_quant(rand(3, 512), torch.float8_e4m3fn, True),
    "silu_and_mul_fp8_quant-fnuz": lambda: silu_and_mul_fp8_quant(rand(2, 300, dtype=torch.bfloat16), torch.float8_e4m3fnuz),
    "rotary-interleaved": lambda: rotary_embedding(rand(2, 4, 3, 16), *angles(3, 8)),
    "rotary-half": lambda: rotary_embedding(
        rand(3, 4, 16, dtype=torch.bfloat16), *(t[:, None] for t in angles(3, 8)), interleaved=False
    ),
}


@pytest.mark.parametrize("call", TRUSTED_CALLS.values(), ids=TRUSTED_CALLS)
def test_trusted_mode_skips_the_wrapper_checks_same_bits(call, kernel_checks):
    """Inside dshal.ops.trusted() the wrappers run none of their input checks (the op's
    checker vouched for the inputs) and compute the same bits as when they check."""
    kernel_checks.trusted_matches_checked(call)
