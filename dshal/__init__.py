"""dshal: a hardware-portable backend abstraction layer for DeepSeek-V3-class models.

    import dshal
    rt = dshal.use("dshal.yaml")          # or a dict, or None (defaults + environment)
    y = dshal.ops.rms_norm(x, weight)     # dispatched to the active runtime's provider

Nothing is discovered at import time: plugins load on the first ``dshal.use()``,
``dshal.current()``, ``dshal.backends()`` or op call. Nothing heavy is imported either:
the public names below load their modules (and torch) on first access, so commands that
need no tensors (``dshal --help``, ``dshal matrix``) start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# ``dshal.backends`` is both the package of built-in backends (``dshal.backends.cpu``) and
# the call that lists every discovered backend (``dshal.backends()``): the package module
# is callable (see dshal/backends/__init__.py), so ``import dshal.backends.cpu as m`` and
# ``dshal.backends()`` both work, whichever runs first.
if TYPE_CHECKING:
    # What a type checker sees: the call (a module object cannot be typed as callable).
    from dshal.registry import backends as backends
else:
    from dshal import backends
from dshal.errors import (
    ArgumentError,
    BackendUnavailableError,
    CheckpointError,
    CommError,
    ConfigError,
    DeviceError,
    DshalError,
    DTypeError,
    PluginLoadError,
    ProviderError,
    ShapeError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

# Why a lazy table: the modules behind these names import torch (~1-2 s), and commands that
# need no tensors (``dshal --help``, ``dshal matrix``) must start at once. The table is
# explicit: any other name is an AttributeError naming it, so a typo never passes.
# ``tests/test_core_imports.py`` reads the table to count ``from dshal import NAME`` as an
# import of NAME's module when it checks the import graph for cycles.
#: Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY_NAMES = {
    **dict.fromkeys(("API_VERSION", "Availability", "Backend", "Capabilities", "Timer", "Topology"), "dshal.backend"),
    **dict.fromkeys(("Config", "load_config"), "dshal.config"),
    "BackendInfo": "dshal.registry",
    **dict.fromkeys(("Runtime", "current", "use"), "dshal.runtime"),
}
#: Submodules that ``import dshal`` used to bind eagerly; still reachable as attributes.
_LAZY_MODULES = ("ops", "backend", "config", "registry", "runtime")


if not TYPE_CHECKING:  # a module __getattr__ would type every unknown name, a typo too, as Any

    def __getattr__(name: str) -> Any:
        if name in _LAZY_MODULES:
            value = importlib.import_module(f"dshal.{name}")
        elif name in _LAZY_NAMES:
            value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        else:
            raise AttributeError(f"module 'dshal' has no attribute {name!r}")
        globals()[name] = value  # later lookups are plain attribute reads
        return value


def __dir__() -> list[str]:
    # What tab completion offers: the public names and the submodules imported so far, not
    # this file's own helpers (Any, TYPE_CHECKING, importlib, the lazy tables). Reads no module.
    submodules = {name for name, value in globals().items() if getattr(value, "__name__", None) == f"dshal.{name}"}
    return sorted({*__all__, *_LAZY_MODULES, *submodules})


if TYPE_CHECKING:
    from dshal import ops
    from dshal.backend import API_VERSION, Availability, Backend, Capabilities, Timer, Topology
    from dshal.config import Config, load_config
    from dshal.registry import BackendInfo
    from dshal.runtime import Runtime, current, use

__all__ = [
    "API_VERSION",
    "ArgumentError",
    "CheckpointError",
    "Availability",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Capabilities",
    "CommError",
    "Config",
    "ConfigError",
    "DeviceError",
    "DshalError",
    "DTypeError",
    "PluginLoadError",
    "ProviderError",
    "Runtime",
    "ShapeError",
    "Timer",
    "Topology",
    "UnsupportedOpError",
    "backends",
    "current",
    "load_config",
    "ops",
    "use",
    "__version__",
]
