"""dshal's C kernels for the cpu backend (``dshal.kernels.cpu``): each checked wrapper
against the op reference, their input errors, and how the library is built, cached and
turned off. The kernels are compiled on this machine by the first test that needs them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dshal.cache import not_private
from dshal.errors import BackendUnavailableError, DeviceError, DTypeError, ShapeError
from dshal.kernels import cpu as K
from dshal.kernels.cpu import _library
from dshal.ops.catalogue import SPECS

needs_kernels = pytest.mark.skipif(
    not K.status().available, reason=f"dshal cpu C kernels unavailable here: {K.status().detail}"
)
GEN = torch.Generator().manual_seed(5)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-6) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.numel():
        err = (got.double() - want.double()).abs().max().item()
        assert err <= rel * max(want.abs().max().item(), 1.0), err


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (256, 256), (100, 200), (3, 4096)], ids=str)
@pytest.mark.parametrize("lead", [(1,), (1, 1), (1, 1, 1), (3,), (2, 4)], ids=str)
def test_gemv_matches_linear(n, k, lead):
    x, w, b = _randn(*lead, k), _randn(n, k) / k**0.5, _randn(n)
    _assert_close(K.gemv(x, w), torch.nn.functional.linear(x, w))
    _assert_close(K.gemv(x, w, b), torch.nn.functional.linear(x, w, b))
    assert K.gemv(x, w).shape == (*lead, n)


@needs_kernels
def test_gemv_strided_inputs_and_nan():
    x2, w, b2 = _randn(1, 64), _randn(8, 32), _randn(16)
    x, b = x2[:, ::2], b2[::2]  # strided views: copied by the wrapper
    _assert_close(K.gemv(x, w, b), torch.nn.functional.linear(x, w, b))
    x = x.clone()
    x[0, 3] = float("nan")
    assert torch.isnan(K.gemv(x, w)).all()
    w = w.clone()
    w[2, 0] = float("inf")
    out = K.gemv(_randn(1, 32).abs(), w)
    assert out[0, 2] == float("inf") and torch.isfinite(out[0, :2]).all()


@needs_kernels
def test_gemv_rejects_bad_inputs():
    w = _randn(8, 16)
    with pytest.raises(DTypeError, match="argument 'x' has dtype torch.float64, expected one of float32"):
        K.gemv(_randn(1, 16).double(), w)
    with pytest.raises(ShapeError, match="argument 'x' has shape \\[2, 15\\], expected \\[..., K=16\\]"):
        K.gemv(_randn(2, 15), w)
    with pytest.raises(ShapeError, match="argument 'weight' has strides"):
        K.gemv(_randn(1, 8), w.t())
    with pytest.raises(ShapeError, match="argument 'bias' has shape \\[7\\], expected \\[8\\]"):
        K.gemv(_randn(1, 16), w, _randn(7))
    with pytest.raises(DeviceError, match="argument 'weight' is on meta, expected cpu"):
        K.gemv(_randn(1, 16), torch.empty(8, 16, device="meta"))


def _moe_inputs(tokens: int, experts: int = 8, hidden: int = 40, inter: int = 24, k: int = 3):
    x = _randn(tokens, hidden)
    w13, w2 = _randn(experts, 2 * inter, hidden) / hidden**0.5, _randn(experts, hidden, inter) / inter**0.5
    ids = (
        torch.stack([torch.randperm(experts, generator=GEN)[:k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    return x, torch.rand(tokens, k, generator=GEN), ids, w13, w2


@needs_kernels
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
def test_moe_tokens_matches_the_reference(id_dtype):
    x, weights, ids, w13, w2 = _moe_inputs(1)
    want = SPECS["moe_experts"].reference_impl(x, weights, ids, w13, w2)
    _assert_close(K.moe_tokens(x, weights, ids.to(id_dtype), w13, w2), want)
    _assert_close(K.moe_tokens(x, weights.double(), ids, w13, w2), want)  # weights read as float32
    x, weights, ids, w13, w2 = _moe_inputs(5)
    ids[:, 0] = 3  # an expert every token shares: its weights serve them all in one pass
    _assert_close(K.moe_tokens(x, weights, ids.to(id_dtype), w13, w2), SPECS["moe_experts"].reference_impl(x, weights, ids, w13, w2))
    with pytest.raises(ShapeError, match="holds expert id 8 \\(slot 4\\), expected ids in \\[0, 8\\)"):
        K.moe_tokens(x[:2], weights[:2], torch.tensor([[0, 2, 1], [5, 8, 1]]), w13, w2)
    with pytest.raises(ShapeError, match="'w13' \\[8, 48, 40\\] and 'w2' \\[8, 40, 23\\] do not match"):
        K.moe_tokens(x, weights, ids, w13, w2[..., :23].contiguous())
    with pytest.raises(ShapeError, match="argument 'x' has shape \\[2, 40\\], expected \\[5, 40\\] \\(a row per row of 'ids'\\)"):
        K.moe_tokens(_randn(2, 40), weights, ids, w13, w2)
    with pytest.raises(ShapeError, match="argument 'ids' is torch.int64 \\[0, 3\\] on cpu, expected int64/int32 \\[T, k\\] with T >= 1"):
        K.moe_tokens(_randn(0, 40), weights[:0], ids[:0], w13, w2)


@needs_kernels
def test_gemv_and_fp8_block_gemm_give_each_row_its_own_result_bit_for_bit():
    """The few-row GEMMs a decode step runs (float32 GEMV up to 8 rows, FP8 blocks up to 32):
    a row's output is the same bits alone as among others (the FP8 kernel takes another loop
    for one row than for several: the same sums in the same order)."""
    x, w = _randn(8, 300), _randn(130, 300)
    together = K.gemv(x, w)
    assert all(torch.equal(together[i : i + 1], K.gemv(x[i : i + 1].clone(), w)) for i in range(8))
    wq, scale = SPECS["quantize_fp8"].reference_impl(w, (128, 128), "e4m3", None)
    x = _randn(32, 300)
    together = K.fp8_block_gemm(x, wq, scale)
    assert all(torch.equal(together[i : i + 1], K.fp8_block_gemm(x[i : i + 1].clone(), wq, scale)) for i in (0, 7, 31))


@needs_kernels
def test_moe_tokens_gives_each_token_its_own_result_bit_for_bit():
    """A token's output is the same bits in any batch: alone, or among others that share its
    experts (as a decode step of several rows runs it). Float32 and FP8 block-scaled experts."""
    x, weights, ids, w13, w2 = _moe_inputs(8)
    ids[::2, 1] = 6  # shared experts: their weight rows serve several tokens in one pass
    quantize = SPECS["quantize_fp8"].reference_impl
    q13, s13 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), "e4m3", None) for w in w13)))
    q2, s2 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), "e4m3", None) for w in w2)))
    for run in (lambda *a: K.moe_tokens(*a, w13, w2), lambda *a: K.moe_tokens_fp8(*a, q13, q2, s13, s2),
                lambda x, *a: K.moe_tokens_fp8(x.bfloat16(), *a, q13, q2, s13, s2)):
        together = run(x, weights, ids)
        for t in range(8):
            assert torch.equal(together[t : t + 1], run(x[t : t + 1].clone(), weights[t : t + 1], ids[t : t + 1])), t
        assert torch.equal(together[2:5], run(x[2:5].clone(), weights[2:5], ids[2:5]))


@needs_kernels
@pytest.mark.parametrize("tokens", [2, 17, 64], ids=str)
def test_moe_group_and_combine_match_the_reference(tokens):
    x, weights, ids, w13, w2 = _moe_inputs(tokens)
    xs, order, ends = K.moe_group(x, ids, 8)
    flat = ids.reshape(-1)
    assert torch.equal(order, torch.argsort(flat, stable=True))  # stable, by expert
    assert torch.equal(ends, torch.bincount(flat, minlength=8).cumsum(0).to(torch.int32))
    assert torch.equal(xs, x[order // ids.shape[1]])
    y = torch.stack([w2[e] @ SPECS["silu_and_mul"].reference_impl(w13[e] @ row) for e, row in zip(flat[order], xs)])
    _assert_close(K.moe_combine(y, order, weights), SPECS["moe_experts"].reference_impl(x, weights, ids, w13, w2), 1e-5)
    bad = ids.clone()
    bad[0, 0] = -1  # (ids - 1 held no -1 when no token chose expert 0: a draw-dependent pass)
    with pytest.raises(ShapeError, match="holds expert id -1"):
        K.moe_group(x, bad, 8)
    with pytest.raises(ShapeError, match="do not match 'weights'"):
        K.moe_combine(y[1:], order[1:], weights)


@needs_kernels
@pytest.mark.parametrize(
    "tokens,experts,top_k,n_group,topk_group,norm,bias",
    [(1, 16, 4, 4, 2, True, True), (33, 256, 8, 8, 4, True, True), (16, 64, 6, 1, 1, True, False),
     (16, 64, 4, 4, 2, False, True), (5, 12, 3, 12, 5, True, True), (4, 8, 8, 2, 2, True, True)],
    ids=str,
)  # fmt: skip
def test_moe_gate_matches_the_reference(tokens, experts, top_k, n_group, topk_group, norm, bias):
    logits = _randn(tokens, experts) * 2
    b = _randn(experts) * 0.5 if bias else None
    weights, ids = K.moe_gate(logits, b, top_k, n_group, topk_group, 2.5, norm)
    want_w, want_ids = SPECS["moe_gate"].reference_impl(logits, b, top_k, n_group, topk_group, 2.5, norm)
    assert ids.dtype == torch.int64 and torch.equal(ids, want_ids)  # random scores: no ties
    _assert_close(weights, want_w)


@needs_kernels
def test_moe_gate_declines_non_finite_scores_and_checks_counts():
    logits = _randn(3, 16)
    logits[1, 4] = float("nan")
    assert K.moe_gate(logits, None, 2, 4, 2, 1.0) is None  # the provider then takes the reference
    assert K.moe_gate(_randn(3, 16), torch.full((16,), float("inf")), 2, 4, 2, 1.0) is None
    with pytest.raises(ShapeError, match="n_group=3"):
        K.moe_gate(_randn(3, 16), None, 2, 3, 2, 1.0)
    with pytest.raises(ShapeError, match="top_k=9"):
        K.moe_gate(_randn(3, 16), None, 9, 4, 2, 1.0)


@needs_kernels
def test_rms_norm_matches_the_reference():
    ref = SPECS["rms_norm"].reference_impl
    x, res, w = _randn(2, 5, 96), _randn(2, 5, 96), torch.rand(96, generator=GEN)
    _assert_close(K.rms_norm(x, w, 1e-6), ref(x, w, 1e-6))
    y, total = K.rms_norm(x, w, 1e-5, res)
    want_y, want_total = ref(x, w, 1e-5, res)
    _assert_close(y, want_y)
    assert torch.equal(total, want_total)
    _assert_close(K.rms_norm(x.transpose(0, 1), w, 1e-6), ref(x.transpose(0, 1), w, 1e-6))
    with pytest.raises(ShapeError, match="argument 'residual' has shape \\[2, 5\\]"):
        K.rms_norm(x, w, 1e-6, res[..., 0])
    with pytest.raises(ShapeError, match="argument 'weight' has shape \\[95\\]"):
        K.rms_norm(x, w[:95], 1e-6)


@needs_kernels
def test_rotary_layouts():
    ref = SPECS["rotary_embedding"].reference_impl
    q = _randn(2, 7, 4, 24)[..., 8:]  # MLA's q_pe: a slice of the head dim, [B, T, H, rope]
    k = _randn(2, 7, 20)[..., 4:]  # the shared rope key, [B, T, rope]
    cos, sin = _randn(7, 8), _randn(7, 8)
    for interleaved in (True, False):
        _assert_close(
            K.rotary(q, cos[:, None], sin[:, None], interleaved), ref(q, cos[:, None], sin[:, None], interleaved)
        )
        _assert_close(K.rotary(k, cos, sin, interleaved), ref(k, cos, sin, interleaved))
        heads_first = q.transpose(1, 2)  # [B, H, T, rope]: leading dims do not collapse (copied)
        _assert_close(K.rotary(heads_first, cos, sin, interleaved), ref(heads_first, cos, sin, interleaved))
        per_batch = _randn(2, 1, 8), _randn(2, 1, 8)
        _assert_close(K.rotary(k, *per_batch, interleaved), ref(k, *per_batch, interleaved))
    # Layouts the kernel does not index: the caller falls back.
    assert K.rotary(k, cos[:, :1], sin[:, :1]) is None
    assert K.rotary(_randn(2, 3, 4, 16), _randn(2, 1, 4, 8), _randn(2, 1, 4, 8)) is None
    assert K.rotary(k, cos[0, 0].clone(), sin[0, 0].clone()) is None  # 0-d tables (one angle): the op allows them
    with pytest.raises(ShapeError, match="D even"):
        K.rotary(_randn(3, 15), _randn(3, 7), _randn(3, 7))


FP8 = {"e4m3": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


def _fp8_weight(n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return SPECS["quantize_fp8"].reference_impl(_randn(n, k) / k**0.5, (128, 128), fmt, None)


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("n,k", [(256, 256), (200, 300), (7, 33), (130, 129)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp8_block_gemm_matches_the_linear_reference(fmt, n, k, dtype):
    w, scale = _fp8_weight(n, k, fmt)
    assert w.dtype == FP8[fmt]
    for lead in [(1, 1), (3,), (2, 4)]:  # one row (a decode step) or a small batch
        x, bias = (_randn(*lead, k) * 3).to(dtype), _randn(n).to(dtype)
        want = SPECS["linear"].reference_impl(x, w, bias, scale)
        got = K.fp8_block_gemm(x, w, scale, bias)
        assert got.dtype == torch.float32 and got.shape == want.shape
        _assert_close(got.to(dtype), want, 2e-6 if dtype == torch.float32 else 1e-2)


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
def test_fp8_block_gemm_decodes_every_code_and_quantizes_like_the_op(fmt):
    codes = torch.arange(256, dtype=torch.uint8).view(FP8[fmt]).reshape(256, 1)
    nan_code = torch.isnan(codes.float())
    # x = [1]: its scale is 1/max and it quantizes to max, so y[c] is code c's value (NaN for NaN codes).
    got = K.fp8_block_gemm(torch.ones(1, 1), codes.contiguous(), torch.ones(2, 1))
    want = SPECS["linear"].reference_impl(torch.ones(1, 1), codes, None, torch.ones(2, 1))
    assert torch.equal(got.isnan(), nan_code.T) and torch.equal(want.isnan(), nan_code.T)
    _assert_close(got.nan_to_num(), want.nan_to_num(), 1e-6)
    # The activation's own quantization: saturation, subnormal grid points, ties to even, NaN.
    w, scale = _fp8_weight(64, 256, fmt)
    for values in (
        _randn(1, 256) * 1e-3,
        torch.linspace(-2, 2, 256)[None] ** 3,
        torch.where(torch.arange(256) % 7 == 0, 1e30, 1.0)[None],
    ):
        _assert_close(K.fp8_block_gemm(values, w, scale), SPECS["linear"].reference_impl(values, w, None, scale), 2e-6)
    x = _randn(1, 256)
    x[0, 3], x[0, 200] = float("inf"), float("-inf")  # saturate to +-max: finite outputs
    _assert_close(K.fp8_block_gemm(x, w, scale), SPECS["linear"].reference_impl(x, w, None, scale), 2e-6)
    x[0, 3] = float("nan")
    assert torch.isnan(K.fp8_block_gemm(x, w, scale)).all()


@needs_kernels
def test_fp8_block_gemm_rejects_bad_inputs():
    w, scale = _fp8_weight(64, 256, "e4m3")
    with pytest.raises(DTypeError, match="argument 'weight' has dtype torch.float8_e5m2"):
        K.fp8_block_gemm(_randn(1, 256), w.view(torch.float8_e5m2), scale)
    with pytest.raises(ShapeError, match="argument 'weight_scale' has shape \\[1, 1\\], expected \\[1, 2\\]"):
        K.fp8_block_gemm(_randn(1, 256), w, scale[:, :1])
    with pytest.raises(DTypeError, match="argument 'x' has dtype torch.float64"):
        K.fp8_block_gemm(_randn(1, 256).double(), w, scale)
    with pytest.raises(DeviceError, match="argument 'weight' is on meta, expected cpu"):
        K.fp8_block_gemm(_randn(1, 256), torch.empty(64, 256, dtype=torch.float8_e4m3fn, device="meta"), scale)
    with pytest.raises(ShapeError, match="argument 'x' has shape \\[2, 255\\], expected \\[..., K=256\\]"):
        K.fp8_block_gemm(_randn(2, 255), w, scale)


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_tokens_fp8_matches_the_reference(fmt, dtype):
    x, weights, ids, w13_f, w2_f = _moe_inputs(3, experts=6, hidden=200, inter=72, k=2)
    ids[:, 1] = 4  # shared by every token
    quantize = SPECS["quantize_fp8"].reference_impl
    q13, s13 = zip(*(quantize(w, (128, 128), fmt, None) for w in w13_f))
    q2, s2 = zip(*(quantize(w, (128, 128), fmt, None) for w in w2_f))
    w13, w2, s13, s2 = torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2)
    x = x.to(dtype)
    want = SPECS["moe_experts"].reference_impl(x, weights, ids, w13, w2, s13, s2)
    got = K.moe_tokens_fp8(x, weights, ids, w13, w2, s13, s2)
    _assert_close(got.to(dtype), want, 2e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ShapeError, match="holds expert id 6"):
        K.moe_tokens_fp8(x, weights, ids.clamp(max=0) + torch.tensor([[0, 6]]), w13, w2, s13, s2)
    with pytest.raises(ShapeError, match="argument 'x' is torch.float32 \\[1, 200\\] on cpu, expected float32/bfloat16 \\[3, 200\\]"):
        K.moe_tokens_fp8(x[:1].float(), weights, ids, w13, w2, s13, s2)
    with pytest.raises(ShapeError, match="argument 'w2_scale' has shape"):
        K.moe_tokens_fp8(x, weights, ids, w13, w2, s13, s2[:, :1])
    # Strided scales: the contiguous copies must live through the call (they were temporaries
    # freed before the kernel read them: values like 5e33 came out).
    strided13, strided2 = s13.transpose(1, 2).contiguous().transpose(1, 2), s2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided13.is_contiguous()
    for _ in range(3):  # an allocation in between reuses freed memory
        got_strided = K.moe_tokens_fp8(x, weights, ids, w13, w2, strided13, strided2)
        torch.empty(1 << 16).fill_(1e30)
        assert torch.equal(got_strided, got)


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
def test_moe_tokens_skip_no_expert_slots_as_the_reference_does(fmt):
    """Slots marked NO_EXPERT (-1: another expert-parallel rank's) add nothing, whatever their
    weight (NaN here): float32 and FP8 (float32 and bf16 activations) against the reference,
    a token with every slot -1 gets zeros; ids below -1 are still refused."""
    x, weights, ids, w13, w2 = _moe_inputs(4, experts=6, hidden=200, inter=72, k=3)
    ids[:, 0] = 2  # an expert the tokens share
    skipped = torch.tensor([[False, True, False], [True, False, True], [True, True, True], [False, True, True]])
    ids, weights = ids.masked_fill(skipped, -1), weights.masked_fill(skipped, float("nan"))
    reference = SPECS["moe_experts"].reference_impl
    got = K.moe_tokens(x, weights, ids.to(torch.int32), w13, w2)
    _assert_close(got, reference(x, weights, ids, w13, w2))
    assert not got[2].any()
    quantize = SPECS["quantize_fp8"].reference_impl
    q13, s13 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), fmt, None) for w in w13)))
    q2, s2 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), fmt, None) for w in w2)))
    for dtype in (torch.float32, torch.bfloat16):
        got = K.moe_tokens_fp8(x.to(dtype), weights, ids, q13, q2, s13, s2)
        _assert_close(got.to(dtype), reference(x.to(dtype), weights, ids, q13, q2, s13, s2), 2e-6 if dtype == torch.float32 else 1e-2)
        assert not got[2].any()
    bad = ids.clone()
    bad[1, 1] = -2
    with pytest.raises(ShapeError, match="holds expert id -2 \\(slot 4\\), expected ids in \\[0, 6\\) or -1 \\(NO_EXPERT\\)"):
        K.moe_tokens(x, weights, bad, w13, w2)
    with pytest.raises(ShapeError, match="holds expert id -2 \\(slot 4\\)"):
        K.moe_tokens_fp8(x, weights, bad, q13, q2, s13, s2)


@needs_kernels
def test_fp8_block_gemm_reads_strided_scales_it_was_given():
    """A transposed-then-transposed-back (non-contiguous) weight scale gives the same result:
    its contiguous copy was a temporary freed before the C kernel read it (errors of ~4e19)."""
    quantize = SPECS["quantize_fp8"].reference_impl
    w, scale = quantize(_randn(256, 384) * 0.1, (128, 128), "e4m3fn", None)
    strided = scale.t().contiguous().t()
    assert not strided.is_contiguous()
    x = _randn(3, 384)
    want = K.fp8_block_gemm(x, w, scale)
    for _ in range(3):
        got = K.fp8_block_gemm(x, w, strided)
        torch.empty(1 << 16).fill_(1e30)
        assert torch.equal(got, want)


def _fake_quant_reference(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What ``linear``'s reference multiplies: x quantized per (1, 128), dequantized, float32."""
    from dshal.ops.quant import dequantize_to

    rows = x.to(torch.float32).reshape(-1, x.shape[-1])
    q, scale = SPECS["quantize_fp8"].reference_impl(rows, (1, 128), fmt, None)
    return dequantize_to(q, scale, (1, 128), torch.float32).reshape(x.shape)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical float32 tensors: NaN payloads and signed zeros count."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    differ = (got.view(torch.int32) != want.view(torch.int32)).nonzero()[:4].tolist()
    assert not differ, [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in differ]


F32_MAX = torch.finfo(torch.float32).max


def _special_values(rows: int, k: int) -> torch.Tensor:
    """Random values with NaN of both signs, +-Inf, +-0, +-float32 max, subnormals, and
    an all-zero first block per row."""
    x = _randn(rows, k) * torch.exp(_randn(rows, k) * 8)
    pick = torch.rand(rows, k, generator=GEN)
    for (lo, hi), value in zip(
        [(0.0, 0.03), (0.03, 0.06), (0.06, 0.08), (0.08, 0.1), (0.1, 0.13), (0.13, 0.15), (0.15, 0.2), (0.2, 0.25)],
        [float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, F32_MAX, -F32_MAX, 1e-40],
    ):
        x[(pick >= lo) & (pick < hi)] = value
    x[:, :128] = 0.0
    return x


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp8_fake_quant_rows_is_bit_identical_to_the_reference(fmt, dtype):
    fp8 = FP8[fmt]
    for trial in range(60):
        rows, k = int(torch.randint(1, 9, (1,), generator=GEN)), int(torch.randint(1, 700, (1,), generator=GEN))
        kind = trial % 4
        if kind == 0:
            x = _randn(rows, k) * 3
        elif kind == 1:  # random bit patterns: every exponent, NaN payloads, subnormals
            bits = torch.randint(-(2**31), 2**31, (rows, k), generator=GEN, dtype=torch.int64)
            x = bits.to(torch.int32).view(torch.float32)
        elif kind == 2:
            x = _special_values(rows, k)
        else:  # a tiny block: amax / max is subnormal in float32, so the scale is its floor
            x = _randn(rows, k) * 1e-39
        x = x.to(dtype)
        _assert_same_bits(K.fp8_fake_quant_rows(x, fp8), _fake_quant_reference(x, fmt))


@needs_kernels
@pytest.mark.parametrize("fmt", FP8, ids=str)
def test_fp8_fake_quant_rows_rounds_every_grid_point_and_midpoint_like_torch(fmt):
    """Scale 1 (each row starts with the format's max): the values themselves are rounded.
    Every FP8 value, every midpoint between neighbours (ties to even) and the floats just
    beside each midpoint, both signs, plus a sweep of float32 bit patterns up to max."""
    fp8 = FP8[fmt]
    qmax = torch.finfo(fp8).max
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = ((grid[1:].double() + grid[:-1].double()) / 2).float()
    sweep = torch.arange(0, torch.tensor(qmax).view(torch.int32).item() + 1, 4099).to(torch.int32).view(torch.float32)
    values = torch.cat([grid, mids, torch.nextafter(mids, torch.zeros(())), torch.nextafter(mids, grid[-1:]), sweep])
    values = torch.cat([values, -values, torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])])
    values = F.pad(values, (0, -values.numel() % 127), value=1.0).reshape(-1, 127)
    x = torch.cat([torch.full((values.shape[0], 1), qmax), values], dim=1)
    got = K.fp8_fake_quant_rows(x, fp8)
    _assert_same_bits(got, _fake_quant_reference(x, fmt))
    assert torch.equal(got[:, 1:].isnan(), values.isnan())


@needs_kernels
def test_fp8_fake_quant_rows_reads_strided_rows_and_any_leading_shape():
    base = _special_values(6, 600)
    for x in (base[:, 40:340], base[::2, :300], base.reshape(2, 3, 600)[:, 1:], base.t()[:300].t(), base[:, :0]):
        got = K.fp8_fake_quant_rows(x, torch.float8_e4m3fn)
        assert got.is_contiguous()
        _assert_same_bits(got, _fake_quant_reference(x, "e4m3") if x.numel() else torch.empty(x.shape))
    _assert_same_bits(K.fp8_fake_quant_rows(base[0], torch.float8_e4m3fn), _fake_quant_reference(base[0], "e4m3"))


@needs_kernels
def test_fp8_fake_quant_rows_rejects_bad_inputs():
    with pytest.raises(DTypeError, match="argument 'x' has dtype torch.float64"):
        K.fp8_fake_quant_rows(_randn(2, 256).double(), torch.float8_e4m3fn)
    with pytest.raises(DTypeError, match="argument 'fp8' is torch.float8_e5m2, expected one of"):
        K.fp8_fake_quant_rows(_randn(2, 256), torch.float8_e5m2)
    with pytest.raises(DeviceError, match="argument 'x' is on meta, expected cpu"):
        K.fp8_fake_quant_rows(torch.empty(2, 256, device="meta"), torch.float8_e4m3fn)
    with pytest.raises(ShapeError, match="argument 'x' has shape \\[\\], expected \\[..., K\\]"):
        K.fp8_fake_quant_rows(torch.tensor(1.0), torch.float8_e4m3fn)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=120
    )


STATUS = """
    import json
    from dshal.kernels import cpu
    s = cpu.status()
    print(json.dumps({"available": s.available, "detail": s.detail}))
"""


def test_switched_off_by_environment_and_the_backend_still_serves_every_op(tmp_path):
    code = (
        STATUS
        + """
    import torch, dshal
    from dshal.ops.catalogue import SPECS
    dshal.use(backend="cpu")
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    assert torch.allclose(dshal.ops.linear(x, w), torch.nn.functional.linear(x, w), atol=1e-5)
    try:
        cpu.gemv(x, w)
    except dshal.DshalError as err:
        print(type(err).__name__, err)
    """
    )
    done = _run(code, DSHAL_CPU_KERNELS="0", DSHAL_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == '{"available": false, "detail": "disabled by DSHAL_CPU_KERNELS=0"}'
    assert second == "BackendUnavailableError dshal cpu kernels are unavailable: disabled by DSHAL_CPU_KERNELS=0"
    assert not list(tmp_path.iterdir())  # nothing was built


def test_a_failing_compiler_is_reported_not_raised(tmp_path):
    done = _run(STATUS, CC="false", DSHAL_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert '"available": false' in done.stdout and "building kernels.c failed: false -O3" in done.stdout


@needs_kernels
def test_built_once_into_the_cache_and_reused(tmp_path):
    first = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and '"available": true' in first.stdout, first.stderr
    built = sorted((tmp_path / "cpu-kernels").glob("dshal_cpu_*.so"))
    assert len(built) == 1 and str(built[0]) in first.stdout
    stamp = built[0].stat().st_mtime_ns
    again = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
    assert again.stdout == first.stdout and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    digest = built[0].with_suffix(".sha256")  # what the build wrote, checked before every load
    assert sorted((tmp_path / "cpu-kernels").iterdir()) == sorted([*built, digest])  # no temporary files left behind


@needs_kernels
def test_a_killed_builds_temporary_file_is_swept_by_the_next_build(tmp_path):
    """Ctrl-C during the first run's build left its temporary ``.so`` in the cache for good (the
    build thread is dropped at exit). The next build removes such orphans, never a file young
    enough to be a concurrent build's."""
    folder = tmp_path / "cpu-kernels"
    folder.mkdir(mode=0o700)
    orphans = [folder / ".dshal-build-killed.so", folder / "tmpolder_release.so"]
    running = folder / ".dshal-build-running.so"
    for path in (*orphans, running):
        path.write_bytes(b"half a library")
    old = time.time() - 3600
    for path in orphans:
        os.utime(path, (old, old))
    done = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0 and '"available": true' in done.stdout, done.stderr
    assert not any(path.exists() for path in orphans)
    assert running.exists()
    assert len(list(folder.glob(".dshal-build-*.so"))) == 1  # the build's own was renamed into place
    os.utime(running, (old, old))  # the usual case: Ctrl-C, a rerun that builds, the orphan aging
    again = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
    assert again.stdout == done.stdout and not running.exists()  # swept when the build is reused too


@needs_kernels
def test_a_damaged_build_in_the_cache_is_rebuilt_not_mapped(tmp_path):
    """A cached library truncated (a crash mid-write) killed every later run with SIGBUS, before
    any message; an emptied one (a power loss after an un-synced rename) turned the kernels off
    for good in silence. Both are rebuilt now."""
    first = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0 and '"available": true' in first.stdout, first.stderr
    (built,) = (tmp_path / "cpu-kernels").glob("dshal_cpu_*.so")
    whole = built.read_bytes()
    for damaged in (whole[:1000], b""):
        built.write_bytes(damaged)
        again = _run(STATUS, DSHAL_CACHE_DIR=str(tmp_path))
        assert again.returncode == 0, (again.returncode, again.stderr)
        assert '"available": true' in again.stdout
        assert built.stat().st_size == len(whole)


def test_unavailable_kernels_raise_backend_unavailable(monkeypatch):
    monkeypatch.setenv("DSHAL_CPU_KERNELS", "off")
    try:
        assert K.reload() == K.KernelStatus(False, "disabled by DSHAL_CPU_KERNELS=off") and K.library() is None
        with pytest.raises(BackendUnavailableError, match="disabled by DSHAL_CPU_KERNELS=off"):
            K.rms_norm(_randn(2, 4), torch.ones(4), 1e-6)
    finally:
        monkeypatch.delenv("DSHAL_CPU_KERNELS")
        K.reload()


@needs_kernels
def test_the_kernel_benchmark_runs():
    """A smoke run of benchmarks/cpu_kernels.py (its timings are not checked: speed is
    measured there, not asserted here)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_kernels.py")
    done = subprocess.run(
        [sys.executable, script, "--rounds", "1", "--skip-model"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["case", "C", "µs", "torch", "µs", "torch", "/", "C"]
    names = [line.split("  ")[0] for line in lines[2:]]
    assert "moe_gate, T=1, E=16, 4 groups" in names and "linear, 1 row, FP8 128x128 blocks, [256x256] weight" in names
    assert "FP8 prefill activations [64, 192], 1x128 quantize + dequantize" in names
    assert all(line.rstrip().endswith("x") for line in lines[2:])  # every row has its ratio


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools")
def test_torch_compile_around_the_c_kernels_gives_the_eager_answer():
    """dynamo traced the ctypes calls with its fake tensors' pointers: a function calling
    ``ops.moe_gate`` aborted the process (heap corruption), and ``torch.compile(model)`` gave
    other logits without a word. The cpu backend's ops are opaque operators under compile now
    (``dshal.backends.cpu_opaque``; ``tests/test_model_compile.py``), and a kernel called
    directly is a graph break (backend "eager": dynamo's tracing is where it went wrong; no
    inductor compile needed). No functools cache on the traced path either: dynamo warned
    about the op checks' and the library's (it traces through them, ignoring the cache)."""
    import dshal
    from dshal.model import random_model, tiny_args

    if K.library() is None:
        pytest.skip(f"the C kernels are not built here: {K.status()}")
    dshal.use(backend="cpu")
    torch._dynamo.reset()
    bias = torch.zeros(16)
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))

    def route(x):
        return dshal.ops.moe_gate(x, bias, 4, 4, 2, 2.5)

    want = route(logits)
    got = torch.compile(route, backend="eager")(logits)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    direct = torch.compile(lambda x: K.moe_gate(x, bias, 4, 4, 2, 2.5), backend="eager")(logits)
    assert torch.equal(direct[1], want[1]) and torch.equal(direct[0], want[0])
    model = random_model(tiny_args(), seed=1)
    ids = torch.randint(0, model.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.compile(model, backend="eager")(ids), model(ids))
    torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes only")
def test_the_kernel_cache_is_never_a_folder_others_can_write(tmp_path, monkeypatch):
    """Where the home cache cannot be made, the built library went to a predictable
    ``$TMPDIR/dshal-cpu-kernels-<uid>`` checked only for being writable: a folder another user
    made (or anyone can write) held their ``.so``, which dshal then loaded and ran. Such a
    folder is refused; one dshal makes is mode 0700."""
    import tempfile


    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(blocked / "cache"))  # cannot be created: under a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"dshal-cpu-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # this user's (as an older dshal made it under umask 002): closed, then used
    assert _first_writable_folder() == shared and (shared.stat().st_mode & 0o777) == 0o700
    shared.rmdir()
    made = _first_writable_folder()
    assert made == shared and (made.stat().st_mode & 0o777) == 0o700
    planted = made / "dshal_cpu_0123456789abcdef.so"
    planted.write_text("")
    planted.chmod(0o666)  # a library others could have written is not loaded
    assert "others can write" in not_private(planted)
    if os.getuid() == 0:  # root can stand in for another user: a folder of theirs is refused, said why
        os.chown(made, 65534, 65534)
        with pytest.raises(OSError, match=r"belongs to uid 65534, not this user .*set DSHAL_CACHE_DIR"):
            _first_writable_folder()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes only")
def test_a_shared_or_linked_cache_folder_keeps_its_mode(tmp_path):
    """Closing a group-writable cache folder to 0700 went through a symlink to a shared
    folder and cleared a setgid team folder's mode: those are refused, their mode kept."""

    shared = tmp_path / "team"
    shared.mkdir()
    shared.chmod(0o2775)
    link = tmp_path / "cpu-kernels"
    link.symlink_to(shared)
    assert "others can write" in not_private(link) and (shared.stat().st_mode & 0o7777) == 0o2775
    assert "others can write" in not_private(shared) and (shared.stat().st_mode & 0o7777) == 0o2775


def test_a_failing_cache_leaves_the_backend_usable_with_the_kernels_off(tmp_path, monkeypatch):
    """``_load`` caught only OSError, SubprocessError and AttributeError: ``Path.home()``'s
    RuntimeError for a user with no home (and any other failure) escaped it, and
    ``CpuBackend.availability()`` raised: "auto found no usable backend". Any failure now turns
    the kernels off with the reason, and the backend serves with torch."""
    import tempfile

    from dshal.backends.cpu import CpuBackend
    from dshal.kernels.cpu import _library

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    def broken_identity():
        raise ValueError("something no one foresaw")

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    try:
        with monkeypatch.context() as m:
            m.setattr(_library, "cache_dir", no_home)
            m.setattr(tempfile, "tempdir", str(tmp_path))
            # the temporary folder is tried when the cache folder cannot even be named
            assert _first_writable_folder() == tmp_path / f"dshal-cpu-kernels-{os.getuid()}"
            m.setattr(tempfile, "tempdir", str(blocked))  # and neither will do
            state = K.reload()
            assert not state.available and "RuntimeError: Could not determine home directory" in state.detail
            assert "Not a directory" in state.detail and "set DSHAL_CACHE_DIR" in state.detail
            availability = CpuBackend().availability()
            assert availability.ok and "Could not determine home directory" in availability.reason
        with monkeypatch.context() as m:
            m.setattr(_library, "_cpu_identity", broken_identity)
            state = K.reload()
            assert state == K.KernelStatus(False, "building kernels.c failed: ValueError: something no one foresaw")
            assert CpuBackend().availability().ok
    finally:
        K.reload()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes only")
def test_the_current_folder_never_holds_the_kernel_cache(tmp_path, monkeypatch):
    """With /tmp and /var/tmp unwritable ``tempfile.gettempdir()`` returns the current folder,
    and the library was built in the user's project (``proj/dshal-cpu-kernels-0/``)."""
    import tempfile


    blocked = tmp_path / "a-file"
    blocked.write_text("")
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(blocked / "cache"))
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(project))  # what gettempdir fell back to
    monkeypatch.chdir(project)
    with pytest.raises(OSError, match=r"the temporary folder: none writable \(the current folder.*set DSHAL_CACHE_DIR"):
        _first_writable_folder()
    assert not list(project.iterdir())


@needs_kernels
def test_a_full_cache_folder_is_left_after_one_failure(tmp_path):
    """On a full disk every start compiled the kernels twice (once per flag set), both failed
    with "No space left on device" and the kernels were off. One failure now moves the build
    to the next folder (the per-user temporary one)."""
    full, tmp, log = tmp_path / "full", tmp_path / "tmp", tmp_path / "calls"
    tmp.mkdir()
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f'case "$*" in *{full}/*) echo "/usr/bin/ld: final link failed: No space left on device" >&2; exit 1;; esac\n'
        f'exec {K._library._compiler()} "$@"\n'
    )
    compiler.chmod(0o755)
    done = _run(STATUS, CC=str(compiler), DSHAL_CACHE_DIR=str(full), TMPDIR=str(tmp))
    assert done.returncode == 0 and '"available": true' in done.stdout, (done.stdout, done.stderr)
    assert f"{tmp}/dshal-cpu-kernels-{os.getuid()}/dshal_cpu_" in done.stdout
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and str(full) in calls[0] and str(tmp) in calls[1]
    assert calls[0].split(" -o ")[0] == calls[1].split(" -o ")[0]  # the same (first) flag set in the next folder


@needs_kernels
def test_an_intact_build_in_a_read_only_folder_is_loaded(tmp_path, monkeypatch):
    """A library baked into a container image (a read-only cache folder) was ignored because
    the folder must be writable, and built again elsewhere at every start. It is loaded now,
    after the same checks: this user's, closed to others, its .sha256 matching."""
    import shutil
    import tempfile

    built = K._library._build(K._library._compiler())[0]
    image = tmp_path / "image" / "cpu-kernels"
    image.mkdir(parents=True)
    image.chmod(0o700)
    shutil.copy2(built, image / built.name)
    shutil.copy2(built.with_suffix(".sha256"), image / built.with_suffix(".sha256").name)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    real_access = os.access

    def read_only(path, mode, **kwargs):  # what a read-only mount answers, even to root
        return False if os.path.samefile(path, image) and mode & os.W_OK else real_access(path, mode, **kwargs)

    try:
        with monkeypatch.context() as m:
            m.setenv("DSHAL_CACHE_DIR", str(tmp_path / "image"))
            m.setattr(tempfile, "tempdir", str(tmp))
            m.setattr(os, "access", read_only)
            state = K.reload()
            assert state.available and state.detail.startswith(f"{image / built.name} "), state.detail
            assert not list(tmp.iterdir())  # nothing built elsewhere
            (image / built.name).chmod(0o777)  # one others could have written is not loaded
            state = K.reload()
            assert state.available and str(tmp) in state.detail
    finally:
        K.reload()


def _first_writable_folder() -> Path:
    """The folder the build compiles into first (the first cache folder this process can write),
    or the OSError that says why there is none."""
    refused: list[str] = []
    for folder, writable in _library._cache_folders(refused):
        if writable:
            return folder
        refused.append(f"{folder} is not writable")
    raise _library._no_folder(refused)
