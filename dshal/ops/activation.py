"""Activation ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dshal.errors import ShapeError
from dshal.ops.spec import FLOAT_DTYPES, Cost, check_tensor, op_spec


@op_spec
def silu_and_mul(x):
    """SwiGLU's gating: ``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` -> ``[..., d]``
    in ``x``'s dtype, computed in float32 (float64 for float64 inputs)."""
    check_tensor("silu_and_mul", "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] % 2:
        raise ShapeError(f"silu_and_mul: argument 'x' has last dim {x.shape[-1]} (shape {list(x.shape)}), expected an even size 2*d")


@silu_and_mul.reference
def _silu_and_mul_reference(x):
    d = x.shape[-1] // 2
    acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    gate, up = x[..., :d].to(acc), x[..., d:].to(acc)
    return (F.silu(gate) * up).to(x.dtype)


@silu_and_mul.cost
def _silu_and_mul_cost(x):
    n = x.numel()
    # silu ~ 4 flops (exp, add, divide, multiply) + 1 multiply per output element.
    return Cost(flops=5 * (n // 2), bytes=n * x.element_size() * 3 // 2)
