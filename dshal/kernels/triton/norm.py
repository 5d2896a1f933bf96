"""RMSNorm, optionally fused with the residual add before it ("add & norm")."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dshal.errors import ShapeError
from dshal.kernels.triton._checks import check_kernel_device, checked_target, launch, module_interpreted, resolve_target
from dshal.kernels.triton._jit import cast_rne
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.spec import FLOAT_DTYPES, check_dim, check_real, check_same_device, check_tensor

INTERPRETED = module_interpreted()

#: Largest hidden size one program holds in registers (one row per program).
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr,
    H, stride_x, stride_res, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The sum is rounded to x's dtype: it is what the next layer receives, and the
        # norm is taken of that rounded value.
        x = cast_rne(x.to(ACC) + r.to(ACC), x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * H + cols, x, mask=mask)
    h = x.to(ACC)
    mean_sq = tl.sum(h * h, axis=0) / H
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + row * H + cols, cast_rne(h * rstd * w, y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as ``[rows, hidden]`` with unit stride along hidden (a view when possible)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 or hidden <= 1 else t2.contiguous()


def _check_rms_norm(
    fn: str, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, target: object
) -> KernelTarget:
    """:func:`rms_norm`'s input checks (skipped inside :func:`dshal.ops.trusted`); returns the target."""
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(fn, "weight", weight, dtypes=FLOAT_DTYPES, ndim=1)
    hidden = x.shape[-1]
    check_dim(fn, "weight", weight, 0, hidden, "the last dim of 'x'")
    check_real(fn, "eps", eps, positive=False)
    if residual is not None:
        check_tensor(fn, "residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ShapeError(
                f"{fn}: argument 'residual' has shape {list(residual.shape)}, "
                f"expected {list(x.shape)} (the shape of 'x')"
            )
    if hidden > MAX_HIDDEN:
        raise ShapeError(f"{fn}: argument 'x' has last dim {hidden}, expected at most {MAX_HIDDEN}")
    check_same_device(fn, "x", x, weight=weight, residual=residual)
    check_kernel_device(fn, "x", x, INTERPRETED)
    return resolve_target(fn, target, x.device)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    target: KernelTarget | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim: ``y = x / sqrt(mean(x^2) + eps) * weight``.

    ``x [..., H]`` (float16/bfloat16/float32/float64, any strides), ``weight [H]`` (any
    float dtype). With ``residual`` (``x``'s shape and dtype) returns the fused pair
    ``(norm(s), s)`` where ``s = x + residual`` rounded to ``x``'s dtype, in one pass.
    Statistics are float32 (float64 for float64 ``x``); outputs are new contiguous tensors
    of ``x``'s dtype. One program per row; H is at most 65536. ``target`` only sets the
    warps per program.

    Raises DTypeError (dtypes), ArgumentError (``eps`` negative or not finite), ShapeError (``weight``/``residual`` shapes, H too
    large), DeviceError (mixed devices, a CPU tensor without the interpreter). Inside
    :func:`dshal.ops.trusted` these input checks are skipped (as the op's own are): the
    caller vouches for the inputs; only ``target`` is resolved.
    """
    fn = "rms_norm"
    tgt = checked_target(fn, target, x.device, lambda: _check_rms_norm(fn, x, weight, eps, residual, target))
    hidden = x.shape[-1]

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(y) if residual is not None else None
    rows = x.numel() // hidden if hidden else 0
    if rows and hidden:
        x2 = _rows(x, hidden)
        r2 = _rows(residual, hidden) if residual is not None else x2
        w = weight if weight.stride(0) == 1 else weight.contiguous()
        launch(
            _rms_norm_kernel, (rows,),
            x2, r2, w, y, summed if summed is not None else y,
            hidden, x2.stride(0), r2.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=triton.next_power_of_2(hidden),
            ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
            num_warps=tgt.elementwise_warps,
        )  # fmt: skip
    elif summed is not None:
        summed.copy_(x + residual)
    return (y, summed) if summed is not None else y


__all__ = ["rms_norm", "MAX_HIDDEN"]
