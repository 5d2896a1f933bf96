"""Conformance of fp8_gemm, int8_gemm, linear: the judging (rows and inputs are the ops' own
examples, in :mod:`dshal.ops.gemm`).

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
from dshal.ops.examples import Example
from dshal_conformance.cases.base import (
    BadInput,
    Case,
    Context,
    op_cases,
    rejection_case,
    replace_arg,
    standard_bad_inputs,
)
from dshal_conformance.cases.quant import fp8_variant
from dshal_conformance.judge import Check, close, fp8_result
from dshal_conformance.tolerances import FLOAT32_MATMUL, closeness

BF16 = torch.bfloat16
FP8_SUFFIXES = ("/vs-dequant", "/vs-prequant")


def judge_fp8_gemm(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> dict[str, list[Check]]:
    pre = inputs.extras["a_f"].to(torch.float64) @ inputs.extras["b_f"].to(torch.float64).T
    coarse = inputs.kwargs["a"].dtype == torch.float8_e5m2  # one significant bit fewer than E4M3
    return {
        "/vs-dequant": fp8_result("out", out, ref, "dequant", row["dtype"]),
        "/vs-prequant": fp8_result("out", out, pre, "prequant_e5m2" if coarse else "prequant", row["dtype"]),
    }


def build_floor_scale(ctx: Context, row: Mapping[str, Any]) -> Example:
    """K = 200 with a_scale/b_scale sized floor(K/128) = 1 instead of ceil(K/128) = 2."""
    inputs = SPECS["fp8_gemm"].example_inputs(ctx.draw, row)
    kw = dict(inputs.kwargs)
    kw["a_scale"], kw["b_scale"] = kw["a_scale"][:, :1].contiguous(), kw["b_scale"][:, :1].contiguous()
    return Example(kw)


def judge_int8_gemm(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    # The integer products are exact; only the scaling and the output rounding differ.
    return close("out", out, ref, closeness(row["dtype"]).scaled_atol(row["k"]), row["dtype"])


def linear_variant(ctx: Context, row: Mapping[str, Any]) -> str | None:
    weight = row.get("weight", "float")
    if weight == "int8" and "int8_gemm" not in ctx.provided:
        return "int8 (W8A8) weights: the backend does not declare int8_gemm"
    if weight.startswith("fp8"):
        return fp8_variant(ctx, row)
    return None


def judge_linear(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    dtype = row["dtype"]
    if row.get("weight", "float") == "float":
        tol = FLOAT32_MATMUL if dtype == torch.float32 else closeness(dtype)  # float32: tight enough to tell TF32
        return close("out", out, ref, tol.scaled_atol(row["k"]), dtype)
    return fp8_result("out", out, ref, "dequant", dtype)


def _other_fp8_family(t: torch.Tensor) -> torch.Tensor:
    other = torch.float8_e4m3fn if t.dtype == torch.float8_e4m3fnuz else torch.float8_e4m3fnuz
    return t.float().to(other)


def cases() -> list[Case]:
    floor_scale = dict(dtype=BF16, m=16, n=128, k=200, granularity="block")
    return [
        *op_cases(
            "fp8_gemm", judge_fp8_gemm,
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
            "int8_gemm", judge_int8_gemm,
            standard_bad_inputs(dtype=("a", torch.float32), shape=("a_scale", lambda t: t[:, 0], "'a_scale' of shape [M]"), device="b"),
        ),
        *op_cases(
            "linear", judge_linear,
            standard_bad_inputs(dtype=("x", torch.int32), shape=("weight", lambda t: t[:, :-1], "'weight' with a different K"), device="bias"),
            variant_supported=linear_variant,
            bad_base="bf16/bias/M4xN128xK256",
        ),
    ]
