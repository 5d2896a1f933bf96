"""DeepSeek Sparse Attention's two kernels: MLA over each query's chosen latent rows
(:func:`dshal.ops.sparse_mla_attention`), one program per (batch, query, block of heads), and
the lightning indexer's scores (:func:`dshal.ops.indexer_topk`; its top-k is ``torch.topk``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dshal.errors import DTypeError, ShapeError
from dshal.kernels.triton._checks import check_kernel_device, checked_target, launch, module_interpreted, resolve_target
from dshal.kernels.triton._jit import cast_rne
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.sparse_attention import (
    check_key_indices as key_indices_in_range,
    indexer_topk as _indexer_spec,
    sparse_mla_attention as _spec,
    top_visible_keys,
)

INTERPRETED = module_interpreted()
# (``key_indices_in_range``: a value check, kept inside dshal.ops.trusted() as a device-side assert,
# not one of the input checks trusted mode skips)

#: Columns of q and kv per step of the score products (DeepSeek-V3.2's 576 = 9 steps).
BLOCK_D = 64
#: The widest value row one program accumulates (``v_dim`` rounded up to a power of two).
MAX_V_DIM = 1024


@triton.jit
def _nonfinite_per_row(x):
    """``[rows]`` int32: 1 where the row of ``x`` holds a NaN or +-Inf (read in float32: the
    interpreter keeps bfloat16 as raw bits)."""
    f = x.to(tl.float32)
    return tl.max(((f != f) | (tl.abs(f) == float("inf"))).to(tl.int32), axis=1)


@triton.jit
def _sparse_mla_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr,
    H, T, K, D, V, head_blocks, scale,
    sq_b, sq_h, sq_t, skv_b, skv_s, si_b, si_t, so_b, so_h, so_t,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    # Programs of one query are adjacent: its heads' blocks read the same kv rows from L2.
    pid = tl.program_id(0)
    bt = pid // head_blocks
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    q_rows = q_ptr + b * sq_b + t * sq_t + heads.to(tl.int64)[:, None] * sq_h
    idx_row = idx_ptr + b * si_b + t * si_t
    vcols = tl.arange(0, BLOCK_V)
    v_ok = vcols < V

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    bad_q = tl.zeros([BLOCK_H], tl.int32)  # a non-finite q entry per head
    bad_kv = tl.zeros([BLOCK_N], tl.int32)  # a non-finite entry in a named row, per key slot
    named = tl.zeros([BLOCK_N], tl.int32)
    for n0 in range(0, K, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        idx = tl.load(idx_row + slots, mask=slots < K, other=-1)
        valid = idx >= 0
        named += valid.to(tl.int32)
        rows = kv_ptr + b * skv_b + tl.where(valid, idx, 0).to(tl.int64)[:, None] * skv_s
        scores = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            d_ok = dcols < D
            qd = tl.load(q_rows + dcols[None, :], mask=head_ok[:, None] & d_ok[None, :], other=0.0)
            kd = tl.load(rows + dcols[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
            bad_q = tl.maximum(bad_q, _nonfinite_per_row(qd))
            bad_kv = tl.maximum(bad_kv, _nonfinite_per_row(kd))
            scores = tl.dot(qd.to(DOT), tl.trans(kd.to(DOT)), scores, input_precision="ieee")
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp(-inf) = 0, not NaN
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(rows + vcols[None, :], mask=valid[:, None] & v_ok[None, :], other=0.0)
        acc = tl.dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    any_key = tl.sum(named, axis=0) > 0
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    # The op's NaN rule: a non-finite value in the query's q row or in a row it names poisons
    # its whole output row (a query naming no row outputs zeros whatever its q).
    poison = ((bad_q > 0) | (tl.sum(bad_kv, axis=0) > 0)) & any_key
    out = tl.where(poison[:, None], float("nan"), out)
    o_rows = out_ptr + b * so_b + t * so_t + heads.to(tl.int64)[:, None] * so_h
    tl.store(o_rows + vcols[None, :], cast_rne(out, out_ptr.dtype.element_ty), mask=head_ok[:, None] & v_ok[None, :])


def _check_sparse_mla_attention(
    fn: str, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, v_dim: int, target: object
) -> KernelTarget:
    """:func:`sparse_mla_attention`'s input checks (the op's own, then the kernel's limits)."""
    _spec.check(q, kv, indices, scale, v_dim)
    if q.dtype == torch.float64:
        raise DTypeError(f"{fn}: argument 'q' has dtype torch.float64, expected float32, bfloat16 or float16 (the kernel "
                         "accumulates in float32)")
    if v_dim > MAX_V_DIM:
        raise ShapeError(f"{fn}: argument 'v_dim' is {v_dim}, expected at most {MAX_V_DIM} (one program's value row)")
    check_kernel_device(fn, "q", q, INTERPRETED)
    return resolve_target(fn, target, q.device)


def sparse_mla_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    v_dim: int,
    *,
    target: KernelTarget | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """:func:`dshal.ops.sparse_mla_attention` in one kernel -> a new contiguous ``[B, H, T, v_dim]``
    in ``q``'s dtype.

    ``q [B, H, T, D]`` and ``kv [B, S, D]`` (float32, bfloat16 or float16; any strides, the
    last dim made unit-stride), ``indices [B, T, K]`` int64 (-1: no key). One program per
    (batch, query, block of ``target.sparse_attention_tile.block_m`` heads) walks the query's
    K indices ``block_n`` at a time: it gathers those rows of ``kv``, scores them against its
    heads (``BLOCK_D`` columns a step, float32 accumulation), and keeps an online softmax and
    a float32 ``[heads, v_dim]`` accumulator; the shared latent row is read once per block of
    heads. A query with no key outputs zeros; a non-finite value in its q row or a named row
    makes its row NaN (the op's rule). ``check_indices``: the indices' range check (a host read
    in checked mode, a device-side assertion inside :func:`dshal.ops.trusted`).

    Raises DTypeError (dtypes, float64), ShapeError (shapes, ``v_dim`` over 1024), ArgumentError
    (``scale``, ``v_dim``), DeviceError (mixed devices, a CPU tensor without the interpreter).
    Inside :func:`dshal.ops.trusted` the input checks are skipped (as the op's own are).
    """
    fn = "sparse_mla_attention"
    tgt = checked_target(fn, target, q.device, lambda: _check_sparse_mla_attention(fn, q, kv, indices, scale, v_dim, target))
    batch, heads, tq, dim = q.shape
    keys = indices.shape[-1]
    if check_indices:
        key_indices_in_range(indices, kv.shape[1])
    out = torch.empty(batch, heads, tq, v_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if keys == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    tile = tgt.sparse_attention_tile
    head_blocks = triton.cdiv(heads, tile.block_m)
    # bfloat16 / float16 dots where the target takes them; float32 inputs stay float32 (ieee)
    half = q.dtype in (torch.bfloat16, torch.float16) and (q.dtype == torch.float16 or tgt.bf16_dot)
    launch(
        _sparse_mla_kernel, (batch * tq * head_blocks,),
        q, kv, indices, out,
        heads, tq, keys, dim, v_dim, head_blocks, float(scale),
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_H=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=BLOCK_D, BLOCK_V=max(16, triton.next_power_of_2(v_dim)),
        DOT={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype] if half else tl.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out


__all__ = ["BLOCK_D", "MAX_V_DIM", "sparse_mla_attention"]


# ---------------------------------------------------------------- the indexer's scores
#: The widest indexer head one program holds (``Di``), and the most heads (``Hi``).
MAX_INDEX_DIM = 512
MAX_INDEX_HEADS = 128


@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, k_ptr, out_ptr,
    T, S, HI, DI, key_blocks,
    sq_b, sq_t, sq_h, sw_b, sw_t, sk_b, sk_s, so_b, so_t,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bt = pid // key_blocks
    b = (bt // T).to(tl.int64)
    t = (bt % T).to(tl.int64)
    keys = (pid % key_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    key_ok = keys < S
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < HI
    q_rows = q_ptr + b * sq_b + t * sq_t + heads[:, None] * sq_h
    k_rows = k_ptr + b * sk_b + keys.to(tl.int64)[:, None] * sk_s
    dots = tl.zeros([BLOCK_H, BLOCK_S], tl.float32)
    for d0 in range(0, DI, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < DI
        qd = tl.load(q_rows + cols[None, :], mask=head_ok[:, None] & col_ok[None, :], other=0.0)
        kd = tl.load(k_rows + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        dots = tl.dot(qd.to(DOT), tl.trans(kd.to(DOT)), dots, input_precision="ieee")
    w = tl.load(w_ptr + b * sw_b + t * sw_t + heads, mask=head_ok, other=0.0)
    scores = tl.sum(w[:, None] * tl.maximum(dots, 0.0), axis=0)  # sum_h w_h relu(q_h . k)
    # relu(NaN) must stay NaN (tl.maximum may drop it): the op ranks NaN scores last. Only real
    # heads count: a padding head's zero query times an infinite key is NaN too.
    nan_dots = ((dots != dots) & head_ok[:, None]).to(tl.int32)
    scores = tl.where(tl.sum(nan_dots, axis=0) > 0, float("nan"), scores)
    tl.store(out_ptr + b * so_b + t * so_t + keys, scores, mask=key_ok)


def _check_indexer_topk(fn: str, q, weights, k, topk, visible, target) -> KernelTarget:  # noqa: ANN001
    """:func:`indexer_topk`'s input checks (the op's own, then the kernel's limits)."""
    _indexer_spec.check(q, weights, k, topk, visible)
    if q.dtype == torch.float64:
        raise DTypeError(f"{fn}: argument 'q' has dtype torch.float64, expected float32, bfloat16 or float16 (the kernel "
                         "accumulates in float32)")
    if q.shape[2] > MAX_INDEX_HEADS or q.shape[3] > MAX_INDEX_DIM:
        raise ShapeError(f"{fn}: argument 'q' has shape {list(q.shape)}, expected at most {MAX_INDEX_HEADS} heads of at most "
                         f"{MAX_INDEX_DIM} (one program's heads)")
    check_kernel_device(fn, "q", q, INTERPRETED)
    return resolve_target(fn, target, q.device)


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    visible: torch.Tensor | None = None,
    *,
    target: KernelTarget | None = None,
) -> torch.Tensor:
    """:func:`dshal.ops.indexer_topk` with its scores from one kernel -> ``[B, T, topk]`` int64.

    ``q [B, T, Hi, Di]`` and ``k [B, S, Di]`` (float32, bfloat16 or float16; any strides, the
    last dim made unit-stride), ``weights [B, T, Hi]`` float32. One program per (batch, query,
    block of ``target.indexer_tile.block_m`` keys) scores its keys against all ``Hi`` heads
    (``block_n`` columns a step, float32 accumulation) and sums ``weights * relu``; the
    visibility, ``torch.topk`` and the -1 entries are the reference's own
    (:func:`dshal.ops.sparse_attention.top_visible_keys`), over the queries in chunks.

    Raises DTypeError (dtypes, float64), ShapeError (shapes, over 128 heads or a head over 512),
    ArgumentError (``topk``), DeviceError (mixed devices, a CPU tensor without the interpreter).
    Inside :func:`dshal.ops.trusted` the input checks are skipped (as the op's own are).
    """
    fn = "indexer_topk"
    tgt = checked_target(fn, target, q.device, lambda: _check_indexer_topk(fn, q, weights, k, topk, visible, target))
    tile = tgt.indexer_tile
    half = q.dtype in (torch.bfloat16, torch.float16) and (q.dtype == torch.float16 or tgt.bf16_dot)
    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype] if half else tl.float32

    def scores(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        batch, tq, heads, dim = q.shape
        slen = k.shape[1]
        out = torch.empty(batch, tq, slen, dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            return out
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        weights = weights if weights.stride(-1) == 1 else weights.contiguous()
        key_blocks = triton.cdiv(slen, tile.block_m)
        launch(
            _index_scores_kernel, (batch * tq * key_blocks,),
            q, weights, k, out,
            tq, slen, heads, dim, key_blocks,
            q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1), k.stride(0), k.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_S=tile.block_m, BLOCK_D=tile.block_n, DOT=dot,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip
        return out

    return top_visible_keys(scores, q, weights, k, topk, visible)


__all__ += ["MAX_INDEX_DIM", "MAX_INDEX_HEADS", "indexer_topk"]
