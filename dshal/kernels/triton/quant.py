"""FP8 block quantization: 1x128 activations and 128x128 weights (DeepSeek-V3 layout).

``scale = amax(block) / fp8_max`` in float32 (an all-zero block gets scale 1), optionally
rounded up to a power of two (UE8M0, DeepSeek-V3.1); ``q = x / scale`` rounded to the
nearest FP8 value (ties to even), so ``x ≈ q.float() * scale`` per block.

The rounding onto the FP8 grid is done in float32 arithmetic before the final cast (see
``_jit.py``): results are bit-identical to ``torch``'s own conversion on every hardware and
under the Triton interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dshal.errors import ShapeError
from dshal.kernels.triton._checks import (
    FP8_FORMATS,
    check_flag,
    check_fp8_dtype,
    check_kernel_device,
    checked_target,
    launch,
    module_interpreted,
    resolve_target,
)
from dshal.kernels.triton._jit import finite_abs, quantize_to_codes, scale_from_amax
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.spec import FLOAT_DTYPES, check_tensor

INTERPRETED = module_interpreted()
#: Largest scale block (bm * bk) one program holds.
MAX_BLOCK_ELEMENTS = 32768


# ---------------------------------------------------------------- kernel
@triton.jit
def _quantize_blocks_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xb, stride_xm, stride_xk,
    stride_qb, stride_qm,
    stride_sb, stride_sm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    NAN_CODE: tl.constexpr, UE8M0: tl.constexpr,
):  # fmt: skip
    # q_ptr points at the FP8 output's bytes (uint8). One program: ROWS rows x BLOCK_K columns
    # of one batch entry. With BLOCK_M == 1 every row is its own scale block; otherwise
    # ROWS == BLOCK_M and the tile is one block.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    x = tl.load(
        x_ptr + pid_b * stride_xb + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    amax = tl.max(finite_abs(x), axis=1)
    if BLOCK_M > 1:
        amax = tl.max(amax, axis=0)
    scale = scale_from_amax(amax, FP8_MAX, UE8M0)
    if BLOCK_M > 1:
        q = quantize_to_codes(x, scale, FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO, NAN_CODE)
        tl.store(s_ptr + pid_b * stride_sb + pid_m * stride_sm + pid_k, scale)
    else:
        q = quantize_to_codes(x, scale[:, None], FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO, NAN_CODE)
        tl.store(s_ptr + pid_b * stride_sb + rows * stride_sm + pid_k, scale, mask=row_ok)
    q_ptrs = q_ptr + pid_b * stride_qb + rows[:, None].to(tl.int64) * stride_qm + cols[None, :]
    tl.store(q_ptrs, q, mask=mask)


# ---------------------------------------------------------------- wrapper
def _is_power_of_two(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def _check_fp8_quantize_blocks(
    fn: str, x: torch.Tensor, block: tuple[int, int], fp8_dtype: torch.dtype, ue8m0: bool, target: object
) -> KernelTarget:
    """:func:`fp8_quantize_blocks`'s input checks (skipped inside :func:`dshal.ops.trusted`);
    returns the target."""
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_fp8_dtype(fn, "fp8_dtype", fp8_dtype)
    check_flag(fn, "ue8m0", ue8m0)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not (block[0] == 1 or (_is_power_of_two(block[0]) and block[0] <= 256))
        or not (_is_power_of_two(block[1]) and 16 <= block[1] <= 1024)
        or block[0] * block[1] > MAX_BLOCK_ELEMENTS
    ):
        raise ShapeError(
            f"{fn}: argument 'block' is {block!r}, expected (bm, bk) with bm 1 or a power of two <= 256, "
            f"bk a power of two in [16, 1024] and bm * bk <= {MAX_BLOCK_ELEMENTS}, e.g. (1, 128) or (128, 128)"
        )
    if block[0] > 1 and x.dim() < 2:
        raise ShapeError(f"{fn}: argument 'x' has shape {list(x.shape)}, expected at least 2-D for block {block!r}")
    check_kernel_device(fn, "x", x, INTERPRETED)
    tgt = resolve_target(fn, target, x.device)
    tgt.check_fp8_dtype(fn, "fp8_dtype", fp8_dtype)
    return tgt


def fp8_quantize_blocks(
    x: torch.Tensor,
    block: tuple[int, int] = (1, 128),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    ue8m0: bool = False,
    *,
    target: KernelTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to FP8 per block; returns ``(q, scale)``.

    - ``block=(1, bk)`` (activations, DeepSeek-V3 uses ``(1, 128)``): ``x [..., K]``, one
      scale per row per ``bk`` columns; ``scale [..., ceil(K/bk)]``.
    - ``block=(bm, bk)`` with ``bm > 1`` (weights, ``(128, 128)``): ``x [..., M, K]`` (at
      least 2-D; leading dims are a batch, e.g. experts); ``scale [..., ceil(M/bm), ceil(K/bk)]``.

    ``bm`` is 1 or a power of two up to 256, ``bk`` a power of two from 16 to 1024, and one
    block holds at most 32768 elements (one program loads a whole block). Partial
    blocks at the edges are fine (their amax covers the elements present). ``fp8_dtype`` is
    ``torch.float8_e4m3fn`` (max 448), ``torch.float8_e4m3fnuz`` (max 240, never a negative
    zero), ``float8_e5m2`` or ``float8_e5m2fnuz``. ``scale`` is float32 and contiguous;
    ``q`` is contiguous with ``x``'s shape. ``ue8m0=True`` rounds each scale up to a power of
    two. ``x`` is float16/bfloat16/float32/float64, any strides; statistics are float32.
    ``target`` only sets the warps per program.

    Raises ShapeError (bad ``block``, ``x`` of the wrong rank), DTypeError (``x``'s dtype,
    ``fp8_dtype``), ArgumentError (``ue8m0`` not a bool), DeviceError (a CPU tensor without the interpreter, meta),
    UnsupportedOpError (an ``fp8_dtype`` outside ``target.fp8_dtypes``). Inside
    :func:`dshal.ops.trusted` these input checks are skipped (as the op's own are): the
    caller vouches for the inputs; only ``target`` is resolved.
    """
    fn = "fp8_quantize_blocks"
    tgt = checked_target(
        fn, target, x.device, lambda: _check_fp8_quantize_blocks(fn, x, block, fp8_dtype, ue8m0, target)
    )
    fmt = FP8_FORMATS[fp8_dtype]
    bm, bk = int(block[0]), int(block[1])

    K = x.shape[-1]
    if bm == 1:
        lead, M, batch = x.shape[:-1], math.prod(x.shape[:-1]), 1
        scale_shape = (*lead, triton.cdiv(K, bk))
    else:
        lead, M = x.shape[:-2], x.shape[-2]
        batch = math.prod(lead)
        scale_shape = (*lead, triton.cdiv(M, bm), triton.cdiv(K, bk))
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scale

    x3 = x.reshape(batch, M, K)  # a view when the strides allow, else one copy
    q3 = q.view(torch.uint8).view(batch, M, K)
    s3 = scale.view(batch, -1, scale.shape[-1])
    rows = bm if bm > 1 else max(1, min(64, 4096 // bk))
    grid = (triton.cdiv(M, rows), triton.cdiv(K, bk), batch)
    launch(
        _quantize_blocks_kernel, grid,
        x3, q3, s3,
        M, K,
        x3.stride(0), x3.stride(1), x3.stride(2),
        q3.stride(0), q3.stride(1),
        s3.stride(0), s3.stride(1),
        BLOCK_M=bm, BLOCK_K=bk, ROWS=rows,
        **fmt.kernel_meta(),
        UE8M0=ue8m0,
        num_warps=tgt.elementwise_warps,
    )  # fmt: skip
    return q, scale


__all__ = ["fp8_quantize_blocks"]
