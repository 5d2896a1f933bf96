"""The built-in ``cpu`` backend: every op's reference implementation on CPU tensors.

It is registered through the ``dshal.backends`` entry-point group like any vendor plugin.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dshal.backend import Availability, Backend, Capabilities


class ReferenceBackend(Backend):
    """Clear torch math on the CPU: the oracle, and the fallback provider of every op."""

    @property
    def name(self) -> str:
        return "cpu"

    @property
    def device_type(self) -> str:
        return "cpu"

    def availability(self) -> Availability:
        return Availability(True, f"reference implementations on {platform.machine() or 'cpu'} ({os.cpu_count()} cores)")

    def capabilities(self) -> Capabilities:
        return Capabilities(
            device_name="cpu",
            arch=platform.machine(),
            fp8_formats=("e4m3fn", "e4m3fnuz", "e5m2"),
            native_e4m3="e4m3fn",
            op_kinds={name: "reference" for name in self.ops()},
            dist_backend="gloo",
            compute_units=torch.get_num_threads(),
        )

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        from dshal.ops.catalogue import SPECS

        return {name: spec.reference_impl for name, spec in SPECS.items() if spec.has_reference}

    def memory_stats(self) -> dict[str, int]:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss": peak_kib * 1024}
