"""FP8 block quantization kernel (Triton interpreter, CPU tensors) against the reference op."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest
from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError  # noqa: E402
from dshal.kernels.triton.quant import fp8_quantize_blocks  # noqa: E402
from dshal.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def awkward_input(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random data with an all-zero block, tiny values (FP8 subnormals), -0.0 and a spike."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    x[..., :4, :] = 0.0  # rows with all-zero (1x128) blocks, part of a 128x128 block
    x[..., 5, :40] *= 1e-4
    x[..., 6, 1] = -0.0
    x[..., 7, 2] = -1e-9  # rounds to zero: -0 in e4m3fn, +0 in fnuz
    x[..., 8, 3] = 1000.0
    return x.to(dtype)


def assert_same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    mismatched = (got.view(torch.uint8) != want.view(torch.uint8)).sum().item()
    assert mismatched == 0, f"{mismatched} FP8 codes differ from the reference"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scale", "ue8m0"])
def test_quantize_blocks_bit_exact_vs_reference(fmt, block, ue8m0):
    x = awkward_input((2, 130, 200))  # partial blocks in both dims
    q, scale = fp8_quantize_blocks(x, block, FORMATS[fmt], ue8m0)
    q_ref, scale_ref = ref.quantize_fp8(x, block, fmt, "ue8m0" if ue8m0 else None)
    assert_same_fp8(q, q_ref)
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    if ue8m0:
        mantissa, _ = torch.frexp(scale)
        assert (mantissa == 0.5).all(), "ue8m0 scales must be powers of two"
    else:  # scale = amax / fmt_max, exactly
        fmt_max = torch.finfo(FORMATS[fmt]).max
        assert (q.float().abs().amax() == fmt_max).item()


def test_fnuz_has_no_negative_zero_and_max_240():
    x = awkward_input((130, 128), torch.float32)
    x[10, :64] = -1e-30  # far below the block's scale: rounds to zero
    q, _ = fp8_quantize_blocks(x, (128, 128), torch.float8_e4m3fnuz)
    codes = q.view(torch.uint8)
    assert not (codes == 0x80).any(), "0x80 is NaN in e4m3fnuz, never a negative zero"
    assert q.float().abs().max().item() == 240.0
    q_fn, _ = fp8_quantize_blocks(x, (128, 128), torch.float8_e4m3fn)
    assert (q_fn.view(torch.uint8) == 0x80).any(), "e4m3fn keeps the sign of values that round to zero"
    assert q_fn.float().abs().max().item() == 448.0


def test_quantize_float32_and_float16_inputs():
    for dtype in (torch.float32, torch.float16):
        x = awkward_input((12, 256), dtype)
        q, scale = fp8_quantize_blocks(x, (1, 128), torch.float8_e4m3fn)
        q_ref, scale_ref = ref.quantize_fp8(x, (1, 128), "e4m3fn")
        assert_same_fp8(q, q_ref)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)


def test_quantize_small_and_empty_shapes():
    for shape in [(1, 128), (1, 5), (0, 128), (3, 0), (128,)]:
        x = torch.randn(shape)
        q, scale = fp8_quantize_blocks(x, (1, 128), torch.float8_e4m3fn)
        q_ref, scale_ref = ref.quantize_fp8(x, (1, 128), "e4m3fn")
        assert_same_fp8(q, q_ref)
        assert scale.shape == scale_ref.shape, shape
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    q, scale = fp8_quantize_blocks(torch.randn(0, 256), (128, 128), torch.float8_e4m3fnuz)
    assert q.shape == (0, 256) and scale.shape == (0, 2)


def test_quantize_non_contiguous_input():
    base = awkward_input((200, 130))
    x = base.T  # [130, 200], stride (1, 130)
    assert not x.is_contiguous()
    for block in [(1, 128), (128, 128)]:
        q, scale = fp8_quantize_blocks(x, block, torch.float8_e4m3fn)
        q_ref, scale_ref = ref.quantize_fp8(x.contiguous(), block, "e4m3fn")
        assert_same_fp8(q, q_ref)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    experts = awkward_input((3, 130, 256))[:, :, ::2]  # a batch of weights, strided columns
    q, scale = fp8_quantize_blocks(experts, (128, 128), torch.float8_e4m3fnuz)
    q_ref, scale_ref = ref.quantize_fp8(experts.contiguous(), (128, 128), "e4m3fnuz")
    assert_same_fp8(q, q_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)


def test_quantize_non_finite_values_follow_the_reference():
    x = torch.randn(4, 256)
    x[0, 3] = float("nan")
    x[1, 130] = float("inf")
    x[2, 7] = -float("inf")
    for fmt, dtype in FORMATS.items():
        q, scale = fp8_quantize_blocks(x, (1, 128), dtype)
        q_ref, scale_ref = ref.quantize_fp8(x, (1, 128), fmt)
        torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)  # amax from finite values only
        assert q.float().isnan()[0, 3] and q_ref.float().isnan()[0, 3]
        assert q.float()[1, 130] == torch.finfo(dtype).max and q.float()[2, 7] == -torch.finfo(dtype).max
        finite = ~q_ref.float().isnan()
        assert torch.equal(q.view(torch.uint8)[finite], q_ref.view(torch.uint8)[finite])


BAD = [
    (lambda: fp8_quantize_blocks(torch.ones(4, 128), (3, 128)), ShapeError, "'block' is (3, 128)"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128), (1, 100)), ShapeError, "bk a power of two"),
    (lambda: fp8_quantize_blocks(torch.ones(128), (128, 128)), ShapeError, "at least 2-D"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128), (1, 128), torch.half), DTypeError, "'fp8_dtype' is torch.float16"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128, dtype=torch.int32)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128), ue8m0="yes"), ArgumentError, "'ue8m0' is 'yes'"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128, device="meta")), DeviceError, "'x' is on meta"),
    (lambda: fp8_quantize_blocks(torch.ones(4, 128), target="hopper"), ArgumentError, "'target' is a str"),
]


@pytest.mark.parametrize("call, error, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_quantize_rejects_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_the_triton_interpreter_still_decodes_fp8_nan_as_a_number() -> None:
    """Why the emulated backends may drop a NaN in an FP8 operand: the Triton interpreter
    decodes E4M3's NaN codes (0x7f, 0xff) as +-480, so a GEMM over them stays finite, where
    the GPU's conversion keeps NaN. When this test fails, the interpreter keeps NaN: drop the
    exemption in ``dshal_conformance.cases.spoiled`` and add a NaN row to ``fp8_gemm``'s examples."""
    import triton  # lazy: the module-level importorskip above decides whether triton is there
    import triton.language as tl

    @triton.jit
    def upcast(x_ptr, y_ptr):
        offsets = tl.arange(0, 4)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.float32))

    codes = torch.tensor([0x7F, 0xFF, 0x38, 0x00], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = torch.empty(4)
    upcast[(1,)](codes, out)
    assert codes.float()[:2].isnan().all()  # torch: NaN
    assert out.tolist() == [480.0, -480.0, 1.0, 0.0]


@pytest.mark.parametrize("block, fmt, ue8m0", [((1, 128), "e4m3fn", False), ((128, 128), "e4m3fnuz", True)])
def test_trusted_mode_skips_the_wrapper_checks_same_bits(block, fmt, ue8m0, kernel_checks):
    """Inside dshal.ops.trusted() the wrapper runs none of its input checks (the op's
    checker vouched for the inputs) and computes the same bits as when it checks."""
    x = awkward_input((2, 130, 200))
    kernel_checks.trusted_matches_checked(lambda: fp8_quantize_blocks(x, block, FORMATS[fmt], ue8m0))
