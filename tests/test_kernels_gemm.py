"""Block-scaled FP8 GEMM kernel (Triton interpreter, CPU tensors) against the reference op."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest
from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError, UnsupportedOpError  # noqa: E402
from dshal.kernels.triton.gemm import fp8_block_gemm  # noqa: E402
from dshal.kernels.triton.target import KernelTarget, TileConfig, shipped_target  # noqa: E402
from dshal.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

FORMATS = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
#: The interpreter target emulating each E4M3 flavour's hardware: its dots take that FP8 dtype.
NATIVE = {name: KernelTarget.interpreter(dtype) for name, dtype in FORMATS.items()}


def operands(m: int, n: int, k: int, fmt: str, ue8m0: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    a, b = torch.randn(m, k), torch.randn(n, k) * 0.1
    scale_fmt = "ue8m0" if ue8m0 else None
    qa, sa = ref.quantize_fp8(a, (1, 128), fmt, scale_fmt)
    qb, sb = ref.quantize_fp8(b, (128, 128), fmt, scale_fmt)
    return qa, sa, qb, sb


def assert_matches_reference(out, qa, sa, qb, sb, out_dtype):
    want = ref.fp8_gemm(qa, sa, qb, sb, torch.float32)
    assert out.dtype == out_dtype and out.shape == want.shape and out.is_contiguous()
    if out_dtype == torch.float32:  # same products, another summation order
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * max(1, qa.shape[1] // 128))
    else:
        torch.testing.assert_close(out, want.to(out_dtype))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 64, 256), (33, 70, 200), (64, 130, 384)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dot", ["fp8-dot", "widened"])
def test_block_gemm_matches_reference(fmt, shape, dot):
    qa, sa, qb, sb = operands(*shape, fmt)
    # "widened": a target whose dots do not take this FP8 dtype (e.g. e4m3fn on gfx942)
    target = NATIVE[fmt] if dot == "fp8-dot" else NATIVE["e4m3fnuz" if fmt == "e4m3fn" else "e4m3fn"]
    assert target.dot_takes(FORMATS[fmt]) == (dot == "fp8-dot")
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32, target=target)
    assert_matches_reference(out, qa, sa, qb, sb, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_block_gemm_low_precision_outputs_and_ue8m0_scales(out_dtype):
    qa, sa, qb, sb = operands(17, 40, 256, "e4m3fn", ue8m0=True)
    out = fp8_block_gemm(qa, sa, qb, sb, out_dtype)
    assert_matches_reference(out, qa, sa, qb, sb, out_dtype)


def test_block_gemm_empty_and_degenerate_shapes():
    qa, sa, qb, sb = operands(0, 16, 128, "e4m3fn")
    out = fp8_block_gemm(qa, sa, qb, sb)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
    qa, sa, qb, sb = operands(3, 0, 128, "e4m3fn")
    assert fp8_block_gemm(qa, sa, qb, sb).shape == (3, 0)
    qa, sa, qb, sb = operands(3, 5, 0, "e4m3fn")
    assert torch.equal(fp8_block_gemm(qa, sa, qb, sb, torch.float32), torch.zeros(3, 5))


def test_block_gemm_non_contiguous_operands_and_scales():
    qa, sa, qb, sb = operands(20, 36, 256, "e4m3fn")
    a_cols = qa.T.contiguous().T  # column-major a, as DeepGEMM keeps its scales
    sa_cols = sa.T.contiguous().T
    b_strided = torch.stack([qb.view(torch.uint8)] * 2, dim=-1).view(qb.dtype)[..., 0]  # column stride 2
    assert not a_cols.is_contiguous() and not sa_cols.is_contiguous() and not b_strided.is_contiguous()
    out = fp8_block_gemm(a_cols, sa_cols, b_strided, sb, torch.float32)
    assert_matches_reference(out, qa, sa, qb, sb, torch.float32)


def test_block_gemm_mixed_ocp_formats_widen():
    qa, sa, _, _ = operands(9, 24, 128, "e4m3fn")
    _, _, qb, sb = operands(9, 24, 128, "e5m2", seed=1)
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32)
    assert_matches_reference(out, qa, sa, qb, sb, torch.float32)


@pytest.mark.parametrize("target", [shipped_target("nvidia-sm90"), shipped_target("amd-gfx942")], ids=lambda t: t.name)
def test_block_gemm_hardware_target_first_tile_under_interpreter(target):
    # The interpreter cannot time autotune configs: the target's first (largest) tile runs.
    fmt = "e4m3fnuz" if target.fp8_e4m3 == torch.float8_e4m3fnuz else "e4m3fn"
    qa, sa, qb, sb = operands(5, 20, 128, fmt)
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32, target=target)
    assert_matches_reference(out, qa, sa, qb, sb, torch.float32)


@pytest.mark.parametrize("tile", [TileConfig(16, 32), TileConfig(16, 128), TileConfig(16, 256)], ids=lambda t: f"N{t.block_n}")
def test_block_gemm_weight_scales_per_column_block_whatever_the_tile_width(tile):
    """Tiles up to 128 columns wide read one weight scale per K step (all their stored columns
    share a 128-column scale block); wider ones one per column. N = 300 ends mid-block and
    mid-tile, and the weight's three column blocks get scales 1, 8 and 1/4: a tile reading its
    neighbour's scale is off by 8x."""
    qa, sa, qb, sb = operands(5, 300, 256, "e4m3fn")
    sb = sb * torch.tensor([1.0, 8.0, 0.25])[:, None]
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32, target=NATIVE["e4m3fn"], tile=tile)
    assert_matches_reference(out, qa, sa, qb, sb, torch.float32)


def test_block_gemm_fnuz_on_an_ocp_only_target_is_unsupported():
    qa, sa, qb, sb = operands(4, 8, 128, "e4m3fnuz")
    with pytest.raises(UnsupportedOpError, match="'a' is torch.float8_e4m3fnuz, which Triton cannot handle on target"):
        fp8_block_gemm(qa, sa, qb, sb, target=shipped_target("nvidia-sm90"))


def test_block_gemm_close_to_unquantized_product():
    torch.manual_seed(3)
    a, b = torch.randn(16, 384), torch.randn(48, 384)
    qa, sa = ref.quantize_fp8(a, (1, 128), "e4m3fnuz")
    qb, sb = ref.quantize_fp8(b, (128, 128), "e4m3fnuz")
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32, target=NATIVE["e4m3fnuz"]).double()
    exact = a.double() @ b.double().T
    similarity = 1 - 2 * (out * exact).sum() / (out.square() + exact.square()).sum()  # DeepGEMM's check
    assert similarity < 1e-3


def _ok():
    return operands(4, 8, 256, "e4m3fn")


BAD = [
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa.float(), sa, qb, sb), DTypeError, "'a' has dtype torch.float32"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb[:, :128], sb), ShapeError, "'b' has size 128 in dim 1"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa[:, :1], qb, sb), ShapeError, "'a_scale' has size 1 in dim 1"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb, sb.double()), DTypeError, "'b_scale' has dtype torch.float64"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb, torch.ones(2, 2)), ShapeError, "ceil(N/128)"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb, sb, torch.int32), DTypeError, "'out_dtype' is torch.int32"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa[0], sa, qb, sb), ShapeError, "'a' must be 2-D"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb.to("meta"), sb), DeviceError, "'b' is on meta"),
    (lambda *ops: fp8_block_gemm(*(t.to("meta") for t in ops)), DeviceError, "'a' is on meta"),
    (lambda qa, sa, qb, sb: fp8_block_gemm(qa, sa, qb, sb, target=3), ArgumentError, "'target' is a int"),
]


@pytest.mark.parametrize("call, error, fragment", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_block_gemm_rejects_bad_inputs(call, error, fragment):
    with pytest.raises(error) as info:
        call(*_ok())
    assert fragment in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_gemm_does_not_overflow_where_the_result_does_not(fmt):
    """The scales multiplied into the dot left to right (``dot * a_s * b_s``) overflowed
    float32 once ``dot * a_s`` did (an activation block near bf16's max gives a_s ~ 1e36),
    although the result, with a small weight scale, is finite."""
    qa, sa, qb, sb = operands(4, 128, 256, fmt, seed=3)
    sa, sb = sa * 1e37, sb * 1e-9  # dot * a_s ~ 1e39: past float32
    want = ref.fp8_gemm(qa, sa, qb, sb, torch.float32)
    assert torch.isfinite(want).all() and want.abs().max() > 1e25
    out = fp8_block_gemm(qa, sa, qb, sb, torch.float32, target=NATIVE[fmt])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5 * float(want.abs().max()))  # summation order


@pytest.mark.parametrize("fmt, dot, out_dtype", [
    ("e4m3fn", "e4m3fn", torch.bfloat16), ("e4m3fnuz", "e4m3fnuz", torch.float32), ("e4m3fnuz", "e4m3fn", torch.float16),
], ids=["e4m3fn", "e4m3fnuz", "widened"])
def test_trusted_mode_skips_the_wrapper_checks_same_bits(fmt, dot, out_dtype, kernel_checks):
    """Inside dshal.ops.trusted() the wrapper runs none of its input checks (the op's
    checker vouched for the inputs) and computes the same bits as when it checks."""
    qa, sa, qb, sb = operands(33, 70, 200, fmt)
    kernel_checks.trusted_matches_checked(lambda: fp8_block_gemm(qa, sa, qb, sb, out_dtype, target=NATIVE[dot]))
