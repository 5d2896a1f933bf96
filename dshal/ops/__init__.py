"""``dshal.ops.<op>(...)``: the op catalogue, dispatched to the active runtime.

Each public function here is a thin dispatcher. The provider behind it (backend kernel,
or the fallback reference) is resolved once, when :func:`dshal.use` activates a
runtime, and stored in a table; a call costs a thread-local attribute and a dict
lookup. Calling an op before any ``dshal.use()`` activates the default runtime first
(config from the environment).

Every call checks its inputs against the op's spec first, except inside
:func:`trusted`, where the calling thread's ops go straight to their providers.

``dshal.ops.reference.<op>`` calls the checked reference implementation directly, and
``dshal.ops.SPECS`` holds every :class:`~dshal.ops.spec.OpSpec`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from dshal.ops.catalogue import SPECS
from dshal.ops.mode import MODE, checking
from dshal.ops.spec import Cost, OpSpec

#: op name -> the provider callable of the active runtime (inputs checked). Filled by
#: :meth:`dshal.runtime.Runtime.activate`; before that, each entry activates the default.
_table: dict[str, Callable[..., Any]] = {}
#: The same providers without the spec's input checks (what :func:`trusted` dispatches to).
_unchecked: dict[str, Callable[..., Any]] = {}


class _Dispatch(threading.local):
    """The table this thread dispatches to (the class attribute is every thread's default)."""

    table = _table


_dispatch = _Dispatch()


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Skip the ops' input checks for this thread's calls inside the block.

    For a caller that builds every op input itself and has already had the same calls
    checked once, as the model core does for its decode steps: the checks are Python and
    cost more than the math for the small tensors of one token. The providers' own value
    checks (e.g. expert ids in range) still run, device-side (no host sync: see
    :func:`dshal.ops.spec.check_ids_in_range`), and :mod:`dshal.comm` skips its cross-rank
    agreement check. Nests; other threads are unaffected.
    """
    previous = _dispatch.table
    _dispatch.table = _unchecked
    MODE.trusted_depth += 1
    try:
        yield
    finally:
        MODE.trusted_depth -= 1
        _dispatch.table = previous


def _bootstrap(name: str, table: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    def first_call(*args: Any, **kwargs: Any) -> Any:
        from dshal.runtime import current

        current()  # activates the default runtime, which refills the tables
        return table[name](*args, **kwargs)

    return first_call


def _dispatcher(spec: OpSpec) -> Callable[..., Any]:
    state, name = _dispatch, spec.name

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return state.table[name](*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__doc__ = spec.__doc__
    dispatch.__signature__ = spec.signature  # type: ignore[attr-defined]
    return dispatch


def _reset_table() -> None:
    for name in SPECS:
        _table[name] = _bootstrap(name, _table)
        _unchecked[name] = _bootstrap(name, _unchecked)


_reset_table()
for _spec in SPECS.values():
    globals()[_spec.name] = _dispatcher(_spec)
del _spec



class _OpsModule(types.ModuleType):
    """``dshal.ops`` itself, with its op names read-only: an op's dispatcher must stay the
    one that reads the active runtime's table (what ``rt.providers`` reports). A plugin or
    script that assigns ``dshal.ops.rms_norm = ...`` gets an error, not a silent takeover;
    a backend provides an op through ``Backend.ops()``, a config through ``ops:``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SPECS:
            raise AttributeError(
                f"dshal.ops.{name} is read-only: it dispatches to the provider the active runtime chose "
                f"(see dshal.current().providers); provide {name!r} from a backend's ops() or set "
                f"`ops: {{{name}: BACKEND}}` in the config"
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in SPECS:
            raise AttributeError(f"dshal.ops.{name} is read-only and cannot be deleted")
        super().__delattr__(name)


sys.modules[__name__].__class__ = _OpsModule
__all__ = sorted(SPECS) + ["SPECS", "OpSpec", "Cost", "checking", "reference", "trusted"]
from dshal.ops import reference  # noqa: E402  (needs SPECS above)
