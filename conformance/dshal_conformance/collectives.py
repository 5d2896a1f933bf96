"""Collective cases: real processes on 127.0.0.1 over the backend's process-group type.

Each world size is one group of rank processes (``python -m
dshal_conformance.collectives``, like torchrun: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT on
127.0.0.1 and a free port) that runs every selected collective case in turn through :mod:`dshal.comm`. Inputs
are integer-valued, so every rank can compute the exact expected result itself; a rank
reports the first element that differs. The ``dead-peer`` case kills one rank while the
others wait in an all_reduce: they must raise :class:`dshal.CommError` within the
configured ``distributed.timeout_s`` (plus a grace period), not hang. ``all_gather`` and
``reduce_scatter`` run along dim 0 and along the last dim (``dim=-1``, as dshal's
tensor-parallel layers call them, on 3-D and 2-D tensors). It runs in dshal's
checked mode, where every collective is waited for on the host with that timeout, so the
case means the same on nccl (asynchronous collectives) as on gloo.

Each rank gets ``LOCAL_RANK`` as torchrun sets it and computes on that device. A device
backend with fewer visible devices than a world size's ranks has that world size's cases
skipped with the reason (ranks sharing one GPU is not what NCCL supports), not errored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import dshal
import dshal.comm as comm
from dshal.errors import CommError
from dshal.lifetime import child_env, child_python, cleanup_on_termination, dies_with_parent, exit_with_parent
from dshal.parallel.launch import free_port
from dshal.registry import REGISTRY
from dshal_conformance.cases.base import TIERS, Case
from dshal_conformance.judge import Verdict

WORLD_SIZES = (2, 4)
#: name -> the collective it exercises (the case's ``op``)
COLLECTIVES = {
    "all_reduce-sum": "all_reduce",
    "all_reduce-max": "all_reduce",
    "all_gather": "all_gather",
    "all_gather-last-dim": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter-last-dim": "reduce_scatter",
    "all_to_all-even": "all_to_all",
    "all_to_all-uneven": "all_to_all",
    "broadcast": "broadcast",
    "barrier": "barrier",
}
DEAD_PEER = "dead-peer"
#: ``distributed.timeout_s`` used by the collective processes.
COMM_TIMEOUT_S = 10.0
#: How much later than the timeout a dead peer may be reported.
DEAD_PEER_GRACE_S = 5.0


def cases() -> list[Case]:
    out = []
    for world in WORLD_SIZES:
        for name, op in COLLECTIVES.items():
            params = {"world_size": world, "collective": name}
            out.append(Case(f"comm/{name}/w{world}", op, "collective", "float32", params, frozenset(TIERS), None, ("",), world))
    params = {"world_size": 2, "timeout_s": COMM_TIMEOUT_S, "grace_s": DEAD_PEER_GRACE_S}
    out.append(Case(f"comm/{DEAD_PEER}/w2", "all_reduce", "collective", "float32", params, frozenset(TIERS), None, ("",), 2))
    return out


# ---------------------------------------------------------------- inputs and expectations
def _make(rank: int, rows: int, cols: int = 4) -> torch.Tensor:
    """Rank ``rank``'s integer-valued input: row j, column c holds rank*1000 + j*10 + c."""
    j = torch.arange(rows, dtype=torch.float32)[:, None]
    c = torch.arange(cols, dtype=torch.float32)[None, :]
    return rank * 1000 + j * 10 + c


def _uneven_splits(world: int) -> list[list[int]]:
    """splits[src][dst]: rows rank src sends to rank dst (asymmetric, never all equal)."""
    return [[(src + 2 * dst) % 3 + 1 for dst in range(world)] for src in range(world)]


def _check(collective: str, rank: int, world: int, comm: Any, device: torch.device, scratch: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one collective; return (got, expected), both on the CPU."""
    if collective == "all_reduce-sum":
        got = comm.all_reduce(_make(rank, 3).to(device), op="sum")
        return got, sum(_make(r, 3) for r in range(world))
    if collective == "all_reduce-max":
        # The max comes from a different rank per element.
        make = lambda r: (_make(r, 3) * (1 + ((torch.arange(12).reshape(3, 4) + r) % world))) % 977  # noqa: E731
        got = comm.all_reduce(make(rank).to(device), op="max")
        return got, torch.stack([make(r) for r in range(world)]).amax(0)
    if collective == "all_gather":
        return comm.all_gather(_make(rank, 2).to(device), dim=0), torch.cat([_make(r, 2) for r in range(world)])
    if collective == "all_gather-last-dim":  # as the tensor-parallel layers gather their column shards
        make = lambda r: _make(r, 6).reshape(2, 3, 4)  # noqa: E731
        return comm.all_gather(make(rank).to(device), dim=-1), torch.cat([make(r) for r in range(world)], dim=-1)
    if collective == "reduce_scatter":
        got = comm.reduce_scatter(_make(rank, 2 * world).to(device), dim=0, op="sum")
        return got, sum(_make(r, 2 * world) for r in range(world)).chunk(world)[rank]
    if collective == "reduce_scatter-last-dim":
        got = comm.reduce_scatter(_make(rank, 4, 2 * world).to(device), dim=-1, op="sum")
        return got, sum(_make(r, 4, 2 * world) for r in range(world)).chunk(world, dim=-1)[rank]
    if collective == "all_to_all-even":
        got = comm.all_to_all(_make(rank, 2 * world).to(device))
        return got, torch.cat([_make(s, 2 * world)[2 * rank : 2 * rank + 2] for s in range(world)])
    if collective == "all_to_all-uneven":
        splits = _uneven_splits(world)
        mine = _make(rank, sum(splits[rank]))
        got = comm.all_to_all(mine.to(device), output_splits=[splits[s][rank] for s in range(world)], input_splits=splits[rank])
        parts = []
        for s in range(world):
            start = sum(splits[s][:rank])
            parts.append(_make(s, sum(splits[s]))[start : start + splits[s][rank]])
        return got, torch.cat(parts)
    if collective == "broadcast":
        src = world - 1
        return comm.broadcast(_make(rank, 3).to(device), src=src), _make(src, 3)
    if collective == "barrier":
        time.sleep(0.1 * rank)  # late arrivals: the barrier must wait for them
        (scratch / f"rank{rank}").write_text("arrived")
        comm.barrier()
        seen = sorted(p.name for p in scratch.iterdir() if p.name.startswith("rank"))
        return torch.tensor([float(len(seen))]), torch.tensor([float(world)])
    raise ValueError(collective)


def _compare(got: Any, want: torch.Tensor) -> tuple[str, float | None, str]:
    if not isinstance(got, torch.Tensor):
        return "fail", None, f"returned {type(got).__name__}, expected a tensor"
    got = got.detach().to("cpu")
    if tuple(got.shape) != tuple(want.shape):
        return "fail", None, f"shape {list(got.shape)}, expected {list(want.shape)}"
    diff = (got.to(torch.float64) - want.to(torch.float64)).abs()
    if diff.numel() == 0 or float(diff.max()) == 0:
        return "pass", 0.0, "exact"
    bad = int(diff.flatten().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(bad), diff.shape))
    return "fail", float(diff.max()), (
        f"{int((diff > 0).sum())} of {diff.numel()} elements differ; first worst at {idx}: "
        f"got {float(got.flatten()[bad]):g}, expected {float(want.flatten()[bad]):g}"
    )


class _Results:
    """A rank's results, written as JSON to ``<scratch>/result-<rank>.json`` (atomically)."""

    def __init__(self, scratch: str):
        self.scratch = Path(scratch)

    def put(self, item: tuple[int, dict[str, Any]]) -> None:
        rank, report = item
        tmp = self.scratch / f".result-{rank}.tmp"
        tmp.write_text(json.dumps(report))
        tmp.replace(self.scratch / f"result-{rank}.json")


def _worker(rank: int, world: int, backend: str, emulate: bool, names: list[str], scratch: str) -> None:
    """One rank (RANK etc. come from the environment): initialize dshal.comm, run the
    named collectives, report, maybe die."""
    results = _Results(scratch)
    report: dict[str, tuple[str, float | None, str]] = {}
    try:

        rt = dshal.use(backend=backend, emulate=emulate, fallback="error", distributed={"timeout_s": COMM_TIMEOUT_S})
        comm.init()
        device = rt.device  # this rank's (LOCAL_RANK), bound when the runtime was built
        communicator = rt.backend.communicator(None)
    except Exception as err:  # noqa: BLE001
        for name in names:
            report[name] = ("error", None, f"rank {rank} could not start: {type(err).__name__}: {err}")
        results.put((rank, report))
        return
    for name in names:
        if name == DEAD_PEER:
            continue
        try:
            got, want = _check(name, rank, world, communicator, device, Path(scratch) / "barrier")
            report[name] = _compare(got, want)
        except Exception as err:  # noqa: BLE001 - the finding is the reason text
            report[name] = ("fail", None, f"raised {type(err).__name__}: {err}")
    if DEAD_PEER not in names:
        results.put((rank, report))
        communicator.barrier()  # nobody tears the group down while a peer still reports
        return
    # Dead peer: the last rank leaves while the others wait in an all_reduce.
    communicator.barrier()
    if rank == world - 1:
        results.put((rank, report))
        time.sleep(0.5)
        os._exit(3)
    start = time.monotonic()
    try:
        communicator.all_reduce(_make(rank, 1).to(device))
        outcome = ("fail", None, "all_reduce returned although a peer died")
    except CommError as err:
        waited = time.monotonic() - start
        limit = COMM_TIMEOUT_S + DEAD_PEER_GRACE_S
        status = "pass" if waited <= limit else "fail"
        outcome = (status, waited, f"CommError after {waited:.2f} s (limit {limit:g} s): {str(err).splitlines()[0][:200]}")
    except Exception as err:  # noqa: BLE001
        outcome = ("fail", None, f"raised {type(err).__name__} instead of CommError: {str(err)[:200]}")
    report[DEAD_PEER] = outcome
    results.put((rank, report))
    os._exit(0)  # the group is broken; do not wait for its teardown


def device_shortfall(device_type: str, visible: int, world: int) -> str | None:
    """Why ``world`` ranks cannot each get a device of ``device_type`` when ``visible`` are
    visible, or None when they can (host tensors: any number of ranks)."""
    if device_type == "cpu" or visible >= world:
        return None
    return (
        f"needs {world} {device_type} devices (one per rank), this machine shows {visible}; "
        f"run it where at least {world} are visible"
    )


def visible_devices(backend: str, emulate: bool) -> tuple[str, int]:
    """The device type ``backend`` computes on here and how many such devices are visible."""
    info = REGISTRY.get(backend, emulate=emulate)
    device_type = info.backend.device_type if info.backend is not None else "cpu"
    if device_type == "cpu":
        return device_type, 0
    module = getattr(torch, device_type, None)
    return device_type, (module.device_count() if module is not None and module.is_available() else 0)


def run_group(
    backend: str,
    emulate: bool,
    world: int,
    selected: Sequence[Case],
    timeout_s: float,
    on_done: Callable[[Case, Verdict], None],
    devices: tuple[str, int] | None = None,
    limits: dict[str, dict[str, float]] | None = None,
) -> None:
    """Run ``selected`` (all of one world size) in ``world`` rank processes; report each case.
    ``devices``: (device type, visible count), default read from the backend here; with too
    few devices every case is skipped with the reason. ``limits``: case id -> (metric ->
    threshold) from waivers, which loosen ``seconds_to_error`` / ``collective_ulp``."""
    device_type, visible = devices if devices is not None else visible_devices(backend, emulate)
    short = device_shortfall(device_type, visible, world)
    if short is not None:
        for case in selected:
            on_done(case, Verdict("skip", None, None, None, short))
        return
    names = [c.params.get("collective", DEAD_PEER) for c in selected]
    # SIGTERM / SIGHUP kill the ranks and remove the folder, as Ctrl-C does (they left it behind)
    with cleanup_on_termination(), tempfile.TemporaryDirectory(prefix="dshal-collectives-") as scratch:
        (Path(scratch) / "barrier").mkdir()
        port = free_port()
        # The children import what this process imports (a plugin found here is found there too).
        env = child_env(dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world)))
        args = json.dumps({"world": world, "backend": backend, "emulate": emulate, "names": names, "scratch": scratch,
                           "parent": os.getpid()})
        # The ranks end with this process: an interrupted or killed run left them running on. The
        # kernel kills them with it (dies_with_parent, even mid-import); a watcher where it cannot.
        code = (dies_with_parent(os.getpid()) + f"sys.argv = ['-c', {args!r}]\nimport runpy\n"
                "runpy.run_module('dshal_conformance.collectives', run_name='__main__')\n")
        procs: list[subprocess.Popen] = []
        # Each rank's stderr goes to a file: a pipe nobody reads until the ranks end would stall
        # a rank that writes more than its buffer (a long traceback), and leave it unclosed.
        stderr_files = [Path(scratch) / f"stderr-{r}.txt" for r in range(world)]
        try:
            for r in range(world):
                with stderr_files[r].open("wb") as err_file:
                    procs.append(subprocess.Popen(
                        child_python("-c", code),
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world)},
                        stdout=subprocess.DEVNULL,
                        stderr=err_file,
                    ))
            deadline = time.monotonic() + timeout_s
            for p in procs:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        stderr = {r: stderr_files[r].read_text(errors="replace") for r in range(len(procs))}
        reports: dict[int, dict[str, tuple[str, float | None, str]]] = {}
        for r in range(world):
            f = Path(scratch) / f"result-{r}.json"
            if f.is_file():
                reports[r] = {k: tuple(v) for k, v in json.loads(f.read_text()).items()}
    for case, name in zip(selected, names):
        on_done(case, _merge(name, world, reports, timeout_s, stderr, (limits or {}).get(case.id, {})))


def _merge(
    name: str, world: int, reports: dict[int, dict[str, tuple[str, float | None, str]]], timeout_s: float, stderr: dict[int, str],
    limits: dict[str, float] | None = None,
) -> Verdict:
    """One verdict from every rank's: the case fails when any rank fails or is missing. A
    waiver's limit for the case's metric re-judges a rank that failed on that metric alone."""
    ranks = range(world - 1) if name == DEAD_PEER else range(world)  # the dead rank reports nothing
    problems, worst = [], 0.0
    metric = "seconds_to_error" if name == DEAD_PEER else "collective_ulp"
    waived = (limits or {}).get(metric)
    for r in ranks:
        entry = reports.get(r, {}).get(name)
        if entry is None:
            tail = stderr.get(r, "").strip().splitlines()[-1:] or ["no output"]
            problems.append(("error", f"rank {r}: no result within {timeout_s:g} s (hung or crashed: {tail[0][:200]})"))
            continue
        status, value, detail = entry
        if value is not None:
            worst = max(worst, value)
            if status == "fail" and waived is not None and value <= waived:
                status = "pass"  # over the suite's threshold, within the waiver's
        if status != "pass":
            problems.append((status, f"rank {r}: {detail}"))
    if name == DEAD_PEER:
        threshold = COMM_TIMEOUT_S + DEAD_PEER_GRACE_S if waived is None else waived
        reason = "; ".join(p for _, p in problems) or f"every surviving rank raised CommError within {threshold:g} s"
    else:
        threshold = 0.0 if waived is None else waived
        reason = "; ".join(p for _, p in problems) or (
            f"exact on all {world} ranks" if worst == 0 else f"within {threshold:g} on all {world} ranks (waived)")
    status = "pass"
    if problems:
        status = "error" if all(s == "error" for s, _ in problems) else "fail"
    return Verdict(status, metric, worst, threshold, reason, waived=(metric,) if waived is not None else ())


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    exit_with_parent(spec["parent"])  # a parent killed by a signal that skips its cleanup (SIGTERM, SIGKILL)
    _worker(int(os.environ["RANK"]), spec["world"], spec["backend"], spec["emulate"], spec["names"], spec["scratch"])
