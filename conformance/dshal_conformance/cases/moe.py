"""Conformance of moe_gate and moe_experts: the judging (rows and inputs are the ops' own
examples, in :mod:`dshal.ops.moe`: DeepSeek-V3's router and expert sizes in the full tier)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.ops.examples import Example
from dshal_conformance.cases.base import Case, Context, op_cases, standard_bad_inputs
from dshal_conformance.cases.quant import fp8_variant
from dshal_conformance.judge import Check, close, failed, fp8_result, threshold_check
from dshal_conformance.modelcheck import selection_margin
from dshal_conformance.tolerances import closeness, composite


def judge_moe_gate(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
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


def judge_moe_experts(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
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
            "moe_gate", judge_moe_gate,
            standard_bad_inputs(dtype=("logits", torch.int32), shape=("bias", lambda t: t[:-1], "'bias' one shorter than E"), device="bias"),
        ),
        *op_cases(
            "moe_experts", judge_moe_experts,
            standard_bad_inputs(dtype=("ids", torch.float32), shape=("w2", lambda t: t[:, :-1], "'w2' with a different H"), device="w13"),
            variant_supported=_moe_variant,
        ),
    ]
