"""Conformance of rotary_embedding: the judging (rows and inputs are the op's own examples,
in :mod:`dshal.ops.rotary`)."""

from __future__ import annotations

import torch

from dshal_conformance.cases.base import Case, op_cases, standard_bad_inputs
from dshal_conformance.cases.norm import judge_same_dtype


def cases() -> list[Case]:
    return op_cases(
        "rotary_embedding", judge_same_dtype,
        standard_bad_inputs(dtype=("x", torch.int32), shape=("cos", lambda t: t[:, :-1], "'cos' with one angle too few"), device="sin"),
    )
