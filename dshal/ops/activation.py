"""Activation ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dshal.errors import ShapeError
from dshal.ops.examples import Draw, Example, fill_pattern
from dshal.ops.spec import FLOAT_DTYPES, Cost, Output, check_tensor, op_spec


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


@silu_and_mul.outputs
def _silu_and_mul_outputs(x):
    return (Output((*x.shape[:-1], x.shape[-1] // 2), x.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
#: ``shape`` is x's ([..., 2 x intermediate]). Full-tier and bench widths are DeepSeek-V3's:
#: MoE intermediate 2048, dense intermediate 18432.
SILU_AND_MUL_ROWS = [
    dict(name="bf16/T4x2x256", dtype=BF16, shape=(4, 512)),
    dict(name="f32/T3x2x128", dtype=F32, shape=(3, 256)),
    dict(name="f16/2x3x2x64", dtype=F16, shape=(2, 3, 128)),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256)),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256)),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), values="nan_inf"),
    dict(name="f32/subnormal", kind="edge", dtype=F32, shape=(2, 256), values="subnormal"),
    # |x| ~ 1e3: silu(gate) * up ~ 1e6, finite in bf16 and float32 (the contract computes in
    # float32), past float16's 65504 (a bf16 path computed in float16 overflows to inf).
    dict(name="bf16/large-values", kind="edge", dtype=BF16, shape=(4, 256), values="large"),
    dict(name="bf16/moe/T4096x2x2048", tier="full", dtype=BF16, shape=(4096, 4096)),
    dict(name="bf16/dense/T1024x2x18432", tier="full", dtype=BF16, shape=(1024, 36864)),
    # bench
    dict(name="bench/bf16/T64x2x1024", kind="bench", dtype=BF16, shape=(64, 2048)),
    dict(name="bench/bf16/dense/T4096x2x18432", kind="bench", tier="full", dtype=BF16, shape=(4096, 36864)),
]


@silu_and_mul.examples(SILU_AND_MUL_ROWS)
def _silu_and_mul_example(draw: Draw, p) -> Example:
    x = fill_pattern(draw.randn(*p["shape"], dtype=p.get("dtype", BF16), scale=2.0), p.get("values"))
    return Example({"x": x})
