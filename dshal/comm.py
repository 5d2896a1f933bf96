"""Collectives over ``torch.distributed``, with dshal errors instead of hangs.

The process-group backend comes from the active dshal backend's capabilities
(``gloo`` for cpu, ``nccl`` for NVIDIA/ROCm, ``hccl`` for Ascend); ``torchrun`` (or the
caller) provides RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

Failure policy: every collective is bounded by ``distributed.timeout_s``. When one fails
(a peer died, hung past the timeout, or a group is misused) it raises
:class:`~dshal.CommError` naming the collective and the group, and the process group is
torn down, so the peers blocked on this rank fail fast too and nothing waits forever in
interpreter shutdown. Later collectives raise the same error straight away.

Every collective is issued asynchronously and then waited for with ``work.wait(timeout)``,
which blocks the host until the work is done or the timeout passes, on every process-group
type: NCCL/RCCL/HCCL collectives are asynchronous, so without that wait a dead peer would
only show as a hang at the next synchronization. A failed device process group is
*aborted* (``ncclCommAbort``: returns at once) rather than destroyed (which waits on the
dead peer); a gloo one is destroyed. Device process groups are created with a timeout a
little past ``distributed.timeout_s``, so this wait, not the watchdog, reports first.
Inside :func:`dshal.ops.trusted` (the model core's decode steps, graph capture) collectives on
device tensors are not waited for on the host: they stay asynchronous and capturable, and
a peer that dies then is caught by the process group's watchdog
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``), which ends the process instead of hanging it.

Checked mode (the default; off inside :func:`dshal.ops.trusted`): before each collective
the ranks exchange what they are about to do -- the collective, the tensor's dtype and
shape, the reduce op / dim / source, and for ``all_to_all`` every rank's split sizes -- and
a disagreement raises :class:`~dshal.CommError` on every rank, naming the ranks and what
each passed, instead of aborting the process (gloo) or returning uninitialized rows.
Cost: one extra ``all_gather`` of ``13 + 2 * world_size`` int64 per collective and a
device-to-host copy of it (a host sync on accelerators): about one small-message latency
(tens of microseconds on NVLink, ~0.1-1 ms on gloo over loopback). The group stays usable
after such an error. An ``all_to_all`` with ``input_splits`` only needs no separate split
exchange in checked mode: the agreement exchange carries the sizes.

``all_to_all`` split sizes: ``input_splits[i]`` rows of ``t`` go to rank i. When
``output_splits`` is None and ``input_splits`` is given, the ranks first exchange their
split sizes (one small extra all_to_all), so uneven and empty splits need no bookkeeping
by the caller; when both are None, ``t`` is split evenly and every rank must pass the same
number of rows (as in ``torch.distributed``).

Layering: the communicator classes sit below the runtime (a backend's ``communicator()``
builds them), so this module imports nothing of :mod:`dshal.runtime`; the module-level
collectives reach the active backend through the public ``dshal.current()`` at call time.
"""

from __future__ import annotations

import abc
import atexit
import datetime
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import dshal
from dshal.config import MAX_TIMEOUT_S
from dshal.errors import CommError, ConfigError, DeviceError, DTypeError, ProviderError, ShapeError
from dshal.lifetime import arm_termination_watchdog
from dshal.ops.mode import checking

log = logging.getLogger(__name__)

#: Reductions every communicator supports. ``avg`` is a sum divided by the group size,
#: computed the same way on every process-group backend (gloo has no native AVG in older torch).
REDUCE_OPS: Mapping[str, Any] = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "avg": dist.ReduceOp.SUM,
    "product": dist.ReduceOp.PRODUCT,
}

# torch >= 2.10 renamed the single-tensor collectives; older releases keep the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# The process-wide record of the distributed session: the timeout every group uses and
# the first failure (after which the process group is gone and every collective refuses).
#: The joined job: its timeout, first failure, device type, backend and the process groups made
#: (the world's, then :func:`new_groups`'), which a failure aborts.
_session: dict[str, Any] = {
    "timeout_s": None, "failure": None, "device_type": "cpu", "leaves_at_exit": False, "backend": None, "groups": [],
    "environment": {},  # variables dshal set for the collective library (Backend.process_group_environment)
}


def _reduce_op(op: str, collective: str, t: torch.Tensor) -> Any:
    if not isinstance(op, str) or op not in REDUCE_OPS:
        raise CommError(f"{collective}: argument 'op' is {op!r}, expected one of {', '.join(REDUCE_OPS)}")
    if op == "avg" and not t.is_floating_point():
        raise DTypeError(f"{collective}: op='avg' needs a floating-point tensor, argument 't' has dtype {t.dtype}")
    if t.is_complex() and op not in ("sum", "avg"):  # torch refuses it at issue, and the group was torn down
        raise DTypeError(f"{collective}: op={op!r} has no order on complex numbers, argument 't' has dtype {t.dtype}; "
                         "expected op 'sum' or 'avg'")
    return REDUCE_OPS[op]


#: The dtypes a gloo process group moves and reduces, measured with torch 2.13 (all_reduce and
#: broadcast of each dtype between two gloo ranks): int16, the unsigned ints wider than 8 bits
#: and every float8 fail inside gloo with "Invalid scalar type", which shuts the group down.
GLOO_DTYPES = frozenset({
    torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.complex64,
    torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
})


def _rows_as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t [R, ...]`` as ``uint8 [R, bytes per row]``: the same memory, for a
    collective that only moves rows (the backend never needs to know the dtype)."""
    return t.view(torch.uint8).reshape(t.shape[0], t.element_size() * math.prod(t.shape[1:]))


def _check_tensor(collective: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{collective}: argument 't' is a {type(t).__name__}, expected a torch.Tensor")


def _check_writable(collective: str, t: torch.Tensor) -> None:
    """An in-place collective writes every element of ``t``: an expanded view (a stride 0 over
    a dim of several elements) cannot take the result, and the copy back failed inside torch
    after the data had moved."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ShapeError(
            f"{collective}: argument 't' is an expanded view (shape {list(t.shape)}, strides {list(t.stride())}), "
            "expected a tensor whose elements do not share memory: the result is written into it (pass t.clone())"
        )


def _check_dim(collective: str, t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0:
        raise ShapeError(f"{collective}: argument 't' is a 0-d tensor, expected at least 1 dim (the one to split or join along)")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -t.dim() <= dim < t.dim():
        raise ShapeError(f"{collective}: argument 'dim' is {dim!r}, expected an int in [{-t.dim()}, {t.dim()}) for a {t.dim()}-d tensor")
    return dim % t.dim()


def group_name(group: Any = None) -> str:
    """A readable name for ``group``: its description (``tp``, ``ep``...) and global ranks."""
    if group is None:
        return "world group" if not dist.is_initialized() else f"world group (ranks 0..{dist.get_world_size() - 1})"
    desc = getattr(group, "group_desc", "") or getattr(group, "group_name", "") or "unnamed"
    try:
        ranks = dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError, KeyError):  # KeyError: torch forgot a group torn down after a failure
        return f"group {desc!r}"
    return f"group {desc!r} (global ranks {ranks})"


def _explain(err: BaseException) -> str:
    low = str(err).lower()
    if "timed out" in low or "timeout" in low:
        return "a peer did not answer within distributed.timeout_s (it hung or died silently)"
    if any(s in low for s in ("connection reset", "connection closed", "broken pipe", "connection refused", "eof")):
        return "a peer closed its connection (it probably died)"
    return "the process-group backend reported an error"


def _peer_failed(err: BaseException) -> bool:
    """Whether :func:`_explain` reads ``err`` as a peer's failure (closed, or silent)."""
    return _explain(err).startswith("a peer")


def teardown_action(device_type: str) -> str:
    """How a failed process group is torn down: ``"abort"`` for one carrying device tensors
    (NCCL/RCCL/HCCL: destroying it would wait on the dead peer's unfinished work, aborting
    returns at once), ``"destroy"`` for gloo (host tensors: nothing in flight to wait on)."""
    return "destroy" if device_type == "cpu" else "abort"


def host_waits(device_type: str, checking: bool) -> bool:
    """Whether a collective on ``device_type`` tensors is waited for on the host (bounded by
    the timeout): always for host tensors (gloo), and for device tensors in checked mode;
    inside ``ops.trusted()`` device collectives stay asynchronous (graph capture, decode)."""
    return device_type == "cpu" or checking


#: A device collective's completion is checked continuously for this long (a small message
#: on NVLink takes tens of us), then every ``DEVICE_POLL_S`` (plus the kernel's timer slack,
#: ~50 us on Linux) while the host waits for it.
DEVICE_SPIN_S = 200e-6
DEVICE_POLL_S = 20e-6


def wait_on_host(work: Any, timeout_s: float, device_type: str) -> None:
    """Block until ``work`` (an async collective's handle) completes, at most ``timeout_s``;
    RuntimeError when it does not. gloo's ``wait(timeout)`` sleeps on a condition variable.
    A device group's (NCCL/RCCL/HCCL) ``wait(timeout)`` polls with a fixed sleep between
    checks (1 ms in current torch, 10 ms in older builds): a floor on every checked collective
    far above a small message's latency. Device work is polled here at ``DEVICE_POLL_S``
    through ``is_completed()`` (true also when the work failed), continuously for its first
    ``DEVICE_SPIN_S``, then ``wait()`` raises its error, if any, and orders the current stream
    after it."""
    if device_type == "cpu":
        if work.wait(timeout=datetime.timedelta(seconds=timeout_s)) is False:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for the collective")
        return
    start = time.monotonic()
    deadline, spin_until = start + timeout_s, start + DEVICE_SPIN_S
    while not work.is_completed():
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for the collective")
        if now > spin_until:
            time.sleep(DEVICE_POLL_S)
    work.wait()


def collective_device(args: Sequence[Any]) -> str:
    """The device type a collective with these arguments runs on: its first tensor's; none (a
    barrier): the process group's, the device this process joined the job with. A failed
    barrier on an NCCL group is then aborted, not destroyed (a destroy flushes its
    communicators, which can block on a dead peer)."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return tensor.device.type if tensor is not None else (_session.get("device_type") or "cpu")


def _teardown(device_type: str = "cpu") -> None:
    """Tear down every process group so peers blocked on this rank fail fast and exit cleanly."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    aborting = teardown_action(device_type) == "abort"
    groups, _session["groups"] = _session["groups"], []
    try:
        if aborting and _session["backend"] is not None:
            _session["backend"].abort_communicators(groups)  # a library torch's abort does not reach (HCCL)
    except Exception as err:  # noqa: BLE001 - the groups are torn down below whatever the hook did
        log.warning("dshal.comm: %s.abort_communicators failed: %s: %s", _session["backend"].name, type(err).__name__, err)
    try:
        if aborting and abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except (RuntimeError, ValueError, AssertionError):  # already half torn down: nothing left to free
        pass


# ---------------------------------------------------------------- the agreement check (checked mode)
#: Dims of a tensor carried in full by the agreement record (the product of any further ones rides in the last).
_RECORD_DIMS = 8
#: Record layout: [collective, dtype, arg (op/dim/src), ndim, numel, dims x 8, input splits x n, output splits x n].
_RECORD_HEAD = 5 + _RECORD_DIMS
COLLECTIVE_NAMES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def _code(text: str) -> int:
    """A stable integer for a name (dtype, collective, reduce op), the same on every rank."""
    return zlib.crc32(text.encode())


_NAMES_BY_CODE = {
    _code(n): n
    for n in (
        *COLLECTIVE_NAMES,
        *REDUCE_OPS,
        *(f"{op}/{dim}" for op in REDUCE_OPS for dim in range(_RECORD_DIMS)),  # reduce_scatter's op and dim
        *(str(v) for v in vars(torch).values() if isinstance(v, torch.dtype)),
    )
}


def agreement_record(
    collective: str, t: torch.Tensor, arg: str | int, world: int,
    input_splits: Sequence[int] | None = None, output_splits: Sequence[int] | None = None,
) -> list[int]:
    """What this rank is about to do, as ``13 + 2 * world`` integers (the same length on every
    rank whatever it does, so the exchange itself cannot disagree). ``-1`` marks unknown splits."""
    dims = list(t.shape[:_RECORD_DIMS])
    if t.dim() > _RECORD_DIMS:
        dims[-1] = int(torch.tensor(t.shape[_RECORD_DIMS - 1 :]).prod())
    dims += [0] * (_RECORD_DIMS - len(dims))
    arg_code = _code(arg) if isinstance(arg, str) else int(arg)
    ins = list(input_splits) if input_splits is not None else [-1] * world
    outs = list(output_splits) if output_splits is not None else [-1] * world
    return [_code(collective), _code(str(t.dtype)), arg_code, t.dim(), t.numel(), *dims, *ins, *outs]


def _describe_record(record: Sequence[int]) -> str:
    ndim = record[3]
    shape = list(record[5 : 5 + min(ndim, _RECORD_DIMS)])
    name = _NAMES_BY_CODE.get(record[1], "an unknown dtype").replace("torch.", "")
    return f"{_NAMES_BY_CODE.get(record[0], '?')} of {name} {shape}"


def disagreement(collective: str, records: Sequence[Sequence[int]], ranks: Sequence[int], arg_name: str) -> str | None:
    """Why the ranks' records (one per group rank, see :func:`agreement_record`) disagree, or
    None when they agree. ``ranks`` are the global ranks, for the message."""
    n = len(records)
    first = records[0]

    def split(what: str, key: Any) -> str | None:
        groups: dict[Any, list[int]] = {}
        for rank, rec in zip(ranks, records):
            groups.setdefault(key(rec), []).append(rank)
        if len(groups) == 1:
            return None
        seen = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {_describe_record(records[ranks.index(rs[0])])}"
            + (f" ({arg_name} {_NAMES_BY_CODE.get(k, k) if isinstance(k, int) else k})" if what == arg_name else "")
            for k, rs in groups.items()
        )
        return f"the ranks disagree on {what} ({seen})"

    head = _RECORD_HEAD
    problems = [
        split("the collective", lambda r: r[0]),
        split("the dtype of 't'", lambda r: r[1]),
    ]
    if collective == "all_to_all":
        problems.append(split("the shape of 't' past dim 0", lambda r: (r[3], tuple(r[6:head]))))
    else:
        problems.append(split("the shape of 't'", lambda r: (r[3], r[4], tuple(r[5:head]))))
    if arg_name:
        problems.append(split(arg_name, lambda r: r[2]))
    found = next((p for p in problems if p), None)
    if found or collective != "all_to_all" or first[0] != _code("all_to_all"):
        return found
    for src in range(n):
        for dst in range(n):
            sent, expected = records[src][head + dst], records[dst][head + n + src]
            if expected >= 0 and sent != expected:
                return (
                    f"the split sizes disagree: rank {ranks[src]} sends {sent} rows to rank {ranks[dst]} (its input_splits), "
                    f"but rank {ranks[dst]} expects {expected} rows from rank {ranks[src]} (its output_splits)"
                )
    return None


class Communicator(abc.ABC):
    """Collectives over one process group. Backends may return their own subclass from
    :meth:`dshal.Backend.communicator`."""

    @abc.abstractmethod
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place reduction of ``t`` over the group; returns ``t``."""

    @abc.abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation along ``dim`` of ``t`` from every rank, in rank order."""

    @abc.abstractmethod
    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        """This rank's chunk (along ``dim``) of the reduction of ``t``."""

    @abc.abstractmethod
    def all_to_all(
        self, t: torch.Tensor, output_splits: Sequence[int] | None = None, input_splits: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Rows ``input_splits[i]`` of ``t`` go to rank i; returns the rows every rank sent here."""

    @abc.abstractmethod
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` of group rank ``src`` on every rank, in place."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""

    def exchange_splits(self, input_splits: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
        """The row counts every rank will send here, given the counts this rank sends to each
        rank (one all_to_all of ``world_size`` integers; ``device``: where the process-group
        backend wants that small tensor)."""
        sizes = torch.tensor([int(s) for s in input_splits], dtype=torch.int64, device=device)
        return self.all_to_all(sizes).tolist()

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's rank within the group."""

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """Number of ranks in the group."""


class ProcessGroupCommunicator(Communicator):
    """Collectives on a torch.distributed process group (None = the world group)."""

    def __init__(self, group: Any = None):
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            raise CommError("communicator: this rank is not a member of the group it was given (torch returned NON_GROUP_MEMBER)")
        self.group = group

    @property
    def rank(self) -> int:
        self._check_ready("rank")
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        self._check_ready("world_size")
        return dist.get_world_size(self.group)

    def _check_ready(self, collective: str) -> None:
        failure = _session["failure"]
        if failure is not None:
            raise CommError(f"{collective} on the {group_name(self.group)}: the process group was shut down after an earlier failure: {failure}")
        if not dist.is_initialized():
            raise CommError(f"{collective}: torch.distributed is not initialized; call dshal.comm.init() first, in every rank (torchrun, or MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE, only describe the job)")

    def _devices(self) -> list[str] | None:
        """The device types this group's backend takes (torch's ``Backend.backend_capability``:
        gloo cpu and cuda, nccl cuda, ...), or None where torch does not say."""
        backend = self._backend()
        return None if backend is None else dist.Backend.backend_capability.get(backend)

    def _moves_as_is(self, t: torch.Tensor) -> bool:
        """Whether the group's backend takes ``t``'s dtype (gloo: :data:`GLOO_DTYPES`; others:
        assumed, where it is not measured)."""
        return not (self._backend() == "gloo" and t.dtype not in GLOO_DTYPES)

    def _backend(self) -> str | None:
        """The group's process-group backend (``gloo``, ``nccl``...), or None where there is none
        to ask (not initialized, or a simulated group)."""
        if not dist.is_initialized() or not (self.group is None or isinstance(self.group, dist.ProcessGroup)):
            return None
        return str(dist.get_backend(self.group))

    def _check_reducible(self, collective: str, t: torch.Tensor) -> None:
        """A reduction needs the backend to do arithmetic in ``t``'s dtype: refused before any
        data moves (inside gloo it would shut the process group down for every rank)."""
        if not self._moves_as_is(t):
            allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in GLOO_DTYPES))
            raise DTypeError(f"{collective}: argument 't' has dtype {t.dtype}, which the gloo process group cannot "
                             f"reduce; expected one of {allowed}")

    def _check_device(self, collective: str, t: torch.Tensor) -> None:
        """``t`` must be on a device the group's backend takes: a wrong one would fail inside
        the collective and tear the process group down for every rank."""
        devices = self._devices()
        if devices is not None and t.device.type not in devices:
            raise DeviceError(
                f"{collective}: argument 't' is on device {t.device}, expected a tensor on {' or '.join(devices)} "
                f"(what the {dist.get_backend(self.group)} process group moves)"
            )

    def _run(self, collective: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Issue ``fn(*args, async_op=True, **kwargs)`` and wait for it (see the module
        docstring: on the host, bounded by the timeout, except for device tensors inside
        ``ops.trusted()``); a failure becomes a CommError and tears the process group down.
        The collective's device: :func:`collective_device`."""
        device = torch.device(collective_device(args))
        self._check_ready(collective)
        start = time.monotonic()
        try:
            work = fn(*args, async_op=True, **kwargs)
            if work is not None:
                if host_waits(device.type, checking()):
                    wait_on_host(work, _session["timeout_s"] or 300.0, device.type)
                else:
                    work.wait()  # the current stream waits for it; the host does not
        except (RuntimeError, ValueError) as err:  # gloo/nccl raise DistBackendError (a RuntimeError)
            where = group_name(self.group)
            message = (
                f"{collective} on the {where} failed on global rank {dist.get_rank()} after "
                f"{time.monotonic() - start:.1f} s (distributed.timeout_s = {_session['timeout_s']}): "
                f"{_explain(err)}. torch said: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            )
            _session["failure"] = message
            _teardown(device.type)
            raise CommError(message, peer_failed=_peer_failed(err)) from err

    def _agree(
        self, collective: str, t: torch.Tensor, arg_name: str = "", arg: str | int = 0,
        input_splits: Sequence[int] | None = None, output_splits: Sequence[int] | None = None,
    ) -> list[list[int]] | None:
        """Checked mode: exchange every rank's :func:`agreement_record` and raise CommError on
        every rank when they disagree. Returns the records (None inside ``ops.trusted()``)."""
        if not checking() or not (self.group is None or isinstance(self.group, dist.ProcessGroup)):
            return None  # trusted, or a group that is not a torch.distributed one: no peers to ask
        n = self.world_size
        mine = torch.tensor(agreement_record(collective, t, arg, n, input_splits, output_splits), dtype=torch.int64)
        length = mine.numel()
        gathered = torch.empty(n * length, dtype=torch.int64, device=t.device)
        self._run(f"{collective} (agreement check)", _all_gather_single, gathered, mine.to(t.device), group=self.group)
        flat = gathered.tolist()
        records = [flat[i * length : (i + 1) * length] for i in range(n)]
        ranks = list(range(n)) if self.group is None else dist.get_process_group_ranks(self.group)
        why = disagreement(collective, records, ranks, arg_name)
        if why:
            raise CommError(
                f"{collective} on the {group_name(self.group)}: {why}; every rank of the group must make the same call "
                "(found by dshal's checked mode before any data moved; the group is still usable)"
            )
        return records

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self._check_ready("all_reduce")  # before anything asks the group its size
        _check_tensor("all_reduce", t)
        _check_writable("all_reduce", t)
        self._check_device("all_reduce", t)
        reduce_op = _reduce_op(op, "all_reduce", t)
        self._check_reducible("all_reduce", t)
        self._agree("all_reduce", t, "op", op)
        buf = t.contiguous()  # backends reduce the storage in order: a strided view would mix elements
        self._run("all_reduce", dist.all_reduce, buf, op=reduce_op, group=self.group)
        if op == "avg":
            buf.div_(self.world_size)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_ready("all_gather")  # before anything asks the group its size
        _check_tensor("all_gather", t)
        self._check_device("all_gather", t)
        dim = _check_dim("all_gather", t, dim)
        n = self.world_size
        src = t.movedim(dim, 0).contiguous() if dim else t.contiguous()
        self._agree("all_gather", t, "dim", dim)
        out = src.new_empty((n * src.shape[0], *src.shape[1:]))
        if self._moves_as_is(src):
            self._run("all_gather", _all_gather_single, out, src, group=self.group)
        else:  # rows as bytes (FP8 on gloo): moved, never computed on
            self._run("all_gather", _all_gather_single, _rows_as_bytes(out), _rows_as_bytes(src), group=self.group)
        return out.movedim(0, dim) if dim else out

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        self._check_ready("reduce_scatter")  # before anything asks the group its size
        _check_tensor("reduce_scatter", t)
        self._check_device("reduce_scatter", t)
        dim = _check_dim("reduce_scatter", t, dim)
        n = self.world_size
        if t.shape[dim] % n:
            raise ShapeError(
                f"reduce_scatter: argument 't' has size {t.shape[dim]} in dim {dim}, expected a multiple of the group size {n}"
            )
        reduce_op = _reduce_op(op, "reduce_scatter", t)
        self._check_reducible("reduce_scatter", t)
        self._agree("reduce_scatter", t, "op and dim", f"{op}/{dim}")
        src = t.movedim(dim, 0).contiguous() if dim else t.contiguous()
        out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
        self._run("reduce_scatter", _reduce_scatter_single, out, src, op=reduce_op, group=self.group)
        if op == "avg":
            out.div_(n)
        return out.movedim(0, dim) if dim else out

    def _splits(self, name: str, splits: Sequence[int], n: int, rows: int | None) -> list[int]:
        sizes = [int(s) for s in splits] if not isinstance(splits, torch.Tensor) else splits.tolist()
        if len(sizes) != n or any(s < 0 for s in sizes) or (rows is not None and sum(sizes) != rows):
            want = f"{n} non-negative sizes" + (f" summing to {rows} (the rows of 't')" if rows is not None else "")
            raise ShapeError(f"all_to_all: argument {name!r} is {sizes}, expected {want}")
        return sizes

    def all_to_all(
        self, t: torch.Tensor, output_splits: Sequence[int] | None = None, input_splits: Sequence[int] | None = None
    ) -> torch.Tensor:
        self._check_ready("all_to_all")  # before anything asks the group its size
        _check_tensor("all_to_all", t)
        self._check_device("all_to_all", t)
        if t.dim() == 0:
            raise ShapeError("all_to_all: argument 't' is a 0-d tensor, expected at least 1 dim (rows to exchange)")
        n = self.world_size
        rows = t.shape[0]
        if input_splits is None:
            if rows % n:
                raise ShapeError(
                    f"all_to_all: argument 't' has {rows} rows, expected a multiple of the group size {n} (or pass input_splits)"
                )
            ins = [rows // n] * n
            outs = ins if output_splits is None else self._splits("output_splits", output_splits, n, None)
        else:
            ins = self._splits("input_splits", input_splits, n, rows)
            outs = None if output_splits is None else self._splits("output_splits", output_splits, n, None)
        records = self._agree("all_to_all", t, input_splits=ins, output_splits=outs)
        if outs is None:  # what every rank sends here: from the agreement records, else one exchange
            me = self.rank
            outs = [rec[_RECORD_HEAD + me] for rec in records] if records is not None else self.exchange_splits(ins, t.device)
        src = t.contiguous()
        out = src.new_empty((sum(outs), *src.shape[1:]))
        if len(set(ins)) == 1 and len(set(outs)) == 1 and ins[0] == outs[0]:
            ins = outs = None  # even exchange: the backend's plain all-to-all, faster than the split-size variant
        if self._moves_as_is(src):
            self._run("all_to_all", dist.all_to_all_single, out, src, outs, ins, group=self.group)
        else:  # rows as bytes (FP8 on gloo): the splits count rows either way
            self._run("all_to_all", dist.all_to_all_single, _rows_as_bytes(out), _rows_as_bytes(src), outs, ins,
                      group=self.group)
        return out

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_ready("broadcast")  # before anything asks the group its size
        _check_tensor("broadcast", t)
        _check_writable("broadcast", t)
        self._check_device("broadcast", t)
        n = self.world_size
        if not isinstance(src, int) or not 0 <= src < n:
            raise CommError(f"broadcast: argument 'src' is {src!r}, expected a group rank in [0, {n})")
        global_src = src if self.group is None else dist.get_global_rank(self.group, src)
        self._agree("broadcast", t, "src", src)
        buf = t.contiguous()  # backends write the storage in order: a strided view would get the wrong elements
        payload = buf if self._moves_as_is(buf) else buf.reshape(-1).view(torch.uint8)  # bytes: FP8 on gloo
        self._run("broadcast", dist.broadcast, payload, src=global_src, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def barrier(self) -> None:
        self._run("barrier", dist.barrier, group=self.group)


# ---------------------------------------------------------------- simulated groups


@dataclass(frozen=True)
class Transfer:
    """One collective a simulated rank took part in: ``payload`` bytes of its tensor and
    ``wire`` bytes this rank sends over links (ring all-reduce ``2(n-1)/n``, all-gather /
    reduce-scatter ``(n-1)/n`` of the full tensor, all-to-all: the rows for other ranks)."""

    collective: str
    group: str
    payload: int
    wire: int


@dataclass
class SimulatedGroup:
    """A group that exists only on paper: ``size`` ranks, this process playing ``rank``.

    The parallel transforms and layers take it wherever they take a process group
    (``dshal plan`` builds each rank's part of a model this way, on the meta device). Its
    collectives run :class:`ProcessGroupCommunicator`'s own argument checks and shape
    rules; only the wire is replaced: each call is logged in ``traffic`` and its output
    has the right shape (on real tensors, values as if every rank held this rank's data).
    An all-to-all whose peers' counts are unknown assumes symmetric traffic: every rank
    sends this one what this one sends it (balanced routing).
    """

    size: int
    rank: int
    name: str = "simulated"
    traffic: list[Transfer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1 or not isinstance(self.rank, int) or not 0 <= self.rank < self.size:
            raise CommError(f"SimulatedGroup: rank {self.rank!r} of size {self.size!r}, expected 0 <= rank < size")


class SimulatedCommunicator(ProcessGroupCommunicator):
    """The collectives of a :class:`SimulatedGroup`: the real communicator's checks, a log for the wire."""

    def __init__(self, group: SimulatedGroup):
        self.group = group

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.size

    def _check_ready(self, collective: str) -> None:
        return None

    def _devices(self) -> list[str] | None:
        return None  # any device, meta included: nothing moves

    def _run(self, collective: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        n = self.group.size
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        if collective == "all_reduce":
            payload = nbytes(args[0])
            wire = 2 * (n - 1) * payload // n
        elif collective in ("all_gather", "reduce_scatter"):
            out, src = args[0], args[1]
            full = nbytes(out) if collective == "all_gather" else nbytes(src)
            payload, wire = full, (n - 1) * full // n
            if not out.is_meta:
                out.copy_(src.repeat(n, *[1] * (src.dim() - 1)) if collective == "all_gather" else src.narrow(0, 0, out.shape[0]))
        elif collective == "all_to_all":
            out, src, ins = args[0], args[1], args[3]
            row = nbytes(src) // max(src.shape[0], 1)
            mine = src.shape[0] // n if ins is None else ins[self.rank]
            payload, wire = nbytes(src), (src.shape[0] - mine) * row
            if not out.is_meta:
                out.copy_(src) if out.shape == src.shape else out.zero_()
        else:  # broadcast, barrier: nothing moves that the plan counts
            payload = wire = 0
        self.group.traffic.append(Transfer(collective, self.group.name, payload, wire))
        return None

    def exchange_splits(self, input_splits: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
        # split sizes are plain numbers, even in a meta-device run: exchange them on the CPU
        return super().exchange_splits(input_splits, "cpu")

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        _check_tensor("broadcast", t)
        _check_writable("broadcast", t)
        if not isinstance(src, int) or not 0 <= src < self.group.size:
            raise CommError(f"broadcast: argument 'src' is {src!r}, expected a group rank in [0, {self.group.size})")
        self._run("broadcast", dist.broadcast, t)
        return t

    def barrier(self) -> None:
        self._run("barrier", dist.barrier)


# ---------------------------------------------------------------- launch and groups


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` (or the caller) told this process about the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    #: torchrun's restart counter (TORCHELASTIC_RESTART_COUNT); keys this attempt's records in
    #: the store torchrun's agent keeps for every attempt.
    restart: int = 0


def _int_env(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise CommError(f"init: environment variable {key} is not set; launch with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
        return default
    try:
        return int(raw)
    except ValueError:
        raise CommError(f"init: environment variable {key} is {raw!r}, expected an integer") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read and check torchrun's environment (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise CommError(f"init: environment variables {missing} are not set; launch with torchrun (or set them by hand)")
    rank = _int_env(environ, "RANK")
    world_size = _int_env(environ, "WORLD_SIZE")
    if world_size < 1:
        raise CommError(f"init: WORLD_SIZE is {world_size}, expected a positive number of ranks")
    if not 0 <= rank < world_size:
        raise CommError(f"init: RANK is {rank}, expected 0 <= RANK < WORLD_SIZE ({world_size}); is WORLD_SIZE the same on every rank?")
    local_world_size = _int_env(environ, "LOCAL_WORLD_SIZE", world_size)
    local_rank = _int_env(environ, "LOCAL_RANK", rank % local_world_size)
    if not 0 <= local_rank < local_world_size:
        raise CommError(f"init: LOCAL_RANK is {local_rank}, expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE ({local_world_size})")
    port = _int_env(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise CommError(f"init: MASTER_PORT is {port}, expected a TCP port in 1..65535")
    return LaunchEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=environ["MASTER_ADDR"],
        master_port=port,
        restart=_int_env(environ, "TORCHELASTIC_RESTART_COUNT", 0),
    )


def _rendezvous_error(err: BaseException, env: LaunchEnv, timeout_s: float) -> CommError:
    text = str(err)
    low = text.lower()
    where = f"MASTER_ADDR={env.master_addr} MASTER_PORT={env.master_port}"
    if "eaddrinuse" in low or "address already in use" in low:
        msg = (
            f"init: port {env.master_port} is already in use on this machine ({where}): another job or a stale "
            "process holds it; pick a free port (torchrun --master-port / --rdzv-endpoint)"
        )
    elif "waiting for clients" in low:
        msg = (
            f"init: rank 0 waited {timeout_s:g} s at {where} but not all WORLD_SIZE={env.world_size} ranks joined "
            f"({text.strip()}); check that {env.world_size} ranks were launched with the same WORLD_SIZE"
        )
    elif "timed out" in low or "connect" in low:
        msg = (
            f"init: rank {env.rank} could not reach rank 0's store at {where} within {timeout_s:g} s; "
            "is rank 0 running, and are MASTER_ADDR / MASTER_PORT the same on every rank?"
        )
    else:
        msg = f"init: rendezvous at {where} failed: {text.splitlines()[0] if text else type(err).__name__}"
    return CommError(msg)


def _bounded_rendezvous(env: LaunchEnv, timeout: float) -> Any:
    """``dist.rendezvous`` (env://, which also handles torchrun's agent-hosted store) within
    ``timeout`` (+ a few seconds). torch bounds its connect, not the store handshake: a
    MASTER_PORT held by a process that accepts and never answers (a stopped old job, another
    service) blocked there for ever. It runs in a daemon thread; past the bound this rank
    raises CommError and leaves the thread blocked (it cannot be cancelled; it dies with the
    process)."""
    result: dict[str, Any] = {}

    def join() -> None:
        try:
            url = f"env://?rank={env.rank}&world_size={env.world_size}"
            result["store"] = next(dist.rendezvous(url, timeout=datetime.timedelta(seconds=timeout)))[0]
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=join, name="dshal-rendezvous", daemon=True)
    thread.start()
    thread.join(timeout + RENDEZVOUS_GRACE_S)
    if thread.is_alive():
        raise CommError(
            f"init: rank {env.rank} got no answer from the store at MASTER_ADDR={env.master_addr} "
            f"MASTER_PORT={env.master_port} within {timeout:g} s (distributed.timeout_s): something accepts "
            "connections on that port but does not answer (a stopped old job, another service); pick a free port "
            "(torchrun --master-port / --rdzv-endpoint)"
        )
    err = result.get("error")
    if isinstance(err, (RuntimeError, ValueError)):
        raise _rendezvous_error(err, env, timeout) from err
    if err is not None:
        raise err
    return result["store"]


#: Seconds past ``distributed.timeout_s`` that the rendezvous may take before it is abandoned
#: (torch's own timeout, when it applies, reports first and more precisely).
RENDEZVOUS_GRACE_S = 5.0


def _check_world_size(store: Any, env: LaunchEnv, setup: str = "", timeout_s: float = 300.0) -> None:
    """Every rank must agree on WORLD_SIZE and on ``setup`` (its dshal backend and process-group
    backend); compare through the rendezvous store before the process group is built (a
    mismatch would otherwise hang inside the backend: NCCL ranks waiting for peers that built
    a gloo group). Rank 0 reads every rank's; the others read rank 0's and acknowledge, and
    rank 0 (which hosts the store) waits for those acknowledgements so nobody loses the store
    mid-check. Each waits at most ``timeout_s`` (distributed.timeout_s). ``store``: this
    attempt's (see :func:`init`)."""
    prefix = "dshal/launch"
    store.set(f"{prefix}/size/{env.rank}", f"{env.world_size}|{setup}")
    others = [0] if env.rank else list(range(1, env.world_size))
    sizes, setups = {}, {}
    for other in others:
        try:
            _store_wait(store, [f"{prefix}/size/{other}"], timeout_s)
            size, _, setups[other] = store.get(f"{prefix}/size/{other}").decode().partition("|")
            sizes[other] = int(size)
        except (RuntimeError, ValueError) as err:
            raise CommError(
                f"init: rank {env.rank} could not read rank {other}'s WORLD_SIZE within distributed.timeout_s "
                f"(WORLD_SIZE={env.world_size} here; did rank {other} fail or start with another WORLD_SIZE?): "
                f"{str(err).splitlines()[0]}"
            ) from err
    try:
        if env.rank:
            store.set(f"{prefix}/ack/{env.rank}", "1")
        else:
            _store_wait(store, [f"{prefix}/ack/{other}" for other in others], timeout_s)
    except (RuntimeError, ValueError):
        pass  # a peer that vanished here fails its own init; the sizes below are what matter
    for other, seen in sizes.items():
        if seen != env.world_size:
            raise CommError(
                f"init: mismatched world size: rank {env.rank} has WORLD_SIZE={env.world_size} but rank {other} has "
                f"WORLD_SIZE={seen}; launch every rank with the same WORLD_SIZE"
            )
    for other, theirs in setups.items():
        if theirs != setup:
            raise CommError(
                f"init: mismatched backends: rank {env.rank} runs {setup} but rank {other} runs {theirs}; every rank "
                "must run the same backend (under backend: auto a rank that cannot use its device takes the next "
                "one: name the backend, e.g. backend: nvidia, and that rank says why)"
            )


#: The longest pause between two looks at the store while a rank waits for its peers' keys.
STORE_POLL_MAX_S = 0.1


def _store_wait(store: Any, keys: list[str], timeout_s: float) -> None:
    """Return once every key of ``keys`` is set in ``store``; RuntimeError after ``timeout_s``.
    Polled from Python (``store.check``, pauses growing to :data:`STORE_POLL_MAX_S`) rather than
    one blocking ``store.get`` / ``wait``: a rank waiting for a peer that died while joining then
    takes SIGTERM at once (torchrun's agent sends it before a restart), not after the termination
    watchdog's grace (short ``store.wait`` slices instead log a C++ warning each)."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while not store.check(keys):
        if time.monotonic() >= deadline:
            raise RuntimeError(f"wait timeout after {timeout_s:g} s, keys: {', '.join(keys)}")
        time.sleep(pause)
        pause = min(pause * 2, STORE_POLL_MAX_S)


def process_group_backend(runtime: Any) -> str:
    """The torch.distributed backend for ``runtime``: its backend's declared ``dist_backend``,
    except ``gloo`` whenever tensors live on the CPU (emulated GPU plugins), since NCCL/HCCL
    carry device tensors only."""
    if runtime.device.type == "cpu":
        return "gloo"
    return runtime.capabilities.dist_backend


def process_group_timeout(timeout_s: float, device_type: str) -> datetime.timedelta:
    """The timeout torch's process group gets: ``timeout_s`` on gloo; on device process groups
    a little more, so dshal's host-side ``work.wait(timeout_s)`` reports a dead peer as a
    CommError before the NCCL/HCCL watchdog ends the process for the same timeout."""
    if device_type == "cpu":
        return datetime.timedelta(seconds=timeout_s)
    return datetime.timedelta(seconds=timeout_s * 1.25 + 5.0)


def _set_library_environment(backend: Any, timeout_s: float) -> None:
    """Set what ``backend.process_group_environment(timeout_s)`` asks for, except a variable
    the user set (theirs wins); one dshal set at an earlier init follows the new timeout (a
    value the user set equal to dshal's earlier one reads as dshal's). All or none: a bad name
    or value (a plugin defect) is a ProviderError before anything is set."""
    wanted = backend.process_group_environment(timeout_s)
    for name, value in wanted.items():
        if not (isinstance(name, str) and isinstance(value, str)):
            raise ProviderError(f"backend {backend.name!r}: process_group_environment() gave {name!r}: {value!r}, "
                                "expected names and values that are strings")
    for name, value in wanted.items():
        ours = _session["environment"].get(name)
        if name not in os.environ or os.environ[name] == ours:
            os.environ[name] = _session["environment"][name] = value


def init(timeout_s: float | None = None) -> Communicator:
    """Join the job described by torchrun's environment and return the world communicator.

    Uses the active runtime's process-group backend (see :func:`process_group_backend`),
    sets this process's local device (``LOCAL_RANK``) and bounds every collective by
    ``timeout_s`` (default: the config's ``distributed.timeout_s``). Idempotent; asking an
    initialized job for another timeout is a ConfigError (the process group's own timeout is
    fixed when it is built: ``shutdown()`` first).
    """
    rt = dshal.current()
    if dist.is_initialized():
        held = _session["timeout_s"]
        if timeout_s is not None and held is not None and float(timeout_s) != held:
            raise ConfigError(f"init: argument 'timeout_s' is {timeout_s}, but this process joined the job with "
                              f"{held:g} s; call dshal.comm.shutdown() first to rejoin with another timeout")
        return rt.backend.communicator(None)
    env = launch_env()
    timeout = float(timeout_s if timeout_s is not None else rt.config.distributed.timeout_s)
    if not 0 < timeout <= MAX_TIMEOUT_S:  # as the config's key (larger overflows torch's timedelta)
        # the config's key is checked when it is loaded: a bad value here is the argument's
        what = "distributed.timeout_s" if timeout_s is None else "init: argument 'timeout_s'"
        raise ConfigError(f"{what}: got {timeout_s if timeout_s is not None else timeout!r}, "
                          f"expected a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    # The runtime already bound this rank's device (LOCAL_RANK) when it was built; bind it
    # again in case the caller changed the current device since.
    device_id = None if rt.device.type == "cpu" else rt.backend.bind_device()
    _set_library_environment(rt.backend, timeout)  # before any peer is contacted: a plugin defect fails alone
    arm_termination_watchdog()  # collectives wait in C: SIGTERM must not wait for them (under `dshal`)
    # torchrun's agent keeps one store for every attempt of the job: what an attempt's ranks write
    # (gloo's addresses too) is read under this attempt's prefix only. Unprefixed, the ranks of a
    # restart (--max-restarts) read the dead ranks' addresses and hung connecting to them.
    store = dist.PrefixStore(f"dshal/attempt/{env.restart}/", _bounded_rendezvous(env, timeout))
    _check_world_size(store, env, f"backend {rt.backend.name!r} ({process_group_backend(rt)})", timeout)
    try:
        dist.init_process_group(
            backend=process_group_backend(rt),
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=process_group_timeout(timeout, rt.device.type),
            device_id=device_id,
        )
    except (RuntimeError, ValueError) as err:
        raise CommError(f"init: could not build the {process_group_backend(rt)} process group: {err}") from err
    _session.update(timeout_s=timeout, failure=None, device_type=rt.device.type, backend=rt.backend,
                    groups=[dist.group.WORLD])
    if not _session["leaves_at_exit"]:
        # A process that exits without shutdown() left its groups and rank 0's store server to
        # the interpreter's teardown, where gloo's store thread could be destroyed while joinable:
        # "terminate called without an active exception" (SIGABRT) in about a third of runs.
        atexit.register(_leave_at_exit)
        _session["leaves_at_exit"] = True
    return rt.backend.communicator(None)


def _leave_at_exit() -> None:
    if dist.is_initialized():
        shutdown()


def is_initialized() -> bool:
    """True between a successful :func:`init` and :func:`shutdown` (or a failure)."""
    return dist.is_initialized() and _session["failure"] is None


def shutdown() -> None:
    """Leave the job: destroy every process group. Safe to call twice or after a failure."""
    _teardown()
    _session.update(timeout_s=None, failure=None)


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    if isinstance(group, SimulatedGroup):
        return group.rank
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 when not distributed)."""
    if isinstance(group, SimulatedGroup):
        return group.size
    return dist.get_world_size(group) if dist.is_initialized() else 1


def new_groups(partition: Sequence[Sequence[int]], name: str) -> Any:
    """Create one process group per entry of ``partition`` (lists of global ranks that
    together cover the world exactly once) and return the one holding this rank.

    Every rank must call this with the same partition (torch.distributed requires every
    rank to take part in creating every group). ``name`` appears in error messages.
    """
    if not dist.is_initialized():
        raise CommError(f"new_groups({name!r}): torch.distributed is not initialized; call dshal.comm.init() first")
    world = dist.get_world_size()
    flat = sorted(r for ranks in partition for r in ranks)
    if flat != list(range(world)):
        raise CommError(f"new_groups({name!r}): argument 'partition' is {[list(p) for p in partition]}, expected every rank 0..{world - 1} exactly once")
    me = dist.get_rank()
    mine = None
    timeout = process_group_timeout(_session["timeout_s"] or 300.0, _session["device_type"])
    for index, ranks in enumerate(partition):
        try:
            group = dist.new_group(list(ranks), timeout=timeout, group_desc=f"{name}{index}")
        except (RuntimeError, ValueError) as err:
            _session["failure"] = f"new_groups({name!r}) failed creating group {list(ranks)}: {err}"
            _teardown(_session["device_type"])
            raise CommError(_session["failure"]) from err
        if me in ranks:
            mine = group
            _session["groups"].append(group)
    return mine


# ---------------------------------------------------------------- module-level collectives


def communicator(group: Any = None) -> Communicator:
    """The active backend's communicator for ``group`` (None = the world group)."""
    if isinstance(group, SimulatedGroup):
        return SimulatedCommunicator(group)
    return dshal.current().backend.communicator(group)


def all_reduce(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place reduction of ``t`` (``sum``, ``max``, ``min``, ``avg``, ``product``); returns ``t``."""
    return communicator(group).all_reduce(t, op)


def all_gather(t: torch.Tensor, dim: int = 0, group: Any = None) -> torch.Tensor:
    """Concatenation along ``dim`` of ``t`` from every rank, in rank order."""
    return communicator(group).all_gather(t, dim)


def reduce_scatter(t: torch.Tensor, dim: int = 0, op: str = "sum", group: Any = None) -> torch.Tensor:
    """This rank's chunk (along ``dim``) of the reduction of ``t`` over ranks."""
    return communicator(group).reduce_scatter(t, dim, op)


def all_to_all(
    t: torch.Tensor,
    output_splits: Sequence[int] | None = None,
    input_splits: Sequence[int] | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Rows ``input_splits[i]`` of ``t`` go to rank i; returns what every rank sent here
    (split sizes are exchanged first when only ``input_splits`` is given)."""
    return communicator(group).all_to_all(t, output_splits, input_splits)


def broadcast(t: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """``t`` from group rank ``src`` on every rank (in place)."""
    return communicator(group).broadcast(t, src)


def barrier(group: Any = None) -> None:
    """Wait until every rank of the group arrives."""
    communicator(group).barrier()


__all__ = [
    "REDUCE_OPS",
    "Communicator",
    "LaunchEnv",
    "ProcessGroupCommunicator",
    "SimulatedCommunicator",
    "SimulatedGroup",
    "Transfer",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "communicator",
    "get_rank",
    "get_world_size",
    "group_name",
    "host_waits",
    "init",
    "is_initialized",
    "launch_env",
    "new_groups",
    "agreement_record",
    "disagreement",
    "process_group_backend",
    "process_group_timeout",
    "reduce_scatter",
    "shutdown",
    "teardown_action",
]
