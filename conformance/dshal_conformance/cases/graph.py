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

import importlib.util
import os
from typing import Any

import torch

from dshal.errors import UnsupportedOpError
from dshal.ops import trusted
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import ShapeRow
from dshal.perf.syncs import HostSyncCounter
from dshal.runtime import current
from dshal_conformance.cases.base import (
    Case,
    Context,
    Outcome,
    conformance_rows,
    crashed,
    dtype_name,
    to_cpu,
    unsupported_outcomes,
)
from dshal_conformance.judge import Verdict, close, finding, verdict
from dshal_conformance.tolerances import closeness

SUFFIXES = ("/replay", "/host-sync")

def emulation_machinery() -> tuple[str, ...]:
    """Folders whose frames are emulation machinery (no such sync on a device): the installed
    Triton package's own (its interpreter), found without importing it. Not any path with a
    ``triton`` folder in it: dshal's own kernel wrappers (``dshal/kernels/triton``) run on the
    device too, and their syncs count."""
    spec = importlib.util.find_spec("triton")
    folders = spec.submodule_search_locations if spec is not None and spec.submodule_search_locations else []
    # frames carry the path as imported: a symlinked site-packages (lib64 -> lib) has two spellings
    spellings = {os.path.join(path, "") for folder in folders for path in (folder, os.path.realpath(folder))}
    return tuple(sorted(spellings))


#: The ops the graph family captures (each on the first row of its own examples).
GRAPH_OPS = ("linear", "fp8_gemm", "quantize_fp8", "rms_norm", "silu_and_mul", "rotary_embedding", "attention", "moe_gate", "moe_experts")


def first_row(op: str) -> ShapeRow:
    """The inputs the graph family uses for ``op``: the first of its conformance rows."""
    return conformance_rows(op)[0]


def _tensors(value: Any) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]


def judge_replay(ctx: Context, op: str, row: ShapeRow, backend: Any) -> Verdict:
    fn = ctx.table[op]
    graphed = backend.graph(fn)
    if graphed is fn:
        return Verdict("unsupported", None, None, None,
                       f"backend {backend.name!r}: graph() returns the function itself (no device graph here)")
    spec = SPECS[op]
    first, second = spec.example_inputs(ctx.draw, row).kwargs, spec.example_inputs(ctx.draw, row).kwargs  # same shapes, new data
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


def judge_host_sync(ctx: Context, op: str, row: ShapeRow, runtime: Any) -> Verdict:
    if runtime.backend.device_type == "cpu" and not runtime.emulated:
        return Verdict("unsupported", None, None, None,
                       f"backend {runtime.backend.name!r} computes on the host: no host synchronization to count")
    placed = {k: ctx.place(v) for k, v in SPECS[op].example_inputs(ctx.draw, row).kwargs.items()}
    # As a captured decode step calls it: checked mode's value checks (the MoE ids' range) read
    # the host by design; trusted() makes them device-side asserts.
    with trusted(), HostSyncCounter(exempt=emulation_machinery()) as counter:
        ctx.table[op](**placed)
    if not counter.events:
        return Verdict("pass", "host_syncs", 0.0, 0.0, f"{op}: no host synchronization on its path")
    what, site = counter.events[0]
    return finding("host-sync", f"{op}: {len(counter.events)} host synchronization(s) on its path (would break graph "
                   f"capture on a device); first: {what} at {site}", "host_syncs", float(len(counter.events)),
                   {"events": [{"what": w, "at": s} for w, s in counter.events[:10]]})


def run_op(ctx: Context, op: str) -> list[Outcome]:
    runtime = current()
    if op not in ctx.provided:
        return unsupported_outcomes(SUFFIXES, f"backend does not provide {op!r}")
    row = first_row(op)
    try:
        return [Outcome("/replay", judge_replay(ctx, op, row, runtime.backend)),
                Outcome("/host-sync", judge_host_sync(ctx, op, row, runtime))]
    except UnsupportedOpError as err:
        return unsupported_outcomes(SUFFIXES, f"{op}: this variant is not supported: {err}")
    except Exception as err:  # noqa: BLE001 - the eager call itself crashed
        return crashed(SUFFIXES, op, err)


def cases() -> list[Case]:
    out = []
    for op in GRAPH_OPS:
        row = first_row(op)

        def body(ctx: Context, op: str = op) -> list[Outcome]:
            return run_op(ctx, op)

        out.append(Case(f"graph/{op}", op, "graph", dtype_name(row.params.get("dtype")), {"inputs": row.name},
                        frozenset({"ci", "full"}), body, SUFFIXES))
    return out


__all__ = ["GRAPH_OPS", "cases", "emulation_machinery", "first_row", "judge_host_sync", "judge_replay", "run_op"]
