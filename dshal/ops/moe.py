"""Mixture-of-experts ops: DeepSeek-V3's router and grouped SwiGLU experts."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from dshal.errors import ArgumentError, DTypeError, ShapeError
from dshal.ops.examples import Draw, Example
from dshal.ops.gemm import linear
from dshal.ops.quant import FP8_DTYPE_LIST, SCALE_DTYPES, compute_dtype, quantize_fp8, quantize_int8
from dshal.ops.spec import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    Cost,
    Output,
    check_dim,
    check_ids_in_range,
    check_int,
    check_real,
    check_same_device,
    check_tensor,
    op_spec,
)


# ---------------------------------------------------------------- moe_gate
@op_spec
def moe_gate(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """DeepSeek-V3's router: ``logits [T, E]`` -> ``(weights [T, top_k] float32, ids [T, top_k] int64)``.

    ``scores = sigmoid(logits)``; choice scores ``scores + bias`` (``bias [E]`` is the
    ``e_score_correction_bias``, or None). The E experts form ``n_group`` equal groups; a
    group's score is the sum of its two best choice scores (its one score when a group has
    one expert); the best ``topk_group`` groups are kept, and the ``top_k`` best choice
    scores among their experts are picked (``ids``, best first). ``weights`` are the
    picked experts' *sigmoid* scores (no bias), divided by their sum (+1e-20) when
    ``norm_topk_prob``, times ``routed_scaling_factor``. Computed in float32 (float64 for
    float64 logits).
    """
    op = "moe_gate"
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    experts = logits.shape[1]
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        check_dim(op, "bias", bias, 0, experts, "E, the experts in 'logits'")
    check_int(op, "n_group", n_group, 1)
    if experts % n_group:
        raise ShapeError(f"{op}: argument 'n_group' is {n_group}, expected a divisor of the {experts} experts in 'logits'")
    check_int(op, "topk_group", topk_group, 1, n_group, why=" (groups kept, at most n_group)")
    kept = topk_group * (experts // n_group)
    check_int(op, "top_k", top_k, 1, kept, why=f" (at most the {kept} experts in the {topk_group} kept groups)")
    check_real(op, "routed_scaling_factor", routed_scaling_factor, positive=True)
    if not isinstance(norm_topk_prob, bool):
        raise ArgumentError(f"{op}: argument 'norm_topk_prob' is {norm_topk_prob!r}, expected True or False")
    check_same_device(op, "logits", logits, bias=bias)


@moe_gate.reference
def _moe_gate_reference(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    acc = compute_dtype(logits.dtype)
    tokens, experts = logits.shape
    scores = torch.sigmoid(logits.to(acc))
    choice = scores if bias is None else scores + bias.to(acc)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(tokens, n_group, experts // n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = group_score.topk(topk_group, dim=-1).indices
        dropped = torch.ones(tokens, n_group, dtype=torch.bool, device=logits.device).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(tokens, experts)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return (weights if acc == torch.float64 else weights.to(torch.float32)), ids


@moe_gate.cost
def _moe_gate_cost(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    n = logits.numel()
    tokens = logits.shape[0]
    # sigmoid (~4) + bias add + selection compares (~log2 E) per score.
    flops = n * (5 + max(1, math.ceil(math.log2(max(logits.shape[1], 2)))))
    return Cost(flops=flops, bytes=n * logits.element_size() + tokens * top_k * (4 + 8))


@moe_gate.outputs
def _moe_gate_outputs(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    return Output((logits.shape[0], top_k)), Output((logits.shape[0], top_k))


# ---------------------------------------------------------------- moe_experts
def _check_expert_weight(
    op: str, arg: str, w, scale_arg: str, scale, shape: tuple[int, int, int], why: str = ""  # noqa: ANN001
) -> None:
    check_tensor(op, arg, w, dtypes=FLOAT_DTYPES + FP8_DTYPE_LIST + (torch.int8,), ndim=3)
    if tuple(w.shape) != shape:
        raise ShapeError(f"{op}: argument {arg!r} has shape {list(w.shape)}, expected {list(shape)}{why}")
    if w.dtype in FLOAT_DTYPES:
        if scale is not None:
            raise ArgumentError(f"{op}: argument {scale_arg!r} is given, but {arg!r} is {w.dtype}; expected None for float weights")
        return
    int8 = w.dtype == torch.int8
    if scale is None:
        what = "per-channel scales" if int8 else "block scales"
        raise ArgumentError(f"{op}: argument {arg!r} is {w.dtype}, which needs {scale_arg!r} ({what}); got None")
    check_tensor(op, scale_arg, scale, dtypes=SCALE_DTYPES, ndim=3)
    if int8:
        want, what = (shape[0], shape[1], 1), "one scale per output channel"
    else:
        want, what = (shape[0], math.ceil(shape[1] / 128), math.ceil(shape[2] / 128)), "one scale per 128x128 block"
    if tuple(scale.shape) != want:
        raise ShapeError(
            f"{op}: argument {scale_arg!r} has shape {list(scale.shape)}, expected {list(want)} "
            f"({what} of {arg!r} {list(shape)})"
        )


@op_spec
def moe_experts(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    """Routed SwiGLU experts: ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])``
    (an expert a token's ids name twice counts twice, once per slot).

    ``x [T, H]`` float; ``weights [T, k]`` float; ``ids [T, k]`` int64/int32 in ``[0, E)``,
    or :data:`NO_EXPERT` (-1): a slot no expert of these weights serves (a tensor-parallel
    rank's share of the experts, as vLLM's ``expert_map`` marks them), which adds nothing to
    its token, whatever its weight (out-of-range ids raise ShapeError when the reference
    runs; the checker does not read tensor values). ``w13 [E, 2I, H]`` holds each expert's gate rows then up rows,
    ``w2 [E, H, I]``; ``expert_e(h) = w2[e] @ (silu(w13[e, :I] h) * w13[e, I:] h)``.
    FP8 weights need block scales ``w13_scale [E, ceil(2I/128), ceil(H/128)]`` and
    ``w2_scale [E, ceil(H/128), ceil(I/128)]``; their activations are then quantized per
    (1, 128) as in :func:`linear`. int8 weights (W8A8) need one float32 scale per output
    channel, ``w13_scale [E, 2I, 1]`` and ``w2_scale [E, H, 1]``; their activations (``x``,
    and the SwiGLU output before ``w2``) are quantized per token as :func:`quantize_int8`
    does, and each product runs as :func:`int8_gemm`. int8 weights come in pairs (both
    ``w13`` and ``w2``); float and FP8 may mix, each GEMM following its own weight. Returns ``[T, H]`` in ``x``'s dtype; the weighted sum is
    accumulated in float32 (float64 for float64 inputs).
    """
    op = "moe_experts"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "weights", weights, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "ids", ids, dtypes=(torch.int64, torch.int32), ndim=2)
    tokens, hidden = x.shape
    check_dim(op, "weights", weights, 0, tokens, "T, the tokens of 'x'")
    check_dim(op, "ids", ids, 0, tokens, "T, the tokens of 'x'")
    check_dim(op, "ids", ids, 1, weights.shape[1], "k, the experts per token in 'weights'")
    check_tensor(op, "w13", w13, ndim=3)
    experts, two_i = w13.shape[0], w13.shape[1]
    if two_i % 2:
        raise ShapeError(f"{op}: argument 'w13' has {two_i} rows per expert (shape {list(w13.shape)}), expected an even 2*I")
    inter = two_i // 2
    _check_expert_weight(op, "w13", w13, "w13_scale", w13_scale, (experts, two_i, hidden))
    check_tensor(op, "w2", w2, ndim=3)
    _check_expert_weight(op, "w2", w2, "w2_scale", w2_scale, (experts, hidden, inter),
                         f" ([E, H, I]: E and 2I from 'w13' {list(w13.shape)}, H from 'x')")
    if (w13.dtype == torch.int8) != (w2.dtype == torch.int8):
        raise DTypeError(f"{op}: arguments 'w13' ({w13.dtype}) and 'w2' ({w2.dtype}) mix int8 and other weights, expected both int8 or neither")
    check_same_device(op, "x", x, weights=weights, ids=ids, w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)


@moe_experts.reference
def _moe_experts_reference(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    inter = w13.shape[1] // 2
    acc = compute_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    slot_weight = weights.reshape(-1, 1).to(acc)  # [T * k, 1]; slot s = (token s // k, choice s % k)
    for e, rows, slots in _expert_groups(ids, w13.shape[0]):
        h = linear.reference_impl(x[rows], w13[e], None, None if w13_scale is None else w13_scale[e])
        act = (F.silu(h[:, :inter].to(acc)) * h[:, inter:].to(acc)).to(x.dtype)
        y = linear.reference_impl(act, w2[e], None, None if w2_scale is None else w2_scale[e])
        out.index_add_(0, rows, y.to(acc) * slot_weight[slots])
    return out.to(x.dtype)


#: An id in ``moe_experts``' ``ids`` that no expert serves: the slot adds nothing.
NO_EXPERT = -1


def check_expert_ids(ids: torch.Tensor, experts: int) -> None:
    """Raise ShapeError unless every id in ``ids`` is :data:`NO_EXPERT` or in ``[0, experts)``."""
    check_ids_in_range("moe_experts", "ids", ids, experts, "expert id", f"w13 has {experts} experts", low=NO_EXPERT)


def moe_experts_on_kept_slots(experts_op, x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):  # noqa: ANN001, ANN201
    """``moe_experts`` for ``ids`` that may hold :data:`NO_EXPERT`, through ``experts_op`` (a
    ``moe_experts`` that needs every id served) on the served slots only: one row per slot,
    weight 1, in the reference's order; each row (the expert's output in ``x``'s dtype, as the op
    rounds it) is then weighted and summed per token in float32 (float64 for float64), as
    the op does. Picking the slots reads ``ids`` on the host (a sync on an accelerator): for
    providers where that is free (the CPU) or already paid; a device kernel skips the slots
    itself (see ``dshal.kernels.triton.moe``)."""
    flat = ids.reshape(-1)
    kept = (flat != NO_EXPERT).nonzero().squeeze(1)
    if ids.shape[0] > 1:  # expert order, as the reference sums (one token: slot order, as it does)
        kept = kept[torch.argsort(flat[kept], stable=True)]
    token = kept // ids.shape[1]
    acc = compute_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    if kept.numel():
        ones = torch.ones((kept.numel(), 1), dtype=weights.dtype, device=weights.device)
        rows = experts_op(x[token], ones, flat[kept][:, None], w13, w2, w13_scale, w2_scale)  # [S, H]
        out.index_add_(0, token, rows.to(acc) * weights.reshape(-1)[kept].to(acc)[:, None])
    return out.to(x.dtype)


def _expert_groups(ids: torch.Tensor, experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor | slice]]:
    """``(expert, token rows, their slots)`` for each expert that has slots: one matmul each.

    Slots are flat indices into ``ids.reshape(-1)``; :data:`NO_EXPERT` slots are in no group.
    Raises ShapeError for an id outside ``[0, experts)`` other than NO_EXPERT. A single
    token (a decode step) needs no sort: each of its k slots is its own group. Meta tensors hold no ids: every slot goes to one group of expert 0, which
    gives the math the shapes of any routing.
    """
    flat_ids = ids.reshape(-1)
    if flat_ids.numel() == 0:
        return []
    if flat_ids.is_meta:
        slots = torch.arange(flat_ids.numel(), device=ids.device)
        return [(0, slots // ids.shape[1], slots)]
    check_expert_ids(flat_ids, experts)
    if ids.shape[0] == 1:
        token = torch.zeros(1, dtype=torch.long, device=ids.device)
        return [(e, token, slice(slot, slot + 1)) for slot, e in enumerate(flat_ids.tolist()) if e != NO_EXPERT]
    order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert, NO_EXPERT's first
    rows = order // ids.shape[1]
    counts = torch.bincount(flat_ids - NO_EXPERT, minlength=experts + 1).tolist()  # [skipped, expert 0, ...]
    starts = list(itertools.accumulate(counts))  # starts[e]: where expert e's slots begin
    return [(e, rows[starts[e] : starts[e + 1]], order[starts[e] : starts[e + 1]]) for e in range(experts) if counts[e + 1]]


@moe_experts.cost
def _moe_experts_cost(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    slots = ids.numel()  # NO_EXPERT ones too: from shapes alone, an upper bound on a TP / EP rank
    experts, two_i, hidden = w13.shape
    flops = slots * (2 * two_i * hidden + 2 * hidden * (two_i // 2) + 3 * (two_i // 2) + 2 * hidden)
    active = min(experts, slots)  # at most this many experts' weights are read
    per_expert = w13[0].numel() * w13.element_size() + w2[0].numel() * w2.element_size() if experts else 0
    moved = 2 * x.numel() * x.element_size() + active * per_expert + slots * (weights.element_size() + ids.element_size())
    moved += sum(t.numel() * t.element_size() for t in (w13_scale, w2_scale) if t is not None)
    return Cost(flops=flops, bytes=moved)


@moe_experts.outputs
def _moe_experts_outputs(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    return (Output(x.shape, x.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32 = torch.bfloat16, torch.float32
#: DeepSeek-V3's router: 256 experts in 8 groups, 4 groups kept, top-8, routed scaling 2.5.
V3_GATE = dict(e=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
#: ``t`` tokens, ``e`` experts and the op's arguments; ``bias=False`` drops the correction bias.
MOE_GATE_ROWS = [
    dict(name="f32/v3-router/T16xE256", dtype=F32, t=16, **V3_GATE),
    dict(name="bf16/v3-router/T16xE256", dtype=BF16, t=16, **V3_GATE),
    dict(name="f32/no-bias/T16xE64", dtype=F32, t=16, e=64, top_k=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, bias=False),
    dict(name="f32/no-norm/T16xE64-g4", dtype=F32, t=16, e=64, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False),
    dict(name="f32/M1", kind="edge", dtype=F32, t=1, **V3_GATE),
    dict(name="f32/M0", kind="edge", dtype=F32, t=0, **V3_GATE),
    dict(name="f32/noncontiguous", kind="edge", dtype=F32, t=16, noncontiguous=("logits",), **V3_GATE),
    dict(name="f32/v3-router/T4096xE256", tier="full", dtype=F32, t=4096, **V3_GATE),
    dict(name="bf16/v3-router/T4096xE256", tier="full", dtype=BF16, t=4096, **V3_GATE),
    # bench
    dict(name="bench/f32/T64xE64-top6-g8", kind="bench", dtype=F32, t=64, e=64, top_k=6, n_group=8, topk_group=4, routed_scaling_factor=2.5),
    dict(name="bench/f32/v3-router/T4096xE256", kind="bench", tier="full", dtype=F32, t=4096, **V3_GATE),
]


@moe_gate.examples(MOE_GATE_ROWS)
def _moe_gate_example(draw: Draw, p) -> Example:
    e = p["e"]
    logits = draw.randn(p["t"], e, dtype=p.get("dtype", F32), scale=2.0)
    # The correction bias is large enough to change the choice of experts.
    bias = draw.randn(e, scale=0.5) if p.get("bias", True) else None
    kw = {
        "logits": logits,
        "bias": bias,
        "top_k": p["top_k"],
        "n_group": p["n_group"],
        "topk_group": p["topk_group"],
        "routed_scaling_factor": p["routed_scaling_factor"],
        "norm_topk_prob": p.get("norm_topk_prob", True),
    }
    return Example(kw)


#: ``t`` tokens, hidden ``h``, expert intermediate ``i``, ``e`` experts, ``k`` picked per token;
#: ``weight``: float (x's dtype), fp8-block (128 x 128 scales) or int8 (W8A8, one scale per
#: output channel: w13_scale [E, 2I, 1], w2_scale [E, H, 1]: Ascend's MoE format).
MOE_EXPERTS_ROWS = [
    dict(name="bf16/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2),
    dict(name="f32/T16xH64xI32xE4-top2", dtype=F32, t=16, h=64, i=32, e=4, k=2),
    dict(name="f32/decode/T1xH256xI128xE16-top4", dtype=F32, t=1, h=256, i=128, e=16, k=4),
    dict(name="f32/T64xH256xI128xE16-top4", dtype=F32, t=64, h=256, i=128, e=16, k=4),
    dict(name="fp8-block/decode/T1xH256xI128xE8-top2", dtype=BF16, t=1, h=256, i=128, e=8, k=2, weight="fp8-block"),
    dict(name="fp8-block/f32/decode/T1xH200xI72xE4-top2", dtype=F32, t=1, h=200, i=72, e=4, k=2, weight="fp8-block"),
    dict(name="fp8-block/T8xH256xI128xE4-top2", dtype=BF16, t=8, h=256, i=128, e=4, k=2, weight="fp8-block"),
    *(dict(name=f"fp8-block/{fmt}/T8xH128xI128xE4-top2", dtype=BF16, t=8, h=128, i=128, e=4, k=2, weight="fp8-block",
           fmt=fmt) for fmt in FP8_DTYPES),  # every format, named (as fp8_gemm's)
    # slots marked NO_EXPERT (a tensor-parallel rank's share; their weights NaN: ignored);
    # conformance runs them where the backend declares Capabilities.moe_no_expert_ids
    dict(name="bf16/skipped-slots/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2, skip=True, capability="moe_no_expert_ids"),
    dict(name="f32/decode/skipped-slots/T1xH256xI128xE16-top4", dtype=F32, t=1, h=256, i=128, e=16, k=4, skip=True, capability="moe_no_expert_ids"),
    dict(name="fp8-block/skipped-slots/T8xH256xI128xE4-top2", dtype=BF16, t=8, h=256, i=128, e=4, k=2, weight="fp8-block",
         skip=True, capability="moe_no_expert_ids"),
    dict(name="fp8-block/decode/skipped-slots/T1xH256xI128xE8-top2", dtype=BF16, t=1, h=256, i=128, e=8, k=2,
         weight="fp8-block", skip=True, capability="moe_no_expert_ids"),
    dict(name="int8/bf16/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2, weight="int8"),
    dict(name="int8/f32/decode/T1xH200xI72xE4-top2", dtype=F32, t=1, h=200, i=72, e=4, k=2, weight="int8"),
    dict(name="int8/f32/T16xH256xI128xE16-top4", dtype=F32, t=16, h=256, i=128, e=16, k=4, weight="int8"),
    dict(name="int8/skipped-slots/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2, weight="int8",
         skip=True, capability="moe_no_expert_ids"),
    dict(name="int8/decode/skipped-slots/T1xH256xI128xE8-top2", dtype=BF16, t=1, h=256, i=128, e=8, k=2,
         weight="int8", skip=True, capability="moe_no_expert_ids"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, t=1, h=128, i=64, e=8, k=2),
    dict(name="bf16/M0", kind="edge", dtype=BF16, t=0, h=128, i=64, e=8, k=2),
    dict(name="bf16/int32-ids", kind="edge", dtype=BF16, t=8, h=128, i=64, e=8, k=2, ids="int32"),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, t=8, h=128, i=64, e=8, k=2, noncontiguous=("x",)),
    # A token routed twice to one expert (its last slot repeats its first): the contract sums
    # over k, so that expert counts twice, each time with its slot's weight.
    dict(name="bf16/duplicate-ids", kind="edge", dtype=BF16, t=8, h=128, i=64, e=8, k=4, duplicate_ids=True),
    dict(name="f32/decode/duplicate-ids", kind="edge", dtype=F32, t=1, h=256, i=128, e=16, k=4, duplicate_ids=True),
    dict(name="bf16/all-skipped", kind="edge", dtype=BF16, t=4, h=128, i=64, e=8, k=2, skip="all", capability="moe_no_expert_ids"),
    dict(name="int8/all-skipped", kind="edge", dtype=BF16, t=4, h=128, i=64, e=8, k=2, weight="int8", skip="all",
         capability="moe_no_expert_ids"),
    dict(name="fp8-block/v3/T128xH7168xI2048xE32-top8", tier="full", dtype=BF16, t=128, h=7168, i=2048, e=32, k=8, weight="fp8-block"),
    dict(name="bf16/v3/T64xH7168xI2048xE8-top8", tier="full", dtype=BF16, t=64, h=7168, i=2048, e=8, k=8),
    dict(name="int8/v3/T128xH7168xI2048xE32-top8", tier="full", dtype=BF16, t=128, h=7168, i=2048, e=32, k=8, weight="int8"),
    # bench
    dict(name="bench/bf16/T32xH256xI128xE16-top4", kind="bench", dtype=BF16, t=32, h=256, i=128, e=16, k=4, weight="float"),
    dict(name="bench/fp8-block/v3/T256xH7168xI2048xE256-top8", kind="bench", tier="full", dtype=BF16,
         t=256, h=7168, i=2048, e=256, k=8, weight="fp8-block"),
]


@moe_experts.examples(MOE_EXPERTS_ROWS)
def _moe_experts_example(draw: Draw, p) -> Example:
    t, h, i, e, k, dtype = p["t"], p["h"], p["i"], p["e"], p["k"], p.get("dtype", BF16)
    x = draw.randn(t, h, dtype=dtype)
    weights = draw.rand(t, k).to(torch.float32)
    ids = draw.rand(t, e).argsort(dim=-1)[:, :k].contiguous()  # k distinct experts per token
    if p.get("duplicate_ids") and k > 1:
        ids[:, -1] = ids[:, 0]  # ... but for one repeated expert
    if p.get("skip"):
        # Every third slot, token 0's all (when there are others), or all: served elsewhere.
        slot = torch.arange(t * k).reshape(t, k)
        skipped = (slot % 3 == 1) | ((slot < k) & (t > 1)) if p["skip"] is True else torch.ones_like(ids, dtype=torch.bool)
        ids = ids.masked_fill(skipped, NO_EXPERT)
        weights = weights.masked_fill(skipped, float("nan"))
    if p.get("ids") == "int32":
        ids = ids.to(torch.int32)
    kw = {"x": x, "weights": weights, "ids": ids}
    if p.get("weight") == "fp8-block":
        # One expert at a time: DeepSeek-V3's 256-expert stacks never exist in float32 at once.
        fmt = draw.fp8(p.get("fmt", "e4m3"))
        kw["w13"], kw["w13_scale"] = _stacked_fp8(draw, e, (2 * i, h), fmt)
        kw["w2"], kw["w2_scale"] = _stacked_fp8(draw, e, (h, i), fmt)
        return Example(kw)
    w13_f = draw.randn(e, 2 * i, h, scale=h**-0.5)
    w2_f = draw.randn(e, h, i, scale=i**-0.5)
    if p.get("weight") == "int8":  # one scale per output channel: [E, 2I, 1] and [E, H, 1]
        kw["w13"], kw["w13_scale"] = quantize_int8.reference_impl(w13_f)
        kw["w2"], kw["w2_scale"] = quantize_int8.reference_impl(w2_f)
    else:
        kw.update(w13=w13_f.to(dtype), w2=w2_f.to(dtype), w13_scale=None, w2_scale=None)
    return Example(kw)


def _stacked_fp8(draw: Draw, experts: int, shape: tuple[int, int], fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``experts`` FP8 weights of ``shape`` (drawn with std 1/sqrt(fan-in)) with 128 x 128 block scales."""
    q, s = zip(*(quantize_fp8.reference_impl(draw.randn(*shape, scale=shape[1] ** -0.5), (128, 128), fmt, None) for _ in range(experts)))
    return torch.stack(q), torch.stack(s)
