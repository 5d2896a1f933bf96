"""Batch-invariant providers by construction: an op computed one row at a time.

A row's result from a kernel can depend on the batch around it (split-K and tile choices
follow M). Calling the provider on each row alone, on a fresh copy, makes the result a
function of that row only -- at the cost of one call per row. Backends without
batch-invariant kernels of their own can offer these under ``determinism: strict``
(``Backend.batch_invariant_ops``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dshal.ops.catalogue import SPECS

#: op -> (its batched arguments, first one leading; whether leading dims are token rows
#: to flatten). attention's rows are sequences (dim 0 of q, k, v).
BATCHED: dict[str, tuple[tuple[str, ...], bool]] = {
    "linear": (("x",), True),
    "rms_norm": (("x", "residual"), True),
    "fp8_gemm": (("a", "a_scale"), False),
    "int8_gemm": (("a", "a_scale"), False),
    "moe_experts": (("x", "weights", "ids"), False),
    "attention": (("q", "k", "v"), False),
}


def _join(parts: list[Any], lead: tuple[int, ...] | None) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(_join([p[i] for p in parts], lead) for i in range(len(parts[0])))
    out = torch.cat(parts)
    return out if lead is None else out.reshape(*lead, *out.shape[1:])


def row_by_row(op: str, provider: Callable[..., Any]) -> Callable[..., Any]:
    """``provider`` of ``op`` (same signature) applied to each row of its batched
    arguments alone; outputs concatenated back in order."""
    signature = SPECS[op].signature
    names, flatten = BATCHED[op]

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
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


__all__ = ["BATCHED", "row_by_row"]
