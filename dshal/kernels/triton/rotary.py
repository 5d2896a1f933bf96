"""Rotary position embedding over the last dim, interleaved or half-split pairs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dshal.errors import ShapeError
from dshal.kernels.triton._checks import (
    check_flag,
    check_kernel_device,
    checked_target,
    launch,
    module_interpreted,
    resolve_target,
)
from dshal.kernels.triton._jit import cast_rne
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.spec import FLOAT_DTYPES, check_same_device, check_tensor

INTERPRETED = module_interpreted()

#: Leading dims (before D) the kernel indexes directly: x is at most 5-D.
MAX_LEADING = 4


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    R, D, half,
    size1, size2, size3,
    sx0, sx1, sx2, sx3, sxd,
    sc0, sc1, sc2, sc3, scd,
    ss0, ss1, ss2, ss3, ssd,
    ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_HALF)
    mask = (r < R)[:, None] & (j < half)[None, :]
    # Row index -> 4 leading indices; cos/sin use their own (possibly 0) strides, which is
    # how they broadcast against x without being materialized.
    i3 = r % size3
    t = r // size3
    i2 = t % size2
    t = t // size2
    i1 = t % size1
    i0 = t // size1
    x_row = i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3
    c_row = i0 * sc0 + i1 * sc1 + i2 * sc2 + i3 * sc3
    s_row = i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3
    if INTERLEAVED:
        first = 2 * j
        second = 2 * j + 1
    else:
        first = j
        second = j + half
    x1 = tl.load(x_ptr + x_row[:, None] + (first * sxd)[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + (second * sxd)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + c_row[:, None] + (j * scd)[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + s_row[:, None] + (j * ssd)[None, :], mask=mask, other=0.0).to(tl.float32)
    out_dtype = y_ptr.dtype.element_ty
    y_row = y_ptr + r[:, None] * D
    tl.store(y_row + first[None, :], cast_rne(x1 * c - x2 * s, out_dtype), mask=mask)
    tl.store(y_row + second[None, :], cast_rne(x2 * c + x1 * s, out_dtype), mask=mask)


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (5 - t.dim()) + tuple(t.shape)) if t.dim() < 5 else t


def _check_rotary(
    fn: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, target: object
) -> KernelTarget:
    """:func:`rotary_embedding`'s input checks (skipped inside :func:`dshal.ops.trusted`); returns the target."""
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(fn, "cos", cos, dtypes=FLOAT_DTYPES)
    check_tensor(fn, "sin", sin, dtypes=FLOAT_DTYPES)
    check_flag(fn, "interleaved", interleaved)
    D = x.shape[-1]
    if D % 2:
        raise ShapeError(f"{fn}: argument 'x' has last dim {D} (shape {list(x.shape)}), expected an even size D")
    if x.dim() > MAX_LEADING + 1:
        raise ShapeError(f"{fn}: argument 'x' has shape {list(x.shape)}, expected at most {MAX_LEADING + 1} dims")
    angles = (*x.shape[:-1], D // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            ok = torch.broadcast_shapes(t.shape, angles) == torch.Size(angles)
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(
                f"{fn}: argument {name!r} has shape {list(t.shape)}, expected a shape that broadcasts to "
                f"{list(angles)} (x[..., :D/2]), e.g. [T, D/2] for x [B, H, T, D] or [T, 1, D/2] for x [T, H, D]"
            )
    check_same_device(fn, "x", x, cos=cos, sin=sin)
    check_kernel_device(fn, "x", x, INTERPRETED)
    return resolve_target(fn, target, x.device)


def rotary_embedding(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = True,
    *,
    target: KernelTarget | None = None,
) -> torch.Tensor:
    """Rotate pairs of ``x``'s last dim ``D`` by the angles whose cos/sin are given.

    ``x [..., D]`` with D even and at most 4 leading dims (``[B, H, T, D]``,
    ``[B, T, H, D]``, ``[T, H, D]``, ``[T, D]``...), float16/bfloat16/float32/float64, any
    strides. ``cos`` and ``sin`` hold one angle per pair: they must broadcast (numpy rules)
    against ``x[..., :D/2]`` to exactly that shape, e.g. ``[T, D/2]`` for ``x [B, H, T, D]``
    and ``[T, 1, D/2]`` for ``x [T, H, D]``; any float dtype, any strides (broadcasting is
    done by strides, nothing is copied).

    Pair ``p`` is ``(2p, 2p+1)`` when ``interleaved`` else ``(p, p + D/2)``;
    ``(a, b) -> (a cos - b sin, b cos + a sin)``. Math in float32; the result is a new
    contiguous tensor of ``x``'s shape and dtype. ``target`` only sets the warps per program.

    Raises DTypeError (dtypes), ArgumentError (``interleaved`` not a bool), ShapeError (odd D, more than 5 dims,
    cos/sin not broadcastable to ``x[..., :D/2]``), DeviceError (mixed devices, a CPU
    tensor without the interpreter). Inside :func:`dshal.ops.trusted` these input checks
    are skipped (as the op's own are): the caller vouches for the inputs; only ``target``
    is resolved.
    """
    fn = "rotary_embedding"
    tgt = checked_target(fn, target, x.device, lambda: _check_rotary(fn, x, cos, sin, interleaved, target))
    D = x.shape[-1]
    half = D // 2
    angles = (*x.shape[:-1], half)

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x.numel() // D if D else 0
    if rows == 0 or half == 0:
        return y
    x5 = _as_5d(x)
    c5 = _as_5d(cos.expand(angles))
    s5 = _as_5d(sin.expand(angles))
    block_half = triton.next_power_of_2(half)
    rows_per = max(1, min(16, 2048 // block_half))
    launch(
        _rotary_kernel, (triton.cdiv(rows, rows_per),),
        x5, c5, s5, y,
        rows, D, half,
        x5.shape[1], x5.shape[2], x5.shape[3],
        *x5.stride(),
        *c5.stride(),
        *s5.stride(),
        ROWS=rows_per, BLOCK_HALF=block_half, INTERLEAVED=interleaved,
        num_warps=tgt.elementwise_warps,
    )  # fmt: skip
    return y


__all__ = ["MAX_LEADING", "rotary_embedding"]
