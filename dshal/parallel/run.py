"""The parallel side of ``dshal run --tp N --ep M`` (hooked into :mod:`dshal.model.run`).

* Under ``torchrun`` (RANK / WORLD_SIZE set) every rank joins the job, builds its TP / EP
  groups and loads only its slices.
* Without torchrun, ``dshal run --tp N --ep M`` starts ``N * M`` local ranks itself
  (``python -m dshal run ...`` with torchrun's environment) and waits for them.

Every rank prints its own tokens/s; rank 0 also prints the aggregate: all ranks work on
the same sequences, so the job's rate is set by its slowest rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from dshal import comm
from dshal.error_file import error_line, record_failure
from dshal.errors import CommError, DshalError
from dshal.lifetime import exit_with_parent
from dshal.model import DictReader, tiny_args
from dshal.model.args import ModelArgs, tiny_run_args
from dshal.model.chat import INVALID_TEXT
from dshal.model.checkpoint import random_checkpoint
from dshal.model.loader import with_runtime_attention
from dshal.model.speculative import mtp_layers_for
from dshal.parallel.groups import ParallelGroups, plan_groups, setup_groups
from dshal.parallel.launch import LAUNCHER_PID_ENV, SAID_BY_ANOTHER_RANK, relaunch_self
from dshal.parallel.loading import build_parallel, from_pretrained_parallel
from dshal.parallel.transforms import sharded_skeletons
from dshal.run_command import (
    add_parallel_arguments as add_arguments,  # --tp / --ep, importable without torch (dshal run --help)
)
from dshal.runtime import current


def wanted(args: argparse.Namespace) -> bool:
    """True when this run is parallel (asked for, or started by torchrun with several ranks)."""
    for name in ("tp", "ep"):
        if getattr(args, name) < 1:
            raise DshalError(f"dshal run: --{name} is {getattr(args, name)}, expected an integer >= 1")
    raw = os.environ.get("WORLD_SIZE") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise CommError(f"dshal run: environment variable WORLD_SIZE is {raw!r}, expected an integer (torchrun sets it)") from None
    if world < 1:  # a launcher's or a script's mistake: a single-process run would hide it
        raise CommError(f"dshal run: environment variable WORLD_SIZE is {raw!r}, expected an integer >= 1 (torchrun sets it)")
    return args.tp * args.ep > 1 or world > 1


def relaunch_needed() -> bool:
    """True when no launcher started this process (no RANK in the environment)."""
    return "RANK" not in os.environ


def relaunch(args: argparse.Namespace) -> int:
    """Start ``tp * ep`` local ranks running this same command line, once the model's config
    is read and every rank's split of it checked here: an error every rank would hit is
    said once, before any rank starts."""
    argv = sys.argv[1:]
    if "run" not in argv:
        raise DshalError("dshal run --tp/--ep: start it from the command line (dshal run ... or torchrun ... -m dshal run ...)")
    model_args = ModelArgs.from_file(args.checkpoint) if args.checkpoint else tiny_args()
    try:
        for _ in sharded_skeletons(model_args, plan_groups(args.tp * args.ep, args.tp, args.ep)):
            pass  # each rank's transforms on a meta skeleton: a split the model cannot take raises
    except DshalError as err:  # name the flags that asked for the split, not only the transform
        raise type(err)(f"dshal run --tp {args.tp} --ep {args.ep}: {err}") from err
    return relaunch_self(["dshal", *argv], args.tp * args.ep)


def setup(args: argparse.Namespace) -> ParallelGroups:
    """Join the job, check that every rank was started with the same settings, and build this
    rank's groups (WORLD_SIZE must equal tp * ep)."""
    if os.environ.get(LAUNCHER_PID_ENV):  # started by relaunch(): end with the launcher
        exit_with_parent(int(os.environ[LAUNCHER_PID_ENV]))
    comm.init()
    agree(lambda: same_settings(run_settings(args)))
    return agree(lambda: setup_groups(tp=args.tp, ep=args.ep))  # e.g. tp x ep != WORLD_SIZE: said once


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every rank of one ``dshal run`` job must share: its flags and the runtime's
    configuration (the resolved backend included)."""
    flags = {f"--{name.replace('_', '-')}": value for name, value in sorted(vars(args).items())
             if not callable(value) and not name.startswith("_")}  # argparse plumbing (the parser) is no setting
    rt = current()
    return {**flags, "backend": rt.backend.name, **_dotted("config", rt.config.to_dict())}


def _dotted(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    """``{"config.precision.gemm": ...}`` from nested mappings: a difference names its key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out.update(_dotted(name, value) if isinstance(value, dict) and value else {name: value})
    return out


def same_settings(settings: dict[str, Any]) -> None:
    """CommError naming each setting that differs between ranks, and each rank's value (every
    rank must call it). Ranks started with different flags or configs would build different
    groups (a wrong "peer hung" after the whole timeout) or silently compute different models."""
    device = _device()
    text = json.dumps(settings, sort_keys=True, default=str).encode()
    sizes = comm.all_gather(torch.tensor([[len(text)]], dtype=torch.int64, device=device), dim=0).flatten().tolist()
    mine = torch.zeros(1, max(sizes), dtype=torch.uint8, device=device)
    mine[0, : len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    rows = comm.all_gather(mine, dim=0).cpu()
    everyone = [json.loads(bytes(rows[rank, :size].tolist())) for rank, size in enumerate(sizes)]
    keys = sorted(set().union(*everyone))
    differ = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in everyone}) > 1]
    if differ:
        said = "; ".join(f"{k}: " + ", ".join(f"rank {r} {s.get(k)!r}" for r, s in enumerate(everyone)) for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise CommError(f"dshal run: the ranks were started with different settings: {said}{more}; every rank of "
                        "one job needs the same command line and configuration")


def load(args: argparse.Namespace, groups: ParallelGroups, progress: Any = None) -> tuple[Any, str]:
    """This rank's part of the model: ``--checkpoint`` (``progress``: see
    :data:`dshal.model.loader.LoadProgress`) or the built-in tiny random model."""
    layout = f"TP={groups.tp_size} x EP={groups.ep_size}"
    mtp = mtp_layers_for(args.speculative)
    if args.checkpoint:
        model = from_pretrained_parallel(args.checkpoint, groups, mla_mode=args.mla_mode, mtp_layers=mtp, progress=progress)
        return model, f"{args.checkpoint} ({layout})"
    model_args = with_runtime_attention(tiny_run_args(args.mla_mode, mtp, args.dtype))
    reader = DictReader(random_checkpoint(model_args, args.seed), path=f"<random seed={args.seed}>")
    return build_parallel(model_args, reader, groups), f"built-in tiny DeepSeek-V3 (random weights, seed {args.seed}, {layout})"


def report(report: dict[str, Any], groups: ParallelGroups) -> dict[str, Any]:
    """Print this rank's tokens/s; gather every rank's on rank 0 and add the aggregate to
    ``report`` (returned). Every rank must call it."""
    rank, world = comm.get_rank(), comm.get_world_size()
    # No rate (None: e.g. --new-tokens 2 times no decode step) travels as NaN and comes back None, not 0.0.
    mine = [report.get("prefill_tokens_per_s"), report.get("decode_tokens_per_s")]
    # One write per line: print() writes the text and its newline apart, and the ranks share stdout.
    sys.stdout.write(f"rank {rank}/{world}: prefill {_per_s(mine[0])} tokens/s, decode {_per_s(mine[1])} tokens/s\n")
    sys.stdout.flush()
    sent = torch.tensor([[math.nan if x is None else x for x in mine]], dtype=torch.float64, device=_device())
    rates = comm.all_gather(sent, dim=0).cpu()
    per_rank = [{"rank": r, "prefill_tokens_per_s": _rate(p), "decode_tokens_per_s": _rate(d)} for r, (p, d) in enumerate(rates.tolist())]
    slowest = [_rate(x) for x in rates.min(dim=0).values.tolist()]  # NaN where any rank has no rate
    report["parallel"] = {
        "tp": groups.tp_size,
        "ep": groups.ep_size,
        "world_size": world,
        "placement": groups.plan.reason,
        "per_rank": per_rank,
        "aggregate_prefill_tokens_per_s": slowest[0],
        "aggregate_decode_tokens_per_s": slowest[1],
    }
    if rank == 0:
        print(aggregate_line(report), flush=True)
    return report


def aggregate_line(report: dict[str, Any]) -> str:
    """Rank 0's line on the job's aggregate tokens/s (``report["parallel"]`` set by :func:`report`)."""
    par = report["parallel"]
    # every sequence of the run: several --prompt-file batches hold more than one batch's rows
    sequences = len(report.get("sequences") or ()) or report["batch"]
    return (f"aggregate over {par['world_size']} ranks (TP={par['tp']} x EP={par['ep']}; all ranks produce the same "
            f"{sequences} sequence(s), so the slowest rank sets the pace): prefill "
            f"{_per_s(par['aggregate_prefill_tokens_per_s'])} tokens/s, decode {_per_s(par['aggregate_decode_tokens_per_s'])} "
            f"tokens/s; placement: {par['placement']}")


def _rate(value: float) -> float | None:
    return None if math.isnan(value) else value


def _per_s(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.1f}"


def is_reporting_rank() -> bool:
    """Rank 0 prints the full report (and writes --json)."""
    return comm.get_rank() == 0


def finish() -> None:
    """Leave the job together: every rank waits for the others, then tears its groups down.
    (A rank that tore down while a peer was still finishing its last collective could end that
    peer with gloo's "terminate called without an active exception", seen under load.)"""
    comm.barrier()
    comm.shutdown()


def ranks_sharing(device: torch.device) -> int:
    """How many of this host's ranks allocate from ``device``'s memory: all of them for a
    device without an index (the host's memory: cpu, emulated GPU plugins), else one."""
    return comm.launch_env().local_world_size if torch.device(device).index is None else 1


def agree(check: Callable[[], Any]) -> Any:
    """Run ``check`` on every rank (every rank must call this) and return its result. When
    it raises a DshalError on any rank, the lowest such rank raises its error and the others
    leave the job and exit with :data:`~dshal.parallel.launch.SAID_BY_ANOTHER_RANK` without a
    word: an error the ranks share is said once, not N times. Under torchrun each of them
    describes its exit in its error file with the speaker's line (:func:`_leave_after`): the
    agent's summary on every node then names the error, not only exit codes."""
    result, error = None, None
    try:
        result = check()
    except DshalError as err:
        error = err
    said = b"" if error is None else error_line("run", error).encode("utf-8", "backslashreplace")
    # each rank's line length + 1 (0: no error): who failed, and what the speaker will send
    sizes = comm.all_gather(torch.tensor([[0 if error is None else len(said) + 1]], dtype=torch.int64, device=_device()),
                            dim=0).flatten().tolist()
    failed = [rank for rank, size in enumerate(sizes) if size]
    if not failed:
        return result
    speaker, rank = failed[0], comm.get_rank()
    line = _speakers_line(said, speaker, sizes[speaker] - 1)
    finish()
    if rank == speaker:
        raise error
    _leave_after(rank, speaker, line, met_too=error is not None)


def _speakers_line(said: bytes, speaker: int, size: int) -> str | None:
    """The speaker's error line on every rank (None where the job cannot pass it: the
    followers then leave without it)."""
    if size == 0:
        return ""
    device = _device()
    payload = torch.frombuffer(bytearray(said), dtype=torch.uint8).to(device) if comm.get_rank() == speaker else \
        torch.zeros(size, dtype=torch.uint8, device=device)
    try:
        payload = comm.broadcast(payload, src=speaker)
    except DshalError:
        return None
    return bytes(payload.cpu().tolist()).decode("utf-8", "replace")


def _leave_after(rank: int, speaker: int, line: str | None, *, met_too: bool) -> NoReturn:
    """Exit :data:`~dshal.parallel.launch.SAID_BY_ANOTHER_RANK`, silent on stderr: ``rank``
    (this one) leaves the job because rank ``speaker`` says ``line``; under torchrun the error file says so (a consequence,
    stamped after the speaker's own failure: the agent's root cause stays the speaker on its
    node, and a node without the speaker still shows the error)."""
    why = f"met the error rank {speaker} said" if met_too else f"left the job because rank {speaker} failed"
    record_failure(f"dshal run: rank {rank} {why}: {line}" if line else f"dshal run: rank {rank} {why} (see rank {speaker}'s "
                   "output)", consequence=True)
    raise SystemExit(SAID_BY_ANOTHER_RANK)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this)."""
    flags = comm.all_gather(torch.tensor([[1.0 if flag else 0.0]], device=_device()), dim=0)
    return bool(flags.any())


#: Seconds between rank 0's "still waiting for the user" broadcasts while a chat is idle:
#: no collective of the other ranks waits longer than that, far under the comm timeout.
INPUT_POLL_S = 5.0
_WAITING, _LINE, _END = 0, 1, 2


def shared_input(read: Callable[[str], str] = input, poll_s: float = INPUT_POLL_S) -> Callable[[str], str]:
    """A ``read(prompt)`` for every rank of the job: rank 0 reads a line with ``read`` (the
    terminal), and every rank returns that line; at the end of rank 0's input every rank
    raises EOFError (every rank must call it). Rank 0 reads in a thread and, while the user
    is typing, broadcasts "still waiting" every ``poll_s`` seconds, so the other ranks wait in
    collectives of that length rather than one that the comm timeout would end."""
    lines: queue.Queue = queue.Queue()

    def read_into_queue(prompt: str) -> None:
        try:
            lines.put((_LINE, read(prompt)))
        except EOFError:
            lines.put((_END, ""))
        except UnicodeDecodeError:  # a strict locale: a line not in UTF-8, which chat() refuses on every rank
            lines.put((_LINE, INVALID_TEXT))
        except Exception as err:  # noqa: BLE001 - a terminal's I/O error: the input ends
            print(f"dshal run: reading the terminal failed ({type(err).__name__}: {err}); ending the chat", file=sys.stderr)
            lines.put((_END, ""))

    def read_shared(prompt: str) -> str:
        device = _device()
        if comm.get_rank() == 0:
            threading.Thread(target=read_into_queue, args=(prompt,), daemon=True).start()
            while True:
                try:
                    status, text = lines.get(timeout=poll_s)
                except queue.Empty:
                    status, text = _WAITING, ""
                data = text.encode("utf-8", "surrogateescape")  # undecodable bytes travel as they came
                comm.broadcast(torch.tensor([status, len(data)], dtype=torch.int64, device=device), src=0)
                if status != _WAITING:
                    break
        else:
            while True:
                header = comm.broadcast(torch.zeros(2, dtype=torch.int64, device=device), src=0)
                status, size = (int(v) for v in header.tolist())
                if status != _WAITING:
                    break
        if status == _END:
            raise EOFError
        if comm.get_rank() == 0:
            payload = torch.tensor(list(data), dtype=torch.uint8, device=device)
        else:
            payload = torch.zeros(size, dtype=torch.uint8, device=device)
        if payload.numel():
            payload = comm.broadcast(payload, src=0)
        return bytes(payload.cpu().tolist()).decode("utf-8", "surrogateescape")

    return read_shared


def _device() -> torch.device:
    return current().device


__all__ = ["INPUT_POLL_S", "add_arguments", "aggregate_line", "agree", "any_rank", "finish", "is_reporting_rank", "load", "relaunch", "relaunch_needed", "ranks_sharing", "report", "setup", "shared_input", "wanted"]
