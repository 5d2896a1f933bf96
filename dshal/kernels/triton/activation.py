"""SwiGLU activation ``silu(x[..., :d]) * x[..., d:]``, optionally fused with the 1x128 FP8
quantization of its output (what the next FP8 GEMM consumes)."""

from __future__ import annotations

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
from dshal.kernels.triton._jit import cast_rne, finite_abs, quantize_to_codes, scale_from_amax
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.spec import FLOAT_DTYPES, check_tensor

INTERPRETED = module_interpreted()

#: Columns per FP8 scale in the fused quantization (DeepSeek-V3's activation blocks).
QUANT_GROUP = 128
_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _silu_mul_tile(x_ptr, rows, cols, mask, d, stride_xr, stride_xc, OUT_DTYPE: tl.constexpr):
    """silu(gate) * up for a [rows, cols] tile, in float32, rounded to OUT_DTYPE's grid."""
    base = x_ptr + rows[:, None].to(tl.int64) * stride_xr
    gate = tl.load(base + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + (cols[None, :] + d) * stride_xc, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    return cast_rne(y, OUT_DTYPE)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, y_ptr, R, d, stride_xr, stride_xc,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    y = _silu_mul_tile(x_ptr, rows, cols, mask, d, stride_xr, stride_xc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * d + cols[None, :], y, mask=mask)


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr, q_ptr, s_ptr, R, d, stride_xr, stride_xc, n_groups,
    ROWS: tl.constexpr, GROUP: tl.constexpr, ROUND_DTYPE: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    NAN_CODE: tl.constexpr, UE8M0: tl.constexpr,
):  # fmt: skip
    # q_ptr points at the FP8 output's bytes (uint8).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < d)[None, :]
    # Rounded to x's dtype first: the same values an unfused silu_and_mul would hand over.
    y = _silu_mul_tile(x_ptr, rows, cols, mask, d, stride_xr, stride_xc, ROUND_DTYPE).to(tl.float32)
    scale = scale_from_amax(tl.max(finite_abs(y), axis=1), FP8_MAX, UE8M0)
    q = quantize_to_codes(y, scale[:, None], FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO, NAN_CODE)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * d + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * n_groups + group, scale, mask=row_ok)


def _check_gated(fn: str, x: torch.Tensor, target: object) -> KernelTarget:
    """The input checks both wrappers share (skipped inside :func:`dshal.ops.trusted`); returns the target."""
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] % 2:
        raise ShapeError(
            f"{fn}: argument 'x' has last dim {x.shape[-1]} (shape {list(x.shape)}), expected an even size 2*d"
        )
    check_kernel_device(fn, "x", x, INTERPRETED)
    return resolve_target(fn, target, x.device)


def _check_silu_and_mul_fp8_quant(
    fn: str, x: torch.Tensor, fp8_dtype: torch.dtype, ue8m0: bool, target: object
) -> KernelTarget:
    """:func:`silu_and_mul_fp8_quant`'s input checks (skipped inside :func:`dshal.ops.trusted`);
    returns the target."""
    check_fp8_dtype(fn, "fp8_dtype", fp8_dtype)
    check_flag(fn, "ue8m0", ue8m0)
    tgt = _check_gated(fn, x, target)
    tgt.check_fp8_dtype(fn, "fp8_dtype", fp8_dtype)
    return tgt


def _gated_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` as ``[rows, 2d]`` (a view when possible), rows and d."""
    two_d = x.shape[-1]
    x2 = x.reshape(-1, two_d)
    return x2, x2.shape[0], two_d // 2


def silu_and_mul(x: torch.Tensor, *, target: KernelTarget | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]``; returns ``[..., d]``.

    ``x`` is float16/bfloat16/float32/float64 with any strides; the math is float32 and the
    result is a new contiguous tensor of ``x``'s dtype, rounded to nearest even.
    ``target`` only sets the warps per program.

    Raises DTypeError (dtype), ShapeError (odd last dim), DeviceError (a CPU tensor
    without the interpreter). Inside :func:`dshal.ops.trusted` these input checks are
    skipped (as the op's own are): the caller vouches for the inputs; only ``target`` is
    resolved.
    """
    fn = "silu_and_mul"
    tgt = checked_target(fn, target, x.device, lambda: _check_gated(fn, x, target))
    x2, rows, d = _gated_rows(x)
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if y.numel():
        block_d = min(triton.next_power_of_2(d), 1024)
        rows_per = max(1, min(32, 4096 // block_d))
        grid = (triton.cdiv(rows, rows_per), triton.cdiv(d, block_d))
        launch(
            _silu_and_mul_kernel, grid,
            x2, y, rows, d, x2.stride(0), x2.stride(1), ROWS=rows_per, BLOCK_D=block_d, num_warps=tgt.elementwise_warps,
        )  # fmt: skip
    return y


def silu_and_mul_fp8_quant(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    ue8m0: bool = False,
    *,
    target: KernelTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_and_mul(x)`` quantized to FP8 in 1x128 blocks, in one pass; returns ``(q, scale)``.

    ``q [..., d]`` of ``fp8_dtype`` and ``scale [..., ceil(d/128)]`` float32, both new and
    contiguous, equal to ``fp8_quantize_blocks(silu_and_mul(x), (1, 128), fp8_dtype, ue8m0)``:
    the activation is rounded to ``x``'s dtype before it is quantized, as the unfused pair
    would. Scales follow ``fp8_quantize_blocks`` (amax / fp8 max, 1 for an all-zero block,
    powers of two when ``ue8m0``). ``target`` only sets the warps per program.

    Raises DTypeError (``x``'s dtype, ``fp8_dtype``), ArgumentError (``ue8m0`` not a bool),
    ShapeError (odd last dim),
    DeviceError (a CPU tensor without the interpreter), UnsupportedOpError (an
    ``fp8_dtype`` outside ``target.fp8_dtypes``). Inside :func:`dshal.ops.trusted` these
    input checks are skipped (as the op's own are): the caller vouches for the inputs; only
    ``target`` is resolved.
    """
    fn = "silu_and_mul_fp8_quant"
    tgt = checked_target(
        fn, target, x.device, lambda: _check_silu_and_mul_fp8_quant(fn, x, fp8_dtype, ue8m0, target)
    )
    fmt = FP8_FORMATS[fp8_dtype]
    x2, rows, d = _gated_rows(x)
    n_groups = triton.cdiv(d, QUANT_GROUP)
    q = torch.empty((*x.shape[:-1], d), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], n_groups), dtype=torch.float32, device=x.device)
    if q.numel():
        rows_per = 16
        grid = (triton.cdiv(rows, rows_per), n_groups)
        launch(
            _silu_and_mul_quant_kernel, grid,
            x2, q.view(torch.uint8), scale, rows, d, x2.stride(0), x2.stride(1), n_groups,
            ROWS=rows_per, GROUP=QUANT_GROUP, ROUND_DTYPE=_TL_DTYPES[x.dtype],
            **fmt.kernel_meta(),
            UE8M0=ue8m0,
            num_warps=tgt.elementwise_warps,
        )  # fmt: skip
    return q, scale


__all__ = ["silu_and_mul", "silu_and_mul_fp8_quant", "QUANT_GROUP"]
