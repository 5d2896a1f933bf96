"""The ``graph`` family: device-graph replay equals eager, and op paths do no host sync.

Case ``graph/<op>`` (inputs: the first row of the op's own table) makes two judgements:

- ``/replay``: where ``backend.graph(fn)`` captures (returns something other than ``fn``),
  the captured op is replayed on the inputs and then on *new data copied into the same
  static buffers*; both must equal eager calls (the op's closeness row) and the second
  must differ from the first (the replay really recomputed). A capture that raises is a
  finding (``capture-failed``). Where ``graph()`` returns ``fn`` itself (cpu, emulated
  legs), ``unsupported`` with that reason.
- ``/host-sync``: the op runs eagerly under :class:`HostSyncCounter`; every host
  synchronization on its path (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``,
  ``nonzero``...: what breaks capture on a real GPU) is a finding (``host-sync``) naming
  the first call site. Syncs made by the Triton interpreter itself (emulation machinery
  that does not exist on a device) are not counted. On the plain cpu backend host and
  device are one: ``unsupported``.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dshal_conformance.cases.base import Case, Context, Inputs, Outcome, dtype_name, fail_all, to_cpu, unsupported_outcomes
from dshal_conformance.judge import Verdict, close, finding, verdict
from dshal_conformance.tolerances import closeness

SUFFIXES = ("/replay", "/host-sync")

#: Tensor methods / torch functions that copy device data to the host and wait for it.
SYNC_FUNCTIONS = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "equal"})
#: aten ops whose result the host must read (data-dependent scalars or shapes).
SYNC_ATEN = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
    "unique_consecutive", "repeat_interleave",
})
#: Frames from these package folders are emulation machinery (no such sync on a device).
EXEMPT = (f"{os.sep}triton{os.sep}",)
_HERE = os.path.abspath(__file__)


def _call_site() -> str | None:
    """The innermost frame outside torch and this module, or None when the call comes from
    exempt machinery (the Triton interpreter)."""
    frames = traceback.extract_stack()[:-2]
    if any(any(e in f.filename for e in EXEMPT) for f in frames):
        return None
    torch_dir = os.path.dirname(torch.__file__)
    for f in reversed(frames):
        if f.filename != _HERE and not f.filename.startswith(torch_dir) and "contextlib" not in f.filename:
            return f"{f.filename}:{f.lineno} ({f.name})"
    return "?"


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.events``: ``(what, call site)`` of each
    host synchronization inside the block, seen at the torch-function level (``.item()``,
    ``.cpu()``...) and at the dispatcher level (``aten._local_scalar_dense``, ``nonzero``...)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        counter = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = getattr(func, "__name__", "")
                if name in SYNC_FUNCTIONS:
                    counter._note(name)
                return func(*args, **(kwargs or {}))

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = func._schema.name.split("::")[-1]
                if name in SYNC_ATEN:
                    counter._note(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self._modes = (Functions(), Dispatch())

    def _note(self, what: str) -> None:
        site = _call_site()
        # One Python-level sync (``t.item()``) also shows as its aten op: count the site once.
        if site is not None and not (self.events and self.events[-1][1] == site and what.startswith("aten.")):
            self.events.append((what, site))

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _tables() -> dict[str, tuple[Mapping[str, Any], Callable[[Context, Mapping[str, Any]], Inputs]]]:
    """op -> (the first row of its table, its build function): the graph family's inputs."""
    from dshal_conformance.cases import attention_moe as am, elementwise as ew, gemm, quant

    return {
        "linear": (gemm.LINEAR[0], gemm.build_linear),
        "fp8_gemm": (gemm.FP8_GEMM[0], gemm.build_fp8_gemm),
        "quantize_fp8": (quant.QUANTIZE_FP8[0], quant.build_quantize_fp8),
        "rms_norm": (ew.RMS_NORM[0], ew.build_rms_norm),
        "silu_and_mul": (ew.SILU_AND_MUL[0], ew.build_silu_and_mul),
        "rotary_embedding": (ew.ROTARY[0], ew.build_rotary),
        "attention": (am.ATTENTION[0], am.build_attention),
        "moe_gate": (am.MOE_GATE[0], am.build_moe_gate),
        "moe_experts": (am.MOE_EXPERTS[0], am.build_moe_experts),
    }


def _tensors(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


def _replay(ctx: Context, op: str, row: Mapping[str, Any], build: Any, backend: Any) -> Verdict:
    fn = ctx.table[op]
    graphed = backend.graph(fn)
    if graphed is fn:
        return Verdict("unsupported", None, None, None,
                       f"backend {backend.name!r}: graph() returns the function itself (no device graph here)")
    first, second = build(ctx, row).kwargs, build(ctx, row).kwargs  # same shapes, new data
    placed = {k: ctx.place(v) for k, v in first.items()}
    try:
        eager = to_cpu(fn(**placed))
        replayed = [t.clone() for t in _tensors(to_cpu(graphed(**placed)))]
        placed2 = {k: ctx.place(v) for k, v in second.items()}
        eager2 = to_cpu(fn(**placed2))
        replayed2 = [t.clone() for t in _tensors(to_cpu(graphed(**placed2)))]
    except Exception as err:  # noqa: BLE001 - capture failing is what the case looks for
        return finding("capture-failed", f"{op}: capture or replay raised {type(err).__name__}: {err}")
    checks = []
    for name, got, want in (("replay", replayed, _tensors(eager)), ("replay-new-data", replayed2, _tensors(eager2))):
        for i, (g, w) in enumerate(zip(got, want)):
            if w.is_floating_point():
                checks += close(f"{name}[{i}]", g, w, closeness(w.dtype))
            elif not torch.equal(g, w):
                return Verdict("fail", f"{name}[{i}]", None, None, f"{op}: {name} output {i} differs from eager (exact)")
    if all(torch.equal(a, b) for a, b in zip(replayed, replayed2)):
        return Verdict("fail", "replay-new-data", None, None, f"{op}: the replay on new data returned the first outputs (static buffers not read)")
    return verdict(checks)


def _host_sync(ctx: Context, op: str, row: Mapping[str, Any], build: Any, runtime: Any) -> Verdict:
    if runtime.backend.device_type == "cpu" and not runtime.emulated:
        return Verdict("unsupported", None, None, None,
                       f"backend {runtime.backend.name!r} computes on the host: no host synchronization to count")
    placed = {k: ctx.place(v) for k, v in build(ctx, row).kwargs.items()}
    with HostSyncCounter() as counter:
        ctx.table[op](**placed)
    if not counter.events:
        return Verdict("pass", "host_syncs", 0.0, 0.0, f"{op}: no host synchronization on its path")
    what, site = counter.events[0]
    return finding("host-sync", f"{op}: {len(counter.events)} host synchronization(s) on its path (would break graph "
                   f"capture on a device); first: {what} at {site}", "host_syncs", float(len(counter.events)),
                   {"events": [{"what": w, "at": s} for w, s in counter.events[:10]]})


def run_op(ctx: Context, op: str) -> list[Outcome]:
    from dshal.errors import UnsupportedOpError
    from dshal.runtime import current

    runtime = current()
    if op not in ctx.provided:
        return unsupported_outcomes(SUFFIXES, f"backend does not provide {op!r}")
    row, build = _tables()[op]
    try:
        return [Outcome("/replay", _replay(ctx, op, row, build, runtime.backend)),
                Outcome("/host-sync", _host_sync(ctx, op, row, build, runtime))]
    except UnsupportedOpError as err:
        return unsupported_outcomes(SUFFIXES, f"{op}: this variant is not supported: {err}")
    except Exception as err:  # noqa: BLE001 - the eager call itself crashed
        return fail_all(SUFFIXES, "error", f"{op} crashed: {type(err).__name__}: {err}")


def cases() -> list[Case]:
    out = []
    for op, (row, _) in _tables().items():

        def body(ctx: Context, op: str = op) -> list[Outcome]:
            return run_op(ctx, op)

        out.append(Case(f"graph/{op}", op, "graph", dtype_name(row.get("dtype")), {"inputs": row["name"]},
                        frozenset({"ci", "full"}), body, SUFFIXES))
    return out


__all__ = ["HostSyncCounter", "SYNC_ATEN", "SYNC_FUNCTIONS", "cases", "run_op"]
