"""Conformance of quantize_fp8, dequantize_fp8, quantize_int8: the judging (rows and inputs
are the ops' own examples, in :mod:`dshal.ops.quant`).

Edge rows cover FP8 maximum values, all-zero blocks, FP8 subnormals, partial blocks
(K % 128 != 0, which the block layout allows), NaN/Inf (documented: NaN/Inf take no part
in the amax, NaN stays NaN, Inf saturates), M = 1 and M = 0, and non-contiguous inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.errors import DshalError, DTypeError
from dshal.ops.examples import Example
from dshal.ops.quant import dequantize_to
from dshal.ops.spec import FP8_FORMAT_OF, FP8_MAX
from dshal_conformance.cases.base import BadInput, Case, Context, op_cases, replace_arg, standard_bad_inputs
from dshal_conformance.judge import Check, close, failed, fp8_codes, int_codes, near_rounding_boundary, scales
from dshal_conformance.tolerances import closeness


def fp8_variant(ctx: Context, row: Mapping[str, Any]) -> str | None:
    """Why this row's FP8 format is outside what the backend declares (None when declared)."""
    fmt = ctx.draw.fp8(row.get("fmt", "e4m3"))
    if fmt not in ctx.fp8_formats:
        return f"FP8 format {fmt!r} is not among the backend's declared formats {list(ctx.fp8_formats)}"
    return None


def judge_quantize_fp8(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    if not (isinstance(out, tuple) and len(out) == 2):
        return [failed("out.type", f"expected (q, scale), got {type(out).__name__}")]
    q, scale = out
    ref_q, ref_scale = ref
    block = inputs.kwargs.get("block", (1, 128))
    per_element = dequantize_to(torch.ones(ref_q.shape, dtype=ref_q.dtype), ref_scale, block, torch.float64)
    quotient = inputs.kwargs["x"].detach().cpu().double() / per_element
    qmax = FP8_MAX[FP8_FORMAT_OF[ref_q.dtype]]
    boundary = near_rounding_boundary(quotient, lambda v: v.clamp(-qmax, qmax).to(ref_q.dtype).view(torch.uint8))
    return scales("scale", scale, ref_scale) + fp8_codes("q", q, ref_q, boundary)


def judge_dequantize(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    return close("out", out, ref, closeness(row["dtype"]), row["dtype"])


def judge_quantize_int8(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    if not (isinstance(out, tuple) and len(out) == 2):
        return [failed("out.type", f"expected (q, scale), got {type(out).__name__}")]
    quotient = inputs.kwargs["x"].detach().cpu().double() / ref[1].double()
    boundary = near_rounding_boundary(quotient, lambda v: torch.round(v).clamp(-127, 127))
    return scales("scale", out[1], ref[1]) + int_codes("q", out[0], ref[0], boundary=boundary)


def cases() -> list[Case]:
    return [
        *op_cases(
            "quantize_fp8", judge_quantize_fp8,
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
            "dequantize_fp8", judge_dequantize,
            standard_bad_inputs(dtype=("q", torch.float32), shape=("scale", lambda t: t[:, :1], "'scale' for a different block"), device="scale"),
            variant_supported=fp8_variant,
        ),
        *op_cases(
            "quantize_int8", judge_quantize_int8,
            standard_bad_inputs(dtype=("x", torch.int8), shape=("x", lambda t: t[0, 0], "0-dim 'x'"), device="x"),
        ),
    ]


__all__ = ["cases", "fp8_variant"]
