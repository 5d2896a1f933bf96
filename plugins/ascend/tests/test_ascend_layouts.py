"""The pure-torch preparation around each torch_npu kernel, checked on CPU against the
reference ops.

No NPU and no torch_npu here. Where a check needs the kernel's own math, the test spells out
the formula from the kernel's op-plugin doc (``Ascend/op-plugin docs/context/...``) as a
plain torch function named ``doc_*``: it is the documented contract the preparation must
feed, not a stand-in for the device. The kernels themselves run only in
``test_ascend_npu.py`` on NPU hardware.
"""

from __future__ import annotations

import pytest
import torch

import dshal.ops.reference as ref
from dshal.plugin import NO_EXPERT
from dshal_ascend import layouts as L

# ---------------------------------------------------------------- documented kernel formulas


def doc_rms_norm(x, gamma, epsilon):
    """torch_npu-npu_rms_norm.md: -> (y, rstd)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def doc_add_rms_norm(x1, x2, gamma, epsilon):
    """op-plugin test_npu_add_rms_norm.py: -> (y, rstd, x1 + x2)."""
    x = (x1.float() + x2.float()).to(x1.dtype)
    y, rstd = doc_rms_norm(x, gamma, epsilon)
    return y, rstd, x


def doc_swiglu(x, dim=-1):
    """torch_npu-npu_swiglu.md: swish(A) * B, A = first half along dim."""
    a, b = x.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(x.dtype)


def doc_rotary_mul_half(x, r1, r2):
    """torch_npu-npu_rotary_mul.md, half mode: r1 * x + r2 * cat(-x2, x1)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return (r1.float() * x.float() + r2.float() * torch.cat((-x2, x1), dim=-1)).to(x.dtype)


def doc_interleave_rope(x, cos, sin):
    """InterleaveRope (ops-transformer doc): q = x.reshape(B, N, S, D/2, 2).transpose(-1, -2)
    .reshape(B, N, S, D); q * cos + RotateHalf(q) * sin."""
    b, n, s, d = x.shape
    q = x.float().reshape(b, n, s, d // 2, 2).transpose(-1, -2).reshape(b, n, s, d)
    q1, q2 = q.chunk(2, dim=-1)
    return (q * cos.float() + torch.cat((-q2, q1), dim=-1) * sin.float()).to(x.dtype)


def doc_fusion_attention(q, k, v, head_num, atten_mask, scale):
    """torch_npu-npu_fusion_attention.md (BNSD, no dropout): softmax(mask(scale * q k^T)) v,
    atten_mask True = not computed; GQA shares each kv head across Nq / Nkv query heads."""
    rep = head_num // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    if atten_mask is not None:
        scores = scores.masked_fill(atten_mask, float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ vf).to(q.dtype)


def doc_dynamic_quant(x):
    """torch_npu-npu_dynamic_quant.md: scale = rowmax(|x|) / 127, y = round(x / scale)."""
    scale = x.float().abs().amax(-1) / 127
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).nan_to_num(0).to(torch.int8), scale


def close(got, want, dtype):
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (1e-3, 1e-3)}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol[0], atol=tol[1])


# ---------------------------------------------------------------- rms_norm / swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ascend_rms_norm_outputs_pick_y_and_residual_sum(dtype):
    x, r = torch.randn(3, 5, 64, dtype=dtype), torch.randn(3, 5, 64, dtype=dtype)
    w = torch.rand(64, dtype=dtype) + 0.5
    close(L.pick_rms_norm_outputs(doc_rms_norm(x, w, 1e-6), fused=False), ref.rms_norm(x, w, 1e-6), dtype)
    y, s = L.pick_rms_norm_outputs(doc_add_rms_norm(x, r, w, 1e-6), fused=True)
    want_y, want_s = ref.rms_norm(x, w, 1e-6, r)
    close(y, want_y, dtype)
    close(s, want_s, dtype)
    with pytest.raises(TypeError, match="expected 3 outputs"):
        L.pick_rms_norm_outputs(doc_rms_norm(x, w, 1e-6), fused=True)


def test_ascend_swiglu_order_matches_silu_and_mul():
    x = torch.randn(4, 7, 2 * 48)
    close(doc_swiglu(x), ref.silu_and_mul(x), torch.float32)


# ---------------------------------------------------------------- rotary


def test_ascend_interleave_permutations_are_inverse():
    x = torch.arange(2 * 3 * 8).reshape(2, 3, 8)
    assert L.deinterleave_pairs(x)[0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(L.interleave_halves(L.deinterleave_pairs(x)), x)


def _rope_case(shape, cos_shape, dtype=torch.float32):
    x = torch.randn(*shape, dtype=dtype)
    angle = torch.rand(*cos_shape) * 6.0
    return x, torch.cos(angle), torch.sin(angle)


ROPE_SHAPES = [
    ((2, 4, 5, 16), (5, 8)),  # x [B, H, T, D], tables [T, D/2]
    ((2, 4, 5, 16), (2, 1, 5, 8)),  # per-batch positions
    ((7, 3, 64), (7, 1, 32)),  # [T, H, D] as MLA's rope part
    ((6, 10), (6, 5)),  # 2-D
]


@pytest.mark.parametrize("shape,cos_shape", ROPE_SHAPES)
def test_ascend_rotary_half_layout_via_rotary_mul(shape, cos_shape):
    x, c, s = _rope_case(shape, cos_shape)
    x4, c4, s4 = L.rope_rows_4d(x, c, s)
    assert x4.dim() == 4 and x4.shape[:2] == (1, 1) and c4.shape == x4.shape
    got = doc_rotary_mul_half(x4, c4, s4).reshape(x.shape)
    close(got, ref.rotary_embedding(x, c, s, interleaved=False), torch.float32)


@pytest.mark.parametrize("shape,cos_shape", ROPE_SHAPES)
def test_ascend_rotary_interleaved_via_permuted_rotary_mul(shape, cos_shape):
    x, c, s = _rope_case(shape, cos_shape)
    x4, c4, s4 = L.rope_rows_4d(x, c, s)
    got = L.interleave_halves(doc_rotary_mul_half(L.deinterleave_pairs(x4), c4, s4)).reshape(x.shape)
    close(got, ref.rotary_embedding(x, c, s, interleaved=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ascend_rotary_interleaved_via_interleave_rope(dtype):
    x, c, s = _rope_case((2, 3, 4, 64), (4, 32), dtype)
    x4, c4, s4 = L.rope_rows_4d(x, c, s)
    got = L.interleave_halves(doc_interleave_rope(x4, c4, s4)).reshape(x.shape)
    # The kernel takes the tables in x's dtype (rope_rows_4d rounds them): compare with the
    # reference given the same tables, or float16's rounded cos/sin (|x| up to ~4) move an
    # output by up to ~1e-3 on about one draw in a thousand.
    close(got, ref.rotary_embedding(x, c.to(dtype), s.to(dtype), interleaved=True), dtype)


# ---------------------------------------------------------------- attention

ATTENTION_CASES = [
    # (tq, tk, causal, window, global_tokens)
    (6, 6, True, None, 0),
    (3, 9, True, None, 0),  # decode-like: queries at the end
    (9, 4, True, None, 0),  # Tq > Tk: leading queries see nothing -> zeros
    (8, 8, True, 3, 0),
    (5, 12, True, 4, 2),
    (8, 8, False, 2, 0),
    (8, 8, False, 3, 2),
    (7, 7, False, None, 0),
    (6, 3, False, 2, 1),
    (1, 9, True, 4, 0),  # one query: keys sliced
    (1, 9, True, 3, 2),
]


@pytest.mark.parametrize("tq,tk,causal,window,glob", ATTENTION_CASES)
def test_ascend_attention_mask_matches_reference_semantics(tq, tk, causal, window, glob):
    torch.manual_seed(tq * 100 + tk)
    q, k, v = torch.randn(2, 4, tq, 16), torch.randn(2, 2, tk, 16), torch.randn(2, 2, tk, 8)
    hidden = L.masked_pairs(tq, tk, causal, window, glob)
    out = doc_fusion_attention(q, k, v, 4, hidden, 16 ** -0.5)
    out = L.zero_rows_without_keys(out, hidden)
    close(out, ref.attention(q, k, v, causal, None, window, glob), torch.float32)


@pytest.mark.parametrize("tq,tk,causal,window,glob", ATTENTION_CASES)
def test_ascend_infer_attention_plan_says_what_the_dense_mask_says(tq, tk, causal, window, glob):
    plan = L.infer_attention_plan(tq, tk, causal, window, glob)
    explicit = L.masked_pairs(tq, tk, causal, window, glob)
    rel = torch.arange(tk)[None, :] - (torch.arange(tq)[:, None] + (tk - tq))
    if plan.keys is not None or tq == 1:  # one query: no mask, the visible keys are passed
        assert plan.atten_mask is None
        keys = torch.arange(tk)[plan.keys] if plan.keys is not None else torch.arange(tk)
        visible = torch.zeros(tk, dtype=torch.bool).index_fill_(0, keys, True)
        assert explicit is None or torch.equal(visible, ~explicit[0])
    elif plan.sparse_mode == 3:  # rightDownCausal from the compressed triu(1) mask, shifted by Tk - Tq
        assert plan.atten_mask.shape == (2048, 2048) and torch.equal(rel > 0, explicit)
    elif plan.sparse_mode == 4:  # band: keys p - pre .. p + next, no dense mask
        assert glob == 0 and plan.atten_mask.shape == (2048, 2048)
        assert torch.equal((rel < -plan.pre_tokens) | (rel > plan.next_tokens), explicit)
    else:
        assert plan.sparse_mode == 0
        assert (plan.atten_mask is None and explicit is None) or torch.equal(plan.atten_mask, explicit)
        assert plan.atten_mask is None or glob > 0  # a dense mask only for global tokens


# ---------------------------------------------------------------- moe_gate


def test_ascend_gating_kernel_fit_rules():
    assert L.gating_top_k_fit(256, 8, 8, 4)[0]  # DeepSeek-V3
    assert L.gating_top_k_fit(64, 6, 1, 1)[0]  # no groups
    for args, why in [
        ((8, 2, 4, 2), "experts per group"),
        ((4096, 8, 8, 4), "2048"),
        ((2000, 8, 40, 4), "align32"),
        ((64, 40, 8, 4), "top_k"),
    ]:
        ok, reason = L.gating_top_k_fit(*args)
        assert not ok and why in reason


@pytest.mark.parametrize("norm,bias", [(True, True), (False, True), (True, False)])
def test_ascend_finish_gate_recovers_reference_from_unordered_ids(norm, bias):
    torch.manual_seed(3)
    # bf16 logits tie often without a bias; the order among ties is topk's own business.
    logits = torch.randn(11, 64, dtype=torch.bfloat16 if bias else torch.float32)
    b = torch.randn(64) * 0.1 if bias else None
    want_w, want_ids = ref.moe_gate(logits, b, 6, 8, 3, 2.5, norm)
    shuffled = torch.stack([row[torch.randperm(6)] for row in want_ids]).to(torch.int32)  # the kernel's int32
    w, ids = L.finish_gate(logits, b, shuffled, 2.5, norm)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w)


# ---------------------------------------------------------------- moe_experts


def test_ascend_moe_routing_groups():
    torch.manual_seed(5)
    tokens, experts, top_k = 13, 6, 3
    ids = torch.stack([torch.randperm(experts - 1)[:top_k] for _ in range(tokens)])  # expert 5 unused
    routing = L.route_tokens(torch.rand(tokens, top_k), ids, experts)
    assert routing.group_ends.tolist()[-1] == tokens * top_k
    assert routing.group_ends[-1] == routing.group_ends[-2]  # empty last group
    active = L.active_experts(ids)
    assert active.index.tolist() == sorted(set(ids.flatten().tolist()))
    assert torch.equal(active.index[active.local_ids], ids)


def test_ascend_split_ranges():
    assert L.split_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert L.split_ranges(129280) == [(0, 64640), (64640, 129280)]
    assert L.split_ranges(65535) == [(0, 65535)]


def test_ascend_route_tokens_puts_no_expert_slots_past_every_group():
    ids = torch.tensor([[2, NO_EXPERT], [NO_EXPERT, 0], [2, 1]])
    weights = torch.tensor([[0.5, float("nan")], [float("nan"), 0.25], [1.0, 2.0]])
    routing = L.route_tokens(weights, ids, 4)
    assert routing.group_ends.tolist() == [1, 2, 4, 4]  # 4 served slots; expert 3 has none
    assert routing.token_of_row.tolist() == [1, 2, 0, 2, 0, 1]  # expert order, then the NO_EXPERT slots
    assert routing.target_of_row.tolist() == [1, 2, 0, 2, 3, 3]  # those add to the spare row 3
    # rows past the last group hold whatever the kernel left there (NaN): dropped, as their NaN weights
    rows = torch.tensor([[1.0], [2.0], [3.0], [4.0], [float("nan")], [float("inf")]])
    assert L.combine_rows(rows, routing, 3).tolist() == [[1.5], [0.25], [8.0]]


# ---------------------------------------------------------------- int8


def test_ascend_dynamic_quant_result_matches_reference_quantize_int8():
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16) * 3
    x[1, 2] = 0  # an all-zero row: dshal's scale is 1
    q, s = doc_dynamic_quant(x.reshape(-1, 64))
    q, s = L.dynamic_quant_result(q, s, x.shape)
    want_q, want_s = ref.quantize_int8(x)
    assert s.shape == want_s.shape == (3, 4, 1)
    torch.testing.assert_close(s, want_s)
    assert (q.int() - want_q.int()).abs().max() <= 1  # round-half differences only
    assert s[1, 2].item() == 1.0


def test_ascend_fix_zero_scales():
    assert L.fix_zero_scales(torch.tensor([0.0, 0.5])).tolist() == [1.0, 0.5]


def test_ascend_attention_scale_default_matches_reference():
    # npu_ops passes d ** -0.5 when scale is None: the reference's 1/sqrt(D).
    q = torch.randn(1, 2, 3, 48)
    close(doc_fusion_attention(q, q, q, 2, None, 48 ** -0.5), ref.attention(q, q, q, False), torch.float32)
