"""Whether this thread's op calls are checked or trusted (see :func:`dshal.ops.trusted`).

Its own module so that the value checks in :mod:`dshal.ops.spec` and the collectives in
:mod:`dshal.comm` read it with a top-level import: :mod:`dshal.ops` imports the specs, so
the specs cannot import :mod:`dshal.ops`.
"""

from __future__ import annotations

import threading


class _Mode(threading.local):
    """Per-thread: how many :func:`dshal.ops.trusted` blocks enclose the current call."""

    trusted_depth = 0


MODE = _Mode()


def checking() -> bool:
    """Whether this thread's calls check their inputs: False inside :func:`dshal.ops.trusted`.
    The collectives of :mod:`dshal.comm` read it too (their cross-rank agreement check)."""
    return MODE.trusted_depth == 0


__all__ = ["MODE", "checking"]
