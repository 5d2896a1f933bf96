"""The cpu backend's native providers against the op references (the oracle), through the
runtime's dispatch, so the spec checks run in front of them as they do in the model."""

from __future__ import annotations

import re

import pytest
import torch

import dshal
from dshal import ops
from dshal.backends import cpu as cpu_module
from dshal.backends.cpu_native import NATIVE_OPS
from dshal.kernels import cpu as cpu_kernels
from dshal.ops.catalogue import SPECS

#: Allowed max |native - reference| / max(|reference|, 1) per dtype (16-bit: a few ulps).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(params=["c-kernels", "torch-only"])
def cpu(request, monkeypatch):
    """The cpu backend, with its C kernels and without them (what a machine without a C
    compiler runs): both must match the references."""
    if request.param == "torch-only":
        monkeypatch.setenv("DSHAL_CPU_KERNELS", "0")
    elif not cpu_kernels.status().available:
        pytest.skip(f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
    assert cpu_kernels.reload().available == (request.param == "c-kernels")
    yield dshal.use({"backend": "cpu", "fallback": "error"})
    monkeypatch.undo()
    cpu_kernels.reload()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if not want.is_floating_point():  # ids: exact
        assert torch.equal(got, want)
        return
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(want.double().abs().max().item() if want.numel() else 0.0, 1.0)
    assert err <= TOL[want.dtype] * scale, f"max |err| {err:.3g} > {TOL[want.dtype] * scale:.3g}"


def _check(op: str, *args, **kwargs) -> None:
    got = getattr(ops, op)(*args, **kwargs)
    want = SPECS[op].reference_impl(*args, **kwargs)
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        _close(g, w)


def test_the_backend_declares_which_ops_are_native(cpu):
    kinds = cpu.backend.capabilities().op_kinds
    assert {op for op, kind in kinds.items() if kind == "native"} == set(NATIVE_OPS)
    assert set(kinds) == {name for name, spec in SPECS.items() if spec.has_reference}
    assert cpu.describe()["providers"]["attention"] == {"provider": "cpu", "kind": "native"}
    linear = cpu.describe()["providers"]["linear"]
    assert (linear["provider"], linear["kind"], linear["paths"]["bf16"]["kind"]) == ("cpu", "native", "native")
    # int8 weights take the reference's W8A8 math: said per weight format, not hidden behind "native".
    assert linear["paths"]["int8"]["kind"] == cpu.provider_kind("linear", "int8") == "reference"
    assert cpu.describe()["providers"]["fp8_gemm"] == {"provider": "cpu", "kind": "reference"}


ATTENTION_CASES = {
    # name: (Hq, Hk, Tq, Tk, D, Dv, causal, window, global_tokens)
    "prefill-causal": (4, 4, 16, 16, 32, 32, True, None, 0),
    "chunk-after-cache": (4, 2, 5, 21, 32, 32, True, None, 0),
    "chunk-after-cache-one-kv-head-mla-dims": (4, 1, 6, 30, 48, 32, True, None, 0),
    "chunk-after-cache-values-wider": (2, 2, 3, 7, 16, 32, True, None, 0),  # the flash pair needs Dv <= D
    "decode-absorbed-shape": (8, 1, 1, 40, 48, 40, True, None, 0),
    "decode-batch-of-queries-noncausal": (6, 3, 3, 9, 16, 8, False, None, 0),
    "more-queries-than-keys": (2, 2, 7, 4, 16, 16, True, None, 0),
    "window-and-global": (4, 4, 24, 24, 16, 16, True, 5, 3),
    "window-noncausal": (2, 1, 10, 10, 16, 8, False, 3, 2),
    "decode-window": (4, 4, 1, 30, 16, 16, True, 6, 2),
    "empty-keys": (2, 2, 3, 0, 16, 16, True, None, 0),
}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_attention_matches_the_reference(cpu, case, dtype):
    hq, hk, tq, tk, d, dv, causal, window, global_tokens = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    q = torch.randn(2, hq, tq, d, generator=gen).to(dtype)
    k = torch.randn(2, hk, tk, d, generator=gen).to(dtype)
    v = torch.randn(2, hk, tk, dv, generator=gen).to(dtype)
    _check("attention", q, k, v, causal, 0.3, window, global_tokens)


def test_attention_blind_queries_output_zeros(cpu):
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4)
    out = ops.attention(q, k, v, True)
    assert torch.equal(out[:, :, :3], torch.zeros(1, 2, 3, 4))  # positions -3..-1 see no key
    assert out[:, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rms_norm_silu_and_rotary_match_the_reference(cpu, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    residual, weight = torch.randn(3, 5, 64, generator=gen).to(dtype), torch.rand(64, generator=gen).to(dtype)
    _check("rms_norm", x, weight, 1e-6)
    _check("rms_norm", x, weight, 1e-6, residual)
    _check("rms_norm", x.transpose(0, 1), weight, 1e-5)  # non-contiguous
    _check("silu_and_mul", x)
    _check("silu_and_mul", x[..., ::2])
    cos, sin = torch.rand(5, 32, generator=gen), torch.rand(5, 32, generator=gen)
    for interleaved in (True, False):
        _check("rotary_embedding", x, cos, sin, interleaved)
        _check("rotary_embedding", x.transpose(0, 1)[:, :, None], cos[:3, None], sin[:3, None], interleaved)
        # Pairs that are not complex-aligned in memory: odd offset, strided last dim.
        _check("rotary_embedding", x[..., 1:33], cos[:, :16], sin[:, :16], interleaved)
        _check("rotary_embedding", x[..., ::2], cos[:, :16], sin[:, :16], interleaved)
        _check("rotary_embedding", x, cos.double(), sin.double(), interleaved)
        _check("rotary_embedding", x, cos[0, 0].clone(), sin[0, 0].clone(), interleaved)  # 0-d: one angle everywhere


MOE_CASES = {
    # name: (tokens, experts, hidden, inter, k)
    "decode-one-token": (1, 8, 64, 32, 3),
    "two-tokens": (2, 8, 64, 32, 2),
    "decode-batch": (5, 8, 64, 32, 3),  # float32: the C kernel's grouping of a few tokens
    "past-the-decode-batch": (9, 8, 64, 32, 3),
    "prefill-some-experts-idle": (24, 16, 64, 32, 2),
    "no-tokens": (0, 4, 32, 16, 2),
}


@pytest.mark.parametrize("case", MOE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_moe_experts_matches_the_reference(cpu, case, dtype):
    tokens, experts, hidden, inter, k = MOE_CASES[case]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / 8).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / 8).to(dtype)
    weights = torch.rand(tokens, k, generator=gen)
    # Only the first half of the experts is ever chosen, so some groups are empty.
    ids = torch.zeros(0, k, dtype=torch.long)
    if tokens:
        ids = torch.stack([torch.randperm(max(experts // 2, k), generator=gen)[:k] for _ in range(tokens)])
    _check("moe_experts", x, weights, ids, w13, w2)
    _check("moe_experts", x, weights, ids.to(torch.int32), w13, w2)


def test_moe_experts_fp8_weights_and_bad_ids(cpu):
    from dshal.errors import ShapeError

    gen = torch.Generator().manual_seed(12)
    x, weights = torch.randn(5, 128, generator=gen), torch.rand(5, 2, generator=gen)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [1, 3]])
    w13, w2 = torch.randn(4, 256, 128, generator=gen) / 8, torch.randn(4, 128, 128, generator=gen) / 8
    quantize = SPECS["quantize_fp8"].reference_impl
    (w13q, s13), (w2q, s2) = (quantize(w.reshape(-1, 128), (128, 128)) for w in (w13, w2))
    w13q, w2q = w13q.view(4, 256, 128), w2q.view(4, 128, 128)
    s13, s2 = s13.view(4, 2, 1), s2.view(4, 1, 1)
    _check("moe_experts", x, weights, ids, w13q, w2q, s13, s2)  # FP8 blocks: the reference's path
    with pytest.raises(ShapeError, match="expert id 4, expected ids in \\[-1, 4\\)"):
        ops.moe_experts(x, weights, ids + 1, w13, w2)
    with pytest.raises(ShapeError, match="expert id -2"):
        ops.moe_experts(x[:1], weights[:1], ids[:1] - 2, w13, w2)
    with pytest.raises(ShapeError, match="expert id 4, expected ids in \\[-1, 4\\)"):  # one token: its own path
        ops.moe_experts(x[:1], weights[:1], ids[:1] + 3, w13, w2)


def _decode_step_experts(gen, experts, hidden, inter):
    """float32 routed experts ``(w13, w2)`` and their FP8 128x128 block-scaled form
    ``(q13, q2, s13, s2)`` for the decode-step kernel tests."""
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / 8
    w2 = torch.randn(experts, hidden, inter, generator=gen) / 8
    quantize = SPECS["quantize_fp8"].reference_impl
    q13, s13 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128)) for w in w13)))
    q2, s2 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128)) for w in w2)))
    return w13, w2, (q13, q2, s13, s2)


@pytest.mark.skipif(not cpu_kernels.status().available, reason=f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
def test_moe_experts_tokens_of_a_decode_step_do_not_change_each_other():
    """With the C kernels, a decode step's tokens (up to FEW_TOKENS float32 ones, FEW_FP8_TOKENS
    with FP8 block-scaled experts) each get the bits they get alone: a row's numbers do not
    depend on the batch (from 3 tokens they took torch's grouped GEMM, whose blocking follows
    each expert's row count: ~1e-7 apart)."""
    from dshal.backends.cpu_native import FEW_FP8_TOKENS, FEW_TOKENS

    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(13)
    experts, hidden, k = 8, 128, 3
    w13, w2, fp8 = _decode_step_experts(gen, experts, hidden, inter=64)
    for tokens, experts_args in ((FEW_TOKENS, (w13, w2)), (FEW_FP8_TOKENS, fp8)):
        x, weights = torch.randn(tokens, hidden, generator=gen), torch.rand(tokens, k, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        together = ops.moe_experts(x, weights, ids, *experts_args)
        for t in range(tokens):
            alone = ops.moe_experts(x[t : t + 1].clone(), weights[t : t + 1], ids[t : t + 1], *experts_args)
            assert torch.equal(together[t : t + 1], alone), (tokens, t)


@pytest.mark.skipif(not cpu_kernels.status().available, reason=f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
def test_moe_experts_decode_step_with_no_expert_slots_gives_each_token_its_own_bits():
    """An expert-parallel rank's decode step (the slots other ranks serve are NO_EXPERT, their
    weights NaN here): each token gets the bits it gets alone with the same slots dropped, a
    token with every slot dropped gets zeros, and all match the reference. (Regathering the
    kept slots and summing them in expert order made 3 tokens differ from themselves alone.)"""
    from dshal.backends.cpu_native import FEW_FP8_TOKENS, FEW_TOKENS
    from dshal.ops.moe import NO_EXPERT

    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(14)
    experts, hidden, k = 8, 128, 4
    w13, w2, fp8 = _decode_step_experts(gen, experts, hidden, inter=64)
    for tokens, dtype, experts_args in ((FEW_TOKENS, torch.float32, (w13, w2)), (3, torch.float32, (w13, w2)),
                                        (FEW_FP8_TOKENS, torch.float32, fp8), (FEW_FP8_TOKENS, torch.bfloat16, fp8)):
        x, weights = torch.randn(tokens, hidden, generator=gen).to(dtype), torch.rand(tokens, k, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        ids[:, 0] = 5  # an expert the tokens share
        skipped = torch.rand(tokens, k, generator=gen) < 0.5  # half the slots: another rank's
        skipped[-1] = True  # a token none of this rank's experts serves
        ids, weights = ids.masked_fill(skipped, NO_EXPERT), weights.masked_fill(skipped, float("nan"))
        together = ops.moe_experts(x, weights, ids, *experts_args)
        _close(together, SPECS["moe_experts"].reference_impl(x, weights, ids, *experts_args))
        assert not together[-1].any()
        for t in range(tokens):
            alone = ops.moe_experts(x[t : t + 1].clone(), weights[t : t + 1], ids[t : t + 1], *experts_args)
            assert torch.equal(together[t : t + 1], alone), (tokens, dtype, t)
            served = ~skipped[t]  # ... and the token with the dropped slots taken out of its routing
            dropped = ops.moe_experts(x[t : t + 1].clone(), weights[t : t + 1, served], ids[t : t + 1, served], *experts_args)
            assert torch.equal(alone, dropped), (tokens, dtype, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_linear_matches_the_reference(cpu, dtype):
    from dshal.backends.cpu_native import GEMV_MAX_K, GEMV_MAX_ROWS

    gen = torch.Generator().manual_seed(21)
    cases = [((1,), 48, 200), ((1, 1), 64, 256), ((1, 1, 1), 5, 1), ((1,), 3, GEMV_MAX_K + 8), ((4,), 16, 32)]
    cases += [((2, 4), 24, 40), ((GEMV_MAX_ROWS + 1,), 24, 40)]  # a decode batch; more rows: MKL's GEMM
    for rows, n, k in cases:
        x = torch.randn(*rows, k, generator=gen).to(dtype)
        w, b = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype), torch.randn(n, generator=gen).to(dtype)
        _check("linear", x, w)
        _check("linear", x, w, b)
    x, w = torch.randn(1, 64, generator=gen).to(dtype), torch.randn(64, 32, generator=gen).to(dtype)
    _check("linear", x, w.t())  # a transposed weight takes torch's path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_moe_gate_matches_the_reference(cpu, dtype):
    gen = torch.Generator().manual_seed(22)
    for tokens, experts, top_k, n_group, topk_group in [(1, 16, 4, 4, 2), (24, 64, 6, 8, 3), (5, 32, 4, 1, 1)]:
        # Distinct scores in every dtype (bf16 rounds nearby randn values together): no ties,
        # so the picked ids are the same whatever order each implementation breaks ties in.
        logits = torch.stack([torch.randperm(experts, generator=gen) * 0.05 - 1.6 for _ in range(tokens)]).to(dtype)
        bias = torch.randn(experts, generator=gen) * 0.5
        _check("moe_gate", logits, bias, top_k, n_group, topk_group, 2.5, True)
        _check("moe_gate", logits, None, top_k, n_group, topk_group, 1.0, False)
    logits = torch.randn(3, 16, generator=gen).to(dtype)
    logits[1, 2] = float("nan")  # the reference's own ordering of NaN scores
    got_w, got_ids = ops.moe_gate(logits, None, 4, 4, 2, 1.0)
    want_w, want_ids = SPECS["moe_gate"].reference_impl(logits, None, 4, 4, 2, 1.0)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w.isnan(), want_w.isnan())


@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fnuz"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_block_decode_products_match_the_reference(cpu, fmt, dtype):
    """One row times FP8 block-scaled weights: a decode step of an FP8 checkpoint."""
    gen = torch.Generator().manual_seed(23)
    quantize = SPECS["quantize_fp8"].reference_impl
    w, scale = quantize(torch.randn(200, 300, generator=gen) / 17, (128, 128), fmt, None)
    x = torch.randn(1, 1, 300, generator=gen).to(dtype)
    _check("linear", x, w, None, scale)
    _check("linear", x, w, torch.randn(200, generator=gen).to(dtype), scale)
    _check("linear", torch.randn(3, 300, generator=gen).to(dtype), w, None, scale)  # a small batch
    _check("linear", torch.randn(40, 300, generator=gen).to(dtype), w, None, scale)  # a prefill: the reference
    experts, hidden, inter = 4, 200, 72
    w13_f = torch.randn(experts, 2 * inter, hidden, generator=gen) / 14
    w2_f = torch.randn(experts, hidden, inter, generator=gen) / 9
    q13, s13 = zip(*(quantize(m, (128, 128), fmt, None) for m in w13_f))
    q2, s2 = zip(*(quantize(m, (128, 128), fmt, None) for m in w2_f))
    stacked = [torch.stack(t) for t in (q13, q2, s13, s2)]
    x, weights, ids = torch.randn(1, hidden, generator=gen).to(dtype), torch.rand(1, 2, generator=gen), torch.tensor([[3, 1]])
    _check("moe_experts", x, weights, ids, stacked[0], stacked[1], stacked[2], stacked[3])
    from dshal.errors import ShapeError

    with pytest.raises(ShapeError, match="expert id 4, expected ids in \\[-1, 4\\)"):
        ops.moe_experts(x, weights, ids + 1, *stacked)


@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fnuz", "e5m2"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp8_prefill_linear_is_bit_identical_to_the_reference(cpu, fmt, dtype):
    """A prefill's FP8 linear (activations quantized per 1x128 by the C kernel or torch's
    steps, then one float32 GEMM with the cached dequantized weight) gives the reference's
    bits: K a multiple of 128 or not, non-finite inputs, zero blocks, a bias. E5M2 weights
    too (the C kernel takes the E4M3 formats; e5m2 was its DTypeError)."""
    gen = torch.Generator().manual_seed(25)
    quantize = SPECS["quantize_fp8"].reference_impl
    for n, k, lead in [(200, 300, (2, 40)), (64, 256, (33,)), (96, 192, (1, 64))]:
        w, scale = quantize(torch.randn(n, k, generator=gen) / 17, (128, 128), fmt, None)
        x = torch.randn(*lead, k, generator=gen) * torch.exp(torch.randn(*lead, k, generator=gen) * 4)
        x[..., 0, :128] = 0.0  # one all-zero block
        x[..., 1, 7], x[..., 2, 9], x[..., 3, 11] = float("inf"), -float("inf"), float("nan")
        x = x.to(dtype)
        for bias in (None, torch.randn(n, generator=gen).to(dtype)):
            got, want = ops.linear(x, w, bias, scale), SPECS["linear"].reference_impl(x, w, bias, scale)
            bits = torch.int16 if dtype != torch.float32 else torch.int32
            assert got.dtype == want.dtype and torch.equal(got.view(bits), want.view(bits))


def _fp8_weights(count: int, n: int = 128, k: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(31)
    quantize = SPECS["quantize_fp8"].reference_impl
    return [quantize(torch.randn(n, k, generator=gen), (128, 128), "e4m3", None) for _ in range(count)]


def test_dequantized_copies_stay_within_their_budget_first_come_kept():
    """A full budget keeps the copies it has (a forward pass reuses them in the same order
    every time) and dequantizes the others per call; a freed weight frees its room."""
    import gc

    from dshal.backends.cpu_native import DequantizedWeights
    from dshal.ops.quant import dequantize_to

    (w1, s1), (w2, s2), (w3, s3) = _fp8_weights(3)
    one = 128 * 256 * 4
    cache = DequantizedWeights(max_bytes=2 * one)
    d1, d2 = cache.get(w1, s1, (128, 128)), cache.get(w2, s2, (128, 128))
    assert cache.nbytes() == 2 * one
    d3 = cache.get(w3, s3, (128, 128))  # full: made, not kept
    assert cache.nbytes() == 2 * one and cache.get(w3, s3, (128, 128)) is not d3
    assert torch.equal(cache.get(w3, s3, (128, 128)), d3)
    assert cache.get(w1, s1, (128, 128)) is d1 and cache.get(w2, s2, (128, 128)) is d2  # still hits
    assert torch.equal(d1, dequantize_to(w1, s1, (128, 128), torch.float32))
    del w1, d1
    gc.collect()
    assert cache.nbytes() == one  # the copy died with its weight
    kept = cache.get(w3, s3, (128, 128))
    assert cache.get(w3, s3, (128, 128)) is kept and cache.nbytes() == 2 * one


def test_a_copy_larger_than_the_budget_is_made_per_call_and_not_kept():
    from dshal.backends.cpu_native import DequantizedWeights

    (w, s), = _fp8_weights(1)
    cache = DequantizedWeights(max_bytes=128 * 256 * 4 - 1)
    first = cache.get(w, s, (128, 128))
    assert cache.nbytes() == 0 and cache.get(w, s, (128, 128)) is not first
    assert torch.equal(cache.get(w, s, (128, 128)), first)


def test_an_inference_mode_weight_buffer_refilled_in_place_is_not_served_stale(cpu):
    """A buffer made under ``torch.inference_mode()`` has no write counter: refilled with the
    next layer's FP8 weight (an offloading loop), its cached float32 copy looked unchanged and
    ``linear`` returned the previous weight's product (97 off). Such weights are dequantized
    per call."""
    from dshal.backends.cpu_native import DEQUANTIZED

    layers = _fp8_weights(2, n=64)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(4))  # > 32 rows: the cached prefill path
    with torch.inference_mode():
        w_buf, s_buf = torch.empty_like(layers[0][0]), torch.empty_like(layers[0][1])
        before = DEQUANTIZED.nbytes()
        for w, s in layers:
            w_buf.copy_(w)
            s_buf.copy_(s)
            assert torch.equal(ops.linear(x, w_buf, None, s_buf), SPECS["linear"].reference_impl(x, w, None, s))
        assert DEQUANTIZED.nbytes() == before


def test_cpu_kernels_write_on_the_cpu_whatever_the_default_device():
    """The C kernels' wrappers allocated their outputs on torch's default device: under
    ``torch.set_default_device("meta")`` (or ``with torch.device("meta")``, set elsewhere in
    a process) the C code wrote through a null pointer and the process died (SIGSEGV), in
    ``ops.rms_norm`` on CPU tensors and in ``generate``. Run in a child process, so that a
    crash fails the test instead of the session."""
    import subprocess
    import sys

    script = (
        "import torch, dshal\n"
        "from dshal import ops\n"
        "from dshal.model import random_model\n"
        "dshal.use(backend='cpu')\n"
        "model = random_model(seed=0)\n"
        "prompt = torch.tensor([[1, 2, 3]])\n"
        "x, w = torch.randn(4, 64), torch.rand(64)\n"
        "want = (ops.rms_norm(x, w), model.generate(prompt, 4))\n"
        "torch.set_default_device('meta')\n"
        "got = (ops.rms_norm(x, w), model.generate(prompt, 4))\n"
        "assert all(g.device.type == 'cpu' and torch.equal(g, h) for g, h in zip(got, want)), got\n"
        "print('same')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", (proc.returncode, proc.stderr[-2000:])


def test_dequant_cache_budget_from_the_environment(cpu, monkeypatch):
    """``DSHAL_CPU_DEQUANT_CACHE_GIB=0``: nothing kept, the same bits out; a malformed value
    is a ConfigError naming the variable, at config load already."""
    from dshal.backends.cpu_native import DEQUANTIZED, DequantizedWeights
    from dshal.errors import ConfigError

    (w, s), = _fp8_weights(1, n=64)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(3))
    kept = ops.linear(x, w, None, s)
    monkeypatch.setenv("DSHAL_CPU_DEQUANT_CACHE_GIB", "0")
    assert DequantizedWeights().limit() == 0
    before = DEQUANTIZED.nbytes()
    w2, s2 = w.clone(), s.clone()
    assert torch.equal(ops.linear(x, w2, None, s2), kept) and DEQUANTIZED.nbytes() == before
    monkeypatch.setenv("DSHAL_CPU_DEQUANT_CACHE_GIB", "lots")
    with pytest.raises(ConfigError, match=r"DSHAL_CPU_DEQUANT_CACHE_GIB: got 'lots', expected a number in \[0, 1e\+06\]"):
        DequantizedWeights().limit()
    with pytest.raises(ConfigError, match="DSHAL_CPU_DEQUANT_CACHE_GIB"):
        dshal.use(backend="cpu")


@pytest.mark.parametrize("fmt", ["e4m3", "e4m3fnuz"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_prefill_products_use_a_cached_dequantized_weight(cpu, fmt, dtype):
    """Many rows times FP8 weights (a prefill): the op's math with the weight dequantized
    once and kept (DequantizedWeights); a changed weight makes a new copy."""
    from dshal.backends.cpu_native import DEQUANTIZED

    gen = torch.Generator().manual_seed(24)
    quantize = SPECS["quantize_fp8"].reference_impl
    w, scale = quantize(torch.randn(200, 300, generator=gen) / 17, (128, 128), fmt, None)
    x = torch.randn(2, 40, 300, generator=gen).to(dtype)
    _check("linear", x, w, torch.randn(200, generator=gen).to(dtype), scale)
    held = DEQUANTIZED.nbytes()
    assert held >= 200 * 300 * 4  # this weight's float32 copy is kept
    _check("linear", x, w, None, scale)
    assert DEQUANTIZED.nbytes() == held  # ... and reused
    scale.mul_(2)  # the same tensors, changed in place: the copy is remade
    _check("linear", x, w, None, scale)
    row, row_scale = quantize(torch.randn(200, 300, generator=gen), (1, -1), fmt, None)
    _check("linear", x, row, None, row_scale)  # rowwise scales
    w256, s256 = quantize(torch.randn(64, 256, generator=gen) / 16, (128, 128), fmt, None)
    x256 = torch.randn(40, 256, generator=gen).to(dtype)
    _check("linear", x256, w256, None, s256)  # K a multiple of 128: the activations' fast path
    x256[3, 5] = float("inf")  # a non-finite value: the reference's handling
    _check("linear", x256, w256, None, s256)
    experts, hidden, inter = 4, 200, 72
    q13, s13 = quantize(torch.randn(experts, 2 * inter, hidden, generator=gen) / 14, (128, 128), fmt, None)
    q2, s2 = quantize(torch.randn(experts, hidden, inter, generator=gen) / 9, (128, 128), fmt, None)
    x = torch.randn(24, hidden, generator=gen).to(dtype)
    weights, ids = torch.rand(24, 2, generator=gen), torch.rand(24, experts, generator=gen).argsort(-1)[:, :2]
    _check("moe_experts", x, weights, ids, q13, q2, s13, s2)


def test_reference_backend_is_a_deprecated_alias_of_cpu_backend(monkeypatch):
    """The cpu backend's class was ReferenceBackend; code that subclasses it keeps working,
    with a DeprecationWarning pointing at CpuBackend."""
    import importlib
    import sys

    from dshal.backends.cpu import CpuBackend

    monkeypatch.delitem(sys.modules, "dshal.backends.reference", raising=False)
    with pytest.warns(DeprecationWarning, match="use dshal.backends.cpu.CpuBackend"):
        old = importlib.import_module("dshal.backends.reference")
    assert old.ReferenceBackend is CpuBackend and CpuBackend().name == "cpu"


def test_dequantized_copies_are_safe_from_several_threads():
    """A service's requests prefill at once while weights come and go (a hot reload): the
    byte total was a sum over the dict, which another thread's insert or a weight's death
    changed mid-iteration ("dictionary changed size during iteration" out of generate)."""
    import sys
    import threading

    from dshal.backends.cpu_native import DequantizedWeights
    from dshal.model.checkpoint import fp8_block_quantize

    cache = DequantizedWeights(max_bytes=1 << 30)
    errors: list[BaseException] = []
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    weights = [fp8_block_quantize(torch.randn(16, 16)) for _ in range(400)]

    def churn(mine: list) -> None:
        try:
            for _ in range(3):
                held = [(q.clone(), s.clone()) for q, s in mine]  # new weights: every get is a miss
                for q, s in held:
                    dense = cache.get(q, s, (128, 128))
                    assert cache.get(q, s, (128, 128)) is dense  # a hit: the same copy
                del held  # the weights die: their copies go with them
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=churn, args=(weights[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    assert not errors, errors[0]
    import gc

    gc.collect()
    assert cache.nbytes() == 0 and not cache._copies


def test_cpu_backend_docstring_names_the_native_ops():
    """The module docstring is where a reader learns which ops run natively: it lists NATIVE_OPS."""
    listed = re.search(r"Hot ops \(([^)]*)\)", cpu_module.__doc__ or "")
    assert listed, "dshal/backends/cpu.py's docstring no longer lists the native ops"
    assert set(re.split(r"[,\s]+", listed.group(1).strip())) == set(NATIVE_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sparse_mla_attention_matches_the_reference(cpu, dtype):
    """The gathered-rows path (no -1: a decode step past index_topk, several queries, a
    non-contiguous query, a row named twice, a NaN in a named row) and the reference's
    (a -1 somewhere, nothing to attend to)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 3, 40, generator=gen).to(dtype)
    kv = torch.randn(2, 30, 40, generator=gen).to(dtype)
    indices = torch.randint(0, 30, (2, 3, 7), generator=gen)
    indices[1, 2, :2] = 4  # named twice
    _check("sparse_mla_attention", q, kv, indices, 0.3, 32)
    _check("sparse_mla_attention", q[:, :, :1].transpose(1, 3).transpose(1, 3), kv, indices[:, :1], 0.3, 32)
    indices[0, [0, 2]] %= 29
    indices[0, 1, 3] = 29  # the only query naming row 29
    kv[0, 29, 35] = float("nan")
    got = ops.sparse_mla_attention(q, kv, indices, 0.3, 32)
    assert got[0, :, 1].isnan().all() and not got[0, :, [0, 2]].isnan().any()
    kv[0, 29, 35] = 0.0
    indices[0, 0, 1] = -1
    _check("sparse_mla_attention", q, kv, indices, 0.3, 32)
    _check("sparse_mla_attention", q, kv, indices[..., :0], 0.3, 32)
