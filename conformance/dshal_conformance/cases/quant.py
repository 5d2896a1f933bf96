"""Case tables: quantize_fp8, dequantize_fp8, quantize_int8.

Edge rows cover FP8 maximum values, all-zero blocks, FP8 subnormals, partial blocks
(K % 128 != 0, which the block layout allows), NaN/Inf (documented: NaN/Inf take no part
in the amax, NaN stays NaN, Inf saturates), M = 1 and M = 0, and non-contiguous inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.errors import DshalError, DTypeError
from dshal.ops.catalogue import SPECS
from dshal_conformance.cases.base import (
    BadInput,
    Case,
    Context,
    Inputs,
    fill_pattern,
    op_cases,
    replace_arg,
    standard_bad_inputs,
)
from dshal_conformance.judge import Check, close, fp8_codes, int_codes, scales
from dshal_conformance.tolerances import closeness

BF16, F32 = torch.bfloat16, torch.float32
ACT, WEIGHT, ROW = (1, 128), (128, 128), (1, -1)


def fp8_variant(ctx: Context, row: Mapping[str, Any]) -> str | None:
    """Why this row's FP8 format is outside what the backend declares (None when declared)."""
    fmt = ctx.fp8(row.get("fmt", "e4m3"))
    if fmt not in ctx.fp8_formats:
        return f"FP8 format {fmt!r} is not among the backend's declared formats {list(ctx.fp8_formats)}"
    return None


# ---------------------------------------------------------------- quantize_fp8
QUANTIZE_FP8 = [
    dict(name="bf16/act-1x128/T4xK256", dtype=BF16, shape=(4, 256), block=ACT),
    dict(name="f32/weight-128x128/N256xK384", dtype=F32, shape=(256, 384), block=WEIGHT),
    dict(name="bf16/rowwise/T8xK256", dtype=BF16, shape=(8, 256), block=ROW),
    dict(name="bf16/tensorwise/T8xK256", dtype=BF16, shape=(8, 256), block=None),
    dict(name="bf16/3d/B2xT3xK256", dtype=BF16, shape=(2, 3, 256), block=ACT),
    dict(name="f32/e4m3fn/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e4m3fn"),
    dict(name="f32/e4m3fnuz/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e4m3fnuz"),
    dict(name="f32/e5m2/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e5m2"),
    dict(name="f32/ue8m0/T4xK256", dtype=F32, shape=(4, 256), block=ACT, scale_fmt="ue8m0"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256), block=ACT),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256), block=ACT),
    dict(name="bf16/K200-partial-block", kind="edge", dtype=BF16, shape=(4, 200), block=ACT),
    dict(name="f32/weight-K200-partial-block", kind="edge", dtype=F32, shape=(136, 200), block=WEIGHT),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), block=ACT, noncontiguous=("x",)),
    dict(name="f32/fp8-max", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="fp8_max"),
    dict(name="f32/zero-block", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="zero_block"),
    dict(name="f32/fp8-subnormals", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="fp8_subnormal"),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="nan_inf"),
    dict(name="bf16/act/T4096xK7168", tier="full", dtype=BF16, shape=(4096, 7168), block=ACT),
    dict(name="bf16/weight/N2112xK7168", tier="full", dtype=BF16, shape=(2112, 7168), block=WEIGHT),
    dict(name="bf16/weight/N7168xK2048", tier="full", dtype=BF16, shape=(7168, 2048), block=WEIGHT),
]


def _pattern(ctx: Context, x: torch.Tensor, pattern: str | None) -> torch.Tensor:
    if pattern == "fp8_max":
        # Every block holds +-amax many times: those must land exactly on +-fmt_max.
        x = x.clone()
        x[..., ::16] = 3.0
        x[..., 8::16] = -3.0
        return x
    if pattern == "zero_block":
        x = x.clone()
        x[1] = 0  # a whole row of blocks
        x[2, 128:] = 0  # one block
        return x
    if pattern == "fp8_subnormal":
        # amax 1 per block, others down to 2^-16: x / scale spans E4M3's subnormals (< 2^-6).
        exponent = torch.rand(x.shape, generator=ctx.generator, dtype=torch.float64) * -16.0
        sign = torch.where(torch.rand(x.shape, generator=ctx.generator) < 0.5, -1.0, 1.0).to(torch.float64)
        y = sign * torch.exp2(exponent)
        y[..., ::128] = 1.0
        return y.to(x.dtype)
    return fill_pattern(x, pattern, ctx)


def build_quantize_fp8(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    x = _pattern(ctx, ctx.randn(*row["shape"], dtype=row["dtype"]), row.get("values"))
    kw = {"x": x, "block": row["block"], "fmt": row.get("fmt", "e4m3"), "scale_fmt": row.get("scale_fmt")}
    return Inputs(kw, {**kw, "fmt": ctx.fp8(kw["fmt"])})


def judge_quantize_fp8(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    from dshal_conformance.judge import failed

    if not (isinstance(out, tuple) and len(out) == 2):
        return [failed("out.type", f"expected (q, scale), got {type(out).__name__}")]
    q, scale = out
    return scales("scale", scale, ref[1]) + fp8_codes("q", q, ref[0])


# ---------------------------------------------------------------- dequantize_fp8
DEQUANTIZE_FP8 = [
    dict(name="bf16/act-1x128/T4xK256", dtype=BF16, shape=(4, 256), block=ACT),
    dict(name="f32/weight-128x128/N256xK384", dtype=F32, shape=(256, 384), block=WEIGHT),
    dict(name="bf16/rowwise/T8xK256", dtype=BF16, shape=(8, 256), block=ROW),
    dict(name="f32/tensorwise/T8xK256", dtype=F32, shape=(8, 256), block=None),
    dict(name="f32/e5m2/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e5m2"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256), block=ACT),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256), block=ACT),
    dict(name="f32/K200-partial-block", kind="edge", dtype=F32, shape=(136, 200), block=WEIGHT),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), block=ACT, noncontiguous=("q",)),
    dict(name="bf16/weight/N7168xK2048", tier="full", dtype=BF16, shape=(7168, 2048), block=WEIGHT),
]


def build_dequantize_fp8(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    x = ctx.randn(*row["shape"], dtype=torch.float32)
    q, scale = SPECS["quantize_fp8"].reference_impl(x, row["block"], ctx.fp8(row.get("fmt", "e4m3")), None)
    return Inputs({"q": q, "scale": scale, "block": row["block"], "out_dtype": row["dtype"]})


def judge_dequantize(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    return close("out", out, ref, closeness(row["dtype"]), row["dtype"])


# ---------------------------------------------------------------- quantize_int8
QUANTIZE_INT8 = [
    dict(name="bf16/T4xK256", dtype=BF16, shape=(4, 256)),
    dict(name="f32/B2xT3xK200", dtype=F32, shape=(2, 3, 200)),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256)),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256)),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), noncontiguous=("x",)),
    dict(name="f32/zero_rows", kind="edge", dtype=F32, shape=(4, 256), values="zero_rows"),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), values="nan_inf"),
    dict(name="bf16/T4096xK7168", tier="full", dtype=BF16, shape=(4096, 7168)),
]


def build_quantize_int8(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    return Inputs({"x": fill_pattern(ctx.randn(*row["shape"], dtype=row["dtype"]), row.get("values"), ctx)})


def judge_quantize_int8(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    from dshal_conformance.judge import failed

    if not (isinstance(out, tuple) and len(out) == 2):
        return [failed("out.type", f"expected (q, scale), got {type(out).__name__}")]
    return scales("scale", out[1], ref[1]) + int_codes("q", out[0], ref[0])


def cases() -> list[Case]:
    return [
        *op_cases(
            "quantize_fp8", QUANTIZE_FP8, build_quantize_fp8, judge_quantize_fp8,
            standard_bad_inputs(
                dtype=("x", torch.int32),
                shape=("x", lambda t: t[0, 0], "0-dim 'x'"),
                device="x",
                extra=[
                    BadInput("format", replace_arg("fmt", lambda f: "e4m3xx"), DTypeError, "unknown fmt 'e4m3xx'"),
                    BadInput("block", replace_arg("block", lambda b: (0, 128)), DshalError, "block (0, 128)"),
                ],
            ),
            variant_supported=fp8_variant,
        ),
        *op_cases(
            "dequantize_fp8", DEQUANTIZE_FP8, build_dequantize_fp8, judge_dequantize,
            standard_bad_inputs(dtype=("q", torch.float32), shape=("scale", lambda t: t[:, :1], "'scale' for a different block"), device="scale"),
            variant_supported=fp8_variant,
        ),
        *op_cases(
            "quantize_int8", QUANTIZE_INT8, build_quantize_int8, judge_quantize_int8,
            standard_bad_inputs(dtype=("x", torch.int8), shape=("x", lambda t: t[0, 0], "0-dim 'x'"), device="x"),
        ),
    ]


__all__ = ["cases", "fp8_variant"]
