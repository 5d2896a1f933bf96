"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer's key choice
(:func:`indexer_topk`) and MLA attention over the chosen keys (:func:`sparse_mla_attention`)."""

from __future__ import annotations

import torch

from dshal.errors import ShapeError
from dshal.ops.examples import Draw, Example
from dshal.ops.spec import (
    FLOAT_DTYPES,
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

#: An entry of ``indices`` that names no key.
NO_KEY = -1

#: Float elements a reference's per-chunk intermediate may hold (64 MiB of float32): both
#: references go over the queries in chunks of this size, so a long prefill never holds
#: ``[T, S, Hi]`` scores or ``[T, K, D]`` gathered rows at once.
CHUNK_ELEMENTS = 2**24


@op_spec
def indexer_topk(q, weights, k, topk, visible=None):
    """The lightning indexer's choice: per query, the ``topk`` visible keys of highest score ->
    ``indices [B, T, topk]`` int64.

    ``q [B, T, Hi, Di]`` and ``k [B, S, Di]`` one float dtype; ``weights [B, T, Hi]`` float32
    (float64 with float64 ``q``), the scales folded in by the caller (DeepSeek-V3.2's
    ``Hi**-0.5 * Di**-0.5``: ``relu(a * s) = s * relu(a)`` for ``s > 0``). The score of key
    ``s`` for query ``t`` is ``sum_h weights[b, t, h] * relu(q[b, t, h] . k[b, s])``, computed
    in float32 (float64 for float64 inputs).

    Visibility: by default the queries are the *last* ``T`` of the ``S`` positions and causal
    (query ``i`` at position ``p = i + S - T`` sees keys ``j <= p``), as in :func:`attention`;
    ``visible [B, T, S]`` bool, when given, says instead which keys each query sees (a static
    decode step's written slots). ``1 <= topk <= max(S, 1)``. A query gets its ``topk``
    visible keys of highest score, in any order; entries past the number of keys it sees are ``-1``. Keys whose scores tie may
    be picked either way. A NaN score (non-finite inputs) ranks below every other visible key.
    """
    op = "indexer_topk"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "k", k, dtypes=(q.dtype,), ndim=3, dtype_of="q")
    wdtypes = (torch.float64,) if q.dtype == torch.float64 else (torch.float32,)
    check_tensor(op, "weights", weights, dtypes=wdtypes, ndim=3)
    batch, tq, heads, dim = q.shape
    check_dim(op, "k", k, 0, batch, "B, the batch of 'q'")
    check_dim(op, "k", k, 2, dim, "Di, the head dim of 'q'")
    check_dim(op, "weights", weights, 0, batch, "B, the batch of 'q'")
    check_dim(op, "weights", weights, 1, tq, "T, the queries of 'q'")
    check_dim(op, "weights", weights, 2, heads, "Hi, the heads of 'q'")
    # at most S: the output is [B, T, topk], and no query sees more than S keys
    check_int(op, "topk", topk, 1, max(k.shape[1], 1), why=f" (at most S = {k.shape[1]}, the keys of 'k')")
    if visible is not None:
        check_tensor(op, "visible", visible, dtypes=(torch.bool,), ndim=3)
        if tuple(visible.shape) != (batch, tq, k.shape[1]):
            raise ShapeError(f"{op}: argument 'visible' has shape {list(visible.shape)}, expected "
                             f"{[batch, tq, k.shape[1]]} ([B, T, S] from 'q' and 'k')")
    check_same_device(op, "q", q, weights=weights, k=k, visible=visible)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _query_chunk(per_query: int) -> int:
    """Queries per chunk when each takes ``per_query`` float elements."""
    return max(1, CHUNK_ELEMENTS // max(per_query, 1))


def causal_visible(tq: int, slen: int, device: torch.device) -> torch.Tensor:
    """``[T, S]`` bool: the default visibility (the queries the last T positions, causal)."""
    return torch.arange(slen, device=device) <= torch.arange(slen - tq, slen, device=device)[:, None]


def index_scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The indexer's scores ``[B, T, S]`` in the accumulation dtype (float32, float64 for
    float64), every key (no visibility): ``sum_h weights * relu(q_h . k)``, as two batched
    products (the per-head dot products, then the weighted sum over heads)."""
    acc = _accumulator(q.dtype)
    batch, tq, heads, dim = q.shape
    per_head = torch.relu(q.to(acc).reshape(batch, tq * heads, dim) @ k.to(acc).mT)  # [B, T * Hi, S]
    return (weights.to(acc).reshape(batch * tq, 1, heads) @ per_head.view(batch * tq, heads, -1)).view(batch, tq, -1)


@indexer_topk.reference
def _indexer_topk_reference(q, weights, k, topk, visible=None):
    batch, tq, heads, _ = q.shape
    slen = k.shape[1]
    out = torch.full((batch, tq, topk), NO_KEY, dtype=torch.int64, device=q.device)
    take = min(topk, slen)  # topk <= S but where S is 0
    if take == 0 or tq == 0 or batch == 0:
        return out
    causal = causal_visible(tq, slen, q.device) if visible is None else None
    step = _query_chunk(heads * slen)
    for t in range(0, tq, step):
        part = slice(t, t + step)
        scores = index_scores(q[:, part], weights[:, part], k)  # [B, c, S]
        seen = causal[part].expand_as(scores) if visible is None else visible[:, part]
        # Smallest first: minus the score, a NaN score after every other visible key (+inf),
        # the hidden keys after them all (torch.topk orders NaN past +inf).
        rank = torch.where(seen, (-scores).nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf), torch.nan)
        best = rank.topk(take, dim=-1, largest=False).indices
        kept = seen.gather(-1, best)
        out[:, part, :take] = torch.where(kept, best, NO_KEY)
    return out


@indexer_topk.cost
def _indexer_topk_cost(q, weights, k, topk, visible=None):
    batch, tq, heads, dim = q.shape
    slen = k.shape[1]
    flops = 2 * batch * tq * slen * heads * (dim + 1)
    moved = (q.numel() + k.numel()) * q.element_size() + weights.numel() * weights.element_size() + batch * tq * topk * 8
    if visible is not None:
        moved += visible.numel()
    return Cost(flops=flops, bytes=moved)


@indexer_topk.outputs
def _indexer_topk_outputs(q, weights, k, topk, visible=None):
    return (Output((*q.shape[:2], topk), torch.int64),)


@op_spec
def sparse_mla_attention(q, kv, indices, scale, v_dim):
    """MLA attention over each query's chosen keys -> ``[B, H, T, v_dim]`` in ``q``'s dtype.

    ``q [B, H, T, D]`` and ``kv [B, S, D]`` one float dtype: one latent head shared by every
    query head (MLA's absorbed form): a key is a whole row of ``kv``, its value the row's first
    ``v_dim`` columns. ``indices [B, T, K]`` int64: the rows query ``t`` attends to (``-1``: no
    key; the others in ``[0, S)``, checked: a host read in checked mode, a device-side
    assertion inside :func:`dshal.ops.trusted`). Output: ``softmax_k(q . kv[idx_k] * scale)``
    times ``kv[idx_k, :v_dim]``, computed in float32 (float64 for float64 inputs). A query
    with no key outputs zeros; a key named twice counts twice.

    Non-finite inputs: a NaN or +-Inf in a query's row of ``q``, or in a row of ``kv`` it
    names, makes its whole output row NaN (that row's values are its keys' columns); rows it
    does not name never reach it.
    """
    op = "sparse_mla_attention"
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor(op, "kv", kv, dtypes=(q.dtype,), ndim=3, dtype_of="q")
    check_tensor(op, "indices", indices, dtypes=(torch.int64,), ndim=3)
    batch, _, tq, dim = q.shape
    check_dim(op, "kv", kv, 0, batch, "B, the batch of 'q'")
    check_dim(op, "kv", kv, 2, dim, "D, the head dim of 'q'")
    check_dim(op, "indices", indices, 0, batch, "B, the batch of 'q'")
    check_dim(op, "indices", indices, 1, tq, "T, the queries of 'q'")
    if dim == 0:
        raise ShapeError(f"{op}: argument 'q' has shape {list(q.shape)}, expected a head dim D >= 1")
    check_real(op, "scale", scale, positive=True)
    check_int(op, "v_dim", v_dim, 1, dim, why=f" (the value columns: at most D = {dim}, the width of 'kv')")
    check_same_device(op, "q", q, kv=kv, indices=indices)


def check_key_indices(indices: torch.Tensor, slen: int) -> None:
    """The value check every provider runs: each entry of ``indices`` is -1 or in ``[0, S)``
    (:func:`~dshal.ops.spec.check_ids_in_range`: a host read in checked mode, a device-side
    assertion inside :func:`dshal.ops.trusted`)."""
    check_ids_in_range("sparse_mla_attention", "indices", indices, slen, "key index", f"kv has S = {slen} rows", low=NO_KEY)


def gather_rows(kv: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``kv [B, S, D]`` rows named by ``indices [B, c, K]`` (``-1`` gives a row of zeros) ->
    ``[B, c, K, D]``."""
    batch, chunk, keys = indices.shape
    named = indices >= 0
    flat = indices.clamp(min=0).reshape(batch, chunk * keys, 1).expand(-1, -1, kv.shape[-1])
    rows = kv.gather(1, flat).view(batch, chunk, keys, -1)
    return rows.masked_fill(~named[..., None], 0)


@sparse_mla_attention.reference
def _sparse_mla_attention_reference(q, kv, indices, scale, v_dim):
    check_key_indices(indices, kv.shape[1])
    batch, heads, tq, dim = q.shape
    keys = indices.shape[-1]
    acc = _accumulator(q.dtype)
    out = torch.zeros(batch, heads, tq, v_dim, dtype=acc, device=q.device)
    if keys == 0 or out.numel() == 0:
        return out.to(q.dtype)
    step = _query_chunk(keys * (dim + heads))
    for t in range(0, tq, step):
        part = slice(t, t + step)
        idx = indices[:, part]
        named = idx >= 0  # [B, c, K]
        rows = gather_rows(kv, idx).to(acc)  # [B, c, K, D]
        qc = q[:, :, part].to(acc).transpose(1, 2)  # [B, c, H, D]
        scores = (qc @ rows.mT).mul_(scale)  # [B, c, H, K]
        scores.masked_fill_(~named[:, :, None], -torch.inf)
        probs = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0)  # a query with no key: zeros
        res = probs @ rows[..., :v_dim]  # [B, c, H, v]
        # The contract's NaN rule, exactly: a non-finite q row or named kv row poisons the row.
        bad = (~torch.isfinite(rows)).any(dim=-1).any(dim=-1)[:, :, None] & named.any(dim=-1)[:, :, None]
        bad = bad | ((~torch.isfinite(qc)).any(dim=-1) & named.any(dim=-1)[:, :, None])  # [B, c, H]
        out[:, :, part] = res.masked_fill(bad[..., None], torch.nan).transpose(1, 2)
    return out.to(q.dtype)


@sparse_mla_attention.cost
def _sparse_mla_attention_cost(q, kv, indices, scale, v_dim):
    batch, heads, tq, dim = q.shape
    keys = indices.shape[-1]
    flops = 2 * batch * heads * tq * keys * (dim + v_dim)
    moved = (q.numel() + batch * tq * keys * dim) * q.element_size() + indices.numel() * 8
    return Cost(flops=flops, bytes=moved + batch * heads * tq * v_dim * q.element_size())


@sparse_mla_attention.outputs
def _sparse_mla_attention_outputs(q, kv, indices, scale, v_dim):
    return (Output((*q.shape[:3], v_dim), q.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32 = torch.bfloat16, torch.float32

#: ``b, t, s, hi, di, topk``; ``static``: a random ``visible`` mask (``blind``: rows that see
#: nothing, ``few``: rows that see fewer than topk keys). The full and bench rows are
#: DeepSeek-V3.2's indexer: 64 heads of 128, 2048 keys kept.
INDEXER_ROWS = [
    dict(name="bf16/prefill/B2xT24xHi4xDi32xtopk8", dtype=BF16, b=2, t=24, s=24, hi=4, di=32, topk=8),
    dict(name="f32/prefill-with-cache/T8xS40xHi8xDi16xtopk16", dtype=F32, b=1, t=8, s=40, hi=8, di=16, topk=16),
    dict(name="bf16/decode/B3xT1xS100xtopk32", dtype=BF16, b=3, t=1, s=100, hi=4, di=64, topk=32),
    dict(name="f32/mtp/T2xS70xtopk20", dtype=F32, b=2, t=2, s=70, hi=8, di=32, topk=20),
    dict(name="bf16/static-visible/T3xS64xtopk16", dtype=BF16, b=2, t=3, s=64, hi=4, di=32, topk=16, static=True,
         blind=[(0, 1)], few=[(1, 2)]),
    dict(name="f32/topk=S/T4xS6xtopk6", kind="edge", dtype=F32, b=1, t=4, s=6, hi=2, di=16, topk=6),
    dict(name="bf16/T>S-unseen-queries", kind="edge", dtype=BF16, b=1, t=12, s=8, hi=2, di=16, topk=4),
    dict(name="bf16/M0/T0", kind="edge", dtype=BF16, b=1, t=0, s=16, hi=2, di=16, topk=4),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, b=2, t=6, s=30, hi=4, di=32, topk=8, noncontiguous=("q", "k")),
    dict(name="f32/nan-in-key", kind="edge", dtype=F32, b=1, t=4, s=20, hi=2, di=16, topk=6, nan=[("k", (0, 3, 5))]),
    dict(name="bf16/v32/prefill/Hi64xDi128xT1024xS4096xtopk2048", tier="full", dtype=BF16, b=1, t=1024, s=4096, hi=64, di=128, topk=2048),
    dict(name="bf16/v32/decode/B4xS8192xtopk2048", tier="full", dtype=BF16, b=4, t=1, s=8192, hi=64, di=128, topk=2048),
    # bench
    dict(name="bench/bf16/decode/B4xS1024xHi16xDi64xtopk128", kind="bench", dtype=BF16, b=4, t=1, s=1024, hi=16, di=64, topk=128),
    dict(name="bench/bf16/v32/decode/B32xS32768xtopk2048", kind="bench", tier="full", dtype=BF16, b=32, t=1, s=32768, hi=64, di=128,
         topk=2048),
    dict(name="bench/bf16/v32/prefill/T4096xtopk2048", kind="bench", tier="full", dtype=BF16, b=1, t=4096, s=4096, hi=64, di=128,
         topk=2048),
]


@indexer_topk.examples(INDEXER_ROWS)
def _indexer_topk_example(draw: Draw, p) -> Example:
    b, t, s, hi, di, dtype = p["b"], p["t"], p["s"], p["hi"], p["di"], p["dtype"]
    kw = {
        "q": draw.randn(b, t, hi, di, dtype=dtype),
        # DeepSeek's weights_proj output times Hi**-0.5 * Di**-0.5: signed, ~1 / sqrt(Hi Di)
        "weights": draw.randn(b, t, hi, scale=(hi * di) ** -0.5),
        "k": draw.randn(b, s, di, dtype=dtype),
        "topk": p["topk"],
        "visible": None,
    }
    if p.get("static"):
        visible = draw.rand(b, t, s) < 0.6
        for row, query in p.get("blind", ()):
            visible[row, query] = False
        for row, query in p.get("few", ()):
            visible[row, query] = False
            visible[row, query, : p["topk"] // 2] = True
        kw["visible"] = visible
    for name, index in p.get("nan", ()):
        kw[name][tuple(index)] = float("nan")
    return Example(kw)


#: ``b, h, t, s, d, v, k``; ``none``: fraction of the indices set to -1 (``blind``: queries
#: with none). The full and bench rows are DeepSeek-V3.2's absorbed MLA: 128 heads over the
#: latent (kv_lora 512 + rope 64), 2048 keys kept.
SPARSE_ROWS = [
    dict(name="f32/B2xH4xT3xS50xD40xDv32xK16", dtype=F32, b=2, h=4, t=3, s=50, d=40, v=32, k=16, none=0.25, blind=[(1, 2)]),
    dict(name="bf16/decode/B2xH16xT1xS200xD576xDv512xK64", dtype=BF16, b=2, h=16, t=1, s=200, d=576, v=512, k=64),
    dict(name="bf16/mtp/B1xH16xT2xS130xD576xDv512xK48", dtype=BF16, b=1, h=16, t=2, s=130, d=576, v=512, k=48, none=0.3),
    dict(name="bf16/prefill/B1xH8xT16xS40xD96xDv64xK8", dtype=BF16, b=1, h=8, t=16, s=40, d=96, v=64, k=8, none=0.1, scale=0.3),
    dict(name="f32/K>S-padded/S12xK20", kind="edge", dtype=F32, b=1, h=2, t=2, s=12, d=32, v=16, k=20),
    dict(name="f32/no-key-queries", kind="edge", dtype=F32, b=2, h=2, t=3, s=20, d=32, v=32, k=8, blind=[(0, 0), (1, 2)]),
    dict(name="bf16/M0/T0", kind="edge", dtype=BF16, b=1, h=2, t=0, s=16, d=64, v=32, k=4),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, b=2, h=4, t=2, s=40, d=64, v=48, k=12, noncontiguous=("q", "kv")),
    # a NaN in a named row poisons its queries; one in an unnamed row (or under a -1) reaches none
    dict(name="f32/nan-in-named-and-unnamed-rows", kind="edge", dtype=F32, b=1, h=2, t=2, s=24, d=32, v=16, k=6, none=0.2,
         nan_named=[(0, 0)], nan_unnamed=True),
    dict(name="bf16/v32/decode/B4xH128xS8192xD576xDv512xK2048", tier="full", dtype=BF16, b=4, h=128, t=1, s=8192, d=576, v=512,
         k=2048),
    dict(name="bf16/v32/prefill/H128xT256xS4096xK2048", tier="full", dtype=BF16, b=1, h=128, t=256, s=4096, d=576, v=512, k=2048),
    # bench
    dict(name="bench/bf16/decode/B4xH16xS1024xD576xDv512xK256", kind="bench", dtype=BF16, b=4, h=16, t=1, s=1024, d=576, v=512,
         k=256),
    dict(name="bench/bf16/v32/decode/B64xH128xS16384xK2048", kind="bench", tier="full", dtype=BF16, b=64, h=128, t=1, s=16384,
         d=576, v=512, k=2048),
]


@sparse_mla_attention.examples(SPARSE_ROWS)
def _sparse_mla_attention_example(draw: Draw, p) -> Example:
    b, h, t, s, d, v, k, dtype = p["b"], p["h"], p["t"], p["s"], p["d"], p["v"], p["k"], p["dtype"]
    q, kv = draw.randn(b, h, t, d, dtype=dtype), draw.randn(b, s, d, dtype=dtype)
    # distinct rows per query (a random permutation's first K), -1 past S
    order = draw.rand(b, t, max(s, k)).argsort(dim=-1)[..., :k]
    indices = torch.where(order < s, order, NO_KEY)
    if p.get("none"):
        indices = torch.where(draw.rand(b, t, k) < p["none"], NO_KEY, indices)
    for row, query in p.get("blind", ()):
        indices[row, query] = NO_KEY
    if p.get("nan_named"):
        for row, query in p["nan_named"]:
            named = indices[row, query][indices[row, query] >= 0]
            kv[row, int(named[0]), 1] = float("nan")
    if p.get("nan_unnamed"):
        unnamed = sorted(set(range(s)) - set(indices[0].flatten().tolist()))
        if unnamed:
            kv[0, unnamed[0], 0] = float("nan")
    scale = p.get("scale", d**-0.5)
    return Example({"q": q, "kv": kv, "indices": indices, "scale": scale, "v_dim": v})

