"""Deprecated home of the built-in ``cpu`` backend: it is :mod:`dshal.backends.cpu` now.

``ReferenceBackend`` was the cpu backend's class name; the class is ``CpuBackend``, because
"reference" names the op oracles (the ``reference`` provider), which this backend is not.
"""

from __future__ import annotations

import warnings

from dshal.backends.cpu import CpuBackend

warnings.warn(
    "dshal.backends.reference.ReferenceBackend is deprecated: use dshal.backends.cpu.CpuBackend",
    DeprecationWarning,
    stacklevel=2,
)

#: Deprecated alias of :class:`~dshal.backends.cpu.CpuBackend`.
ReferenceBackend = CpuBackend
