"""Case tables: rms_norm, silu_and_mul, rotary_embedding (element- and row-wise ops).

Full-tier rows use DeepSeek-V3's real widths: hidden 7168, q_lora 1536, kv_lora 512,
rope head dim 64, MoE intermediate 2048 (SwiGLU input 2 x 2048), dense intermediate 18432.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal_conformance.cases.base import Case, Context, Inputs, fill_pattern, op_cases, standard_bad_inputs
from dshal_conformance.judge import Check, close
from dshal_conformance.tolerances import closeness

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16


def judge_same_dtype(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    """Output(s) in the input dtype, elementwise-close to the oracle by that dtype's row."""
    dtype = row["dtype"]
    tol = closeness(dtype)
    if isinstance(ref, tuple):
        if not isinstance(out, tuple) or len(out) != len(ref):
            from dshal_conformance.judge import failed

            return [failed("out.type", f"expected a tuple of {len(ref)} tensors, got {type(out).__name__}")]
        names = row.get("outputs", [f"out{i}" for i in range(len(ref))])
        return [c for name, o, r in zip(names, out, ref) for c in close(name, o, r, tol, dtype)]
    return close("out", out, ref, tol, dtype)


# ---------------------------------------------------------------- rms_norm
RMS_NORM = [
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
]


def build_rms_norm(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    shape, dtype = row["shape"], row["dtype"]
    x = fill_pattern(ctx.randn(*shape, dtype=dtype), row.get("values"), ctx)
    weight = (1.0 + 0.1 * ctx.randn(shape[-1])).to(dtype)
    kw: dict[str, Any] = {"x": x, "weight": weight, "eps": row.get("eps", 1e-6)}
    if row.get("residual"):
        kw["residual"] = ctx.randn(*shape, dtype=dtype)
    return Inputs(kw)


# ---------------------------------------------------------------- silu_and_mul
SILU_AND_MUL = [
    dict(name="bf16/T4x2x256", dtype=BF16, shape=(4, 512)),
    dict(name="f32/T3x2x128", dtype=F32, shape=(3, 256)),
    dict(name="f16/2x3x2x64", dtype=F16, shape=(2, 3, 128)),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256)),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256)),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), values="nan_inf"),
    dict(name="f32/subnormal", kind="edge", dtype=F32, shape=(2, 256), values="subnormal"),
    dict(name="bf16/moe/T4096x2x2048", tier="full", dtype=BF16, shape=(4096, 4096)),
    dict(name="bf16/dense/T1024x2x18432", tier="full", dtype=BF16, shape=(1024, 36864)),
]


def build_silu_and_mul(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    x = fill_pattern(ctx.randn(*row["shape"], dtype=row["dtype"], scale=2.0), row.get("values"), ctx)
    return Inputs({"x": x})


# ---------------------------------------------------------------- rotary_embedding
ROTARY = [
    dict(name="bf16/interleaved/B1xH4xT16xD64", dtype=BF16, shape=(1, 4, 16, 64), interleaved=True),
    dict(name="bf16/halves/B1xH4xT16xD64", dtype=BF16, shape=(1, 4, 16, 64), interleaved=False),
    dict(name="f32/interleaved/B2xH2xT8xD32", dtype=F32, shape=(2, 2, 8, 32), interleaved=True),
    dict(name="f32/halves/T8xD64", dtype=F32, shape=(8, 64), interleaved=False),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 4, 1, 64), interleaved=True),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(1, 4, 0, 64), interleaved=True),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(1, 4, 16, 64), interleaved=True, noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(1, 2, 8, 64), interleaved=True, values="nan_inf"),
    dict(name="bf16/v3-rope/B1xH128xT4096xD64", tier="full", dtype=BF16, shape=(1, 128, 4096, 64), interleaved=True),
]


def build_rotary(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    shape, dtype = row["shape"], row["dtype"]
    x = fill_pattern(ctx.randn(*shape, dtype=dtype), row.get("values"), ctx)
    t, d = shape[-2], shape[-1]
    angles = ctx.randn(t, d // 2, scale=3.0)
    return Inputs({"x": x, "cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype), "interleaved": row["interleaved"]})


def cases() -> list[Case]:
    return [
        *op_cases(
            "rms_norm", RMS_NORM, build_rms_norm, judge_same_dtype,
            standard_bad_inputs(dtype=("x", torch.int32), shape=("weight", lambda t: t[:-1], "'weight' one shorter than H"), device="weight"),
        ),
        *op_cases(
            "silu_and_mul", SILU_AND_MUL, build_silu_and_mul, judge_same_dtype,
            standard_bad_inputs(dtype=("x", torch.int64), shape=("x", lambda t: t[..., :-1], "odd last dim"), device="x"),
        ),
        *op_cases(
            "rotary_embedding", ROTARY, build_rotary, judge_same_dtype,
            standard_bad_inputs(dtype=("x", torch.int32), shape=("cos", lambda t: t[:, :-1], "'cos' with one angle too few"), device="sin"),
        ),
    ]
