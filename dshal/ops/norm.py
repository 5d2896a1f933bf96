"""Normalization ops."""

from __future__ import annotations

import torch

from dshal.errors import ShapeError
from dshal.ops.examples import Draw, Example, fill_pattern
from dshal.ops.spec import FLOAT_DTYPES, Cost, Output, check_dim, check_real, check_same_device, check_tensor, op_spec


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
    check_real("rms_norm", "eps", eps, positive=False)
    if residual is not None:
        check_tensor("rms_norm", "residual", residual, dtypes=(x.dtype,), dtype_of="x")
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


@rms_norm.outputs
def _rms_norm_outputs(x, weight, eps=1e-6, residual=None):
    y = Output(x.shape, x.dtype)
    return (y,) if residual is None else (y, y)  # the norm, and x + residual


# ---------------------------------------------------------------- examples
BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
#: ``shape`` is x's; ``residual`` adds the fused sum; ``values`` an edge pattern; ``eps`` the op's.
#: Full-tier and bench widths are DeepSeek-V3's: hidden 7168, q_lora 1536, kv_lora 512.
RMS_NORM_ROWS = [
    dict(name="bf16/T4xH256", dtype=BF16, shape=(4, 256)),
    dict(name="f32/T3xH512", dtype=F32, shape=(3, 512)),
    dict(name="f16/T2x3xH128", dtype=F16, shape=(2, 3, 128)),
    dict(name="bf16/residual/T4xH256", dtype=BF16, shape=(4, 256), residual=True, outputs=["y", "sum"]),
    dict(name="f32/residual/T2xH384", dtype=F32, shape=(2, 384), residual=True, outputs=["y", "sum"]),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256)),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256)),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), noncontiguous=("x",)),
    # Tiny activations: mean(x^2) ~ 1e-6 ~ eps, so eps visibly matters.
    dict(name="f32/small-eps-matters", kind="edge", dtype=F32, shape=(4, 256), values="small"),
    dict(name="f32/eps1e-5", kind="edge", dtype=F32, shape=(4, 256), values="small", eps=1e-5),
    dict(name="f32/subnormal", kind="edge", dtype=F32, shape=(2, 256), values="subnormal"),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), values="nan_inf"),
    dict(name="f32/zero_rows", kind="edge", dtype=F32, shape=(4, 256), values="zero_rows"),
    dict(name="bf16/T4096xH7168", tier="full", dtype=BF16, shape=(4096, 7168)),
    dict(name="bf16/residual/T4096xH7168", tier="full", dtype=BF16, shape=(4096, 7168), residual=True, outputs=["y", "sum"]),
    dict(name="bf16/q_lora/T4096x1536", tier="full", dtype=BF16, shape=(4096, 1536)),
    dict(name="bf16/kv_lora/T4096x512", tier="full", dtype=BF16, shape=(4096, 512)),
    # bench
    dict(name="bench/bf16/T64xH1024", kind="bench", dtype=BF16, shape=(64, 1024)),
    dict(name="bench/f32/residual/T64xH1024", kind="bench", dtype=F32, shape=(64, 1024), residual=True),
    dict(name="bench/bf16/residual/T4096xH7168", kind="bench", tier="full", dtype=BF16, shape=(4096, 7168), residual=True),
    dict(name="bench/bf16/kv_lora/T4096xH512", kind="bench", tier="full", dtype=BF16, shape=(4096, 512)),
]


@rms_norm.examples(RMS_NORM_ROWS)
def _rms_norm_example(draw: Draw, p) -> Example:
    shape, dtype = p["shape"], p.get("dtype", BF16)
    x = fill_pattern(draw.randn(*shape, dtype=dtype), p.get("values"))
    weight = (1.0 + 0.1 * draw.randn(shape[-1])).to(dtype)
    kw = {"x": x, "weight": weight, "eps": p.get("eps", 1e-6)}
    if p.get("residual"):
        kw["residual"] = draw.randn(*shape, dtype=dtype)
    return Example(kw)
