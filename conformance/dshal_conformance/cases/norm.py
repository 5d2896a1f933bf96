"""Conformance of rms_norm: the judging (rows and inputs are the op's own examples, in
:mod:`dshal.ops.norm`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.ops.examples import Example
from dshal_conformance.cases.base import Case, Context, op_cases, standard_bad_inputs
from dshal_conformance.judge import Check, close, failed
from dshal_conformance.tolerances import closeness


def judge_same_dtype(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    """Output(s) in the input dtype, elementwise-close to the oracle by that dtype's row."""
    dtype = row["dtype"]
    tol = closeness(dtype)
    if isinstance(ref, tuple):
        if not isinstance(out, tuple) or len(out) != len(ref):
            return [failed("out.type", f"expected a tuple of {len(ref)} tensors, got {type(out).__name__}")]
        names = row.get("outputs", [f"out{i}" for i in range(len(ref))])
        return [c for name, o, r in zip(names, out, ref) for c in close(name, o, r, tol, dtype)]
    return close("out", out, ref, tol, dtype)


def cases() -> list[Case]:
    return op_cases(
        "rms_norm", judge_same_dtype,
        standard_bad_inputs(dtype=("x", torch.int32), shape=("weight", lambda t: t[:-1], "'weight' one shorter than H"), device="weight"),
    )
