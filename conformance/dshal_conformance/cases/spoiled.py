"""``<op>/bad_input/spoiled``: every argument of the op, spoiled one at a time (see
:mod:`dshal_conformance.spoilers`), on the op's first ci rows. Each call must raise a
``DshalError``, or, where the op accepts the value, give the reference's answer: a crash
from deep in torch, a kernel or a vendor library fails the case, and so does an accepted
input answered wrongly (a misread stride or layout). The ``bad_input/<name>`` cases check
that specific inputs get specific error classes; this one checks that nothing escapes.

Exempt, and counted in ``details``: on an emulated backend, an FP8 operand holding a NaN
code (the Triton interpreter decodes it as a number; hardware keeps NaN). A spoiled input
the device cannot hold (float8 where ``Capabilities.fp8_storage`` is False) is not run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dshal.errors import DshalError, ProviderError
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import TIERS
from dshal_conformance.cases.base import (
    Case,
    Context,
    NotPlaceable,
    Outcome,
    logged_crash,
    to_cpu,
    unsupported_outcomes,
)
from dshal_conformance.judge import Verdict
from dshal_conformance.spoilers import differs, routing_differs, selection_differs, spoiled_calls

#: Ops whose answer is not one tensor to compare entry by entry: a choice of experts or keys,
#: compared as sets, where a near-tie may go either way.
SET_ANSWERS: dict[str, Callable[[Any, Any, dict[str, Any]], str | None]] = {
    "moe_gate": routing_differs,
    "indexer_topk": selection_differs,
}

#: Example rows spoiled per op: the first two ci rows (the interpreter runs ~100x slower than a device).
ROWS = 2
#: Failures quoted in the reason; ``details`` lists them all.
QUOTED = 3


def _place(ctx: Context, value: Any) -> Any:
    """A CPU tensor on the backend's device; a meta tensor, or anything else, as it is."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return value
    return ctx.place(value)


#: ``(op, spoiled value) -> why a difference from the reference is not the backend's``, or None.
Exemption = Callable[[str, Any], "str | None"]


def run_spoiled(ctx: Context, op: str, exempt: Exemption | None = None) -> list[Outcome]:
    """The case's body: every spoiled call of ``op`` through ``ctx``'s table, judged. ``exempt``
    (default: none) names differences that are not the backend's. (An emulated backend's FP8
    NaN codes were exempt while the interpreter lost them; its kernels now give NaN where a
    GPU's tensor cores do.)"""
    exempt = exempt or (lambda op, bad: None)
    if op not in ctx.provided:
        return unsupported_outcomes(("",), f"backend does not provide {op!r}")
    crashes: list[str] = []
    wrong: list[str] = []
    counts = {"calls": 0, "refused": 0, "accepted": 0, "not_placeable": 0, "exempt": 0}
    for name, kwargs, bad in spoiled_calls(op, ROWS, ctx.draw):
        try:
            placed = {k: _place(ctx, v) for k, v in kwargs.items()}
        except NotPlaceable as err:
            if name.endswith(": valid"):  # the op's own inputs cannot be held: as its other cases
                return unsupported_outcomes(("",), str(err))
            counts["not_placeable"] += 1
            continue
        counts["calls"] += 1
        try:
            got = to_cpu(ctx.table[op](**placed))
        except ProviderError as err:  # not a refusal of the input: the provider's result broke the contract
            wrong.append(f"{name}: the provider breaks the op's contract: {err}"[:300])
            continue
        except DshalError:
            counts["refused"] += 1
            if name.endswith(": valid"):
                wrong.append(f"{name}: refused")
            continue
        except Exception as err:  # noqa: BLE001 - what the case exists to find
            first_line = str(err).splitlines()[0] if str(err) else ""
            crashes.append(logged_crash(f"{name}: {type(err).__name__}: {first_line}"[:300], err))
            continue
        counts["accepted"] += 1
        ref_kwargs = {**kwargs, "fmt": ctx.draw.native_e4m3} if kwargs.get("fmt") == "e4m3" else kwargs
        try:
            want = SPECS[op].reference_impl(**ref_kwargs)
        except Exception as err:  # noqa: BLE001 - the op's checks let through what its reference cannot do
            wrong.append(f"{name}: accepted, but the reference itself raised {type(err).__name__}: {err}"[:300])
            continue
        why = SET_ANSWERS[op](got, want, kwargs) if op in SET_ANSWERS else differs(got, want)
        if why and exempt(op, bad):
            counts["exempt"] += 1
            continue
        if why:
            wrong.append(f"{name}: accepted, but {why}")
    failures = crashes + wrong
    status = "fail" if failures else "pass"
    reason = (
        f"{len(crashes)} crash(es) outside DshalError and {len(wrong)} wrong answer(s) in {counts['calls']} spoiled calls: "
        + "; ".join(failures[:QUOTED]) + (" ..." if len(failures) > QUOTED else "")
        if failures else
        f"{counts['calls']} spoiled calls: {counts['refused']} refused with a DshalError, {counts['accepted']} accepted "
        f"with the reference's answer" + (f", {counts['exempt']} exempt" if counts["exempt"] else "")
    )
    verdict = Verdict(status, "mishandled_calls", float(len(failures)), 0.0, reason)
    verdict.details = {**counts, "crashes": crashes, "wrong": wrong}
    return [Outcome("", verdict)]


def cases() -> list[Case]:
    out = []
    for op in SPECS:
        def body(ctx: Context, op: str = op) -> list[Outcome]:
            return run_spoiled(ctx, op)

        out.append(Case(f"{op}/bad_input/spoiled", op, "bad_input", "", {"rows": ROWS}, frozenset(TIERS), body))
    return out
