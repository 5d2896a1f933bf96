"""The dispatcher: which provider each ``dshal.ops.<op>`` call reaches, per thread.

:class:`Dispatcher` holds two tables, op name -> provider callable: ``checked`` (the
provider behind the op's input checks; what a call reaches by default) and ``unchecked``
(the bare provider; what a call reaches inside :meth:`Dispatcher.trusted`). The active
runtime fills them with :meth:`Dispatcher.install`; :meth:`Dispatcher.reset` puts back
the first-call entries, which activate the default runtime and then dispatch.

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

import dshal
from dshal.ops.catalogue import SPECS
from dshal.ops.mode import MODE

Provider = Callable[..., Any]


class _ThreadTable(threading.local):
    """The table the calling thread dispatches to: ``checked`` unless inside ``trusted()``."""

    def __init__(self, default: dict[str, Provider]):
        self.table = default


class Dispatcher:
    """Op name -> provider tables of the active runtime, and the per-thread trusted mode.

    A call costs a thread-local attribute read and a dict lookup: ``thread.table[name]``.
    The tables are filled in place, so a thread that holds one sees every later install.
    """

    def __init__(self, op_names: Iterable[str], activate_default: Callable[[], object]):
        self.op_names = tuple(op_names)
        self._activate_default = activate_default
        self._checked: dict[str, Provider] = {}
        self._unchecked: dict[str, Provider] = {}
        #: ``thread.table`` is the table this thread's calls read (the public op functions use it).
        self.thread = _ThreadTable(self._checked)
        self.reset()

    def install(self, checked: Mapping[str, Provider], unchecked: Mapping[str, Provider]) -> None:
        """Serve every op by these providers from now on (``checked`` behind the spec's input
        checks, ``unchecked`` the same providers without them); both name every op."""
        for role, table in (("checked", checked), ("unchecked", unchecked)):
            if set(table) != set(self.op_names):
                missing, extra = set(self.op_names) - set(table), set(table) - set(self.op_names)
                raise ValueError(f"Dispatcher.install: {role} table must name every op exactly; "
                                 f"missing {sorted(missing)}, unknown {sorted(extra)}")
        self._checked.update(checked)
        self._unchecked.update(unchecked)

    def reset(self) -> None:
        """Forget the installed providers: the next call of each op activates the default runtime."""
        for name in self.op_names:
            self._checked[name] = self._first_call(name, self._checked)
            self._unchecked[name] = self._first_call(name, self._unchecked)

    def provider(self, name: str, *, checked: bool = True) -> Provider:
        """What a call of ``name`` reaches now (checked, or as inside :meth:`trusted`)."""
        return (self._checked if checked else self._unchecked)[name]

    @contextlib.contextmanager
    def trusted(self) -> Iterator[None]:
        """Skip the ops' input checks for this thread's calls inside the block (nests; other
        threads are unaffected). See :func:`dshal.ops.trusted` for when that is right."""
        previous = self.thread.table
        self.thread.table = self._unchecked
        MODE.trusted_depth += 1
        try:
            yield
        finally:
            MODE.trusted_depth -= 1
            self.thread.table = previous

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

__all__ = ["DISPATCHER", "Dispatcher", "Provider"]
