"""Normalization ops."""

from __future__ import annotations

import torch

from dshal.ops.spec import FLOAT_DTYPES, Cost, check_dim, check_same_device, check_tensor, op_spec
from dshal.errors import ArgumentError, ShapeError


@op_spec
def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm over the last dim: ``y = x / sqrt(mean(x^2) + eps) * weight``.

    ``x [..., H]`` float, ``weight [H]``. With ``residual`` (same shape and dtype as ``x``)
    it returns the fused pair ``(norm(x + residual), x + residual)``, as a transformer
    block's "add & norm" does. Statistics are computed in float32 (float64 for float64
    inputs); the output has ``x``'s dtype.
    """
    check_tensor("rms_norm", "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("rms_norm", "weight", weight, dtypes=FLOAT_DTYPES, ndim=1)
    check_dim("rms_norm", "weight", weight, 0, x.shape[-1], "the last dim of 'x'")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ArgumentError(f"rms_norm: argument 'eps' is {eps!r}, expected a non-negative float")
    if residual is not None:
        check_tensor("rms_norm", "residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape:
            raise ShapeError(
                f"rms_norm: argument 'residual' has shape {list(residual.shape)}, expected {list(x.shape)} (the shape of 'x')"
            )
    check_same_device("rms_norm", "x", x, weight=weight, residual=residual)


@rms_norm.reference
def _rms_norm_reference(x, weight, eps=1e-6, residual=None):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if residual is not None:
        # The sum is rounded to x's dtype first: it is what the next layer receives.
        x = (x.to(acc) + residual.to(acc)).to(x.dtype)
    h = x.to(acc)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    y = y.to(x.dtype)
    return (y, x) if residual is not None else y


@rms_norm.cost
def _rms_norm_cost(x, weight, eps=1e-6, residual=None):
    n = x.numel()
    # square, sum, scale, weight: ~4 flops/element (+1 for the residual add).
    flops = 4 * n + (n if residual is not None else 0)
    moved = x.numel() * x.element_size() * (2 if residual is None else 4) + weight.numel() * weight.element_size()
    return Cost(flops=flops, bytes=moved)
