"""quantize_fp8 / dequantize_fp8 / quantize_int8 against independent loop-based formulas."""

from __future__ import annotations

import math

import pytest
import torch

import dshal
from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref

FORMATS = {"e4m3fn": (torch.float8_e4m3fn, 448.0), "e4m3fnuz": (torch.float8_e4m3fnuz, 240.0), "e5m2": (torch.float8_e5m2, 57344.0)}


def loop_quantize(x: torch.Tensor, bm: int, bk: int, dtype: torch.dtype, qmax: float, pow2: bool = False):
    """Block quantization of a 2-D float tensor, one block at a time in Python floats."""
    m, k = x.shape
    bm, bk = (m if bm == -1 else bm), (k if bk == -1 else bk)
    mb, kb = math.ceil(m / bm), math.ceil(k / bk)
    scale = torch.empty(mb, kb, dtype=torch.float32)
    q = torch.empty(m, k, dtype=dtype)
    for i in range(mb):
        for j in range(kb):
            block = x[i * bm : (i + 1) * bm, j * bk : (j + 1) * bk].double()
            finite = [abs(v) for v in block.flatten().tolist() if math.isfinite(v)]
            amax = max(finite, default=0.0)
            s = float(torch.tensor(amax / qmax, dtype=torch.float32)) if amax > 0 else 1.0
            if pow2:
                s = 2.0 ** math.ceil(math.log2(s))
            scale[i, j] = s
            scaled = torch.tensor([[min(max(v / s, -qmax), qmax) if not math.isnan(v) else v for v in row] for row in block.tolist()])
            q[i * bm : (i + 1) * bm, j * bk : (j + 1) * bk] = scaled.to(torch.float32).to(dtype)
    return q, scale


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(
    "shape, block",
    [((3, 300), (1, 128)), ((130, 200), (128, 128)), ((4, 77), (1, -1)), ((1, 128), (1, 128)), ((0, 256), (1, 128)), ((5, 40), (2, 16))],
)
def test_quantize_fp8_matches_block_loops(fmt, shape, block):
    dtype, qmax = FORMATS[fmt]
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    if x.numel():
        x[0, : min(64, shape[1])] = 0.0  # an all-zero block (or part of one)
    q, scale = ref.quantize_fp8(x, block, fmt)
    want_q, want_scale = loop_quantize(x, *block, dtype, qmax)
    assert q.dtype == dtype and scale.dtype == torch.float32
    assert torch.equal(scale, want_scale)
    assert same_bits(q, want_q)


def test_quantize_fp8_zero_block_scale_is_one_and_tensorwise_is_0dim():
    x = torch.zeros(2, 256)
    x[1, 200] = 448.0 * 4
    q, s = ref.quantize_fp8(x)
    assert s.tolist() == [[1.0, 1.0], [1.0, 4.0]]
    assert q[1, 200].float().item() == 448.0  # the block max lands exactly on the format max
    q, s = ref.quantize_fp8(x, None)
    assert s.dim() == 0 and s.item() == pytest.approx(4.0)
    assert ref.quantize_fp8(torch.zeros(0, 3), None)[1].item() == 1.0


def test_quantize_fp8_1d_is_one_row_and_ue8m0_rounds_up():
    x = torch.linspace(-5, 7, 300)
    q, s = ref.quantize_fp8(x, (1, 128), "e4m3fn", "ue8m0")
    assert s.shape == (3,)
    _, want = loop_quantize(x[None], 1, 128, torch.float8_e4m3fn, 448.0, pow2=True)
    assert torch.equal(s, want[0])
    assert all(math.log2(v) == round(math.log2(v)) for v in s.tolist())
    assert torch.equal(ref.dequantize_fp8(q, s, (1, 128), torch.float64), q.double() * s.repeat_interleave(128)[:300].double())


def test_quantize_fp8_subnormals_and_tiny_blocks():
    x = torch.full((1, 16), 1e-42)  # float32 subnormal: amax / 448 underflows float32
    q, s = ref.quantize_fp8(x, (1, 16), "e4m3fn")
    assert s.item() > 0 and math.isfinite(s.item())
    assert torch.isfinite(q.float()).all()
    # fp8 subnormals survive a round trip: 2**-9 is e4m3fn's smallest subnormal.
    y = torch.tensor([[448.0, 2.0**-9, -(2.0**-9), 0.0]])
    q, s = ref.quantize_fp8(y, (1, -1), "e4m3fn")
    assert s.item() == 1.0 and q.float().tolist() == y.tolist()


def test_quantize_fp8_nonfinite_policy_and_fnuz_no_negative_zero():
    x = torch.tensor([[1.0, float("nan"), float("inf"), -float("inf"), 2.0, -0.0]])
    for fmt, (_, qmax) in FORMATS.items():
        q, s = ref.quantize_fp8(x, (1, -1), fmt)
        assert s.item() == pytest.approx(2.0 / qmax)  # only finite values set the scale
        vals = q.float()[0]
        assert math.isnan(vals[1]) and vals[2] == qmax and vals[3] == -qmax
        assert vals[4] == qmax
    q, _ = ref.quantize_fp8(torch.tensor([-0.0, -1e-9, 1.0]), (1, -1), "e4m3fnuz")
    assert q.view(torch.uint8)[:2].tolist() == [0, 0]  # 0x80 would be fnuz's NaN


def test_quantize_fp8_batched_and_noncontiguous():
    torch.manual_seed(1)
    x = torch.randn(2, 300, 6).transpose(1, 2)  # [2, 6, 300], non-contiguous
    q, s = ref.quantize_fp8(x, (1, 128))
    assert s.shape == (2, 6, 3)
    for b in range(2):
        wq, ws = loop_quantize(x[b].contiguous(), 1, 128, torch.float8_e4m3fn, 448.0)
        assert torch.equal(s[b], ws) and same_bits(q[b].contiguous(), wq)


def test_a_block_longer_than_its_dim_is_one_block_of_that_dim():
    """(1, 10**30) quantizes as (1, -1) does, without padding a row to 10**30 values; the
    same for dequantize (a huge block once crashed torch's pad with an overflow)."""
    x = torch.randn(6, 200)
    for huge, whole in (((1, 10**30), (1, -1)), ((10**30, 10**30), (-1, -1)), ((256, 128), (6, 128))):
        q, scale = ref.quantize_fp8(x, huge, "e4m3fn")
        q_whole, scale_whole = ref.quantize_fp8(x, whole, "e4m3fn")
        assert torch.equal(q.view(torch.uint8), q_whole.view(torch.uint8)) and torch.equal(scale, scale_whole)
        torch.testing.assert_close(ref.dequantize_fp8(q, scale, huge, torch.float32),
                                   ref.dequantize_fp8(q, scale, whole, torch.float32), rtol=0, atol=0)


def test_quantize_fp8_float64_oracle_and_bf16_agree():
    torch.manual_seed(2)
    x = torch.randn(4, 256).to(torch.bfloat16)
    q, s = ref.quantize_fp8(x)
    q64, s64 = SPECS["quantize_fp8"].run_oracle(x)
    assert torch.equal(s, s64) and same_bits(q, q64)


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, -1), None])
def test_dequantize_fp8_matches_elementwise_loop(block):
    torch.manual_seed(3)
    x = torch.randn(130, 140)
    q, s = ref.quantize_fp8(x, block)
    got = ref.dequantize_fp8(q, s, block, torch.float32)
    m_blk, k_blk = (1, 1) if block is None else ((130 if block[0] == -1 else block[0]), (140 if block[1] == -1 else block[1]))
    for i in (0, 1, 127, 128, 129):
        for j in (0, 127, 128, 139):
            sc = s.item() if block is None else s[i // m_blk, j // k_blk].item()
            assert got[i, j].item() == pytest.approx(q[i, j].float().item() * sc, rel=1e-7)
    assert ref.dequantize_fp8(q, s, block).dtype == torch.bfloat16


def test_quantize_int8_matches_numpy_row_formula():
    torch.manual_seed(4)
    x = torch.randn(3, 5, 33)
    x[0, 0] = 0
    q, s = ref.quantize_int8(x)
    xn = x.double().numpy()
    amax = abs(xn).max(axis=-1, keepdims=True)
    want_s = torch.from_numpy(amax / 127).float()
    want_s[0, 0] = 1.0
    import numpy as np

    want_q = np.clip(np.rint(xn / want_s.double().numpy()), -127, 127).astype(np.int8)
    assert s.shape == (3, 5, 1) and torch.equal(s, want_s)
    assert torch.equal(q, torch.from_numpy(want_q))
    q, s = ref.quantize_int8(torch.tensor([float("nan"), float("inf"), 2.0]))
    assert q.tolist() == [0, 127, 127] and s.item() == pytest.approx(2 / 127)


BAD = [
    (lambda: ref.quantize_fp8(torch.ones(4, 8, dtype=torch.int32)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: ref.quantize_fp8(torch.ones(4, 8), (1, 0)), DshalError, "argument 'block' is (1, 0)"),
    (lambda: ref.quantize_fp8(torch.ones(4, 8), fmt="e3m4"), DTypeError, "'fmt' is 'e3m4'"),
    (lambda: ref.quantize_fp8(torch.ones(4, 8), scale_fmt="ue4m3"), DshalError, "'scale_fmt' is 'ue4m3'"),
    (lambda: ref.quantize_fp8(torch.ones(())), ShapeError, "at least 1 dims"),
    (lambda: ref.dequantize_fp8(torch.ones(4, 256), torch.ones(4, 2)), DTypeError, "'q' has dtype torch.float32"),
    (lambda: ref.dequantize_fp8(torch.ones(4, 256).to(torch.float8_e4m3fn), torch.ones(4, 3)), ShapeError, "expected [4, 2]"),
    (
        lambda: ref.dequantize_fp8(torch.ones(4, 256).to(torch.float8_e4m3fn), torch.ones(4, 2, device="meta")),
        DeviceError,
        "'scale' is on meta",
    ),
    (
        lambda: ref.dequantize_fp8(torch.ones(4, 256).to(torch.float8_e4m3fn), torch.ones(4, 2), out_dtype=torch.int8),
        DTypeError,
        "'out_dtype' is torch.int8",
    ),
    (lambda: ref.quantize_int8(torch.ones(4, 8, dtype=torch.int8)), DTypeError, "'x' has dtype torch.int8"),
    (lambda: ref.quantize_int8(torch.ones(())), ShapeError, "'x' must have at least 1 dims"),
    (lambda: ref.quantize_int8([1.0, 2.0]), DTypeError, "must be a torch.Tensor, got list"),
]


def test_quant_ops_reject_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_quant_ops_dispatch_on_cpu_backend():
    dshal.use(backend="cpu")
    x = torch.randn(3, 200)
    q, s = dshal.ops.quantize_fp8(x, (1, 128), "e5m2")
    assert q.dtype == torch.float8_e5m2 and s.shape == (3, 2)
    assert torch.allclose(dshal.ops.dequantize_fp8(q, s, (1, 128), torch.float32), x, rtol=0.13, atol=1e-6)
    qi, si = dshal.ops.quantize_int8(x)
    assert torch.allclose(qi.float() * si, x, atol=si.max().item() / 2 + 1e-7)
    with pytest.raises(DeviceError, match="expected a 'cpu' tensor"):
        dshal.ops.quantize_int8(torch.ones(2, 3, device="meta"))


# ---------------------------------------------------------------- host FP8 -> int8 in slabs
def _int8_by_references(q, scale):
    return ref.quantize_int8(ref.dequantize_fp8(q, scale, (128, 128), torch.float32))


def _fp8_weight(shape, fmt="e4m3", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = ref.quantize_fp8(torch.randn(*shape, generator=g) / 16, (128, 128), fmt, None)
    return q, scale * torch.rand(scale.shape, generator=g) * 4  # the blocks' scales differ widely


@pytest.mark.parametrize(
    "shape",
    [
        (256, 384),  # whole blocks
        (576, 7168),  # kv_a_proj_with_mqa: N is 4.5 row blocks
        (200, 300),  # partial row and column blocks
        (130, 100),  # K under one block
        (1, 128),
        (3, 130, 260),  # stacked experts [E, N, K]
    ],
)
@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fnuz"])
def test_fp8_block_to_int8_rows_is_the_references_bit_for_bit(shape, fmt):
    from dshal.ops.quant import fp8_block_to_int8_rows

    q, scale = _fp8_weight(shape, fmt)
    got_q, got_s = fp8_block_to_int8_rows(q, scale)
    want_q, want_s = _int8_by_references(q, scale)
    assert got_q.dtype == torch.int8 and got_s.dtype == torch.float32 and got_s.shape == (*shape[:-1], 1)
    assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)


def test_fp8_block_to_int8_rows_edge_rows_follow_the_references():
    from dshal.ops.quant import fp8_block_to_int8_rows

    q, scale = _fp8_weight((384, 256))
    bits = q.view(torch.uint8)
    bits[5] = 0  # an all-zero row: scale 1
    bits[130, 7] = 0x7F  # NaN (e4m3fn) in the second slab: the references' rule (NaN -> 0, not in the amax)
    bits[131, :] = 0x01  # subnormals only
    scale[2, 1] = 1e-30  # a block whose values underflow float32's normal range
    got_q, got_s = fp8_block_to_int8_rows(q, scale)
    want_q, want_s = _int8_by_references(q, scale)
    assert torch.equal(got_q, want_q) and torch.equal(got_s, want_s)
    assert got_s[5].item() == 1.0 and got_q[130, 7].item() == 0
    # float64 scales: the references compute in float64, and so does the helper
    got64 = fp8_block_to_int8_rows(q, scale.double())
    want64 = _int8_by_references(q, scale.double())
    assert torch.equal(got64[0], want64[0]) and torch.equal(got64[1], want64[1])


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        ((torch.zeros(128, 128), torch.ones(1, 1)), DTypeError, "argument 'q' has dtype torch.float32"),
        ((torch.zeros(128, dtype=torch.float8_e4m3fn), torch.ones(1)), ShapeError, "argument 'q' must have at least 2"),
        ((torch.zeros(256, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1)), ShapeError, "argument 'scale' has shape [1, 1], expected [2, 1]"),
        ((torch.zeros(128, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.bfloat16)), DTypeError, "argument 'scale' has dtype torch.bfloat16"),
        ((torch.zeros(128, 128, dtype=torch.float8_e4m3fn, device="meta"), torch.ones(1, 1)), DeviceError, "argument 'q' is on meta, expected cpu"),
    ],
)
def test_fp8_block_to_int8_rows_rejects_bad_input(args, error, words):
    from dshal.ops.quant import fp8_block_to_int8_rows

    with pytest.raises(error) as caught:
        fp8_block_to_int8_rows(*args)
    assert words in str(caught.value)
