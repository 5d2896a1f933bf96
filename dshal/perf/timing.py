"""Latency measurement: robust statistics, a clock per device, and timed repeats.

On a CPU device calls are timed with ``time.perf_counter_ns`` around the call (the
work is synchronous); on any other device with the backend's :meth:`~dshal.Backend.timer`
(device events where the backend provides them), so queued device work is what is timed.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dshal.backend import Backend

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
        from dshal.errors import DshalError

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


__all__ = ["Clock", "Inputs", "Repeats", "Stats", "backend_clock", "gc_paused", "perf_counter_clock", "time_calls"]
