"""The built-in ``cpu`` backend: every op on CPU tensors.

Hot ops (linear, attention, rms_norm, silu_and_mul, rotary_embedding, moe_gate,
moe_experts, sparse_mla_attention) run natively (:mod:`dshal.backends.cpu_native`, kind "native": torch's fused
CPU kernels, and dshal's C kernels where the system C compiler could build them); the
rest are the op references (kind "reference"). Whatever this backend serves, the
references stay the oracle, and a fallback is served by the provider named ``reference``,
not by ``cpu`` (``ops: {attention: cpu}`` means this backend's native attention). It is
registered through the ``dshal.backends`` entry-point group like any vendor plugin.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dshal.backend import Availability, Backend, Capabilities, host_available_memory, host_cpus_text, host_peak_rss
from dshal.backends.cpu_native import NATIVE_OPS, weight_format_paths
from dshal.backends.invariant import BATCHED, row_by_row
from dshal.kernels import cpu as cpu_kernels
from dshal.ops.catalogue import SPECS


class CpuBackend(Backend):
    """Torch on the CPU: native providers for the hot ops, the references for the rest."""

    @property
    def name(self) -> str:
        return "cpu"

    @property
    def device_type(self) -> str:
        return "cpu"

    def availability(self) -> Availability:
        kernels = cpu_kernels.status()
        c_part = "dshal C kernels built" if kernels.available else f"no dshal C kernels ({kernels.detail}): torch serves their ops"
        return Availability(
            True,
            f"torch CPU kernels and reference implementations on {platform.machine() or 'cpu'} "
            f"({host_cpus_text()}); {c_part}",
        )

    def capabilities(self) -> Capabilities:
        return Capabilities(
            device_name="cpu",
            arch=platform.machine(),
            fp8_formats=("e4m3fn", "e4m3fnuz", "e5m2"),
            native_e4m3="e4m3fn",
            op_kinds={name: "native" if name in NATIVE_OPS else "reference" for name in self.ops()},
            op_paths=weight_format_paths(),
            dist_backend="gloo",
            compute_units=torch.get_num_threads(),
            moe_no_expert_ids=True,  # cpu_native.moe_experts drops them first (a free read here)
        )

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        references = {name: spec.reference_impl for name, spec in SPECS.items() if spec.has_reference}
        return {**references, **NATIVE_OPS}

    def batch_invariant_ops(self) -> Mapping[str, Callable[..., Any]]:
        """Every batch-sensitive op this backend serves, one row at a time (see
        :mod:`dshal.backends.invariant`): batch-invariant by construction, slower."""
        own = self.ops()
        return {op: row_by_row(op, own[op]) for op in BATCHED if op in own}

    def memory_stats(self) -> dict[str, int]:
        stats = {"peak_rss": host_peak_rss(), "free": host_available_memory()}
        return {key: value for key, value in stats.items() if value is not None}  # what this OS can say

