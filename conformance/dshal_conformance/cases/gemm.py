"""Case tables: fp8_gemm, int8_gemm, linear.

FP8 GEMM results are judged twice, reported as two results of one case: ``/vs-dequant``
against the float64 GEMM of the dequantized inputs (what the kernel was given) and
``/vs-prequant`` against the float64 GEMM of the inputs before quantization (what the
model meant). The full tier runs DeepGEMM's benchmark shapes (N x K) for M in
{1, 64, 128, 4096}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.errors import DTypeError, ShapeError
from dshal.ops.catalogue import SPECS
from dshal_conformance.cases.base import (
    BadInput,
    Case,
    Context,
    Inputs,
    fill_pattern,
    op_cases,
    rejection_case,
    replace_arg,
    standard_bad_inputs,
)
from dshal_conformance.cases.quant import fp8_variant
from dshal_conformance.judge import Check, close, fp8_result
from dshal_conformance.tolerances import closeness

BF16, F32 = torch.bfloat16, torch.float32
#: scale granularity -> (a's block, b's block)
GRANULARITY = {"block": ((1, 128), (128, 128)), "row": ((1, -1), (1, -1)), "tensor": (None, None)}
#: DeepGEMM's GEMM benchmark shapes (N, K) and Ms.
DEEPGEMM_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPGEMM_M = [1, 64, 128, 4096]
FP8_SUFFIXES = ("/vs-dequant", "/vs-prequant")


# ---------------------------------------------------------------- fp8_gemm
FP8_GEMM = [
    dict(name="block/bf16/M128xN256xK256", dtype=BF16, m=128, n=256, k=256, granularity="block"),
    dict(name="block/f32/M64xN128xK256", dtype=F32, m=64, n=128, k=256, granularity="block"),
    dict(name="rowwise/bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256, granularity="row"),
    dict(name="tensorwise/bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256, granularity="tensor"),
    dict(name="block/M1", kind="edge", dtype=BF16, m=1, n=256, k=256, granularity="block"),
    dict(name="block/M0", kind="edge", dtype=BF16, m=0, n=128, k=256, granularity="block"),
    dict(name="block/K200-partial-block", kind="edge", dtype=BF16, m=16, n=128, k=200, granularity="block"),
    dict(name="block/N200-partial-block", kind="edge", dtype=BF16, m=16, n=200, k=256, granularity="block"),
    dict(name="block/noncontiguous", kind="edge", dtype=BF16, m=32, n=128, k=256, granularity="block", noncontiguous=("a",)),
    dict(name="block/zero-rows", kind="edge", dtype=BF16, m=32, n=128, k=256, granularity="block", values="zero_rows"),
] + [
    dict(name=f"block/deepgemm/M{m}xN{n}xK{k}", tier="full", dtype=BF16, m=m, n=n, k=k, granularity="block")
    for n, k in DEEPGEMM_NK
    for m in DEEPGEMM_M
]


def build_fp8_gemm(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    m, n, k = row["m"], row["n"], row["k"]
    fmt = ctx.fp8(row.get("fmt", "e4m3"))
    a_f = fill_pattern(ctx.randn(m, k), row.get("values"), ctx)
    b_f = ctx.randn(n, k)
    a_block, b_block = GRANULARITY[row["granularity"]]
    a, a_scale = SPECS["quantize_fp8"].reference_impl(a_f, a_block, fmt, None)
    b, b_scale = SPECS["quantize_fp8"].reference_impl(b_f, b_block, fmt, None)
    kw = {"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale, "out_dtype": row["dtype"]}
    return Inputs(kw, extras={"a_f": a_f, "b_f": b_f})


def judge_fp8_gemm(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> dict[str, list[Check]]:
    pre = inputs.extras["a_f"].to(torch.float64) @ inputs.extras["b_f"].to(torch.float64).T
    return {
        "/vs-dequant": fp8_result("out", out, ref, "dequant", row["dtype"]),
        "/vs-prequant": fp8_result("out", out, pre, "prequant", row["dtype"]),
    }


def build_floor_scale(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    """K = 200 with a_scale/b_scale sized floor(K/128) = 1 instead of ceil(K/128) = 2."""
    inputs = build_fp8_gemm(ctx, row)
    kw = dict(inputs.kwargs)
    kw["a_scale"], kw["b_scale"] = kw["a_scale"][:, :1].contiguous(), kw["b_scale"][:, :1].contiguous()
    return Inputs(kw)


# ---------------------------------------------------------------- int8_gemm
INT8_GEMM = [
    dict(name="bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256),
    dict(name="f32/M16xN128xK200", dtype=F32, m=16, n=128, k=200),
    dict(name="M1", kind="edge", dtype=BF16, m=1, n=64, k=256),
    dict(name="M0", kind="edge", dtype=BF16, m=0, n=64, k=256),
    dict(name="noncontiguous", kind="edge", dtype=BF16, m=16, n=64, k=256, noncontiguous=("a",)),
    dict(name="bf16/M4096xN7168xK2048", tier="full", dtype=BF16, m=4096, n=7168, k=2048),
    dict(name="bf16/M128xN2112xK7168", tier="full", dtype=BF16, m=128, n=2112, k=7168),
]


def build_int8_gemm(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    a, a_scale = SPECS["quantize_int8"].reference_impl(ctx.randn(row["m"], row["k"]))
    b, b_scale = SPECS["quantize_int8"].reference_impl(ctx.randn(row["n"], row["k"]))
    return Inputs({"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale, "out_dtype": row["dtype"]})


def judge_int8_gemm(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    # The integer products are exact; only the scaling and the output rounding differ.
    return close("out", out, ref, closeness(row["dtype"]).scaled_atol(row["k"]), row["dtype"])


# ---------------------------------------------------------------- linear
LINEAR = [
    dict(name="bf16/M4xN256xK256", dtype=BF16, m=4, n=256, k=256),
    dict(name="bf16/bias/M4xN128xK256", dtype=BF16, m=4, n=128, k=256, bias=True),
    dict(name="f32/3d/B2xT3xN64xK128", dtype=F32, lead=(2, 3), n=64, k=128, bias=True),
    dict(name="f16/M8xN64xK128", dtype=torch.float16, m=8, n=64, k=128),
    dict(name="fp8-block/bf16/M16xN256xK256", dtype=BF16, m=16, n=256, k=256, weight="fp8-block"),
    dict(name="fp8-block/bias/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-block", bias=True),
    dict(name="fp8-row/bf16/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-row"),
    dict(name="int8/bf16/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="int8"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, m=1, n=128, k=256),
    dict(name="bf16/M0", kind="edge", dtype=BF16, m=0, n=128, k=256),
    dict(name="fp8-block/M1", kind="edge", dtype=BF16, m=1, n=128, k=256, weight="fp8-block"),
    dict(name="fp8-block/K200-partial-block", kind="edge", dtype=BF16, m=8, n=128, k=200, weight="fp8-block"),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, m=8, n=128, k=256, noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, m=4, n=64, k=128, values="nan_inf"),
    # One row (a decode step's projections), K not a multiple of any vector width.
    dict(name="f32/decode/M1xN256xK200", dtype=F32, m=1, n=256, k=200),
    dict(name="f32/decode/bias/B1xT1xN96xK256", dtype=F32, lead=(1, 1), n=96, k=256, bias=True),
    dict(name="f32/decode/nan_inf", kind="edge", dtype=F32, m=1, n=64, k=128, values="nan_inf"),
    dict(name="fp8-block/f32/decode/M1xN200xK200-partial-blocks", dtype=F32, m=1, n=200, k=200, weight="fp8-block", bias=True),
    dict(name="bf16/q_a_proj/M4096xN1536xK7168", tier="full", dtype=BF16, m=4096, n=1536, k=7168),
    dict(name="fp8-block/q_b_proj/M4096xN24576xK1536", tier="full", dtype=BF16, m=4096, n=24576, k=1536, weight="fp8-block"),
    dict(name="fp8-block/o_proj/M4096xN7168xK16384", tier="full", dtype=BF16, m=4096, n=7168, k=16384, weight="fp8-block"),
]


def linear_variant(ctx: Context, row: Mapping[str, Any]) -> str | None:
    weight = row.get("weight", "float")
    if weight == "int8" and "int8_gemm" not in ctx.provided:
        return "int8 (W8A8) weights: the backend does not declare int8_gemm"
    if weight.startswith("fp8"):
        return fp8_variant(ctx, row)
    return None


def build_linear(ctx: Context, row: Mapping[str, Any]) -> Inputs:
    lead = tuple(row.get("lead", (row.get("m", 1),)))
    n, k, dtype = row["n"], row["k"], row["dtype"]
    x = fill_pattern(ctx.randn(*lead, k, dtype=dtype), row.get("values"), ctx)
    w_f = ctx.randn(n, k, scale=k**-0.5)
    kind = row.get("weight", "float")
    kw: dict[str, Any] = {"x": x}
    if kind == "float":
        kw["weight"], kw["weight_scale"] = w_f.to(dtype), None
    elif kind == "int8":
        kw["weight"], kw["weight_scale"] = SPECS["quantize_int8"].reference_impl(w_f)
    else:
        block = (128, 128) if kind == "fp8-block" else (1, -1)
        kw["weight"], kw["weight_scale"] = SPECS["quantize_fp8"].reference_impl(w_f, block, ctx.fp8("e4m3"), None)
    kw["bias"] = ctx.randn(n, dtype=dtype) if row.get("bias") else None
    return Inputs(kw, extras={"w_f": w_f})


def judge_linear(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Inputs) -> list[Check]:
    dtype = row["dtype"]
    if row.get("weight", "float") == "float":
        return close("out", out, ref, closeness(dtype).scaled_atol(row["k"]), dtype)
    return fp8_result("out", out, ref, "dequant", dtype)


def _other_fp8_family(t: torch.Tensor) -> torch.Tensor:
    other = torch.float8_e4m3fn if t.dtype == torch.float8_e4m3fnuz else torch.float8_e4m3fnuz
    return t.float().to(other)


def cases() -> list[Case]:
    floor_scale = dict(dtype=BF16, m=16, n=128, k=200, granularity="block")
    return [
        *op_cases(
            "fp8_gemm", FP8_GEMM, build_fp8_gemm, judge_fp8_gemm,
            standard_bad_inputs(
                dtype=("a", torch.bfloat16),
                shape=("b", lambda t: t[:, :-16], "'b' with a different K"),
                device="b_scale",
                extra=[BadInput("mixed-families", replace_arg("b", _other_fp8_family), DTypeError, "'a' and 'b' of different FP8 families")],
            ),
            suffixes=FP8_SUFFIXES,
            variant_supported=fp8_variant,
        ),
        rejection_case(
            "fp8_gemm", "block/K200-floor-scale-rejected", floor_scale, build_floor_scale, ShapeError,
            "K = 200 with scales sized floor(K/128) instead of ceil(K/128)",
        ),
        *op_cases(
            "int8_gemm", INT8_GEMM, build_int8_gemm, judge_int8_gemm,
            standard_bad_inputs(dtype=("a", torch.float32), shape=("a_scale", lambda t: t[:, 0], "'a_scale' of shape [M]"), device="b"),
        ),
        *op_cases(
            "linear", LINEAR, build_linear, judge_linear,
            standard_bad_inputs(dtype=("x", torch.int32), shape=("weight", lambda t: t[:, :-1], "'weight' with a different K"), device="bias"),
            variant_supported=linear_variant,
            bad_base=LINEAR[1],
        ),
    ]
