"""The roofline: a device's peak compute and bandwidth, and how close a measured op gets.

Peaks come from the backend's :class:`~dshal.Capabilities` (``peak_flops`` per dtype
name, ``peak_bandwidth``). A figure the backend does not declare is *measured* once, with
a short matmul (compute) and a device-to-device copy (bandwidth), and labelled
``measured`` wherever it is shown: a measured peak is what torch achieves here, not the
hardware's datasheet figure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dshal.backend import Backend
from dshal.ops.spec import Cost
from dshal.perf.timing import Repeats, backend_clock, time_calls

#: torch dtype -> the key ``Capabilities.peak_flops`` uses.
DTYPE_KEYS = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e4m3fnuz: "fp8",
    torch.float8_e5m2: "fp8",
    torch.int8: "int8",
}
#: Peak keys that can be measured with a plain torch matmul in that dtype.
_MEASURABLE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Peak measurements keep the best of a few runs (the least disturbed by other work).
_PEAK_REPEATS = Repeats(warmup=3, min_runs=5, max_runs=30, budget_s=0.4)
#: Keys with no torch matmul to measure them: the figure of the first available key stands in.
_STAND_INS = {"fp8": ("bf16", "fp32"), "int8": ("bf16", "fp32"), "fp64": ("fp32",)}


#: Words a reported device name adds around the part's own name without making it another
#: part: vendor and family prefixes, memory size and type, the SXM form factor, and ``VF``
#: (an SR-IOV virtual function of the same GPU). ``PCIe``, ``NVL`` or a ``G`` prefix do change
#: the part (a GH200 is not an H200), so they are never dropped.
_NAME_NOISE = re.compile(r"^(nvidia|amd|instinct|tesla|\d+gb|hbm\d*e?|sxm\d*|vf)$", re.IGNORECASE)


def part_words(device_name: str) -> tuple[str, ...]:
    """The words that name the part in ``device_name`` (``"NVIDIA H100 80GB HBM3"`` -> ``("H100",)``)."""
    words = re.split(r"[\s_-]+", device_name.strip())
    return tuple(w.upper() for w in words if w and not _NAME_NOISE.match(w))


def same_part(device_name: str, part: str) -> bool:
    """Whether ``device_name`` (as torch reports it) is exactly ``part`` (a peaks-table name
    such as ``"H200"`` or ``"H100 PCIe"``): the part's words, no more and no fewer. Substring
    matching would give a GH200 the H200's figures, or an H100 PCIe the SXM's."""
    return part_words(device_name) == part_words(part)


def dtype_key(dtype: torch.dtype) -> str:
    """The ``peak_flops`` key for ``dtype`` (``"bf16"``, ``"fp8"``...)."""
    return DTYPE_KEYS.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class Peaks:
    """Peak FLOP/s per dtype key and peak bytes/s, each with where it came from."""

    flops: dict[str, float] = field(default_factory=dict)
    bandwidth: float | None = None
    #: key (or ``"bandwidth"``) -> "capabilities", "measured", or "stand-in: <key> (measured)".
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def any_measured(self) -> bool:
        return any("measured" in s for s in self.sources.values())

    def to_dict(self) -> dict[str, Any]:
        return {"flops": dict(self.flops), "bandwidth": self.bandwidth, "sources": dict(self.sources)}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, backend: Backend, size: int = 1024) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` (best of a few timed runs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    clock, _ = backend_clock(backend)
    stats = time_calls(torch.matmul, [((a, b), {})], clock, _PEAK_REPEATS)
    return 2 * size**3 / stats.min


def measure_copy_bandwidth(device: torch.device, backend: Backend, nbytes: int = 64 << 20) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write counted), best of a few."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    clock, _ = backend_clock(backend)
    stats = time_calls(dst.copy_, [((src,), {})], clock, _PEAK_REPEATS)
    return 2 * src.numel() * src.element_size() / stats.min


def resolve_peaks(backend: Backend, device: torch.device, needed: set[str]) -> Peaks:
    """Peaks for the dtype keys in ``needed``: declared ones from ``capabilities()``, the
    rest measured once (or, for fp8/int8 with no declared figure, the measured bf16/fp32
    matmul figure standing in)."""
    caps = backend.capabilities()
    declared: Mapping[str, float] = caps.peak_flops or {}
    peaks = Peaks()
    for key in sorted(needed | set(declared)):
        if declared.get(key):
            peaks.flops[key], peaks.sources[key] = float(declared[key]), "capabilities"
    for key in sorted(needed - set(peaks.flops)):
        if key in _MEASURABLE:
            peaks.flops[key] = measure_matmul_flops(device, _MEASURABLE[key], backend)
            peaks.sources[key] = "measured"
    for key in sorted(needed - set(peaks.flops)):
        for other in _STAND_INS.get(key, ("fp32",)):
            if other not in peaks.flops and other in _MEASURABLE:
                peaks.flops[other] = measure_matmul_flops(device, _MEASURABLE[other], backend)
                peaks.sources[other] = "measured"
            if other in peaks.flops:
                peaks.flops[key] = peaks.flops[other]
                peaks.sources[key] = f"stand-in: {other} ({peaks.sources[other]})"
                break
    if caps.peak_bandwidth:
        peaks.bandwidth, peaks.sources["bandwidth"] = float(caps.peak_bandwidth), "capabilities"
    else:
        peaks.bandwidth, peaks.sources["bandwidth"] = measure_copy_bandwidth(device, backend), "measured"
    return peaks


@dataclass(frozen=True)
class RooflinePoint:
    """One measured call placed on the roofline."""

    flops_per_s: float
    bytes_per_s: float
    intensity: float
    #: min(peak FLOP/s, intensity x peak bandwidth): the best this op can do here.
    attainable_flops_per_s: float
    #: "compute" or "memory": which roof bounds it.
    bound: str
    #: achieved / attainable, in percent.
    percent: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops_per_s": self.flops_per_s,
            "bytes_per_s": self.bytes_per_s,
            "intensity": self.intensity,
            "attainable_flops_per_s": self.attainable_flops_per_s,
            "bound": self.bound,
            "roofline_percent": self.percent,
        }


def place(cost: Cost, seconds: float, peak_flops: float | None, peak_bandwidth: float | None) -> RooflinePoint:
    """Achieved FLOP/s and bytes/s of ``cost`` done in ``seconds``, and its % of roofline."""
    flops_per_s = cost.flops / seconds if seconds > 0 else math.inf
    bytes_per_s = cost.bytes / seconds if seconds > 0 else math.inf
    intensity = cost.intensity
    if not peak_flops or not peak_bandwidth:
        return RooflinePoint(flops_per_s, bytes_per_s, intensity, math.nan, "unknown", math.nan)
    memory_roof = intensity * peak_bandwidth
    bound = "memory" if memory_roof < peak_flops else "compute"
    attainable = min(peak_flops, memory_roof)
    if cost.flops > 0:
        percent = 100.0 * flops_per_s / attainable
    else:  # pure data movement: judged by bandwidth alone
        percent = 100.0 * bytes_per_s / peak_bandwidth
    return RooflinePoint(flops_per_s, bytes_per_s, intensity, attainable, bound, percent)


__all__ = [
    "DTYPE_KEYS",
    "Peaks",
    "RooflinePoint",
    "dtype_key",
    "measure_copy_bandwidth",
    "measure_matmul_flops",
    "place",
    "part_words",
    "resolve_peaks",
    "same_part",
]
