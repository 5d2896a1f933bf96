"""dshal: a hardware-portable backend abstraction layer for DeepSeek-V3-class models.

    import dshal
    rt = dshal.use("dshal.yaml")          # or a dict, or None (defaults + environment)
    y = dshal.ops.rms_norm(x, weight)     # dispatched to the active runtime's provider

Nothing is discovered at import time: plugins load on the first ``dshal.use()``,
``dshal.current()``, ``dshal.backends()`` or op call.
"""

from __future__ import annotations

from dshal import ops
from dshal.backend import API_VERSION, Availability, Backend, Capabilities, Timer, Topology
from dshal.config import Config, load_config
from dshal.errors import (
    BackendUnavailableError,
    CommError,
    ConfigError,
    DeviceError,
    DshalError,
    DTypeError,
    PluginLoadError,
    ShapeError,
    UnsupportedOpError,
)
from dshal.registry import BackendInfo, backends
from dshal.runtime import Runtime, current, use

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
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
