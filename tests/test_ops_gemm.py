"""fp8_gemm / int8_gemm / linear against independent formulas (numpy, torch._scaled_mm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dshal
from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref

E4 = torch.float8_e4m3fn


def fp8_operand(rows: int, k: int, seed: int, dtype: torch.dtype = E4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * 4).to(dtype)


def expand_scale(scale: torch.Tensor, rows: int, k: int, block_rows: int, block_k: int) -> np.ndarray:
    """Per-element scale in numpy: element (i, j) takes scale[i // block_rows, j // block_k]."""
    s = scale.double().numpy()
    i = np.arange(rows)[:, None] // block_rows
    j = np.arange(k)[None, :] // block_k
    return s[i, j]


@pytest.mark.parametrize("m, n, k", [(5, 200, 300), (1, 128, 128), (0, 64, 256), (3, 7, 130)])
def test_fp8_gemm_block_matches_numpy(m, n, k):
    a, b = fp8_operand(m, k, 0), fp8_operand(n, k, 1)
    g = torch.Generator().manual_seed(2)
    a_scale = torch.rand(m, -(-k // 128), generator=g) + 0.5
    b_scale = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5
    want = (a.double().numpy() * expand_scale(a_scale, m, k, 1, 128)) @ (b.double().numpy() * expand_scale(b_scale, n, k, 128, 128)).T
    got = ref.fp8_gemm(a, a_scale, b, b_scale, torch.float32)
    assert got.shape == (m, n) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-3)
    oracle = SPECS["fp8_gemm"].run_oracle(a, a_scale, b, b_scale)
    assert oracle.dtype == torch.float64
    np.testing.assert_allclose(oracle.numpy(), want, rtol=1e-12, atol=1e-9)
    assert ref.fp8_gemm(a, a_scale, b, b_scale).dtype == torch.bfloat16


def test_fp8_gemm_rowwise_matches_scaled_mm(cpu_rowwise_scaled_mm_refusal):
    if cpu_rowwise_scaled_mm_refusal:
        pytest.skip(cpu_rowwise_scaled_mm_refusal)
    m, n, k = 6, 10, 96
    a, b = fp8_operand(m, k, 3), fp8_operand(n, k, 4)
    sa, sb = torch.rand(m, 1) + 0.5, torch.rand(n, 1) + 0.5
    want = torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb.T.contiguous(), out_dtype=torch.float32)
    torch.testing.assert_close(ref.fp8_gemm(a, sa, b, sb, torch.float32), want, rtol=1e-5, atol=1e-4)


def test_fp8_gemm_tensorwise_matches_scaled_mm():
    a, b = fp8_operand(6, 96, 3), fp8_operand(10, 96, 4)
    ta, tb = torch.tensor(0.75), torch.tensor(1.5)
    want = torch._scaled_mm(a, b.T, scale_a=ta, scale_b=tb, out_dtype=torch.float32)
    torch.testing.assert_close(ref.fp8_gemm(a, ta, b, tb.reshape(1), torch.float32), want, rtol=1e-5, atol=1e-4)


def test_fp8_gemm_mixed_e4m3_e5m2_and_fnuz():
    a, b = fp8_operand(4, 64, 5), fp8_operand(3, 64, 6, torch.float8_e5m2)
    s = torch.tensor(1.0)
    torch.testing.assert_close(ref.fp8_gemm(a, s, b, s, torch.float64), a.double() @ b.double().T)
    a, b = fp8_operand(4, 64, 5, torch.float8_e4m3fnuz), fp8_operand(3, 64, 6, torch.float8_e4m3fnuz)
    torch.testing.assert_close(ref.fp8_gemm(a, s, b, s, torch.float64), a.double() @ b.double().T)


def test_int8_gemm_is_exact():
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-128, 128, (9, 1000), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (5, 1000), generator=g, dtype=torch.int8)
    sa, sb = torch.full((9, 1), 0.5), torch.full((5, 1), 0.25)
    exact = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    got = SPECS["int8_gemm"].run_oracle(a, sa, b, sb)
    assert np.array_equal(got.numpy(), exact * 0.125)
    assert np.array_equal(ref.int8_gemm(a, sa, b, sb, torch.float32).numpy(), (exact * 0.125).astype(np.float32))
    assert ref.int8_gemm(a[:0], sa[:0], b, sb).shape == (0, 5)


@pytest.mark.parametrize("k", [1024, 1025, 1101, 2049, 4096 + 7])
def test_int8_gemm_is_exact_at_the_extremes(k):
    """Odd products (127 x 127, -128 x 127) make odd sums past 2**24 once K > 1040, where float32
    holds only even integers: one float32 matmul over the whole K would be off by one."""
    a = torch.full((3, k), 127, dtype=torch.int8)
    a[1] = -128
    b = torch.full((2, k), 127, dtype=torch.int8)
    b[1, ::2] = -127
    ones = torch.ones(3, 1), torch.ones(2, 1)
    exact = a.to(torch.int64) @ b.to(torch.int64).T  # integer matmul: the truth
    got = SPECS["int8_gemm"].run_oracle(a, ones[0], b, ones[1])
    assert torch.equal(got, exact.to(torch.float64)), (got - exact.to(torch.float64)).abs().max()
    assert got[0, 0].item() == k * 127 * 127


def test_int8_reference_runs_no_float64_matmul():
    """The references serve as fallbacks on the device: an NPU has no float64 matmul (aclnnMm
    takes BF16/FP16/FP32), so the int8 GEMM and W8A8 linear references must not use one."""
    from torch.overrides import TorchFunctionMode

    class RefuseFloat64Matmul(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.nn.functional.linear):
                if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in args):
                    raise AssertionError(f"float64 {func.__name__}")
            return func(*args, **kwargs)

    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (4, 2100), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 2100), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(4, 1, generator=g), torch.rand(6, 1, generator=g)
    want = ref.int8_gemm(a, sa, b, sb, torch.float32)
    with RefuseFloat64Matmul():
        got = ref.int8_gemm(a, sa, b, sb, torch.float32)
        x = torch.randn(4, 2100, generator=g, dtype=torch.bfloat16)
        ref.linear(x, b, weight_scale=sb)  # the W8A8 linear: int8 weight with per-row scales
    assert torch.equal(got, want)


def loop_quant_rows(x: np.ndarray, group: int, qmax: float, dtype: torch.dtype) -> np.ndarray:
    """Dequantized value of x quantized per (1, group) columns, with numpy scales."""
    out = np.empty_like(x)
    for j in range(0, x.shape[1], group):
        blk = x[:, j : j + group]
        amax = np.abs(blk).max(axis=1, keepdims=True)
        s = np.where(amax > 0, (amax / qmax).astype(np.float32), 1.0).astype(np.float64)
        q = torch.from_numpy((blk / s).astype(np.float32)).to(dtype).double().numpy()
        out[:, j : j + group] = q * s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_float_weight_matches_numpy(dtype):
    g = torch.Generator().manual_seed(8)
    x, w, bias = torch.randn(2, 3, 40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x, w, bias = x.to(dtype), w.to(dtype), bias.to(dtype)
    want = x.double().numpy() @ w.double().numpy().T + bias.double().numpy()
    got = ref.linear(x, w, bias)
    assert got.dtype == dtype and got.shape == (2, 3, 24)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("mode", ["block", "row", "tensor"])
def test_linear_fp8_weight_quantizes_x_like_the_weight_scale_says(mode):
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(3, 260, generator=g), torch.randn(140, 260, generator=g)
    bias = torch.randn(140, generator=g)
    block = {"block": (128, 128), "row": (1, -1), "tensor": None}[mode]
    wq, ws = ref.quantize_fp8(w, block)
    w_deq = wq.double().numpy() * (expand_scale(ws, 140, 260, 128, 128) if mode == "block" else ws.double().numpy())
    group = {"block": 128, "row": 260, "tensor": None}[mode]
    xn = x.double().numpy()
    if group is None:
        amax = np.abs(xn).max()
        s = float(np.float32(amax / 448.0))
        x_deq = torch.from_numpy((xn / s).astype(np.float32)).to(E4).double().numpy() * s
    else:
        x_deq = loop_quant_rows(xn, group, 448.0, E4)
    want = x_deq @ w_deq.T + bias.double().numpy()
    got = ref.linear(x, wq, bias, ws)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3)
    # Quantization error stays small against the unquantized product.
    exact = xn @ w.double().numpy().T + bias.double().numpy()
    assert np.abs(got.numpy() - exact).max() < 0.1 * np.abs(exact).max()


def test_linear_int8_weight_is_w8a8():
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(4, 64, generator=g).to(torch.bfloat16), torch.randn(16, 64, generator=g)
    wq, ws = ref.quantize_int8(w)
    xq, xs = ref.quantize_int8(x)
    want = (xq.double() @ wq.double().T) * xs.double() * ws.double().T
    got = ref.linear(x, wq, None, ws)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1e-2)
    assert ref.linear(x[:0], wq, None, ws).shape == (0, 16)


FP8_A = torch.ones(4, 256).to(E4)
FP8_B = torch.ones(8, 256).to(E4)
BAD = [
    (lambda: ref.fp8_gemm(torch.ones(4, 256), torch.ones(4, 2), FP8_B, torch.ones(1, 2)), DTypeError, "'a' has dtype torch.float32"),
    (lambda: ref.fp8_gemm(FP8_A, torch.ones(4, 2), FP8_B[:, :128], torch.ones(1, 1)), ShapeError, "'b' has size 128 in dim 1"),
    (lambda: ref.fp8_gemm(FP8_A, torch.ones(4, 2), FP8_B, torch.ones(8, 1)), ShapeError, "a_scale [4, 2] (block) and b_scale [8, 1] (row)"),
    (lambda: ref.fp8_gemm(FP8_A, torch.ones(4, 2), FP8_B, torch.ones(1, 2, device="meta")), DeviceError, "'b_scale' is on meta"),
    (
        lambda: ref.fp8_gemm(FP8_A, torch.ones(()), FP8_B.to(torch.float8_e4m3fnuz), torch.ones(())),
        DTypeError,
        "mix FP8 families",
    ),
    (lambda: ref.fp8_gemm(FP8_A, torch.ones(()), FP8_B, torch.ones(()), out_dtype=torch.int32), DTypeError, "'out_dtype' is torch.int32"),
    (lambda: ref.int8_gemm(torch.ones(4, 8), torch.ones(4, 1), torch.ones(2, 8, dtype=torch.int8), torch.ones(2, 1)), DTypeError, "'a' has dtype torch.float32"),
    (
        lambda: ref.int8_gemm(torch.ones(4, 8, dtype=torch.int8), torch.ones(4), torch.ones(2, 8, dtype=torch.int8), torch.ones(2, 1)),
        ShapeError,
        "'a_scale' has shape [4], expected [4, 1]",
    ),
    (
        lambda: ref.int8_gemm(torch.ones(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.ones(2, 8, dtype=torch.int8, device="meta"), torch.ones(2, 1)),
        DeviceError,
        "'b' is on meta",
    ),
    (lambda: ref.linear(torch.ones(3, 8, dtype=torch.int32), torch.ones(4, 8)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 9)), ShapeError, "'weight' has size 9 in dim 1"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 8), torch.ones(5)), ShapeError, "'bias' has size 5 in dim 0"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 8, device="meta")), DeviceError, "'weight' is on meta"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 8).to(E4)), DshalError, "needs a 'weight_scale'; got None"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 8).to(E4), None, torch.ones(2, 2)), ShapeError, "'weight_scale' has shape [2, 2]"),
    (lambda: ref.linear(torch.ones(3, 8), torch.ones(4, 8), None, torch.ones(4, 1)), DshalError, "expected None for a float weight"),
    # K = 0: no scale block to hold (int8 was a reshape error deep in torch; rowwise FP8 too).
    (lambda: ref.linear(torch.ones(3, 0), torch.ones(4, 0, dtype=torch.int8), None, torch.ones(4, 1)), ShapeError, "expected K >= 1 for a quantized weight"),
    (lambda: ref.linear(torch.ones(3, 0), torch.ones(4, 0).to(E4), None, torch.ones(4, 1)), ShapeError, "is torch.float8_e4m3fn [4, 0]"),
    (lambda: ref.fp8_gemm(torch.ones(3, 0).to(E4), torch.ones(3, 1), torch.ones(5, 0).to(E4), torch.ones(5, 1)), ShapeError, "expected K >= 1"),
]


def test_gemm_ops_reject_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_gemm_ops_dispatch_on_cpu_backend_and_cost():
    dshal.use(backend="cpu")
    x, w = torch.randn(2, 256), torch.randn(128, 256)
    wq, ws = dshal.ops.quantize_fp8(w, (128, 128))
    y = dshal.ops.linear(x, wq, None, ws)
    assert y.shape == (2, 128)
    xq, xs = dshal.ops.quantize_fp8(x)
    torch.testing.assert_close(dshal.ops.fp8_gemm(xq, xs, wq, ws, torch.float32), y)
    cost = SPECS["fp8_gemm"].cost_of(xq, xs, wq, ws)
    assert cost.flops == 2 * 2 * 128 * 256
    assert cost.bytes == 2 * 256 + 2 * 2 * 4 + 128 * 256 + 1 * 2 * 4 + 2 * 128 * 2
    qi, si = dshal.ops.quantize_int8(w)
    assert dshal.ops.int8_gemm(*dshal.ops.quantize_int8(x), qi, si).shape == (2, 128)
