"""Collectives over ``torch.distributed``, with dshal errors instead of hangs.

The process-group backend comes from the active dshal backend's capabilities
(``gloo`` for cpu, ``nccl`` for NVIDIA/ROCm, ``hccl`` for Ascend); ``torchrun`` (or the
caller) provides RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Every collective is
bounded by ``distributed.timeout_s``; a failure raises :class:`~dshal.CommError` naming
the collective and the group.
"""

from __future__ import annotations

import abc
import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from dshal.errors import CommError, ConfigError, ShapeError

REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "avg": dist.ReduceOp.AVG,
    "product": dist.ReduceOp.PRODUCT,
}


def _reduce_op(op: str, collective: str) -> Any:
    try:
        return REDUCE_OPS[op]
    except (KeyError, TypeError):
        raise CommError(f"{collective}: argument 'op' is {op!r}, expected one of {', '.join(REDUCE_OPS)}") from None


class Communicator(abc.ABC):
    """Collectives over one process group. Backends may return their own subclass."""

    @abc.abstractmethod
    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    @abc.abstractmethod
    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor: ...

    @abc.abstractmethod
    def all_to_all(
        self, t: torch.Tensor, output_splits: Sequence[int] | None = None, input_splits: Sequence[int] | None = None
    ) -> torch.Tensor: ...

    @abc.abstractmethod
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...


class ProcessGroupCommunicator(Communicator):
    """Collectives on a torch.distributed process group (None = the default group)."""

    def __init__(self, group: Any = None):
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def _group_name(self) -> str:
        if self.group is None:
            return "default group"
        return f"group {getattr(self.group, 'group_name', None) or id(self.group)}"

    def _run(self, collective: str, fn, *args: Any, **kwargs: Any) -> Any:
        if not dist.is_initialized():
            raise CommError(f"{collective}: torch.distributed is not initialized; call dshal.comm.init() first")
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as err:  # gloo/nccl raise RuntimeError (DistBackendError)
            raise CommError(
                f"{collective} on the {self._group_name()} (rank {dist.get_rank()}, world size {dist.get_world_size()}) failed: {err}"
            ) from err

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        rop = _reduce_op(op, "all_reduce")
        self._run("all_reduce", dist.all_reduce, t, op=rop, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._run("all_gather", dist.all_gather, parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0, op: str = "sum") -> torch.Tensor:
        n = self.world_size
        if t.shape[dim] % n:
            raise ShapeError(
                f"reduce_scatter: argument 't' has size {t.shape[dim]} in dim {dim}, expected a multiple of the world size {n}"
            )
        rop = _reduce_op(op, "reduce_scatter")
        inputs = [c.contiguous() for c in t.chunk(n, dim=dim)]
        out = torch.empty_like(inputs[0])
        self._run("reduce_scatter", dist.reduce_scatter, out, inputs, op=rop, group=self.group)
        return out

    def all_to_all(
        self, t: torch.Tensor, output_splits: Sequence[int] | None = None, input_splits: Sequence[int] | None = None
    ) -> torch.Tensor:
        n = self.world_size
        if input_splits is None:
            if t.shape[0] % n:
                raise ShapeError(
                    f"all_to_all: argument 't' has {t.shape[0]} rows, expected a multiple of the world size {n} "
                    "(or pass input_splits)"
                )
            input_splits = [t.shape[0] // n] * n
        if len(input_splits) != n or sum(input_splits) != t.shape[0]:
            raise ShapeError(
                f"all_to_all: argument 'input_splits' is {list(input_splits)}, expected {n} sizes summing to {t.shape[0]}"
            )
        if output_splits is None:
            output_splits = list(input_splits)
        if len(output_splits) != n:
            raise ShapeError(f"all_to_all: argument 'output_splits' is {list(output_splits)}, expected {n} sizes")
        ins = list(t.contiguous().split(list(input_splits), dim=0))
        outs = [t.new_empty((s, *t.shape[1:])) for s in output_splits]
        self._run("all_to_all", dist.all_to_all, outs, ins, group=self.group)
        return torch.cat(outs, dim=0)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._run("broadcast", dist.broadcast, t, src=src, group=self.group)
        return t

    def barrier(self) -> None:
        self._run("barrier", dist.barrier, group=self.group)


def init(timeout_s: float | None = None) -> None:
    """Initialize torch.distributed from torchrun's environment on the active backend's
    process-group type (idempotent)."""
    from dshal.runtime import current

    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CommError(f"init: environment variables {missing} are not set; launch with torchrun or set them")
    rt = current()
    timeout = timeout_s if timeout_s is not None else rt.config.distributed.timeout_s
    if timeout <= 0:
        raise ConfigError(f"distributed.timeout_s: got {timeout}, expected a positive number")
    try:
        dist.init_process_group(
            backend=rt.capabilities.dist_backend,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout),
        )
    except (RuntimeError, ValueError) as err:
        raise CommError(f"init: could not initialize the process group: {err}") from err


def _comm(group: Any = None) -> Communicator:
    from dshal.runtime import current

    return current().backend.communicator(group)


def all_reduce(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """In-place all-reduce of ``t``; returns ``t``."""
    return _comm(group).all_reduce(t, op)


def all_gather(t: torch.Tensor, dim: int = 0, group: Any = None) -> torch.Tensor:
    """Concatenation along ``dim`` of ``t`` from every rank."""
    return _comm(group).all_gather(t, dim)


def reduce_scatter(t: torch.Tensor, dim: int = 0, op: str = "sum", group: Any = None) -> torch.Tensor:
    """This rank's chunk (along ``dim``) of the reduction of ``t`` over ranks."""
    return _comm(group).reduce_scatter(t, dim, op)


def all_to_all(
    t: torch.Tensor,
    output_splits: Sequence[int] | None = None,
    input_splits: Sequence[int] | None = None,
    group: Any = None,
) -> torch.Tensor:
    """Rows ``input_splits[i]`` of ``t`` go to rank i; returns what every rank sent here."""
    return _comm(group).all_to_all(t, output_splits, input_splits)


def broadcast(t: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (in place)."""
    return _comm(group).broadcast(t, src)


def barrier(group: Any = None) -> None:
    """Wait until every rank of the group arrives."""
    _comm(group).barrier()
