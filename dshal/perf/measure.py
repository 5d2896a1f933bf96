"""Measuring: latency statistics and clocks, the device roofline, and the profiler's
instrumentation -- what ``dshal bench`` and ``dshal profile`` measure with.

- timing: on a CPU device calls are timed with ``time.perf_counter_ns`` around the call
  (the work is synchronous); on any other device with the backend's
  :meth:`~dshal.Backend.timer` (device events where the backend provides them), so queued
  device work is what is timed. Repeats are cycled over several input sets, with the
  garbage collector paused, and summarized by robust statistics.
- roofline: peaks come from the backend's :class:`~dshal.Capabilities` (``peak_flops`` per
  dtype name, ``peak_bandwidth``). A figure the backend does not declare is *measured*
  once, with a short matmul (compute) and a device-to-device copy (bandwidth), and labelled
  ``measured`` wherever it is shown: a measured peak is what torch achieves here, not the
  hardware's datasheet figure.
- instrumentation (``dshal profile``): :func:`dshal.runtime.op_hook` routes every
  ``dshal.ops.<op>`` call through :meth:`Recorder.wrap_op` while profiling (zero cost when
  off), and forward pre/post hooks on the model's top-level children (``embed``, each of
  ``layers.N``, ``norm``, ``lm_head``) time the layers; both are removed when profiling
  ends -- the model has no ``if profiling:`` anywhere. Device work is synchronized at each
  boundary (``backend.synchronize()``; a no-op on CPU), so host timestamps measure the work
  itself. The recorder's own bookkeeping is timed and shown as its own row ("profiler"),
  so the rows of a layer add up to its time.

Counting host synchronizations is a check rather than a measurement: :mod:`dshal.perf.syncs`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dshal.backend import Backend
from dshal.errors import DshalError
from dshal.ops.catalogue import SPECS
from dshal.ops.spec import Cost
from dshal.runtime import op_hook

# ================================================================ timing
#: One call's positional and keyword arguments.
Inputs = tuple[tuple[Any, ...], dict[str, Any]]
#: Runs ``fn(*args, **kwargs)`` once and returns the seconds it took.
Clock = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], float]


@dataclass(frozen=True)
class Stats:
    """Summary of repeated latencies, in seconds."""

    median: float
    p10: float
    p90: float
    mean: float
    min: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        if not seconds:
            raise ValueError("Stats.of needs at least one sample")
        a = np.asarray(seconds, dtype=np.float64)
        p10, median, p90 = np.percentile(a, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(a.mean()), float(a.min()), int(a.size))

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80 % of runs."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {f"{k}_s" if k != "runs" else k: v for k, v in asdict(self).items()}


def perf_counter_clock(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """Host wall time of one synchronous call (CPU devices)."""
    start = time.perf_counter_ns()
    fn(*args, **kwargs)
    return (time.perf_counter_ns() - start) * 1e-9


def backend_clock(backend: Backend) -> tuple[Clock, str]:
    """The clock for ``backend``'s device and its description: ``perf_counter_ns`` on a
    CPU device, else the backend's timer (device events where available)."""
    if backend.device_type == "cpu":
        return perf_counter_clock, "time.perf_counter_ns"
    timer = backend.timer()

    def device_clock(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        timer.start()
        fn(*args, **kwargs)
        return timer.stop()

    return device_clock, f"{type(timer).__name__} ({backend.name}.timer())"


@dataclass(frozen=True)
class Repeats:
    """How many times to run: ``warmup`` untimed calls, then at least ``min_runs`` and at
    most ``max_runs`` timed calls, stopping early once ``budget_s`` seconds are spent."""

    warmup: int = 3
    min_runs: int = 5
    max_runs: int = 200
    budget_s: float = 0.25

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < 1 or self.budget_s < 0:
            raise DshalError(
                f"repeats: warmup={self.warmup}, min_runs={self.min_runs}, max_runs={self.max_runs}, "
                f"budget_s={self.budget_s}; expected warmup >= 0, runs >= 1, budget >= 0"
            )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's garbage collector (as ``timeit`` does) so a collection triggered by
    one call's allocations does not land in another call's timing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(fn: Callable[..., Any], input_sets: Sequence[Inputs], clock: Clock, repeats: Repeats) -> Stats:
    """Time ``fn`` over ``input_sets`` cycled call after call (so consecutive calls never
    reuse the same tensors), after ``repeats.warmup`` untimed calls."""
    n = len(input_sets)
    for i in range(repeats.warmup):
        args, kwargs = input_sets[i % n]
        fn(*args, **kwargs)
    samples: list[float] = []
    min_runs = min(repeats.min_runs, repeats.max_runs)
    i = repeats.warmup
    with gc_paused():
        deadline = time.perf_counter() + repeats.budget_s
        while len(samples) < repeats.max_runs and (len(samples) < min_runs or time.perf_counter() < deadline):
            args, kwargs = input_sets[i % n]
            samples.append(clock(fn, args, kwargs))
            i += 1
    return Stats.of(samples)


# ================================================================ roofline
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

    def to_dict(self) -> dict[str, Any]:
        return {"flops": dict(self.flops), "bandwidth": self.bandwidth, "sources": dict(self.sources)}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, backend: Backend, size: int = 1024) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` (best of a few timed runs)."""
    gen = torch.Generator(device=device).manual_seed(0)  # its own: the caller's global RNG stream is left as it was
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
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


def resolve_peaks(backend: Backend, device: torch.device, needed: set[str], into: Peaks | None = None) -> Peaks:
    """Peaks for the dtype keys in ``needed``: declared ones from ``capabilities()``, the
    rest measured once (or, for fp8/int8 with no declared figure, the measured bf16/fp32
    matmul figure standing in). ``into``: add to these peaks (keeping what they hold)."""
    caps = backend.capabilities()
    declared: Mapping[str, float] = caps.peak_flops or {}
    peaks = Peaks() if into is None else into
    for key in sorted(needed | set(declared)):
        if declared.get(key) and key not in peaks.flops:
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
    elif peaks.bandwidth is None:  # measured once
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


# ================================================================ profiler instrumentation
#: Row name of the time inside a layer spent outside any op (views, cat, einsum, indexing).
GLUE = "torch glue"
#: Row name of the recorder's own bookkeeping.
PROFILER = "profiler"
#: Layer name of op calls made outside every instrumented module.
OUTSIDE = "(outside layers)"
#: Ops whose FLOPs run in their weight's dtype (index of the weight argument).
_WEIGHT_ARG = {"linear": 1, "moe_experts": 3, "fp8_gemm": 0, "int8_gemm": 0, "dequantize_fp8": 0}


@dataclass
class Tally:
    """Accumulated calls of one (phase, layer, op)."""

    calls: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    peak_key: str = ""

    def add(self, seconds: float, flops: float = 0.0, nbytes: float = 0.0) -> None:
        self.calls += 1
        self.seconds += seconds
        self.flops += flops
        self.bytes += nbytes


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A hashable key of the call's shapes/dtypes (costs depend on nothing else)."""
    part = lambda v: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(part(a) for a in args) + tuple((k, part(v)) for k, v in sorted(kwargs.items()))


def peak_key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The ``peak_flops`` key that bounds one call of op ``name``: its weight's (or first
    operand's) dtype for the GEMMs, else its first tensor's."""
    bound = SPECS[name].signature.bind(*args, **kwargs).arguments
    values = list(bound.values())
    index = _WEIGHT_ARG.get(name)
    tensor = values[index] if index is not None and index < len(values) else None
    if not isinstance(tensor, torch.Tensor):
        tensor = next((v for v in values if isinstance(v, torch.Tensor)), None)
    return dtype_key(tensor.dtype) if tensor is not None else "fp32"


class Recorder:
    """Collects op and layer timings (see the module docstring)."""

    def __init__(self, synchronize: Callable[[], None]):
        self._sync = synchronize
        self.phase = "prefill"
        self._stack: list[str] = []
        self._open: list[int] = []
        #: (phase, layer, op) -> Tally; op is an op name, GLUE or PROFILER.
        self.ops: dict[tuple[str, str, str], Tally] = {}
        #: (phase, layer) -> Tally (calls = forward calls of that layer).
        self.layers: dict[tuple[str, str], Tally] = {}
        #: layer names in first-call order.
        self.layer_order: list[str] = []
        self._costs: dict[tuple[str, tuple[Any, ...]], tuple[float, float, str]] = {}

    # ------------------------------------------------------------ ops
    def wrap_op(self, name: str, provider: Callable[..., Any]) -> Callable[..., Any]:
        """The op hook: ``provider`` timed, its cost and layer recorded."""
        sync, clock = self._sync, time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            start = clock()
            out = provider(*args, **kwargs)
            sync()
            end = clock()
            self._record_op(name, args, kwargs, (end - start) * 1e-9)
            self._tally(PROFILER).add((clock() - end) * 1e-9)
            return out

        timed.__name__ = name
        timed.__wrapped__ = provider  # type: ignore[attr-defined]
        return timed

    def _record_op(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], seconds: float) -> None:
        try:
            key = (name, _signature(args, kwargs))
            cost = self._costs.get(key)
        except TypeError:  # an unhashable argument: no caching
            key, cost = None, None
        if cost is None:
            c = SPECS[name].cost_of(*args, **kwargs)
            cost = (float(c.flops), float(c.bytes), peak_key(name, args, kwargs))
            if key is not None:
                self._costs[key] = cost
        tally = self._tally(name)
        tally.add(seconds, cost[0], cost[1])
        tally.peak_key = tally.peak_key or cost[2]

    def _tally(self, op: str) -> Tally:
        key = (self.phase, self._stack[-1] if self._stack else OUTSIDE, op)
        tally = self.ops.get(key)
        if tally is None:
            tally = self.ops[key] = Tally()
        return tally

    # ------------------------------------------------------------ layers
    def _enter(self, name: str) -> None:
        self._sync()
        self._stack.append(name)
        self._open.append(time.perf_counter_ns())

    def _exit(self, name: str) -> None:
        self._sync()
        seconds = (time.perf_counter_ns() - self._open.pop()) * 1e-9
        self._stack.pop()
        if name not in self.layer_order:
            self.layer_order.append(name)
        self.layers.setdefault((self.phase, name), Tally()).add(seconds)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[Recorder]:
        """Profile ``model``: op hook + layer hooks while inside; both removed on exit."""
        handles = []
        try:
            for name, module in layer_modules(model):
                handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name)))
                handles.append(module.register_forward_hook(lambda m, a, out, name=name: self._exit(name)))
            with op_hook(self.wrap_op):
                yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------ derived
    def finish(self) -> None:
        """Add the GLUE rows: each layer's time not spent in ops or the recorder."""
        for (phase, layer), t in self.layers.items():
            inside = sum(x.seconds for (p, lay, _), x in self.ops.items() if p == phase and lay == layer)
            self.ops[(phase, layer, GLUE)] = Tally(calls=t.calls, seconds=max(0.0, t.seconds - inside))


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units a profile reports: each top-level child of ``model``, with every element of
    a ModuleList (``layers.0``, ``layers.1``...) as its own unit."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
        else:
            out.append((name, child))
    return out


def has_hooks(model: nn.Module) -> bool:
    """True when any module of ``model`` still carries a forward (pre-)hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


__all__ = [
    "DTYPE_KEYS", "GLUE", "OUTSIDE", "PROFILER", "Clock", "Inputs", "Peaks", "Recorder", "Repeats", "RooflinePoint",
    "Stats", "Tally", "backend_clock", "dtype_key", "gc_paused", "has_hooks", "layer_modules", "measure_copy_bandwidth",
    "measure_matmul_flops", "part_words", "peak_key", "perf_counter_clock", "place", "resolve_peaks", "same_part",
    "time_calls",
]
