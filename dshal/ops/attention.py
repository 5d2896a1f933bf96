"""Scaled dot-product attention with GQA, an end-aligned causal mask, a sliding window and
global tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dshal.errors import ArgumentError, ShapeError
from dshal.ops.examples import Draw, Example
from dshal.ops.spec import (
    FLOAT_DTYPES,
    Cost,
    Output,
    check_dim,
    check_int,
    check_real,
    check_same_device,
    check_tensor,
    op_spec,
)
from dshal.versions import minor

#: Positive floats at or below this round to 0 in float32, at or above the other to inf.
FLOAT32_ZERO_BELOW = 2.0**-150
FLOAT32_INF_FROM = 2.0**128 * (1 - 2.0**-25)


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

    Non-finite inputs (NaN, +-Inf): keys a query does not see never reach its output. A
    non-finite value in the query's own row of ``q``, or in a row of ``k`` it sees, makes its
    whole output row NaN; a non-finite ``v[j, c]`` of a key ``j`` it sees makes its output
    column ``c`` NaN. Every provider follows this (:func:`nonfinite_guard`).
    """
    op = "attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=4, dtype_of="q")
    check_tensor(op, "v", v, dtypes=(q.dtype,), ndim=4, dtype_of="q")
    batch, hq, _, d = q.shape
    check_dim(op, "k", k, 0, batch, "B, the batch of 'q'")
    check_dim(op, "k", k, 3, d, "D, the head dim of 'q'")
    check_dim(op, "v", v, 0, batch, "B, the batch of 'q'")
    check_dim(op, "v", v, 1, k.shape[1], "Hk, the heads of 'k'")
    check_dim(op, "v", v, 2, k.shape[2], "Tk, the length of 'k'")
    hk = k.shape[1]
    if hq == 0 or d == 0:  # no head, or a head of no width: nothing to attend with (the scale is 1/sqrt(D))
        raise ShapeError(f"{op}: argument 'q' has shape {list(q.shape)}, expected at least one head (Hq >= 1) of "
                         "width D >= 1")
    if hk == 0 or hq % hk:
        raise ShapeError(f"{op}: argument 'k' has {hk} heads, expected a divisor of the {hq} heads of 'q' (GQA)")
    if not isinstance(causal, bool):
        raise ArgumentError(f"{op}: argument 'causal' is {causal!r}, expected True or False")
    check_real(op, "scale", scale, positive=True, optional=True)
    if scale is not None and q.dtype != torch.float64 and not FLOAT32_ZERO_BELOW < scale < FLOAT32_INF_FROM:
        # Computed in float32: such a scale is 0 or inf there, and providers then disagree.
        raise ArgumentError(f"{op}: argument 'scale' is {scale!r}, expected a positive float that float32 holds "
                            f"(in ({FLOAT32_ZERO_BELOW:.4g}, {FLOAT32_INF_FROM:.4g}): attention on {q.dtype} computes "
                            "in float32)")
    check_int(op, "window", window, 1, optional=True)
    check_int(op, "global_tokens", global_tokens, 0)
    check_same_device(op, "q", q, k=k, v=v)


#: torch's scaled_dot_product_attention takes ``enable_gqa`` from 2.5; pyproject admits 2.4
#: (torch_npu 6.0.0 / 7.0.0 ship for it).
SDPA_TAKES_GQA = minor(torch.__version__) >= (2, 5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, native_gqa: bool = SDPA_TAKES_GQA, **kwargs) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention(q, k, v, **kwargs)`` where ``k`` / ``v`` may have
    fewer heads than ``q`` (grouped: ``Hq`` a multiple of ``Hk``): ``enable_gqa`` where torch
    takes it (``native_gqa``), else ``k`` / ``v`` repeated per group first."""
    groups = q.shape[1] // k.shape[1] if k.shape[1] else 1
    if groups == 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    if native_gqa:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def visible_keys(tq: int, tk: int, causal: bool, window: int | None, global_tokens: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``[Tq, Tk]`` (True = visible) as documented in :func:`attention`, or None
    when every key is visible."""
    if not causal and window is None:
        return None
    window = _within_reach(window, tq, tk)
    pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    key = torch.arange(tk, device=device)[None, :]
    if causal:
        seen = key <= pos
        if window is not None:
            seen &= (key > pos - window) | (key < global_tokens)
    else:
        seen = ((key - pos).abs() < window) | (key < global_tokens)
    return seen


def _within_reach(window: int | None, tq: int, tk: int) -> int | None:
    """``window`` capped at ``Tq + Tk``, past which it hides nothing: a window near the int64
    limit would wrap in ``pos + window``."""
    return None if window is None else min(window, tq + tk)


def _visible_ranges(
    tq: int, tk: int, causal: bool, window: int | None, global_tokens: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per query, its visible keys as disjoint index ranges ``[start, end)`` (each bound a
    ``[Tq]`` int64 tensor): the band, and the global keys below and above it -- the same
    set as :func:`visible_keys`."""
    window = _within_reach(window, tq, tk)
    pos = torch.arange(tq, device=device) + (tk - tq)
    if causal:
        lo, hi = (pos - window + 1 if window is not None else torch.zeros_like(pos)), pos
    elif window is not None:
        lo, hi = pos - window + 1, pos + window - 1
    else:
        lo, hi = torch.zeros_like(pos), torch.full_like(pos, tk - 1)
    a = lo.clamp(0, tk)
    b = torch.maximum((hi + 1).clamp(0, tk), a)
    if window is None or global_tokens == 0:
        return [(a, b)]
    g = torch.full_like(a, min(global_tokens, tk))
    below = torch.minimum(g, a)
    if causal:  # global keys still obey causality: j <= pos
        return [(a, b), (torch.zeros_like(a), torch.minimum(below, (hi + 1).clamp(min=0)))]
    return [(a, b), (torch.zeros_like(a), below), (b, torch.maximum(b, g))]


@dataclass
class NonFiniteGuard:
    """The inputs to run the kernel on, and where the output must be NaN instead. The inputs
    have every non-finite value zeroed where a key hidden from a query could otherwise leak
    one into its output; they are the given tensors themselves when every query sees every
    key (nothing can leak: a non-finite value reaches only outputs the poison marks)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    #: ``[B, Hq, Tq, Dv]``-broadcastable bool: outputs that saw a non-finite input.
    poison: torch.Tensor

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        return out.masked_fill(self.poison, float("nan"))


def nonfinite_guard(
    q, k, v, causal=True, window=None, global_tokens=0, *, may_read_host: bool | None = None
) -> NonFiniteGuard | None:
    """How the contract's non-finite rule is met by any provider: run the kernel on the
    returned zeroed inputs, then :meth:`NonFiniteGuard.apply` its output. None when every
    input is finite: where reading a result costs no device sync (``may_read_host``; default:
    CPU tensors), three sums tell (a NaN or Inf anywhere makes its tensor's sum non-finite; a
    sum that merely overflows takes the exact path, which is still right). Otherwise the
    guard is always built: a few elementwise passes over q, k and v, and no sync. A GPU
    plugin emulated on CPU tensors passes ``may_read_host=False`` to take its device's path
    (no host read: graph capture stays possible)."""
    if may_read_host is None:
        may_read_host = q.device.type == "cpu"
    if may_read_host and _sums_are_finite(q, k, v):
        return None
    batch, hq, tq, _ = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    if window is None and (not causal or tq == 1) and min(q.shape) > 0 and min(k.shape) > 0 and dv > 0:
        return _all_keys_visible_guard(q, k, v)
    bad_q, bad_k = ~torch.isfinite(q), ~torch.isfinite(k)
    shared = values_are_key_columns(v, k)  # MLA's absorbed values: one mask and one zeroed copy serve both
    bad_v = bad_k[..., :dv] if shared else ~torch.isfinite(v)
    ranges = _visible_ranges(tq, tk, causal, window, global_tokens, q.device)
    # Non-finite keys / value entries per prefix of the keys, then summed over each query's ranges.
    per_key = torch.cat((bad_k.any(dim=-1, keepdim=True), bad_v), dim=-1).to(torch.int32)  # [B, Hk, Tk, 1 + Dv]
    prefix = torch.nn.functional.pad(per_key.cumsum(dim=2, dtype=torch.int32), (0, 0, 1, 0))  # [B, Hk, Tk + 1, 1 + Dv]
    seen_bad = sum(prefix.index_select(2, end) - prefix.index_select(2, start) for start, end in ranges) > 0
    from_kv = seen_bad[..., :1] | seen_bad[..., 1:]  # [B, Hk, Tq, Dv]: a bad key poisons the row, a value its column
    sees_any = (sum(end - start for start, end in ranges) > 0)[:, None]  # [Tq, 1]: seeing nothing gives zeros
    from_q = bad_q.any(dim=-1, keepdim=True) & sees_any  # [B, Hq, Tq, 1]
    poison = (from_kv[:, :, None] | from_q.reshape(batch, hk, hq // hk, tq, 1)).reshape(batch, hq, tq, dv)
    safe_k = k.masked_fill(bad_k, 0)
    safe_v = safe_k[..., :dv] if shared else v.masked_fill(bad_v, 0)  # still k's first columns: a kernel can share it
    return NonFiniteGuard(q.masked_fill(bad_q, 0), safe_k, safe_v, poison)


#: Bytes of k and v (per kv-head group) past which :func:`guarded_attention` splits the heads.
#: The guard holds a few times its inputs (bool masks, int32 prefix counts, zeroed copies):
#: ~40 GiB on top of 10 GiB of k and v for a 2048-token prefill chunk over 128k expanded keys
#: of 128 heads, past an H200's free memory; in groups it stays a few times this bound.
GUARD_GROUP_BYTES = 512 * 2**20


def guarded_attention(
    kernel, q, k, v, causal=True, scale=None, window=None, global_tokens=0, *,  # noqa: ANN001
    may_read_host: bool | None = None, group_bytes: int = GUARD_GROUP_BYTES,
) -> torch.Tensor:
    """``kernel(q, k, v, causal, scale, window, global_tokens)`` -- an attention kernel for
    finite inputs -- under the op's NaN / Inf rule (:func:`nonfinite_guard`, with its
    ``may_read_host``): what every provider runs. Where the guard must be built and the keys
    see different queries, the kv heads go in groups whose k and v take at most
    ``group_bytes`` (a kv head alone may take more), each guarded and run on its own: heads
    are independent, so the result is the same, and the guard's memory is bounded by the
    group's, not the whole k and v's."""
    if may_read_host is None:
        may_read_host = q.device.type == "cpu"
    hk, tk = k.shape[1], k.shape[2]
    per_head = k[:, :1].numel() * k.element_size()
    if not values_are_key_columns(v, k):
        per_head += v[:, :1].numel() * v.element_size()
    heads = max(1, group_bytes // max(per_head, 1))
    visible_to_all = window is None and (not causal or q.shape[2] == 1)
    if heads >= hk or visible_to_all or tk == 0:
        guard = nonfinite_guard(q, k, v, causal, window, global_tokens, may_read_host=may_read_host)
        if guard is None:
            return kernel(q, k, v, causal, scale, window, global_tokens)
        return guard.apply(kernel(guard.q, guard.k, guard.v, causal, scale, window, global_tokens))
    if may_read_host and _sums_are_finite(q, k, v):
        return kernel(q, k, v, causal, scale, window, global_tokens)
    share = q.shape[1] // hk  # query heads per kv head

    def group(first: int) -> torch.Tensor:  # its guard is freed on return, before the next group's
        kv = slice(first, first + heads)
        qs = q[:, first * share : (first + heads) * share]
        guard = nonfinite_guard(qs, k[:, kv], v[:, kv], causal, window, global_tokens, may_read_host=False)
        return guard.apply(kernel(guard.q, guard.k, guard.v, causal, scale, window, global_tokens))

    out = None
    for first in range(0, hk, heads):
        part = group(first)
        if out is None:  # the kernel's dtype: one output, written group by group (no concatenated copy)
            out = part.new_empty(*q.shape[:3], part.shape[-1])
        out[:, first * share : first * share + part.shape[1]] = part
        del part
    return out


def _sums_are_finite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k and v hold only finite values, read on the host (three sums: a NaN or Inf
    anywhere makes its tensor's sum non-finite; one that merely overflows says no, which only
    takes the exact path)."""
    return math.isfinite(float(q.sum()) + float(k.sum()) + float(v.sum()))


def values_are_key_columns(v: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``v`` is ``k[..., :Dv]`` (MLA's absorbed decode: the values are the latent's first
    ``kv_lora`` columns): a kernel may then read one tensor for both."""
    return (v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape[:-1] == k.shape[:-1]
            and v.shape[-1] <= k.shape[-1])


def _all_keys_visible_guard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> NonFiniteGuard:
    """:func:`nonfinite_guard` where every query sees every key (a decode step's one query, or
    non-causal without a window): no hidden key can leak a value, so the kernel runs on the
    inputs as given. A query's row is NaN when its q row, or any k row of its kv head, is not
    finite; a column when any v entry of it is.

    Found with products by zeros: ``0 * x`` is 0 for a finite ``x`` and NaN for NaN or +-Inf
    (IEEE 754), and a sum of zeros cannot overflow, so ``zeros [1, Tk] @ k`` has NaN exactly in
    the columns where a key is not finite. One read of k (a matrix-vector product, at memory
    speed), which also serves v when v is k's first columns (MLA's absorbed decode: the values
    are the latent's first ``kv_lora`` columns); no copy of either."""
    batch, hq, _, _ = q.shape
    hk, dv = k.shape[1], v.shape[3]

    def per_query_head(t: torch.Tensor) -> torch.Tensor:  # [B, Hk, 1, n] -> [B, Hq, 1, n] (no host sync)
        return t[:, :, None].expand(batch, hk, hq // hk, *t.shape[2:]).reshape(batch, hq, *t.shape[2:])

    zeros = k.new_zeros(*k.shape[:2], 1, k.shape[2])  # [B, Hk, 1, Tk]
    key_columns = (zeros @ k).isnan()  # [B, Hk, 1, D]
    if values_are_key_columns(v, k):
        value_columns = key_columns[..., :dv]
    else:
        value_columns = (zeros @ v).isnan()  # [B, Hk, 1, Dv]
    query_rows = (q @ q.new_zeros(q.shape[-1], 1)).isnan()  # [B, Hq, Tq, 1]
    rows = query_rows | per_query_head(key_columns.any(dim=-1, keepdim=True))  # [B, Hq, Tq, 1]
    return NonFiniteGuard(q, k, v, rows | per_query_head(value_columns))


@attention.reference
def _attention_reference(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    guard = nonfinite_guard(q, k, v, causal, window, global_tokens)
    if guard is not None:
        return guard.apply(_attention_math(guard.q, guard.k, guard.v, causal, scale, window, global_tokens))
    return _attention_math(q, k, v, causal, scale, window, global_tokens)


def _attention_math(q, k, v, causal, scale, window, global_tokens):
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
        if blind.is_meta or bool(blind.any()):  # meta: no values to test, keep the shapes of the fill
            probs.masked_fill_(blind, 0.0)
    out = probs @ vg
    return out.reshape(batch, hq, tq, dv).to(q.dtype)


def visible_pairs(tq: int, tk: int, causal: bool, window: int | None, global_tokens: int) -> int:
    """How many (query, key) pairs :func:`visible_keys` lets through, counted per query in
    closed form (no ``[Tq, Tk]`` mask): what a kernel that skips masked blocks computes, up to
    its tiles' edges (causal halves a square's work, CPU and GPU kernels alike skip it)."""
    if not causal and window is None:
        return tq * tk
    window = _within_reach(window, tq, tk)
    pos = torch.arange(tq, dtype=torch.int64) + (tk - tq)
    if window is None:  # causal: keys 0..pos
        return int((pos + 1).clamp(0, tk).sum())
    low = (pos - window + 1).clamp(min=0)
    high = pos.clamp(max=tk - 1) if causal else (pos + window - 1).clamp(max=tk - 1)
    near = (high - low + 1).clamp(min=0)  # the window's keys
    pinned_end = torch.full_like(pos, min(global_tokens, tk))  # the global keys [0, pinned_end)
    if causal:
        pinned_end = torch.minimum(pinned_end, (pos + 1).clamp(min=0))
    both = (torch.minimum(pinned_end - 1, high) - low + 1).clamp(min=0)  # global keys inside the window
    return int((near + pinned_end - both).sum())


@attention.cost
def _attention_cost(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    batch, hq, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    pairs = visible_pairs(tq, tk, causal, window, global_tokens)
    flops = 2 * batch * hq * pairs * (d + dv)
    moved = sum(t.numel() for t in (q, k, v)) * q.element_size() + batch * hq * tq * dv * q.element_size()
    return Cost(flops=flops, bytes=moved)


@attention.outputs
def _attention_outputs(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    return (Output((*q.shape[:-1], v.shape[-1]), q.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32 = torch.bfloat16, torch.float32
#: ``b, hq, tq, d`` (``hk`` = hq, ``tk`` = tq, ``dv`` = d unless given) and the op's keywords.
#: ``nan``: (tensor, index) pairs to poison with ``value`` (default NaN). Full and bench rows
#: are DeepSeek-V3's MLA: 128 heads, q/k head dim 192 = 128 + rope 64, v head dim 128;
#: absorbed decode attends one shared latent head (kv_lora 512 + rope 64, values 512): ``latent``
#: makes v the keys' first ``dv`` columns, as the model passes them (a view: a NaN in k is in v too).
ATTENTION_ROWS = [
    dict(name="bf16/causal/B1xH4xT64xD64", dtype=BF16, b=1, hq=4, hk=4, tq=64, tk=64, d=64),
    dict(name="f32/causal/gqa/B2xHq8xHk2xT32xD32", dtype=F32, b=2, hq=8, hk=2, tq=32, tk=32, d=32),
    dict(name="bf16/noncausal/B1xH2xT48xD64", dtype=BF16, b=1, hq=2, hk=2, tq=48, tk=48, d=64, causal=False),
    dict(name="bf16/prefill-with-cache/Tq16xTk96", dtype=BF16, b=1, hq=4, hk=4, tq=16, tk=96, d=64),
    # a prefill chunk after cached tokens (generate's chunked prefill), with GQA and MLA's head dims
    dict(name="f32/prefill-with-cache/gqa/Hq8xHk2xTq16xTk80", dtype=F32, b=2, hq=8, hk=2, tq=16, tk=80, d=32),
    dict(name="bf16/prefill-with-cache/Hk1xTq24xTk72xD96xDv64", dtype=BF16, b=1, hq=4, hk=1, tq=24, tk=72, d=96, dv=64),
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
    # it sees propagates (row for q/k, column for v).
    dict(name="f32/nan-in-visible-key/causal", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=16, tk=16, d=32, nan=[("k", (0, 1, 5, 3))]),
    dict(name="f32/nan-in-hidden-key/window4", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=16, tk=16, d=32, window=4, nan=[("k", (0, 0, 2, 0))]),
    dict(name="f32/inf-in-values/window4+global2/gqa", kind="edge", dtype=F32, b=1, hq=4, hk=2, tq=16, tk=16, d=32, window=4, global_tokens=2,
         nan=[("v", (0, 0, 1, 7)), ("v", (0, 1, 9, 0)), ("v", (0, 1, 14, 3))], value=float("inf")),
    dict(name="f32/nan-in-query/noncausal-window3", kind="edge", dtype=F32, b=1, hq=2, hk=2, tq=12, tk=12, d=32, causal=False, window=3,
         nan=[("q", (0, 1, 4, 0)), ("k", (0, 0, 11, 2))]),
    dict(name="bf16/nan-in-key/decode/Tq1xTk64/gqa", kind="edge", dtype=BF16, b=2, hq=4, hk=2, tq=1, tk=64, d=64, nan=[("k", (1, 0, 40, 5))]),
    dict(name="bf16/nan-in-key/decode-window16/Tq1xTk64", kind="edge", dtype=BF16, b=1, hq=2, hk=2, tq=1, tk=64, d=64, window=16,
         nan=[("k", (0, 0, 10, 5)), ("v", (0, 1, 60, 1))]),
    # absorbed MLA: decode, an MTP step's few queries, a NaN in the shared latent
    dict(name="bf16/mla/absorbed-decode/B2xHq32xHk1xTk300xD576xDv512", dtype=BF16, b=2, hq=32, hk=1, tq=1, tk=300, d=576, dv=512, latent=True),
    dict(name="bf16/mla/absorbed-mtp/Hq32xHk1xTq2xTk130xD576xDv512", dtype=BF16, b=1, hq=32, hk=1, tq=2, tk=130, d=576, dv=512, latent=True),
    dict(name="bf16/nan-in-latent/absorbed-decode/Hq32xTk64", kind="edge", dtype=BF16, b=2, hq=32, hk=1, tq=1, tk=64, d=576, dv=512,
         latent=True, nan=[("k", (1, 0, 40, 7))]),
    dict(name="bf16/mla/prefill/H128xT1024xD192xDv128", tier="full", dtype=BF16, b=1, hq=128, hk=128, tq=1024, tk=1024, d=192, dv=128),
    dict(name="bf16/mla/decode/H128xTk4096xD192xDv128", tier="full", dtype=BF16, b=4, hq=128, hk=128, tq=1, tk=4096, d=192, dv=128),
    dict(name="bf16/mla/window512/H128xT2048", tier="full", dtype=BF16, b=1, hq=128, hk=128, tq=2048, tk=2048, d=192, dv=128, window=512, global_tokens=16),
    # bench
    dict(name="bench/bf16/causal/B1xH8xT128xD64", kind="bench", dtype=BF16, b=1, hq=8, tq=128, d=64),
    dict(name="bench/bf16/decode/B4xHq16xHk1xTk256xD96xDv64", kind="bench", dtype=BF16, b=4, hq=16, hk=1, tq=1, tk=256, d=96, dv=64),
    dict(name="bench/bf16/mla/prefill/H128xT4096xD192xDv128", kind="bench", tier="full", dtype=BF16, b=1, hq=128, tq=4096, d=192, dv=128),
    dict(name="bench/bf16/mla/absorbed-decode/B64xHq128xHk1xTk4096xD576xDv512", kind="bench", tier="full", dtype=BF16,
         b=64, hq=128, hk=1, tq=1, tk=4096, d=576, dv=512, latent=True),
]


@attention.examples(ATTENTION_ROWS)
def _attention_example(draw: Draw, p) -> Example:
    b, hq, tq, d = p["b"], p["hq"], p["tq"], p["d"]
    hk, tk, dv, dtype = p.get("hk", hq), p.get("tk", tq), p.get("dv", d), p.get("dtype", BF16)
    q, k = draw.randn(b, hq, tq, d, dtype=dtype), draw.randn(b, hk, tk, d, dtype=dtype)
    kw = {
        "q": q,
        "k": k,
        "v": k[..., :dv] if p.get("latent") else draw.randn(b, hk, tk, dv, dtype=dtype),
        "causal": p.get("causal", True),
        "scale": p.get("scale"),
        "window": p.get("window"),
        "global_tokens": p.get("global_tokens", 0),
    }
    for name, index in p.get("nan", ()):
        kw[name][tuple(index)] = p.get("value", float("nan"))
    return Example(kw)
