"""Instrumentation for ``dshal profile``: times every op call and every top-level layer of a
model, and leaves nothing behind when it is removed.

- op calls: :func:`dshal.runtime.op_hook` routes every ``dshal.ops.<op>`` call through
  :meth:`Recorder.wrap_op` while profiling; when it exits, the dispatch table holds the
  bare providers again (zero cost when off);
- layers: forward pre/post hooks on the model's top-level children (``embed``, each of
  ``layers.N``, ``norm``, ``lm_head``), removed when profiling ends -- the model has no
  ``if profiling:`` anywhere.

Device work is synchronized at each boundary (``backend.synchronize()``; a no-op on CPU),
so host timestamps measure the work itself. The recorder's own bookkeeping is timed and
shown as its own row ("profiler"), so the rows of a layer add up to its time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dshal.ops.catalogue import SPECS
from dshal.perf.roofline import dtype_key

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


def _peak_key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
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
            cost = (float(c.flops), float(c.bytes), _peak_key(name, args, kwargs))
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
        from dshal.runtime import op_hook

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


__all__ = ["GLUE", "OUTSIDE", "PROFILER", "Recorder", "Tally", "has_hooks", "layer_modules"]
