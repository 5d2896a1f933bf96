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
from dshal.errors import ShapeError
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


def doc_grouped_matmul(x, weight_ekn, group_ends):
    """torch_npu-npu_grouped_matmul.md, group_type=0, group_list_type=0: y_i = x_i @ weight_i
    for the rows between consecutive cumulative counts."""
    out = torch.empty(x.shape[0], weight_ekn.shape[-1], dtype=x.dtype)
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        out[start:end] = (x[start:end].float() @ weight_ekn[e].float()).to(x.dtype)
        start = end
    return out


def doc_dynamic_quant(x):
    """torch_npu-npu_dynamic_quant.md: scale = rowmax(|x|) / 127, y = round(x / scale)."""
    scale = x.float().abs().amax(-1) / 127
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).nan_to_num(0).to(torch.int8), scale


def doc_quant_matmul(x1, x2, scale, pertoken_scale):
    """torch_npu-npu_quant_matmul.md: (x1 @ x2) * scale * pertoken_scale (int32 accumulate)."""
    acc = x1.to(torch.int64) @ x2.to(torch.int64)
    return acc.to(torch.float32) * scale[None, :] * pertoken_scale[:, None]


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
    close(got, ref.rotary_embedding(x, c, s, interleaved=True), dtype)


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
def test_ascend_fusion_attention_mask_arguments(tq, tk, causal, window, glob):
    m = L.fusion_attention_mask(tq, tk, causal, window, glob)
    if not causal and window is None:
        assert m.atten_mask is None and m.sparse_mode == 0
    elif window is None:
        # rightDownCausal: the kernel reads the compressed triu(1) mask shifted by Tk - Tq,
        # which must say exactly what the explicit end-aligned causal mask says.
        assert m.sparse_mode == 3 and m.atten_mask.shape == (2048, 2048) and m.atten_mask.dtype == torch.bool
        explicit = L.masked_pairs(tq, tk, True, None, 0)
        rows = torch.arange(tq)[:, None] + (tk - tq)
        cols = torch.arange(tk)[None, :]
        shifted = torch.where(rows >= 0, m.atten_mask[rows.clamp(min=0), cols], torch.ones((), dtype=torch.bool))
        assert torch.equal(shifted, explicit)
    else:
        assert m.sparse_mode == 0 and torch.equal(m.atten_mask, L.masked_pairs(tq, tk, causal, window, glob))
        assert m.pre_tockens == m.next_tockens == L.NO_TOKEN_LIMIT


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


def _experts_via_documented_kernels(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    prep = L.expert_operands(x, weights, ids, w13, w2, w13_scale, w2_scale)
    h = doc_grouped_matmul(prep.rows, prep.w13_ekn, prep.routing.group_ends)
    y = doc_grouped_matmul(prep.between(doc_swiglu(h)), prep.w2_ekn, prep.routing.group_ends)
    return L.combine_rows(y, prep.routing, x.shape[0]).to(x.dtype)


def test_ascend_moe_experts_routing_matches_reference():
    torch.manual_seed(5)
    tokens, hidden, inter, experts, top_k = 13, 32, 24, 6, 3
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts - 1)[:top_k] for _ in range(tokens)])  # expert 5 unused
    weights = torch.rand(tokens, top_k)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) * 0.2, torch.randn(experts, hidden, inter) * 0.2
    routing = L.route_tokens(weights, ids, experts)
    assert routing.group_ends.tolist()[-1] == tokens * top_k
    assert routing.group_ends[-1] == routing.group_ends[-2]  # empty last group
    got = _experts_via_documented_kernels(x, weights, ids, w13, w2)
    close(got, ref.moe_experts(x, weights, ids, w13, w2), torch.float32)


def test_ascend_moe_experts_fp8_emulation_close_to_reference():
    torch.manual_seed(6)
    tokens, hidden, inter, experts, top_k = 9, 256, 128, 4, 2
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    w13q, w13s = ref.quantize_fp8(torch.randn(experts, 2 * inter, hidden) * 0.1, (128, 128), "e4m3fn")
    w2q, w2s = ref.quantize_fp8(torch.randn(experts, hidden, inter) * 0.1, (128, 128), "e4m3fn")
    got = _experts_via_documented_kernels(x, weights, ids, w13q, w2q, w13s, w2s).float()
    want = ref.moe_experts(x, weights, ids, w13q, w2q, w13s, w2s).float()
    assert (got - want).norm() / want.norm() < 2e-2


def test_ascend_route_tokens_rejects_unknown_expert():
    with pytest.raises(ShapeError, match="expert id 7"):
        L.route_tokens(torch.ones(2, 2), torch.tensor([[0, 7], [1, 2]]), 4)


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


def test_ascend_quant_matmul_args_match_reference_int8_gemm():
    torch.manual_seed(8)
    a, b = torch.randint(-127, 128, (5, 96), dtype=torch.int8), torch.randint(-127, 128, (7, 96), dtype=torch.int8)
    a_s, b_s = torch.rand(5, 1) / 100, torch.rand(7, 1) / 100
    x1, x2, scale, pertoken = L.quant_matmul_args(a, a_s, b, b_s)
    assert x2.shape == (96, 7) and scale.shape == (7,) and pertoken.shape == (5,)
    close(doc_quant_matmul(x1, x2, scale, pertoken), ref.int8_gemm(a, a_s, b, b_s, torch.float32), torch.float32)


def test_ascend_fix_zero_scales():
    assert L.fix_zero_scales(torch.tensor([0.0, 0.5])).tolist() == [1.0, 0.5]


def test_ascend_attention_scale_default_matches_reference():
    # npu_ops passes d ** -0.5 when scale is None: the reference's 1/sqrt(D).
    q = torch.randn(1, 2, 3, 48)
    close(doc_fusion_attention(q, q, q, 2, None, 48 ** -0.5), ref.attention(q, q, q, False), torch.float32)
