"""Pure-torch preparation around the torch_npu kernels: layout changes, masks, token sorting.

Nothing here imports torch_npu, so every function runs (and is unit-tested) on CPU
tensors against ``dshal.ops.reference``; on the NPU the same code runs on ``npu`` tensors
right before and after the fused kernel in :mod:`dshal_ascend.npu_ops`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dshal.plugin import NO_EXPERT, dequantize_to
from dshal_ascend.fp8emu import decode_fp8, fake_quantize_fp8, format_of

#: ``pre_tokens`` / ``next_tokens`` default of npu_fused_infer_attention_score: "no limit".
NO_TOKEN_LIMIT = 2147483647

# ---------------------------------------------------------------- rms_norm


def pick_rms_norm_outputs(outputs: tuple[torch.Tensor, ...], fused: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Map torch_npu's RMSNorm tuples to dshal's return value.

    ``npu_rms_norm`` returns ``(y, rstd)``; ``npu_add_rms_norm`` returns ``(y, rstd, x1 + x2)``
    (op-plugin docs ``torch_npu-npu_rms_norm.md`` and its add_rms_norm test). dshal returns
    ``y`` or ``(y, x + residual)``: the residual sum is the *third* element, not the second.
    """
    expected = 3 if fused else 2
    if len(outputs) != expected:
        raise TypeError(f"expected {expected} outputs from the torch_npu RMSNorm kernel, got {len(outputs)}")
    return (outputs[0], outputs[2]) if fused else outputs[0]


# ---------------------------------------------------------------- rotary


def deinterleave_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs ``(x0, x1), (x2, x3)...`` -> half-split ``[x0, x2, ..., x1, x3, ...]``."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def interleave_halves(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`deinterleave_pairs`: ``[a0..a(n-1), b0..b(n-1)]`` -> ``[a0, b0, a1, b1, ...]``."""
    a, b = x.chunk(2, dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)


RopeOperands = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rope_rows_4d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> RopeOperands:
    """Flatten ``x [..., D]`` to the 4-D ``[1, 1, R, D]`` (BNSD with B = N = 1) the rotary
    kernels take, and expand the per-pair tables to full-width ``[1, 1, R, D]`` = ``cat(c, c)``.
    The general case (any rank, tables broadcast per row); :func:`rope_operands` avoids it
    for the model's ``[B, H, S, D]`` activations."""
    d = x.shape[-1]
    half = (*x.shape[:-1], d // 2)
    rows = x.numel() // d if d else 0
    c = cos.to(x.dtype).expand(half).reshape(rows, d // 2)
    s = sin.to(x.dtype).expand(half).reshape(rows, d // 2)
    full = lambda t: torch.cat((t, t), dim=-1).reshape(1, 1, rows, d).contiguous()  # noqa: E731
    return x.reshape(1, 1, rows, d).contiguous(), full(c), full(s)


#: npu_rotary_mul's bound on B and N (exclusive) in its half mode.
ROTARY_MAX_BN = 1000
#: npu_rotary_mul's bound on the head dim D (exclusive), in both modes on Atlas A2/A3 (op-plugin
#: 7.1.0 / 7.3.0 docs/context/torch_npu-npu_rotary_mul.md, "D < 896"; 26.x custom_APIs pages).
ROTARY_MAX_D = 896


def rope_operands(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> RopeOperands:
    """``x [B, N, S, D]`` with tables that vary only along S (``[S, D/2]``, ``[1, 1, S, D/2]``...):
    pass ``x`` as is and the tables once per position as ``[1, 1, S, D]`` (``cat(c, c)``), which
    npu_rotary_mul broadcasts over B and N (layout "11SD"). Anything else: :func:`rope_rows_4d`."""
    d = x.shape[-1]
    # npu_rotary_mul's half mode wants B, N < 1000 (op-plugin 7.1.0/7.3.0/26.0.0/26.1.0 torch_npu-npu_rotary_mul.md).
    if x.dim() == 4 and x.shape[0] < ROTARY_MAX_BN and x.shape[1] < ROTARY_MAX_BN and cos.dim() <= 4 and cos.shape == sin.shape:
        padded = (1,) * (4 - cos.dim()) + tuple(cos.shape)
        if padded[0] == 1 and padded[1] == 1 and padded[2] in (1, x.shape[2]) and padded[3] in (1, d // 2):
            seq = (1, 1, x.shape[2], d // 2)
            full = lambda t: torch.cat((t, t), dim=-1).contiguous()  # noqa: E731
            c = cos.to(x.dtype).reshape(padded).expand(seq)
            s = sin.to(x.dtype).reshape(padded).expand(seq)
            return x.contiguous(), full(c), full(s)
    return rope_rows_4d(x, cos, sin)


# ---------------------------------------------------------------- attention
#: npu_fused_infer_attention_score's limits on Atlas A2/A3 (op-plugin 7.1.0-7.3.0
#: docs/context/torch_npu-npu_fused_infer_attention_score.md; 26.0.0 / 26.1.0
#: docs/zh/custom_APIs/torch_npu/ say the same): query float16 / bfloat16, head
#: dim <= 512 and a multiple of 16, at most 256 query heads, num_heads / num_key_value_heads <= 64.
FIA_DTYPES = (torch.float16, torch.bfloat16)
FIA_MAX_HEAD_DIM, FIA_HEAD_DIM_MULTIPLE, FIA_MAX_HEADS, FIA_MAX_GROUP = 512, 16, 256, 64
#: B <= 65536 and S <= 262144: the page's limits for one query (7.1.0 line 368, 7.3.0 line 342,
#: 26.1.0 docs/zh/custom_APIs/torch_npu/ line 427); dshal holds every call to them, as the MLA form's.
FIA_MAX_BATCH, FIA_MAX_KEYS = 65536, 262144


def fused_attention_unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why ``npu_fused_infer_attention_score`` cannot take ``q [B, Hq, Tq, D]`` / ``k [B, Hk, Tk, D]``
    (the reference then serves the call), or None."""
    d, heads, kv_heads = q.shape[3], q.shape[1], k.shape[1]
    if q.dtype not in FIA_DTYPES:
        return f"query dtype {q.dtype} (the kernel takes float16 / bfloat16)"
    if d > FIA_MAX_HEAD_DIM or d % FIA_HEAD_DIM_MULTIPLE:
        return f"head dim {d} (the kernel takes at most {FIA_MAX_HEAD_DIM}, a multiple of {FIA_HEAD_DIM_MULTIPLE})"
    if heads > FIA_MAX_HEADS or heads // max(kv_heads, 1) > FIA_MAX_GROUP:
        return f"{heads} query heads over {kv_heads} kv heads (at most {FIA_MAX_HEADS}, {FIA_MAX_GROUP} per kv head)"
    if q.shape[0] > FIA_MAX_BATCH or k.shape[2] > FIA_MAX_KEYS:
        return f"batch {q.shape[0]} x {k.shape[2]} keys (the kernel takes B <= {FIA_MAX_BATCH}, S <= {FIA_MAX_KEYS})"
    return None


#: The MLA form of npu_fused_infer_attention_score on A2/A3 (``query_rope`` / ``key_rope``; op-plugin
#: 7.1.0 and 7.2.0 docs/context/torch_npu-npu_fused_infer_attention_score.md, query D 512): query
#: D 512 + rope 64, 32 / 64 / 128 query heads over one kv head (the MLA section allows 128 per kv
#: head, past the general 64), 1-16 queries, page attention required (block_size 16 or 128), one
#: query: sparse_mode 0 and no mask, more: sparse_mode 3 with the compressed mask; every dim of
#: key and of value multiplied must fit int32, B <= 65536, S <= 262144. 7.3.0 relaxes these (more
#: head counts, other sparse modes, page attention optional; 26.0.0 / 26.1.0 as 7.3.0); dshal keeps
#: to what every release from 7.1.0 takes. dshal's absorbed MLA decode steps are this shape (r 512, rope 64); fewer
#: heads (DeepSeek-V3 on TP=8: 16 per rank) are padded with zero queries to 32, as vllm-ascend does.
MLA_LATENT_DIM, MLA_ROPE_DIM, MLA_HEADS, MLA_MAX_QUERIES = 512, 64, (32, 64, 128), 16
MLA_BLOCK_SIZE = 128
MLA_MAX_BATCH, MLA_MAX_KEYS, MLA_MAX_ELEMENTS = 65536, 262144, 2**31 - 1


def mla_heads(heads: int) -> int | None:
    """The head count the MLA form runs ``heads`` query heads as (zero queries pad the rest),
    or None past its largest."""
    return next((n for n in MLA_HEADS if n >= heads), None)


def mla_form_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None) -> str | None:
    """Why the kernel's MLA form cannot take absorbed ``q [B, H, Tq, r + rope]``, ``k [B, 1, Tk, r + rope]``,
    ``v [B, 1, Tk, r]``, or None."""
    batch, heads, tq, d = q.shape
    tk = k.shape[2]
    if d != MLA_LATENT_DIM + MLA_ROPE_DIM or v.shape[3] != MLA_LATENT_DIM or k.shape[1] != 1:
        return (f"q head dim {d}, v head dim {v.shape[3]}, {k.shape[1]} kv heads (the MLA form takes "
                f"{MLA_LATENT_DIM} + {MLA_ROPE_DIM}, {MLA_LATENT_DIM}, 1)")
    if q.dtype not in FIA_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (one of float16 / bfloat16)"
    if mla_heads(heads) is None:
        return f"{heads} query heads (the MLA form takes at most {MLA_HEADS[-1]})"
    if not 1 <= tq <= min(MLA_MAX_QUERIES, tk):
        return f"{tq} queries over {tk} keys (the MLA form takes 1-{MLA_MAX_QUERIES}, at most one per key)"
    if tq > 1 and not (causal and window is None):
        return "several queries without a plain causal mask (the MLA form takes only sparse_mode 3 then)"
    pages = -(-tk // MLA_BLOCK_SIZE)
    if batch > MLA_MAX_BATCH or tk > MLA_MAX_KEYS or batch * pages * MLA_BLOCK_SIZE * MLA_LATENT_DIM > MLA_MAX_ELEMENTS:
        return (f"batch {batch} x {tk} keys (the kernel takes B <= {MLA_MAX_BATCH}, S <= {MLA_MAX_KEYS}, "
                "and paged key / value of at most 2**31 - 1 elements)")
    return None


def paged(t: torch.Tensor, block: int = MLA_BLOCK_SIZE) -> torch.Tensor:
    """``t [B, 1, S, D]`` as page-attention blocks ``[B * ceil(S / block), 1, block, D]``, batch b's
    pages first-to-last at ``b * pages .. (b + 1) * pages - 1`` (:func:`page_table`); the last page is
    zero-padded. A view when S is a multiple of ``block`` and ``t`` is contiguous, else one copy."""
    b, _, s, d = t.shape
    pages = -(-s // block)
    if pages * block != s:
        t = torch.nn.functional.pad(t, (0, 0, 0, pages * block - s))
    return t.contiguous().reshape(b * pages, 1, block, d)  # [B, 1, P*block, D] -> N = 1, so a view


def page_table(batch: int, seq: int, device: torch.device | str, block: int = MLA_BLOCK_SIZE) -> torch.Tensor:
    """``block_table [B, pages]`` int32 for :func:`paged`'s layout."""
    pages = -(-seq // block)
    return torch.arange(batch * pages, dtype=torch.int32, device=device).reshape(batch, pages)


@dataclass(frozen=True)
class InferAttentionPlan:
    """The mask arguments of ``npu_fused_infer_attention_score`` for one (Tq, Tk, causal,
    window, global) case (op-plugin 7.1.0 ``docs/context/torch_npu-npu_fused_infer_attention_score.md``).

    ``atten_mask``: bool, True = the pair does NOT take part, or None. ``sparse_mode``:
    0 = the mask as given (or none), 3 = rightDownCausal and 4 = band, both with the
    2048 x 2048 compressed ``triu(1)`` mask; band keeps, for the query at end-aligned position
    ``p``, the keys ``p - pre_tokens .. p + next_tokens``. ``keys``: for one query (sparse
    modes are ignored when Q_S == 1) the key positions to pass instead of a mask, or None = all.
    """

    atten_mask: torch.Tensor | None
    sparse_mode: int
    pre_tokens: int = NO_TOKEN_LIMIT
    next_tokens: int = NO_TOKEN_LIMIT
    keys: torch.Tensor | slice | None = None


def masked_pairs(tq: int, tk: int, causal: bool, window: int | None, global_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Bool ``[Tq, Tk]``, True where query ``i`` must NOT see key ``j`` (None: nothing masked).

    Query ``i`` sits at position ``i + Tk - Tq`` (end-aligned). The offset of key ``j``
    from the query, ``rel = j - pos``, decides: causal hides ``rel > 0``; a window ``w``
    hides ``rel <= -w`` (and, non-causal, ``rel >= w``); the first ``global_tokens`` keys
    are exempt from the window (never from causality).
    """
    if not causal and window is None:
        return None
    rel = torch.arange(tk, device=device)[None, :] - (torch.arange(tq, device=device)[:, None] + (tk - tq))
    hidden = rel > 0 if causal else torch.zeros(tq, tk, dtype=torch.bool, device=device)
    if window is not None:
        outside = rel <= -window if causal else rel.abs() >= window
        is_global = torch.arange(tk, device=device)[None, :] < global_tokens
        hidden = hidden | (outside & ~is_global)
    return hidden


#: Side of the compressed causal mask that sparse modes 2/3/4 expect (op-plugin docs).
COMPRESSED_MASK_SIZE = 2048


@functools.lru_cache(maxsize=16)
def compressed_causal_mask(device: str) -> torch.Tensor:
    """The 2048 x 2048 ``triu(1)`` bool mask of sparse modes 2/3 (4 MiB), once per device."""
    size = COMPRESSED_MASK_SIZE
    return torch.ones(size, size, dtype=torch.bool, device=device).triu_(1)


def infer_attention_plan(
    tq: int, tk: int, causal: bool, window: int | None, global_tokens: int, device: torch.device | str = "cpu"
) -> InferAttentionPlan:
    """Express dshal's mask to ``npu_fused_infer_attention_score`` without a dense mask where possible.

    * nothing masked -> no mask, ``sparse_mode=0``;
    * one query (decode) -> no mask: causal end-aligned sees every key; a window keeps the
      last ``window`` keys and the ``global_tokens`` first ones, passed as a key slice/index;
    * causal -> ``sparse_mode=3`` with the compressed mask (O(1) in the sequence length);
    * window without global tokens -> band, ``sparse_mode=4``: ``pre_tokens = window - 1``,
      ``next_tokens = 0`` (causal) or ``window - 1``;
    * window with global tokens (several queries) -> the dense ``[Tq, Tk]`` mask, ``sparse_mode=0``.
    """
    if not causal and window is None:
        return InferAttentionPlan(None, 0)
    if tq == 1:
        if window is None or window >= tk:
            return InferAttentionPlan(None, 0)
        start = tk - window
        if global_tokens <= 0:
            return InferAttentionPlan(None, 0, keys=slice(start, tk))
        if global_tokens >= start:
            return InferAttentionPlan(None, 0)
        keys = torch.cat((torch.arange(global_tokens), torch.arange(start, tk))).to(device)
        return InferAttentionPlan(None, 0, keys=keys)
    if window is None:
        return InferAttentionPlan(compressed_causal_mask(str(device)), 3)
    if global_tokens <= 0:
        return InferAttentionPlan(compressed_causal_mask(str(device)), 4, window - 1, 0 if causal else window - 1)
    return InferAttentionPlan(masked_pairs(tq, tk, causal, window, global_tokens, device), 0)


def zero_rows_without_keys(out: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """dshal outputs zeros for a query that sees no key; fused kernels leave such rows
    undefined. ``out [..., Tq, Dv]``, ``hidden [Tq, Tk]`` (True = masked)."""
    if hidden is None or hidden.shape[-1] == 0:
        return out if hidden is None else torch.zeros_like(out)
    blind = hidden.all(dim=-1)
    if not bool(blind.any()):
        return out
    return out.masked_fill(blind[:, None], 0.0)


# ---------------------------------------------------------------- moe_gate


def gating_top_k_fit(
    experts: int, top_k: int, n_group: int, topk_group: int, fixed_shape: bool = False, has_bias: bool = True
) -> tuple[bool, str]:
    """Whether ``npu_moe_gating_top_k`` selects exactly DeepSeek-V3's experts, and why not.

    The kernel (op-plugin doc ``torch_npu-npu_moe_gating_top_k.md``) matches dshal's
    ``moe_gate`` selection with ``norm_type=1`` (sigmoid), ``group_select_mode=1`` (a group
    scores the sum of its top-2) and the bias added for choice only, when:
    E <= 2048; E divisible by ``n_group`` with more than 2 experts per group (so the top-2
    sum is the same as dshal's); ``align32(E / n_group) * n_group <= 2048``;
    ``1 <= topk_group <= n_group``; ``top_k <= E / n_group * topk_group``. Only the *ids* are
    taken from the kernel; the weights are recomputed (:func:`finish_gate`), so
    ``norm_topk_prob`` and ``routed_scaling_factor`` always follow dshal's definition
    (the kernel's own ``y`` formula is a figure in the doc; we do not depend on it).

    ``fixed_shape``: the op-plugin 7.1.0 page's A2/A3 limits (7.0.0 and 7.1.0): only 256
    experts, 8 groups, ``topk_group`` 4, a bias, ``top_k <= 32``.
    """
    if fixed_shape:
        if (experts, n_group, topk_group) != (256, 8, 4) or not has_bias or top_k > 32:
            return False, (f"E={experts}, n_group={n_group}, topk_group={topk_group}, bias={has_bias}, top_k={top_k}: "
                           "before op-plugin 7.2.0 the kernel takes only E=256, 8 groups, topk_group 4, a bias, top_k <= 32")
    if experts > 2048:
        return False, f"{experts} experts > 2048 (kernel limit)"
    if n_group < 1 or experts % n_group:
        return False, f"{experts} experts not divisible into {n_group} groups"
    per_group = experts // n_group
    if per_group <= 2:
        return False, f"{per_group} experts per group (kernel needs > 2)"
    if -(-per_group // 32) * 32 * n_group > 2048:
        return False, f"align32({per_group}) * {n_group} groups > 2048 (kernel limit)"
    if not 1 <= topk_group <= n_group:
        return False, f"topk_group {topk_group} outside [1, {n_group}]"
    if not 1 <= top_k <= per_group * topk_group:
        return False, f"top_k {top_k} outside [1, {per_group * topk_group}]"
    return True, "matches DeepSeek-V3 routing (sigmoid, top-2 group score, bias for choice only)"


def finish_gate(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and order for chosen expert ``ids [T, k]`` (in any order, any int dtype).

    Recomputes the weights as dshal defines them (sigmoid scores without bias, optionally
    normalized with +1e-20, times ``routed_scaling_factor``, float32) and sorts each row best
    choice score first, as ``torch.topk`` in the reference does. Returns
    ``(weights float32 [T, k], ids int64 [T, k])``.
    """
    ids = ids.to(torch.int64)
    scores = torch.sigmoid(logits.to(torch.float32))
    choice = scores if bias is None else scores + bias.to(torch.float32)
    rank = choice.gather(1, ids).argsort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, rank)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


# ---------------------------------------------------------------- moe_experts


@dataclass(frozen=True)
class ExpertRouting:
    """(token, slot) pairs sorted by expert, as ``npu_grouped_matmul`` wants its rows.

    ``token_of_row[r]``: the token that sorted row ``r`` reads; ``weight_of_row[r]``: its
    routing weight; ``group_ends``: cumulative row counts per expert (``group_list`` with
    ``group_list_type=0``), int64 ``[E]``; ``target_of_row[r]``: the output row it adds to,
    its token, or ``T`` (a spare row, dropped) for a :data:`NO_EXPERT` slot.
    """

    token_of_row: torch.Tensor
    weight_of_row: torch.Tensor
    group_ends: torch.Tensor
    target_of_row: torch.Tensor


def route_tokens(weights: torch.Tensor, ids: torch.Tensor, experts: int) -> ExpertRouting:
    """Sort the ``T * k`` (token, slot) pairs by expert id (stable: token order kept per expert).

    :data:`NO_EXPERT` slots sort last, past ``group_ends[-1]``, so no group computes them
    (vllm-ascend's ``expert_map`` path does the same). No host read: the counts come from
    ``scatter_add_``, not ``bincount`` (op-plugin's NPU bincount reads min and max on the
    host). ``ids`` must be checked first (``moe_experts`` does): another id is not caught here.
    """
    tokens, top_k = ids.shape
    flat = ids.reshape(-1).to(torch.int64)
    skipped = flat == NO_EXPERT
    flat = flat.masked_fill(skipped, experts)  # one bucket past the last expert
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    token_of_row = order // top_k
    return ExpertRouting(
        token_of_row=token_of_row,
        weight_of_row=weights.reshape(-1)[order],
        group_ends=torch.cumsum(counts[:experts], 0),
        target_of_row=token_of_row.masked_fill(skipped[order], tokens),
    )


def combine_rows(rows: torch.Tensor, routing: ExpertRouting, tokens: int, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """``out[t] = sum over rows r of token t: weight_of_row[r] * rows[r]`` in ``acc``.

    Rows of :data:`NO_EXPERT` slots go to a spare row that is dropped: ``npu_grouped_matmul``
    leaves rows past the last group unwritten (vllm-ascend saw random values and NaN there),
    and their weights may be NaN."""
    out = torch.zeros(tokens + 1, rows.shape[-1], dtype=acc, device=rows.device)
    return out.index_add_(0, routing.target_of_row, rows.to(acc) * routing.weight_of_row.to(acc)[:, None])[:tokens]


def dequantize_expert_weights(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``[E, R, C]`` + 128x128 block scales -> ``dtype``, without FP8 casts (emulated)."""
    return dequantize_to(decode_fp8(w), scale, (128, 128), torch.float32).to(dtype)


@dataclass(frozen=True)
class ActiveExperts:
    """The experts a batch routes to, so FP8 experts are decoded only for those.

    ``index``: expert ids in use, ascending, int64 ``[A]``; ``local_ids``: ``ids`` renumbered
    to positions in ``index`` (what the grouped matmul's ``group_list`` counts)."""

    index: torch.Tensor
    local_ids: torch.Tensor


def active_experts(ids: torch.Tensor) -> ActiveExperts:
    index, local = torch.unique(ids.to(torch.int64), sorted=True, return_inverse=True)
    return ActiveExperts(index, local.reshape(ids.shape))


def fp8_expert_rows(rows: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """Token rows rounded to FP8 per (1, 128), as the reference's FP8 ``linear`` quantizes its inputs."""
    return fake_quantize_fp8(rows, (1, 128), format_of(w13.dtype).name).to(rows.dtype)


#: Largest K or N one CANN matmul call takes (issue #20; split beyond it).
MATMUL_DIM_LIMIT = 65535
#: Most groups (experts) one npu_grouped_matmul call takes with one x, weight and output
#: (op-plugin 7.1.0 docs/context/torch_npu-npu_grouped_matmul.md line 728, 7.3.0 line 772:
#: group_list's first dim at most 1024); more experts: the reference serves moe_experts.
GROUPED_MATMUL_MAX_GROUPS = 1024


def split_ranges(size: int, limit: int = MATMUL_DIM_LIMIT) -> list[tuple[int, int]]:
    """``[0, size)`` cut into as few equal-ish ``(start, stop)`` pieces of at most ``limit`` as possible."""
    if size <= limit:
        return [(0, size)]
    pieces = -(-size // limit)
    step = -(-size // pieces)
    return [(i, min(i + step, size)) for i in range(0, size, step)]


# ---------------------------------------------------------------- int8


def fix_zero_scales(scale: torch.Tensor) -> torch.Tensor:
    """dshal gives all-zero rows scale 1 (not 0): their q is 0 either way, but a 0 scale
    would turn later divisions into NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def dynamic_quant_result(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """``npu_dynamic_quant``'s ``(y, scale [rows])`` -> dshal's ``(q [..., K], scale [..., 1] float32)``."""
    return q.reshape(shape), fix_zero_scales(scale.reshape(*shape[:-1], 1).to(torch.float32))


# ---------------------------------------------------------------- DeepSeek Sparse Attention (V3.2)

#: npu_lightning_indexer on Atlas A2/A3 (op-plugin 7.3.0 docs/context/torch_npu-npu_lightning_indexer.md;
#: 26.0.0 / 26.1.0 docs/en/custom_APIs/torch_npu/ the same page): query and key bfloat16 or float16, one
#: dtype; index head dim D = 128; one key head; query heads N1 = 64 (7.3.0) or N1 <= 64 (26.x);
#: weights in q's dtype (26.x: or float32); sparse_count 1-2048 (26.x: or 3072 ... 8192 in steps of
#: 1024); sparse_mode 0 (no mask) or 3 (causal from the bottom-right corner: query i of S1 sees keys
#: j <= i + S2 - S1); pre_tokens / next_tokens only their defaults. Out: int32 [B, S1, 1, sparse_count].
INDEXER_DTYPES = (torch.float16, torch.bfloat16)
INDEXER_HEAD_DIM = 128
INDEXER_MAX_HEADS = 64
INDEXER_MAX_SPARSE_COUNT = 2048
INDEXER_LARGE_SPARSE_COUNTS = (3072, 4096, 5120, 6144, 7168, 8192)
#: The kernels' "no limit" default of pre_tokens / next_tokens (int64 max; the only value taken).
DSA_NO_TOKEN_LIMIT = 2**63 - 1


def indexer_sparse_count_fits(topk: int, large_counts: bool) -> bool:
    """Whether npu_lightning_indexer takes ``sparse_count=topk`` (``large_counts``: 26.x's 3072-8192)."""
    return 1 <= topk <= INDEXER_MAX_SPARSE_COUNT or (large_counts and topk in INDEXER_LARGE_SPARSE_COUNTS)


def lightning_indexer_unsupported(
    q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, topk: int, visible: torch.Tensor | None,
    *, float32_weights: bool, large_counts: bool,
) -> str | None:
    """Why npu_lightning_indexer cannot serve ``indexer_topk(q [B, T, Hi, Di], weights [B, T, Hi],
    k [B, S, Di], topk, visible)``, or None. A head dim under 128 is zero-padded (exact)."""
    batch, tq, heads, dim = q.shape
    keys = k.shape[1]
    if visible is not None:
        return "an explicit visible mask (the kernel masks nothing or causally: sparse_mode 0 / 3)"
    if q.dtype not in INDEXER_DTYPES or k.dtype != q.dtype:
        return f"q {q.dtype}, k {k.dtype} (the kernel takes one of float16 / bfloat16)"
    if weights.dtype != q.dtype and not (float32_weights and weights.dtype == torch.float32):
        return (f"weights {weights.dtype} with q {q.dtype} (this release takes weights in q's dtype only; "
                "rounding float32 weights would change which keys are chosen)")
    if dim > INDEXER_HEAD_DIM:
        return f"index head dim {dim} (the kernel takes {INDEXER_HEAD_DIM}; smaller ones are zero-padded)"
    if heads > INDEXER_MAX_HEADS:
        return f"{heads} index heads (the kernel takes at most {INDEXER_MAX_HEADS})"
    if not indexer_sparse_count_fits(topk, large_counts):
        more = ", or " + " / ".join(map(str, INDEXER_LARGE_SPARSE_COUNTS)) if large_counts else ""
        return f"topk {topk} (the kernel's sparse_count is 1-{INDEXER_MAX_SPARSE_COUNT}{more})"
    if batch * tq == 0 or keys == 0 or tq > keys:
        return f"{tq} queries over {keys} keys, batch {batch} (the kernel's causal mask needs 1 <= T <= S)"
    return None


def pad_last_dim(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` zero-padded on its last dim to ``size`` (contiguous; ``t`` itself when it fits)."""
    if t.shape[-1] == size:
        return t.contiguous()
    return torch.nn.functional.pad(t, (0, size - t.shape[-1]))


def indexer_operands(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dshal's ``q [B, T, Hi, Di]``, ``weights [B, T, Hi]``, ``k [B, S, Di]`` as the kernel's BSND
    ``query [B, T, Hi, 128]``, ``key [B, S, 1, 128]`` and ``weights``, contiguous; zero columns
    pad Di to 128 (they add 0 to every q . k)."""
    return pad_last_dim(q, INDEXER_HEAD_DIM), pad_last_dim(k, INDEXER_HEAD_DIM)[:, :, None], weights.contiguous()


def indexer_result(sparse_indices: torch.Tensor, keys: int) -> torch.Tensor:
    """The kernel's ``int32 [B, T, 1, topk]`` as dshal's ``int64 [B, T, topk]``: query i (of T, the
    last T of ``keys`` positions) sees ``i + keys - T + 1`` keys, and every entry past that count
    becomes -1 (the docs do not say what the kernel writes there; op-plugin's own test expects the
    masked keys, sorted last)."""
    idx = sparse_indices[:, :, 0].to(torch.int64)
    tq, topk = idx.shape[1], idx.shape[2]
    seen = torch.arange(tq, device=idx.device) + (keys - tq + 1)
    past = torch.arange(topk, device=idx.device)[None, :] >= seen[:, None]  # [T, topk]
    return idx.masked_fill(past, -1)


#: npu_sparse_flash_attention on Atlas A2/A3 (op-plugin 7.3.0 docs/context/torch_npu-npu_sparse_flash_attention.md;
#: 26.0.0 / 26.1.0 docs/en/custom_APIs/torch_npu/ the same page): query, key, value bfloat16 or float16, one
#: dtype; only the MLA-absorb form (attention_mode 2): query / key D = 512, query_rope / key_rope D = 64,
#: key and value one tensor, one kv head, N1 in 1, 2, 4, ..., 128 query heads; sparse_indices int32
#: [B, S1, 1, K], K > 0, the valid entries first and -1 after them; sparse_block_size 1 selects
#: single tokens; sparse_mode 0 (the selected keys only) or 3 (also causal). Out: [B, S1, N1, 512].
SFA_LATENT_DIM = 512
SFA_ROPE_DIM = 64
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)


def sfa_heads(heads: int) -> int | None:
    """The head count npu_sparse_flash_attention runs ``heads`` query heads as (zero queries pad
    the rest), or None past its largest."""
    return next((n for n in SFA_HEADS if n >= heads), None)


def sparse_attention_unsupported(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, v_dim: int) -> str | None:
    """Why npu_sparse_flash_attention cannot serve ``sparse_mla_attention(q [B, H, T, D],
    kv [B, S, D], indices [B, T, K], scale, v_dim)``, or None. D up to 512 + 64 and v_dim up to 512
    are zero-padded to the kernel's dims (exact: zero columns add nothing to q . k, and the
    output's extra columns are dropped)."""
    batch, heads, tq, dim = q.shape
    if q.dtype not in INDEXER_DTYPES or kv.dtype != q.dtype:
        return f"q {q.dtype}, kv {kv.dtype} (the kernel takes one of float16 / bfloat16)"
    if dim > SFA_LATENT_DIM + SFA_ROPE_DIM or v_dim > SFA_LATENT_DIM:
        return (f"head dim {dim}, v_dim {v_dim} (the kernel's MLA-absorb form takes a {SFA_LATENT_DIM}-column latent, "
                f"also the values, + {SFA_ROPE_DIM} rope columns)")
    if sfa_heads(heads) is None:
        return f"{heads} query heads (the kernel takes at most {SFA_HEADS[-1]})"
    if batch * tq == 0 or kv.shape[1] == 0 or indices.shape[-1] == 0:
        return f"batch {batch}, {tq} queries, {kv.shape[1]} keys, {indices.shape[-1]} indices per query (all must be > 0)"
    return None


@dataclass(frozen=True)
class SparseAttentionOperands:
    """npu_sparse_flash_attention's BSND operands for one dshal call, and which queries have a key."""

    query: torch.Tensor  # [B, T, N1, 512]
    query_rope: torch.Tensor  # [B, T, N1, 64]
    key: torch.Tensor  # [B, S, 1, 512]: also the value
    key_rope: torch.Tensor  # [B, S, 1, 64]
    sparse_indices: torch.Tensor  # int32 [B, T, 1, K], valid entries first
    has_key: torch.Tensor  # bool [B, T]
    poisoned: torch.Tensor  # bool [B, N1, T]: the op's NaN rule (the kernel ran on zeroed inputs)


def sparse_attention_operands(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, heads: int) -> SparseAttentionOperands:
    """dshal's ``q [B, H, T, D]``, ``kv [B, S, D]`` (values: its first v_dim <= 512 columns) and
    ``indices [B, T, K]`` (-1 = none, anywhere) as the kernel's: D zero-padded to 512 + 64 and split
    there (the latent part is the key and the value), H padded with zero queries to ``heads``, the
    indices sorted descending so the -1 entries come last. A query with no key gets key 0 (its
    output is zeroed after the kernel; the docs leave such a row undefined). The kernel's NaN / Inf
    handling is not documented either: it gets the inputs with non-finite entries zeroed, and
    ``poisoned`` marks the rows the op's rule makes NaN (a non-finite q row, or a named kv row,
    of a query with a key). No host read. The kernel takes no strided views, so q and kv are
    copied once each, the zeroing done in that copy (the cache's concatenated ``[latent | rope]``
    rows cannot be handed over as they are)."""
    full = SFA_LATENT_DIM + SFA_ROPE_DIM
    if q.shape[-1] < full or heads > q.shape[1]:  # zero columns add nothing to q . k; zero queries are dropped
        q = torch.nn.functional.pad(q, (0, full - q.shape[-1], 0, 0, 0, heads - q.shape[1]))
    if kv.shape[-1] < full:
        kv = torch.nn.functional.pad(kv, (0, full - kv.shape[-1]))
    bad_q, bad_kv = ~torch.isfinite(q), ~torch.isfinite(kv)
    named = indices >= 0
    has_key = named.any(dim=-1)  # [B, T]
    bad_rows = bad_kv.any(dim=-1).gather(1, indices.clamp(min=0).flatten(1)).view(indices.shape)  # [B, T, K]
    poisoned = (bad_q.any(dim=-1) | (bad_rows & named).any(dim=-1)[:, None]) & has_key[:, None]  # [B, N1, T]

    def part(t: torch.Tensor, bad: torch.Tensor, cols: slice) -> torch.Tensor:  # one copy, zeroed, contiguous
        return t[..., cols].masked_fill(bad[..., cols], 0).contiguous()

    latent, rope = slice(0, SFA_LATENT_DIM), slice(SFA_LATENT_DIM, full)
    q_t, bad_q_t = q.transpose(1, 2), bad_q.transpose(1, 2)  # [B, T, N1, 576]
    kv4, bad_kv4 = kv[:, :, None], bad_kv[:, :, None]  # [B, S, 1, 576]
    ordered = indices.to(torch.int32).sort(dim=-1, descending=True).values
    first = torch.where(has_key, ordered[..., 0], torch.zeros_like(ordered[..., 0]))
    ordered = torch.cat((first[..., None], ordered[..., 1:]), dim=-1)
    return SparseAttentionOperands(
        query=part(q_t, bad_q_t, latent), query_rope=part(q_t, bad_q_t, rope),
        key=part(kv4, bad_kv4, latent), key_rope=part(kv4, bad_kv4, rope),
        sparse_indices=ordered[:, :, None].contiguous(), has_key=has_key, poisoned=poisoned,
    )


def sparse_attention_result(out: torch.Tensor, ops: SparseAttentionOperands, heads: int, v_dim: int) -> torch.Tensor:
    """The kernel's ``[B, T, N1, 512]`` as dshal's ``[B, H, T, v_dim]``: queries without a key give
    zeros, the poisoned rows NaN."""
    out = out[:, :, :heads, :v_dim].transpose(1, 2)
    out = torch.where(ops.has_key[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.masked_fill(ops.poisoned[:, :heads, :, None], float("nan"))
