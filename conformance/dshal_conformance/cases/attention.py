"""Conformance of attention: the judging (rows and inputs are the op's own examples, in
:mod:`dshal.ops.attention`: DeepSeek-V3's MLA dims in the full tier, windows, GQA,
non-finite inputs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.ops.examples import Example
from dshal_conformance.cases.base import Case, Context, op_cases, standard_bad_inputs
from dshal_conformance.judge import Check, close
from dshal_conformance.tolerances import composite


def judge_attention(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    # Softmax averages: the output does not grow with Tk, so atol is not scaled by it.
    return close("out", out, ref, composite(row["dtype"], ref, 1, stages=2), row["dtype"])


def cases() -> list[Case]:
    return op_cases(
        "attention", judge_attention,
        standard_bad_inputs(dtype=("k", torch.float32), shape=("q", lambda t: t[0], "3-D 'q'"), device="v"),
    )
