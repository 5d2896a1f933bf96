"""Conformance of silu_and_mul: the judging (rows and inputs are the op's own examples, in
:mod:`dshal.ops.activation`)."""

from __future__ import annotations

import torch

from dshal_conformance.cases.base import Case, op_cases, standard_bad_inputs
from dshal_conformance.cases.norm import judge_same_dtype


def cases() -> list[Case]:
    return op_cases(
        "silu_and_mul", judge_same_dtype,
        standard_bad_inputs(dtype=("x", torch.int64), shape=("x", lambda t: t[..., :-1], "odd last dim"), device="x"),
    )
