"""``dshal.ops.<op>(...)``: the op catalogue, dispatched to the active runtime.

Each public function here is a thin dispatcher. The provider behind it (backend kernel,
or the fallback reference) is resolved once, when :func:`dshal.use` activates a
runtime, and stored in a table; a call costs one dict lookup. Calling an op before any
``dshal.use()`` activates the default runtime first (config from the environment).

``dshal.ops.reference.<op>`` calls the checked reference implementation directly, and
``dshal.ops.SPECS`` holds every :class:`~dshal.ops.spec.OpSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dshal.ops.catalogue import SPECS
from dshal.ops.spec import Cost, OpSpec

#: op name -> the provider callable of the active runtime (inputs checked). Filled by
#: :meth:`dshal.runtime.Runtime.activate`; before that, each entry activates the default.
_table: dict[str, Callable[..., Any]] = {}


def _bootstrap(name: str) -> Callable[..., Any]:
    def first_call(*args: Any, **kwargs: Any) -> Any:
        from dshal.runtime import current

        current()  # activates the default runtime, which refills _table
        return _table[name](*args, **kwargs)

    return first_call


def _dispatcher(spec: OpSpec) -> Callable[..., Any]:
    table, name = _table, spec.name

    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return table[name](*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__doc__ = spec.__doc__
    dispatch.__signature__ = spec.signature  # type: ignore[attr-defined]
    return dispatch


def _reset_table() -> None:
    for name in SPECS:
        _table[name] = _bootstrap(name)


_reset_table()
for _spec in SPECS.values():
    globals()[_spec.name] = _dispatcher(_spec)
del _spec

__all__ = sorted(SPECS) + ["SPECS", "OpSpec", "Cost", "reference"]
from dshal.ops import reference  # noqa: E402  (needs SPECS above)
