"""Scaled dot-product attention with GQA, an end-aligned causal mask, a sliding window and
global tokens."""

from __future__ import annotations

import math

import torch

from dshal.errors import ArgumentError, ShapeError
from dshal.ops.spec import FLOAT_DTYPES, Cost, check_dim, check_same_device, check_tensor, op_spec


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@op_spec
def attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    """``softmax(q k^T * scale + mask) v`` -> ``[B, Hq, Tq, Dv]`` in ``q``'s dtype.

    ``q [B, Hq, Tq, D]``, ``k [B, Hk, Tk, D]``, ``v [B, Hk, Tk, Dv]``, one float dtype,
    ``Hq % Hk == 0`` (query head ``h`` uses kv head ``h // (Hq / Hk)``). ``scale``
    defaults to ``1/sqrt(D)``. Queries are the *last* ``Tq`` positions: query ``i`` sits
    at position ``p = i + Tk - Tq``. Key ``j`` is visible to query ``i`` when:

    - ``causal``: ``j <= p``;
    - ``window=w`` (int >= 1): causal -> ``j > p - w`` (its last ``w`` keys, itself
      included); non-causal -> ``|j - p| < w`` (a band of ``w - 1`` keys on each side);
    - ``global_tokens=g``: keys ``j < g`` are visible whatever the window (causality
      still applies).

    A query that sees no key (e.g. ``p < 0`` when ``Tq > Tk``) outputs zeros.
    Computed in float32 (float64 for float64 inputs).
    """
    op = "attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=4)
    check_tensor(op, "v", v, dtypes=(q.dtype,), ndim=4)
    batch, hq, _, d = q.shape
    check_dim(op, "k", k, 0, batch, "B, the batch of 'q'")
    check_dim(op, "k", k, 3, d, "D, the head dim of 'q'")
    check_dim(op, "v", v, 0, batch, "B, the batch of 'q'")
    check_dim(op, "v", v, 1, k.shape[1], "Hk, the heads of 'k'")
    check_dim(op, "v", v, 2, k.shape[2], "Tk, the length of 'k'")
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        raise ShapeError(f"{op}: argument 'k' has {hk} heads, expected a divisor of the {hq} heads of 'q' (GQA)")
    if not isinstance(causal, bool):
        raise ArgumentError(f"{op}: argument 'causal' is {causal!r}, expected True or False")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0):
        raise ArgumentError(f"{op}: argument 'scale' is {scale!r}, expected None or a positive float")
    if window is not None and (not _is_int(window) or window < 1):
        raise ArgumentError(f"{op}: argument 'window' is {window!r}, expected None or an int >= 1")
    if not _is_int(global_tokens) or global_tokens < 0:
        raise ArgumentError(f"{op}: argument 'global_tokens' is {global_tokens!r}, expected an int >= 0")
    check_same_device(op, "q", q, k=k, v=v)


def visible_keys(tq: int, tk: int, causal: bool, window: int | None, global_tokens: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``[Tq, Tk]`` (True = visible) as documented in :func:`attention`, or None
    when every key is visible."""
    if not causal and window is None:
        return None
    pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    key = torch.arange(tk, device=device)[None, :]
    if causal:
        seen = key <= pos
        if window is not None:
            seen &= (key > pos - window) | (key < global_tokens)
    else:
        seen = ((key - pos).abs() < window) | (key < global_tokens)
    return seen


@attention.reference
def _attention_reference(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    batch, hq, tq, d = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    acc = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # GQA without copying k/v: group the query heads that share a kv head.
    qg = q.to(acc).reshape(batch, hk, hq // hk, tq, d)
    kg, vg = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    # In place on the fresh [.., Tq, Tk] tensors: each extra copy is a pass over all scores.
    scores = (qg @ kg.transpose(-1, -2)).mul_(scale)
    seen = visible_keys(tq, tk, causal, window, global_tokens, q.device)
    if seen is not None:
        scores.masked_fill_(~seen, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if seen is not None:
        # Rows with no visible key are all -inf -> NaN; they output zeros.
        blind = ~seen.any(dim=-1, keepdim=True)
        if bool(blind.any()):
            probs.masked_fill_(blind, 0.0)
    out = probs @ vg
    return out.reshape(batch, hq, tq, dv).to(q.dtype)


@attention.cost
def _attention_cost(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    batch, hq, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    pairs = tq * tk  # dense count; masked pairs are not subtracted (kernels tile them too)
    flops = 2 * batch * hq * pairs * (d + dv)
    moved = sum(t.numel() for t in (q, k, v)) * q.element_size() + batch * hq * tq * dv * q.element_size()
    return Cost(flops=flops, bytes=moved)
