"""``dshal.ops.reference.<op>``: each op's reference implementation behind its input
checks, callable without any runtime. This is the oracle conformance compares against."""

from __future__ import annotations

from dshal.ops.catalogue import SPECS

for _spec in SPECS.values():
    if _spec.has_reference:
        globals()[_spec.name] = _spec.checked(_spec.reference_impl)
del _spec
