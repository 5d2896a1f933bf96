"""Block-scaled FP8 GEMM, NT layout (``a [M, K]``, ``b [N, K]``), as DeepSeek-V3 / DeepGEMM.

Scales: ``a_scale [M, ceil(K/128)]`` (1x128 activation blocks) and
``b_scale [ceil(N/128), ceil(K/128)]`` (128x128 weight blocks), float32. The kernel walks
K in steps of 128 (one scale block), takes each partial product from ``tl.dot`` in FP32
and promotes it into an FP32 accumulator scaled by ``a_scale[m, k] * b_scale[n // 128, k]``
(the "scale promotion every 128 K" of DeepSeek-V3's ``fp8_gemm`` and DeepGEMM).

Tuning comes from the :class:`~dshal.kernels.triton.target.KernelTarget`: see
:func:`select_tile` (power-of-two M buckets, tuned tables shipped as data, timing on the
device once per bucket, never inside a graph capture). ``fp8_dot_dtypes`` says whether
``tl.dot`` takes the FP8 operands directly (E4M3FN on Hopper/gfx950, E4M3FNUZ as
``tl.float8e4b8`` on gfx942) or they are widened to float16 first (exact: every E4M3/E5M2
value is a float16 value). A tile with ``split_k`` > 1 (decode, M <= 16) splits the K loop
over programs that write float32 partials, summed afterwards in a fixed order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from dshal.errors import ArgumentError, DTypeError
from dshal.kernels.triton import on_tensor_device
from dshal.kernels.triton._checks import (
    FP8_FORMATS,
    check_kernel_device,
    checked_target,
    hardware_nan_gemm,
    launch,
    module_interpreted,
    resolve_target,
)
from dshal.kernels.triton._jit import cast_rne
from dshal.kernels.triton.target import KernelTarget, TileConfig, m_bucket
from dshal.ops.spec import check_dim, check_same_device, check_tensor

INTERPRETED = module_interpreted()

#: K extent of one scale block (and of one step of the kernel's K loop).
SCALE_BLOCK = 128
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_cs,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP8: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Program (pid, split): output tile pid, K blocks [k_first, k_last) of split; with SPLIT_K > 1
    # c_ptr is a float32 [SPLIT_K, M, N] buffer of partial sums (stride_cs apart).
    # Grouped tile order: GROUP_M row-tiles share each column of B while it is in cache.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_rows
    pid_n = (pid % group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 / column 0 (wrapped) and are never stored.
    rows = offs_m % M
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    a_s_ptrs = a_s_ptr + rows * stride_asm
    b_s_ptrs = b_s_ptr + (cols // BLOCK_K) * stride_bsn

    k_tiles = tl.cdiv(K, BLOCK_K)
    k_first = 0
    k_last = k_tiles
    if SPLIT_K > 1:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_first = tl.program_id(1) * per_split
        k_last = tl.minimum(k_first + per_split, k_tiles)
        a_ptrs += k_first * BLOCK_K * stride_ak
        b_ptrs += k_first * BLOCK_K * stride_bk
        c_ptr += tl.program_id(1).to(tl.int64) * stride_cs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_first, k_last):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + kt * stride_ask)
        if not DOT_FP8:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        if BLOCK_N <= BLOCK_K:
            # the tile's stored columns lie in one 128-column scale block: one weight scale, and
            # a [BLOCK_M] scale vector, not a [BLOCK_M, BLOCK_N] one in registers (tcgen05 tiles
            # of 128x128 spilled 2 KB with it on sm_100a). Same products, same bits.
            b_s = tl.load(b_s_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn + kt * stride_bsk)
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]  # scales first: dot * a_s alone can overflow
        else:
            b_s = tl.load(b_s_ptrs + kt * stride_bsk)
            acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c = cast_rne(acc, c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


#: (target, M bucket, N, K, operand dtype, out dtype) -> the tile timed fastest in this process
_TUNED: dict[tuple, TileConfig] = {}
_TUNING = threading.Lock()


def _capturing_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def select_tile(
    target: KernelTarget, m: int, n: int, k: int, key: tuple = (), run: Callable[[TileConfig], object] | None = None,
    widened: bool = False,
) -> TileConfig:
    """The tile for an (m, n, k) GEMM on ``target``, in this order:

    1. the tuned table's tile for (n, k, M bucket) (``target.tuned_tile``: data shipped with
       dshal or written by ``dshal tune``);
    2. the space's only tile (``target.gemm_space(m)``), or its first when ``run`` is None
       (the interpreter cannot time);
    3. the fastest tile of the space, timed once per (M bucket, n, k, ``key``) by calling
       ``run(tile)`` under ``triton.testing.do_bench``; remembered for the process. While a
       CUDA/HIP graph is being captured nothing is timed (timing launches and synchronizes):
       the capture takes the tile already timed for the shape (by the eager step before it,
       so a replay computes the bits the eager step did), else the space's first.

    Without a tuned table the timed choice may differ from one process to the next, and with
    it a GEMM's rounding (a split-K tile sums in another order); ``dshal tune`` fixes it.
    ``widened`` (FP8 operands the dot cannot take, widened to f16): the target's widened
    space, and no tuned table (it was timed on the dot path, whose tiles may spill widened).
    """
    bucket = m_bucket(m)
    tuned = None if widened else target.tuned_tile(n, k, bucket)
    if tuned is not None:
        return tuned
    space = target.gemm_space(m, widened)
    if len(space) == 1 or run is None:
        return space[0]
    memo = (target.name, bucket, n, k, *key)
    if _capturing_graph():
        return _TUNED.get(memo, space[0])
    from triton.testing import do_bench

    with _TUNING:
        if memo not in _TUNED:
            times = {tile: do_bench(lambda tile=tile: run(tile), warmup=5, rep=20) for tile in space}
            _TUNED[memo] = min(times, key=times.__getitem__)
        return _TUNED[memo]


def _check_fp8_block_gemm(
    fn: str,
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    target: object,
    tile: object,
) -> KernelTarget:
    """:func:`fp8_block_gemm`'s input checks (skipped inside :func:`dshal.ops.trusted`);
    returns the target."""
    fp8 = tuple(FP8_FORMATS)
    check_tensor(fn, "a", a, dtypes=fp8, ndim=2)
    check_tensor(fn, "b", b, dtypes=fp8, ndim=2)
    check_tensor(fn, "a_scale", a_scale, dtypes=(torch.float32,), ndim=2)
    check_tensor(fn, "b_scale", b_scale, dtypes=(torch.float32,), ndim=2)
    if out_dtype not in OUT_DTYPES:
        raise DTypeError(f"{fn}: argument 'out_dtype' is {out_dtype!r}, expected torch.bfloat16, float16 or float32")
    M, K = a.shape
    N = b.shape[0]
    check_dim(fn, "b", b, 1, K, "K, the last dim of 'a'")
    k_blocks = triton.cdiv(K, SCALE_BLOCK)
    check_dim(fn, "a_scale", a_scale, 0, M, "M, the rows of 'a'")
    check_dim(fn, "a_scale", a_scale, 1, k_blocks, "ceil(K/128) for 1x128 activation blocks")
    check_dim(fn, "b_scale", b_scale, 0, triton.cdiv(N, SCALE_BLOCK), "ceil(N/128) for 128x128 weight blocks")
    check_dim(fn, "b_scale", b_scale, 1, k_blocks, "ceil(K/128) for 128x128 weight blocks")
    check_same_device(fn, "a", a, b=b, a_scale=a_scale, b_scale=b_scale)
    check_kernel_device(fn, "a", a, INTERPRETED)
    tgt = resolve_target(fn, target, a.device)
    tgt.check_fp8_dtype(fn, "a", a.dtype)
    tgt.check_fp8_dtype(fn, "b", b.dtype)
    if tile is not None and not isinstance(tile, TileConfig):
        raise ArgumentError(f"{fn}: argument 'tile' is a {type(tile).__name__}, expected a TileConfig or None")
    return tgt


def fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    target: KernelTarget | None = None,
    tile: TileConfig | None = None,
) -> torch.Tensor:
    """``out[M, N] = (a * a_scale) @ (b * b_scale).T`` with DeepSeek-V3 block scales.

    ``a [M, K]`` and ``b [N, K]`` are FP8 (e4m3fn, e4m3fnuz, e5m2 or e5m2fnuz; any
    strides); ``a_scale [M, ceil(K/128)]`` and ``b_scale [ceil(N/128), ceil(K/128)]`` are
    float32 (any strides). Accumulation is FP32 with the scales applied every 128 K; the
    result is a new contiguous ``[M, N]`` tensor of ``out_dtype`` (bfloat16, float16 or
    float32). Any M, N, K >= 0 works: partial tiles and a K that is not a multiple of 128
    are masked (the last scale block then covers fewer than 128 columns); M or N of 0 gives
    an empty result, K of 0 zeros.

    ``target`` (default: :meth:`KernelTarget.interpreter` for CPU tensors, else
    the ``generic`` shipped table) supplies the tiles, chosen by :func:`select_tile` (under the
    interpreter, which cannot time tiles, the space's first); ``tile`` forces one (``dshal
    tune``, ``dshal kernels``). FP8 operands go to ``tl.dot`` directly when ``a`` and ``b``
    share a dtype listed in ``target.fp8_dot_dtypes``, else both are widened (exactly) to float16.

    Raises DTypeError (non-FP8 ``a``/``b``, non-float32 scales, bad ``out_dtype``),
    ShapeError (ranks, K mismatch, scale shapes), DeviceError (mixed devices, a CPU tensor
    without the interpreter), UnsupportedOpError (an FP8 dtype outside ``target.fp8_dtypes``,
    e.g. FNUZ on NVIDIA), ArgumentError (``tile`` not a TileConfig, ``target`` not a
    KernelTarget). Inside
    :func:`dshal.ops.trusted` these input checks are skipped (as the op's own are): the
    caller vouches for the inputs; only ``target`` is resolved.
    """
    fn = "fp8_block_gemm"
    tgt = checked_target(
        fn, target, a.device, lambda: _check_fp8_block_gemm(fn, a, a_scale, b, b_scale, out_dtype, target, tile)
    )
    M, K = a.shape
    N = b.shape[0]

    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=out_dtype, device=a.device)
    dot_fp8 = a.dtype == b.dtype and tgt.dot_takes(a.dtype)

    def run(t: TileConfig) -> torch.Tensor:
        split = min(t.split_k, triton.cdiv(K, SCALE_BLOCK))
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
        # split-K partials: float32 [split, M, N], summed below in split order (deterministic)
        dest = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
        launch(
            _fp8_block_gemm_kernel, (triton.cdiv(M, t.block_m) * triton.cdiv(N, t.block_n), split),
            a, b, dest, a_scale, b_scale,
            M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), dest.stride(-2), dest.stride(-1),
            dest.stride(0) if split > 1 else 0,
            a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
            BLOCK_K=SCALE_BLOCK, EVEN_K=K % SCALE_BLOCK == 0, DOT_FP8=dot_fp8,
            **(t.kernel_kwargs() | {"SPLIT_K": split}), num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
        if split > 1:
            out.copy_(dest.sum(dim=0))
        return out

    with on_tensor_device((a,)):  # tuning times on the current device: a's
        if tile is None:
            tile = select_tile(tgt, M, N, K, (a.dtype, b.dtype, out_dtype), None if INTERPRETED else run, widened=not dot_fp8)
        out = run(tile)
    # The interpreter decodes FP8 NaN codes as numbers; tensor cores propagate NaN.
    return hardware_nan_gemm(out, a, b) if INTERPRETED else out


__all__ = ["SCALE_BLOCK", "fp8_block_gemm", "select_tile"]
