"""Spoiled arguments: one op argument at a time replaced by a wrong value, from an op's ci
example rows. What must follow is a ``DshalError``, or the reference's answer where the op
accepts the value: never another exception from deep in torch or a kernel. Used by the
``<op>/bad_input/spoiled`` cases (:mod:`dshal_conformance.cases.spoiled`) and the tests.

The spoilers: another dtype, a dim added, dropped or one short, an empty or 0-d tensor, a
transposed or strided view, NaN / Inf / out-of-range ids, the meta device, a list, None, a
string, a negative, zero, huge (past int64) or non-finite number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dshal.ops.catalogue import SPECS
from dshal.ops.examples import Draw
from dshal.ops.spec import FP8_DTYPES
from dshal_conformance.cases.moe import TIE_MARGIN
from dshal_conformance.cases.sparse_attention import compare_selection
from dshal_conformance.modelcheck import routed_differently, selection_margin

FP8 = tuple(FP8_DTYPES.values())
OTHER_DTYPES = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
    torch.bool, *FP8,
)


def spoiled_tensors(t: torch.Tensor) -> Iterator[tuple[str, Any]]:
    """Wrong values for a tensor argument, named."""
    for dtype in OTHER_DTYPES:
        if dtype != t.dtype:
            yield f"dtype {str(dtype).replace('torch.', '')}", t.to(dtype)
    yield "a leading dim added", t.unsqueeze(0)
    yield "meta device", t.to("meta")
    yield "a list", t.tolist() if t.numel() <= 64 else [1, 2]
    yield "None", None
    if t.dim() == 0:
        return
    yield "flattened", t.reshape(-1)
    yield "empty first dim", t[:0]
    if t.numel():
        yield "0-d", t.reshape(-1)[0]
    if t.shape[0]:
        yield "first dim dropped", t[0]
    if t.shape[0] > 1:
        yield "first dim one short", t[:-1]
    if t.shape[-1] > 1:
        yield "last dim one short", t[..., :-1]
        yield "strided last dim", t[..., ::2]
    if t.dim() >= 2:
        yield "transposed", t.transpose(-1, -2)
    if t.numel() and t.is_floating_point():
        for what, value in (("NaN", math.nan), ("Inf", math.inf)):
            u = t.clone()
            u.reshape(-1)[0] = value  # an FP8 format without Inf stores NaN
            yield f"one {what}", u
    if t.numel() and not t.is_floating_point() and t.dtype != torch.bool:
        for what, value in (("-1", -1), ("a huge value", torch.iinfo(t.dtype).max)):
            u = t.clone()
            u.reshape(-1)[0] = value
            yield f"one {what}", u


def spoiled_options(v: Any) -> Iterator[tuple[str, Any]]:
    """Wrong values for a non-tensor argument, named."""
    yield from (("None", None), ("a string", "bogus"), ("a list", [1, 2]))
    if v is None:  # an optional option: numbers it might take
        yield from (("-1", -1), ("0", 0), ("1e30", 10**30), ("1.5", 1.5), ("NaN", math.nan))
    elif isinstance(v, bool):
        yield "2", 2
    elif isinstance(v, int):
        yield from (("-1", -1), ("0", 0), ("1e9", 10**9), ("1e30", 10**30), ("1.5", 1.5), ("True", True))
    elif isinstance(v, float):
        yield from (("NaN", math.nan), ("inf", math.inf), ("-1.0", -1.0), ("0.0", 0.0), ("1 (int)", 1), ("1e30", 1e30))
    elif isinstance(v, tuple):
        yield from (("()", ()), ("(1, 2, 3)", (1, 2, 3)), ("negative", tuple(-1 for _ in v)), ("zeros", tuple(0 for _ in v)),
                    ("1e30", tuple(10**30 for _ in v)))
    elif isinstance(v, str):
        yield "another string", "e5m3"


def sorted_by_id(out: Any) -> Any:
    """``moe_gate``'s (weights, ids) with each token's experts in id order (the op does not
    fix the order within a token's top-k)."""
    weights, ids = out
    ids, order = ids.sort(-1)
    return weights.gather(-1, order), ids


def routing_differs(got: Any, want: Any, kwargs: dict[str, Any]) -> str | None:
    """:func:`differs` for ``moe_gate``: experts compared as sets per token, and a token whose
    oracle choice is within the moe_gate cases' ``TIE_MARGIN`` of a tie may go either way."""
    (got_w, got_ids), (want_w, want_ids) = sorted_by_id(got), sorted_by_id(want)
    if got_ids.shape != want_ids.shape or got_ids.dtype != want_ids.dtype or got_ids.is_meta:
        return differs((got_w, got_ids), (want_w, want_ids))
    other = routed_differently(got_ids, want_ids)
    if not bool(other.any()):
        return differs((got_w, got_ids), (want_w, want_ids))
    margin = selection_margin(**{k: kwargs[k] for k in ("logits", "bias", "top_k", "n_group", "topk_group")})
    decisive = other & ~(margin < TIE_MARGIN)
    if bool(decisive.any()):
        return f"{int(decisive.sum())} token(s) routed to other experts at a decisive margin"
    keep = ~other
    return differs((got_w[keep], got_ids[keep]), (want_w[keep], want_ids[keep]))


def selection_differs(got: Any, want: Any, kwargs: Mapping[str, Any]) -> str | None:
    """:func:`dshal_conformance.spoilers.differs` for ``indexer_topk``: the keys compared as
    sets per query (the op's order is free), and a key within float32 rounding of the
    topk-th score may go either way, as the op's judge allows."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype or got.is_meta:
        return differs(got, want)
    if got.numel() == 0:
        return None
    kw = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    problem, n_bad, detail = compare_selection(got.detach().cpu(), want.detach().cpu(), kw["q"], kw["weights"], kw["k"], kw.get("visible"))
    return problem or (detail if n_bad else None)


def differs(got: Any, want: Any) -> str | None:
    """Why ``got`` is not ``want``'s answer, or None. Non-finite entries must be non-finite in
    both (which of NaN or Inf depends on the order of the arithmetic)."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"got {type(got).__name__}, expected {len(want)} outputs"
        return next((why for g, w in zip(got, want) if (why := differs(g, w))), None)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return f"got {getattr(got, 'dtype', type(got))} {list(getattr(got, 'shape', []))}, expected {want.dtype} {list(want.shape)}"
    if got.device.type == "meta":
        return None
    if not want.dtype.is_floating_point:
        return None if torch.equal(got, want) else "integer outputs differ"
    g, w = got.double(), want.double()
    if not torch.equal(g.isfinite(), w.isfinite()):
        return f"finite where the reference is not, or the other way, at {int((g.isfinite() != w.isfinite()).sum())} entries"
    finite = w.isfinite()
    g, w = g[finite], w[finite]
    # elementwise, or as a whole where a matmul's cancellations make single elements noisy
    # (a bf16 product: ~3e-3 relative L2); a misread stride or layout fails both
    if not torch.allclose(g, w, rtol=5e-2, atol=5e-2) and float((g - w).norm()) > 1e-2 * float(w.norm()):
        return f"values differ by up to {float((g - w).abs().max()):.3g} ({float((g - w).norm() / w.norm()):.2g} relative L2)"
    return None


def spoiled_calls(op: str, rows_per_op: int, draw: Draw | None = None) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """``(what, arguments, the spoiled value)`` for each of the op's first ``rows_per_op`` ci
    rows and each spoiler, the row itself first (``what`` ends in ``: valid``). CPU tensors,
    drawn from ``draw`` (default: seed 0)."""
    spec = SPECS[op]
    rows = [r for r in spec.rows if "ci" in r.tiers and r.kind in ("accuracy", "edge")][:rows_per_op]
    draw = draw or Draw(torch.Generator().manual_seed(0))
    for row in rows:
        base = spec.example_inputs(draw, row).kwargs
        yield f"{row.name}: valid", base, None
        for arg, value in base.items():
            spoilers = spoiled_tensors(value) if isinstance(value, torch.Tensor) else spoiled_options(value)
            for what, bad in spoilers:
                yield f"{row.name}: {arg} {what}", {**base, arg: bad}, bad


__all__ = ["differs", "routing_differs", "selection_differs", "sorted_by_id", "spoiled_calls", "spoiled_options", "spoiled_tensors"]
