"""Batch-invariant providers by construction: an op computed one row at a time.

A row's result from a kernel can depend on the batch around it (split-K and tile choices
follow M). Calling the provider on each row alone, on a fresh copy, makes the result a
function of that row only -- at the cost of one call per row. Backends without
batch-invariant kernels of their own can offer these under ``determinism: strict``
(``Backend.batch_invariant_ops``).

One kind of call has no batch-invariant form that is still the op: ``linear`` with a
tensorwise-FP8 weight quantizes the activations with *one* scale over all rows of the call
(the op's contract), so a row's result depends on the other rows' amax. Per-row scales would
compute another function; those calls run on the whole batch, batch-variant, and the runtime
says so (:data:`CONTRACT_BATCH_VARIANT`, ``Runtime.determinism_gaps``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import weight_quant_mode
from dshal.ops.spec import FP8_FORMAT_OF

#: op -> (its batched arguments, first one leading; whether leading dims are token rows
#: to flatten). attention's rows are sequences (dim 0 of q, k, v).
BATCHED: dict[str, tuple[tuple[str, ...], bool]] = {
    "linear": (("x",), True),
    "rms_norm": (("x", "residual"), True),
    "fp8_gemm": (("a", "a_scale"), False),
    "int8_gemm": (("a", "a_scale"), False),
    "moe_experts": (("x", "weights", "ids"), False),
    "attention": (("q", "k", "v"), False),
    "indexer_topk": (("q", "weights", "k", "visible"), False),
    "sparse_mla_attention": (("q", "kv", "indices"), False),
}

#: op -> calls whose contract couples the rows of the batch, so no batch-invariant provider can
#: serve them as the op defines them, and why. :func:`row_by_row` runs those calls on the whole
#: batch (the contract's result, batch-variant); ``determinism: strict`` reports it as a gap of
#: the op (``Runtime.determinism_gaps``), which stays batch-invariant for every other call.
CONTRACT_BATCH_VARIANT: dict[str, str] = {
    "linear": (
        "tensorwise-FP8 weights (precision.gemm: fp8-tensor, or a checkpoint stored per tensor) stay batch-variant: "
        "the op quantizes the activations with one scale over all rows of the call (its contract), so a row's "
        "result depends on the other rows' amax; those calls run on the whole batch, every other weight format "
        "row by row (use fp8-row or fp8-block for batch-invariant FP8)"
    ),
}


def couples_rows(op: str, given: dict[str, Any]) -> bool:
    """Whether the call ``op(**given)`` is one of :data:`CONTRACT_BATCH_VARIANT`'s: a
    ``linear`` whose weight is FP8 with a tensorwise (one-element) scale."""
    if op != "linear":
        return False
    weight, scale = given.get("weight"), given.get("weight_scale")
    return (isinstance(weight, torch.Tensor) and isinstance(scale, torch.Tensor) and weight.dtype in FP8_FORMAT_OF
            and weight.dim() == 2 and weight_quant_mode("linear", weight, scale) == "tensor")


def _join(parts: list[Any], lead: tuple[int, ...] | None) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(_join([p[i] for p in parts], lead) for i in range(len(parts[0])))
    out = torch.cat(parts)
    return out if lead is None else out.reshape(*lead, *out.shape[1:])


def row_by_row(op: str, provider: Callable[..., Any]) -> Callable[..., Any]:
    """``provider`` of ``op`` (same signature) applied to each row of its batched
    arguments alone; outputs concatenated back in order. A call whose contract couples the
    rows (:func:`couples_rows`) runs whole: splitting it would compute another function."""
    signature = SPECS[op].signature
    names, flatten = BATCHED[op]

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        if couples_rows(op, given):
            return provider(**given)
        first = given[names[0]]
        lead = tuple(first.shape[:-1]) if flatten else None
        rows = {n: given[n].reshape(-1, given[n].shape[-1]) if flatten else given[n] for n in names if isinstance(given[n], torch.Tensor)}
        count = rows[names[0]].shape[0] if rows[names[0]].dim() else 0
        if count == 0:
            return provider(**given)
        parts = []
        for i in range(count):
            sub = dict(given)
            for n, t in rows.items():
                if t.dim() and t.shape[0] == count:  # a tensorwise (0-d) scale stays whole
                    sub[n] = t[i : i + 1].clone()
            parts.append(provider(**sub))
        return _join(parts, lead)

    call.__name__ = op
    call.__wrapped__ = provider  # type: ignore[attr-defined]
    return call


__all__ = ["BATCHED", "CONTRACT_BATCH_VARIANT", "couples_rows", "row_by_row"]
