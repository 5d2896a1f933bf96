"""The suite's case catalogue: every family's cases (op families named as in ``dshal.ops``)."""

from __future__ import annotations

import importlib

from dshal_conformance.cases.base import TIERS, Case, case_seed

FAMILY_MODULES = (
    "dshal_conformance.cases.quant",
    "dshal_conformance.cases.gemm",
    "dshal_conformance.cases.norm",
    "dshal_conformance.cases.activation",
    "dshal_conformance.cases.rotary",
    "dshal_conformance.cases.attention",
    "dshal_conformance.cases.sparse_attention",
    "dshal_conformance.cases.moe",
    "dshal_conformance.collectives",
    "dshal_conformance.cases.model",
    "dshal_conformance.cases.determinism",
    "dshal_conformance.cases.graph",
    "dshal_conformance.cases.hooks",
    # last: on a device, a kernel that faults on a spoiled input (an illegal address) can take
    # the process's context down, and every case after it with it
    "dshal_conformance.cases.spoiled",
)


def all_cases(tier: str = "ci") -> list[Case]:
    """Every case of ``tier`` (``full`` includes the ci rows), in a stable order."""
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r}, expected one of {TIERS}")
    out: list[Case] = []
    for name in FAMILY_MODULES:
        out += importlib.import_module(name).cases()
    ids = [c.id for c in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RuntimeError(f"duplicate case ids: {dupes}")
    return [c for c in out if tier in c.tiers]


__all__ = ["Case", "TIERS", "all_cases", "case_seed"]
