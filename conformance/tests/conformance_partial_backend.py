"""Partial plugins, as a vendor starts one: the cpu backend's ``linear`` and ``rms_norm``
only (every other op undeclared). ``partial`` serves them correctly; ``partialbiased``
gives ``linear`` the within-tolerance bias of ``conformance_biased_backend``, which only
the ``model`` family catches. Registered through throw-away ``dist-info`` folders (see the
tests), found like any vendor plugin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from conformance_biased_backend import biased
from cpu_variant import CpuVariant

from dshal.backend import Capabilities

#: The ops a partial plugin provides.
OPS = ("linear", "rms_norm")


class PartialBackend(CpuVariant):
    variant_name, variant_note = "partial", "linear and rms_norm only"

    def capabilities(self) -> Capabilities:
        caps = super().capabilities()
        return dataclasses.replace(
            caps,
            op_kinds={op: kind for op, kind in caps.op_kinds.items() if op in OPS},
            op_paths={op: paths for op, paths in caps.op_paths.items() if op in OPS},
        )

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        return {op: fn for op, fn in super().ops().items() if op in OPS}


class PartialBiasedBackend(PartialBackend):
    variant_name, variant_note = "partialbiased", "linear (biased within tolerance) and rms_norm only"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return {"linear": biased(cpu_ops["linear"])}
