"""Case tables: attention, moe_gate, moe_experts.

Full-tier rows use DeepSeek-V3's MLA attention (128 heads, q/k head dim 192 = 128 + rope
64, v head dim 128) and its router (256 experts in 8 groups, 4 groups kept, top-8,
routed scaling 2.5) with hidden 7168 and expert intermediate 2048.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.ops.catalogue import SPECS
from dshal_conformance.cases.base import Case, Context, Inputs, op_cases, standard_bad_inputs
from dshal_conformance.cases.quant import fp8_variant
from dshal_conformance.judge import Check, close, failed, fp8_result, threshold_check
from dshal_conformance.tolerances import closeness, composite

BF16, F32 = torch.bfloat16, torch.float32


# ---------------------------------------------------------------- attention
ATTENTION = [
    dict(name="bf16/causal/B1xH4xT64xD64", dtype=BF16, b=1, hq=4, hk=4, tq=64, tk=64, d=64),
    dict(name="f32/causal/gqa/B2xHq8xHk2xT32xD32", dtype=F32, b=2, hq=8, hk=2, tq=32, tk=32, d=32),
    dict(name="bf16/noncausal/B1xH2xT48xD64", dtype=BF16, b=1, hq=2, hk=2, tq=48, tk=48, d=64, causal=False),
    dict(name="bf16/prefill-with-cache/Tq16xTk96", dtype=BF16, b=1, hq=4, hk=4, tq=16, tk=96, d=64),
    dict(name="bf16/mla-dims/D96xDv64", dtype=BF16, b=1, hq=4, hk=4, tq=32, tk=32, d=96, dv=64),
    dict(name="f32/scale0.3", dtype=F32, b=1, hq=2, hk=2, tq=32, tk=32, d=32, scale=0.3),
    dict(name="bf16/window16/T96", dtype=BF16, b=1, hq=4, hk=4, tq=96, tk=96, d=64, window=16),
    dict(name="f32/window8+global4/T64", dtype=F32, b=1, hq=2, hk=1, tq=64, tk=64, d=32, window=8, global_tokens=4),
    dict(name="f32/noncausal-window8/T48", dtype=F32, b=1, hq=2, hk=2, tq=48, tk=48, d=32, causal=False, window=8),
    dict(name="bf16/decode-window32/Tq1xTk128", dtype=BF16, b=2, hq=4, hk=4, tq=1, tk=128, d=64, window=32),
    dict(name="bf16/decode/M1/Tq1xTk128", kind="edge", dtype=BF16, b=2, hq=4, hk=2, tq=1, tk=128, d=64),
    dict(name="bf16/M0/Tq0", kind="edge", dtype=BF16, b=1, hq=2, hk=2, tq=0, tk=16, d=64),
    dict(name="bf16/Tq>Tk-unseen-queries", kind="edge", dtype=BF16, b=1, hq=2, hk=2, tq=24, tk=16, d=64),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, b=1, hq=4, hk=4, tq=32, tk=32, d=64, noncontiguous=("q", "v")),
    # Non-finite inputs (the op's contract): keys a query does not see never reach it; a NaN
    # it sees propagates (row for q/k, column for v). ``nan``: (tensor, index) to poison.
    dict(name="f32/nan-in-visible-key/causal", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=16, tk=16, d=32, nan=[("k", (0, 1, 5, 3))]),
    dict(name="f32/nan-in-hidden-key/window4", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=16, tk=16, d=32, window=4, nan=[("k", (0, 0, 2, 0))]),
    dict(name="f32/inf-in-values/window4+global2/gqa", kind="edge", dtype=F32, b=1, hq=4, hk=2, tq=16, tk=16, d=32, window=4, global_tokens=2,
         nan=[("v", (0, 0, 1, 7)), ("v", (0, 1, 9, 0)), ("v", (0, 1, 14, 3))], value=float("inf")),
    dict(name="f32/nan-in-query/noncausal-window3", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=12, tk=12, d=32, causal=False, window=3,
         nan=[("q", (0, 1, 4, 0)), ("k", (0, 0, 11, 2))]),
    dict(name="bf16/nan-in-key/decode/Tq1xTk64/gqa", kind="edge", dtype=BF16, b=2, hq=4, hk=2, tq=1, tk=64, d=64, nan=[("k", (1, 0, 40, 5))]),
    dict(name="bf16/nan-in-key/decode-window16/Tq1xTk64", kind="edge", dtype=BF16, b=1, hq=2, hk=2, tq=1, tk=64, d=64, window=16,
         nan=[("k", (0, 0, 10, 5)), ("v", (0, 1, 60, 1))]),
    dict(name="bf16/mla/prefill/H128xT1024xD192xDv128", tier="full", dtype=BF16, b=1, hq=128, hk=128, tq=1024, tk=1024, d=192, dv=128),
    dict(name="bf16/mla/decode/H128xTk4096xD192xDv128", tier="full", dtype=BF16, b=4, hq=128, hk=128, tq=1, tk=4096, d=192, dv=128),
    dict(name="bf16/mla/window512/H128xT2048", tier="full", dtype=BF16, b=1, hq=128, hk=128, tq=2048, tk=2048, d=192, dv=128, window=512, global_tokens=16),
]


def build_attention(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    b, hq, hk, tq, tk, d = (row[k] for k in ("b", "hq", "hk", "tq", "tk", "d"))
    dv, dtype = row.get("dv", d), row["dtype"]
    kw = {
        "q": ctx.randn(b, hq, tq, d, dtype=dtype),
        "k": ctx.randn(b, hk, tk, d, dtype=dtype),
        "v": ctx.randn(b, hk, tk, dv, dtype=dtype),
        "causal": row.get("causal", True),
        "scale": row.get("scale"),
        "window": row.get("window"),
        "global_tokens": row.get("global_tokens", 0),
    }
    for name, index in row.get("nan", ()):
        kw[name][index] = row.get("value", float("nan"))
    return Inputs(kw)


def judge_attention(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    # Softmax averages: the output does not grow with Tk, so atol is not scaled by it.
    return close("out", out, ref, composite(row["dtype"], ref, 1, stages=2), row["dtype"])


# ---------------------------------------------------------------- moe_gate
V3_GATE = dict(e=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
MOE_GATE = [
    dict(name="f32/v3-router/T16xE256", dtype=F32, t=16, **V3_GATE),
    dict(name="bf16/v3-router/T16xE256", dtype=BF16, t=16, **V3_GATE),
    dict(name="f32/no-bias/T16xE64", dtype=F32, t=16, e=64, top_k=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, bias=False),
    dict(name="f32/no-norm/T16xE64-g4", dtype=F32, t=16, e=64, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False),
    dict(name="f32/M1", kind="edge", dtype=F32, t=1, **V3_GATE),
    dict(name="f32/M0", kind="edge", dtype=F32, t=0, **V3_GATE),
    dict(name="f32/noncontiguous", kind="edge", dtype=F32, t=16, noncontiguous=("logits",), **V3_GATE),
    dict(name="f32/v3-router/T4096xE256", tier="full", dtype=F32, t=4096, **V3_GATE),
    dict(name="bf16/v3-router/T4096xE256", tier="full", dtype=BF16, t=4096, **V3_GATE),
]


def build_moe_gate(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    e = row["e"]
    logits = ctx.randn(row["t"], e, dtype=row["dtype"], scale=2.0)
    # The correction bias is large enough to change the choice of experts.
    bias = ctx.randn(e, scale=0.5) if row.get("bias", True) else None
    kw = {
        "logits": logits,
        "bias": bias,
        "top_k": row["top_k"],
        "n_group": row["n_group"],
        "topk_group": row["topk_group"],
        "routed_scaling_factor": row["routed_scaling_factor"],
        "norm_topk_prob": row.get("norm_topk_prob", True),
    }
    return Inputs(kw)


def judge_moe_gate(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    if not (isinstance(out, tuple) and len(out) == 2):
        return [failed("out.type", f"expected (weights, ids), got {type(out).__name__}")]
    weights, ids = out
    ref_w, ref_ids = ref
    for name, o, r in (("weights", weights, ref_w), ("ids", ids, ref_ids)):
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(r.shape):
            got = list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            return [failed(f"{name}.shape", f"{name}: got {got}, expected {list(r.shape)}")]
    checks: list[Check] = []
    if ids.dtype != torch.int64:
        checks.append(failed("ids.dtype", f"ids: dtype {ids.dtype}, expected torch.int64"))
    # Compare as sets per token (order among the picked experts is not part of the contract
    # beyond "best first"); weights are matched by expert id.
    got_ids, got_order = ids.to(torch.int64).sort(dim=-1)
    want_ids, want_order = ref_ids.sort(dim=-1)
    differs = (got_ids != want_ids).any(dim=-1)
    # A token whose oracle choice is itself within TIE_MARGIN of a tie may go either way.
    near_tie = selection_margin(**{k: inputs.kwargs[k] for k in ("logits", "bias", "top_k", "n_group", "topk_group")}) < TIE_MARGIN
    ties = int((differs & near_tie).sum())
    differs = differs & ~near_tie
    n_bad = int(differs.sum())
    detail = f"{n_bad} of {ids.shape[0]} tokens picked different experts"
    if ties:
        detail += f" ({ties} more differ only where the oracle is within {TIE_MARGIN:g} of a tie)"
    if n_bad:
        t = int(differs.nonzero()[0])
        extra = sorted(set(got_ids[t].tolist()) - set(want_ids[t].tolist()))
        missing = sorted(set(want_ids[t].tolist()) - set(got_ids[t].tolist()))
        detail += f"; token {t}: picked {extra} instead of {missing}"
    checks.append(threshold_check("routing_mismatch", float(n_bad), detail))
    if n_bad == 0 and ties == 0:
        checks += close("weights", weights.gather(1, got_order), ref_w.gather(1, want_order), closeness(torch.float32), torch.float32)
    return checks


#: Choice-score gap under which the oracle's expert choice counts as a tie (float32
#: sigmoid + bias is good to ~1e-7; 1e-5 leaves two orders of magnitude).
TIE_MARGIN = 1e-5


def selection_margin(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Per token, how far the float64 oracle's choice is from a tie: the smaller of the gap
    between the last kept and first dropped group score, and between the top_k-th and
    next choice score among the kept groups."""
    tokens, experts = logits.shape
    if tokens == 0:
        return torch.zeros(0, dtype=torch.float64)
    choice = torch.sigmoid(logits.to(torch.float64)) + (0 if bias is None else bias.to(torch.float64))
    margin = torch.full((tokens,), float("inf"), dtype=torch.float64)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(tokens, n_group, experts // n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        ranked = group_score.sort(dim=-1, descending=True).values
        margin = ranked[:, topk_group - 1] - ranked[:, topk_group]
        kept = group_score.topk(topk_group, dim=-1).indices
        dropped = torch.ones(tokens, n_group, dtype=torch.bool).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(tokens, experts)
    if top_k < experts:
        ranked = choice.sort(dim=-1, descending=True).values
        gap = ranked[:, top_k - 1] - ranked[:, top_k]
        margin = torch.minimum(margin, torch.nan_to_num(gap, posinf=float("inf")))
    return margin


# ---------------------------------------------------------------- moe_experts
MOE_EXPERTS = [
    dict(name="bf16/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2),
    dict(name="f32/T16xH64xI32xE4-top2", dtype=F32, t=16, h=64, i=32, e=4, k=2),
    dict(name="f32/decode/T1xH256xI128xE16-top4", dtype=F32, t=1, h=256, i=128, e=16, k=4),
    dict(name="f32/T64xH256xI128xE16-top4", dtype=F32, t=64, h=256, i=128, e=16, k=4),
    dict(name="fp8-block/decode/T1xH256xI128xE8-top2", dtype=BF16, t=1, h=256, i=128, e=8, k=2, weight="fp8-block"),
    dict(name="fp8-block/f32/decode/T1xH200xI72xE4-top2", dtype=F32, t=1, h=200, i=72, e=4, k=2, weight="fp8-block"),
    dict(name="fp8-block/T8xH256xI128xE4-top2", dtype=BF16, t=8, h=256, i=128, e=4, k=2, weight="fp8-block"),
    # W8A8 int8 experts, one scale per output channel (w13_scale [E, 2I, 1], w2_scale
    # [E, H, 1]), activations quantized per token: Ascend's MoE format (DESIGN.md).
    dict(name="int8/bf16/T8xH128xI64xE8-top2", dtype=BF16, t=8, h=128, i=64, e=8, k=2, weight="int8"),
    dict(name="int8/f32/decode/T1xH200xI72xE4-top2", dtype=F32, t=1, h=200, i=72, e=4, k=2, weight="int8"),
    dict(name="int8/f32/T16xH256xI128xE16-top4", dtype=F32, t=16, h=256, i=128, e=16, k=4, weight="int8"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, t=1, h=128, i=64, e=8, k=2),
    dict(name="bf16/M0", kind="edge", dtype=BF16, t=0, h=128, i=64, e=8, k=2),
    dict(name="bf16/int32-ids", kind="edge", dtype=BF16, t=8, h=128, i=64, e=8, k=2, ids="int32"),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, t=8, h=128, i=64, e=8, k=2, noncontiguous=("x",)),
    dict(name="fp8-block/v3/T128xH7168xI2048xE32-top8", tier="full", dtype=BF16, t=128, h=7168, i=2048, e=32, k=8, weight="fp8-block"),
    dict(name="bf16/v3/T64xH7168xI2048xE8-top8", tier="full", dtype=BF16, t=64, h=7168, i=2048, e=8, k=8),
    dict(name="int8/v3/T128xH7168xI2048xE32-top8", tier="full", dtype=BF16, t=128, h=7168, i=2048, e=32, k=8, weight="int8"),
]


def build_moe_experts(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    t, h, i, e, k, dtype = (row[n] for n in ("t", "h", "i", "e", "k", "dtype"))
    x = ctx.randn(t, h, dtype=dtype)
    weights = torch.rand(t, k, generator=ctx.generator).to(torch.float32)
    ids = torch.rand(t, e, generator=ctx.generator).argsort(dim=-1)[:, :k].contiguous()
    if row.get("ids") == "int32":
        ids = ids.to(torch.int32)
    w13_f = ctx.randn(e, 2 * i, h, scale=h**-0.5)
    w2_f = ctx.randn(e, h, i, scale=i**-0.5)
    kw: dict[str, Any] = {"x": x, "weights": weights, "ids": ids}
    if row.get("weight") == "fp8-block":
        fmt = ctx.fp8("e4m3")
        kw["w13"], kw["w2"], kw["w13_scale"], kw["w2_scale"] = _stacked_fp8(w13_f, w2_f, fmt)
    elif row.get("weight") == "int8":  # one scale per output channel: [E, 2I, 1] and [E, H, 1]
        kw["w13"], kw["w13_scale"] = SPECS["quantize_int8"].reference_impl(w13_f)
        kw["w2"], kw["w2_scale"] = SPECS["quantize_int8"].reference_impl(w2_f)
    else:
        kw.update(w13=w13_f.to(dtype), w2=w2_f.to(dtype), w13_scale=None, w2_scale=None)
    return Inputs(kw)


def _stacked_fp8(w13_f: torch.Tensor, w2_f: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    q13, s13 = zip(*(SPECS["quantize_fp8"].reference_impl(w, (128, 128), fmt, None) for w in w13_f))
    q2, s2 = zip(*(SPECS["quantize_fp8"].reference_impl(w, (128, 128), fmt, None) for w in w2_f))
    return torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2)


def judge_moe_experts(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    # int8: the SwiGLU output is re-quantized per token, so a backend's rounding of it may
    # land one int8 step from the oracle's: judged like FP8, by similarity and SQNR.
    if row.get("weight") in ("fp8-block", "int8"):
        return fp8_result("out", out, ref, "requant", row["dtype"])
    return close("out", out, ref, composite(row["dtype"], ref, row["h"], stages=3), row["dtype"])


def _moe_variant(ctx: Context, row: Mapping[str, Any]) -> str | None:
    if row.get("weight") == "int8":
        return None  # every backend takes int8 experts (the reference serves it where none is native)
    return fp8_variant(ctx, row) if row.get("weight") else None


def cases() -> list[Case]:
    return [
        *op_cases(
            "attention", ATTENTION, build_attention, judge_attention,
            standard_bad_inputs(dtype=("k", torch.float32), shape=("q", lambda t: t[0], "3-D 'q'"), device="v"),
        ),
        *op_cases(
            "moe_gate", MOE_GATE, build_moe_gate, judge_moe_gate,
            standard_bad_inputs(dtype=("logits", torch.int32), shape=("bias", lambda t: t[:-1], "'bias' one shorter than E"), device="bias"),
        ),
        *op_cases(
            "moe_experts", MOE_EXPERTS, build_moe_experts, judge_moe_experts,
            standard_bad_inputs(dtype=("ids", torch.float32), shape=("w2", lambda t: t[:, :-1], "'w2' with a different H"), device="w13"),
            variant_supported=_moe_variant,
        ),
    ]
