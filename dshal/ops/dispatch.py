"""The dispatcher: which provider each ``dshal.ops.<op>`` call reaches, per thread.

A pair of tables, op name -> provider callable, serves the calls: ``checked`` (the
provider behind the op's input checks; what a call reaches by default) and ``unchecked``
(the bare provider; what a call reaches inside :meth:`Dispatcher.trusted`). The active
runtime fills the process-wide pair with :meth:`Dispatcher.install`; :meth:`Dispatcher.reset`
puts back the first-call entries, which activate the default runtime and then dispatch.
:meth:`Dispatcher.overlay` serves one thread's calls from another pair for the length of
a block (``dshal.runtime.reference_ops``), and :meth:`Dispatcher.hooked` routes every
table's providers, overlays included, through one wrapper (``dshal.runtime.op_hook``).

Layering: this module sits below :mod:`dshal.runtime` and imports nothing of it (the
runtime imports this module to install its providers). The first-call entries reach the
runtime at call time through the public ``dshal.current()``, the same call a user makes;
the top-level package loads :mod:`dshal.runtime` on that first access.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import dshal
from dshal.errors import DshalError
from dshal.ops.catalogue import SPECS
from dshal.ops.mode import MODE

Provider = Callable[..., Any]
#: ``hook(op_name, provider)`` -> the callable that serves the op instead (see :meth:`Dispatcher.hooked`).
Hook = Callable[[str, Provider], Provider]


class _Tables:
    """One pair of live tables and the providers they are built from. The live dicts are
    refilled in place (a thread that holds one sees every later fill), with each provider
    wrapped by the dispatcher's hook while one is set."""

    __slots__ = ("sources", "checked", "unchecked")

    def __init__(self) -> None:
        self.sources: tuple[dict[str, Provider], dict[str, Provider]] = ({}, {})
        self.checked: dict[str, Provider] = {}
        self.unchecked: dict[str, Provider] = {}

    def fill(self, checked: Mapping[str, Provider], unchecked: Mapping[str, Provider], hook: Hook | None) -> None:
        self.sources = (dict(checked), dict(unchecked))
        self.rebuild(hook)

    def rebuild(self, hook: Hook | None) -> None:
        for live, source in ((self.checked, self.sources[0]), (self.unchecked, self.sources[1])):
            live.update(source if hook is None else {name: hook(name, fn) for name, fn in source.items()})


class _ThreadTables(threading.local):
    """What the calling thread dispatches through: ``tables`` (the process-wide pair, or an
    overlay's) and ``table``, the one of that pair its calls read (``unchecked`` inside
    ``trusted()``), both worked out from ``blocks``: the thread's open ``trusted()`` (None)
    and overlay (its tables) blocks, in the order they were entered."""

    def __init__(self, base: _Tables):
        self.tables = base
        self.table = base.checked
        self.blocks: list[_Block] = []
        # A block may close on another thread while this one opens one, or on this thread
        # inside its own settle (a generator finalized by the garbage collector): re-entrant.
        self.lock = threading.RLock()
        self.version = 0  # bumped by every open and close: a settle interrupted by one settles again


class _Block:
    """One open ``trusted()`` block (``tables`` None) or overlay; compared by identity."""

    __slots__ = ("tables",)

    def __init__(self, tables: _Tables | None):
        self.tables = tables


class Dispatcher:
    """Op name -> provider tables of the active runtime, per-thread overlays, the per-thread
    trusted mode and the op hook.

    A call costs a thread-local attribute read and a dict lookup: ``thread.table[name]``.
    """

    def __init__(self, op_names: Iterable[str], activate_default: Callable[[], object]):
        self.op_names = tuple(op_names)
        self._activate_default = activate_default
        self._lock = threading.Lock()  # guards the hook and the set of live overlays
        self._hook: Hook | None = None
        self._base = _Tables()
        self._overlays: set[_Tables] = set()
        #: ``thread.table`` is the table this thread's calls read (the public op functions use it).
        self.thread = _ThreadTables(self._base)
        self.reset()

    def install(self, checked: Mapping[str, Provider], unchecked: Mapping[str, Provider]) -> None:
        """Serve every op by these providers from now on (``checked`` behind the spec's input
        checks, ``unchecked`` the same providers without them); both name every op."""
        self._check_names("install", checked, unchecked)
        with self._lock:
            self._base.fill(checked, unchecked, self._hook)

    def reset(self) -> None:
        """Forget the installed providers and the hook: the next call of each op activates
        the default runtime."""
        live = self._base
        with self._lock:
            self._hook = None
            for table in (self._base, *self._overlays):
                table.rebuild(None)
            live.fill({name: self._first_call(name, live.checked) for name in self.op_names},
                      {name: self._first_call(name, live.unchecked) for name in self.op_names}, None)

    def provider(self, name: str, *, checked: bool = True) -> Provider:
        """What a call of ``name`` from this thread reaches now (checked, or as inside :meth:`trusted`)."""
        tables = self.thread.tables
        return (tables.checked if checked else tables.unchecked)[name]

    @contextlib.contextmanager
    def trusted(self) -> Iterator[None]:
        """Skip the ops' input checks for this thread's calls inside the block (nests; other
        threads are unaffected). See :func:`dshal.ops.trusted` for when that is right.
        While ``torch.compile`` traces it, it does nothing: compiled code runs no Python checks
        (they run once, as dynamo traces), and dynamo cannot enter this thread's lock."""
        if torch.compiler.is_compiling():
            yield
            return
        close = self._open(_Block(None))
        try:
            yield
        finally:
            close()

    @contextlib.contextmanager
    def overlay(self, checked: Mapping[str, Provider], unchecked: Mapping[str, Provider]) -> Iterator[None]:
        """Serve this thread's calls inside the block by these providers (both name every op);
        other threads, and this one after the block, keep the installed ones. Nests, and keeps
        the trusted mode: a call inside ``trusted()`` reaches ``unchecked``. An install inside
        the block (``dshal.use``) takes effect for the thread when the block ends."""
        self._check_names("overlay", checked, unchecked)
        tables = _Tables()
        with self._lock:
            tables.fill(checked, unchecked, self._hook)
            self._overlays.add(tables)
        close = self._open(_Block(tables))
        try:
            yield
        finally:
            close()
            with self._lock:
                self._overlays.discard(tables)

    def _open(self, block: _Block) -> Callable[[], None]:
        """Open ``block`` on the calling thread; returns what closes it. Blocks need not close
        in the order they opened (two generators, each inside its own block, finished in
        turn), nor on the thread that opened them (a generator finished by another thread):
        closing removes this block from the thread that opened it, and that thread's tables
        and trusted depth are worked out again from the blocks still open there."""
        state, mode = self.thread.__dict__, MODE.__dict__  # the opening thread's own (threading.local) attributes
        with state["lock"]:
            state["blocks"].append(block)
            state["version"] += 1
            self._settle(state, mode)

        def close() -> None:
            with state["lock"]:
                blocks = state["blocks"]
                blocks[:] = [b for b in blocks if b is not block]
                state["version"] += 1
                self._settle(state, mode)

        return close

    def _settle(self, state: dict[str, Any], mode: dict[str, Any]) -> None:
        """Work the thread's tables and trusted depth out from its open blocks (under its lock),
        again if a block closed meanwhile (re-entrantly, from a garbage-collected generator)."""
        while True:
            version = state["version"]
            tables, depth = self._base, 0
            for block in state["blocks"]:
                if block.tables is None:
                    depth += 1
                else:
                    tables = block.tables  # the innermost overlay
            mode["trusted_depth"] = depth
            state["tables"] = tables
            state["table"] = tables.unchecked if depth else tables.checked
            if state["version"] == version:
                return

    @contextlib.contextmanager
    def hooked(self, hook: Hook) -> Iterator[None]:
        """While active, every op call, in every thread and overlay, reaches
        ``hook(op_name, provider)`` instead of the provider. Hooks do not nest. When none is set
        the tables hold the providers themselves, so the off state costs nothing."""
        with self._lock:
            if self._hook is not None:
                raise DshalError(
                    "an op hook is already installed (RunReport.recording, dshal profile or diff tracing, "
                    "dshal.runtime.op_hook); hooks do not nest: one at a time per process"
                )
            self._hook = hook
            for table in (self._base, *self._overlays):
                table.rebuild(hook)
        try:
            yield
        finally:
            with self._lock:
                if self._hook is hook:  # reset() inside the block already took it away
                    self._hook = None
                    for table in (self._base, *self._overlays):
                        table.rebuild(None)

    def _check_names(self, role: str, *tables: Mapping[str, Provider]) -> None:
        for kind, table in zip(("checked", "unchecked"), tables):
            if set(table) != set(self.op_names):
                missing, extra = set(self.op_names) - set(table), set(table) - set(self.op_names)
                raise ValueError(f"Dispatcher.{role}: {kind} table must name every op exactly; "
                                 f"missing {sorted(missing)}, unknown {sorted(extra)}")

    def _first_call(self, name: str, table: dict[str, Provider]) -> Provider:
        def first_call(*args: Any, **kwargs: Any) -> Any:
            self._activate_default()  # installs the default runtime's providers into ``table``
            return table[name](*args, **kwargs)

        first_call.__name__ = first_call.__qualname__ = name
        return first_call


def _activate_default() -> None:
    dshal.current()


#: The dispatcher of ``dshal.ops`` (one per process; the active runtime installs into it).
DISPATCHER = Dispatcher(SPECS, _activate_default)

__all__ = ["DISPATCHER", "Dispatcher", "Hook", "Provider"]
