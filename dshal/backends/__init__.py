"""Backends shipped with dshal itself (registered through entry points like any plugin):
``cpu.py`` (the built-in cpu backend), ``cpu_native.py`` (its C-kernel ops),
``triton_gpu.py`` (the base the GPU plugins share), ``invariant.py``, ``reference.py``.

This package is also the call ``dshal.backends()`` (DESIGN's Python API): every discovered
backend, broken ones included, with the reason for each. The package and the call share
one name, so the module itself is callable; importing it loads nothing else.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dshal.registry import BackendInfo


class _CallablePackage(types.ModuleType):
    def __call__(self, *, emulate: bool | None = None, refresh: bool = False) -> list[BackendInfo]:
        """Every discovered backend, broken ones included, with the reason for each
        (:func:`dshal.registry.backends`)."""
        from dshal.registry import backends as discovered  # lazy: start-up time (import dshal loads no torch)

        return discovered(emulate=emulate, refresh=refresh)


sys.modules[__name__].__class__ = _CallablePackage
