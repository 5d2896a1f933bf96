"""dshal: a hardware-portable backend abstraction layer for DeepSeek-V3-class models.

    import dshal
    rt = dshal.use("dshal.yaml")          # or a dict, or None (defaults + environment)
    y = dshal.ops.rms_norm(x, weight)     # dispatched to the active runtime's provider

Nothing is discovered at import time: plugins load on the first ``dshal.use()``,
``dshal.current()``, ``dshal.backends()`` or op call.
"""

from __future__ import annotations

# The subpackage dshal/backends/ shares its name with the dshal.backends() function.
# Importing a submodule binds the package as an attribute of its parent, but only the
# first time the package loads; loading it here, before the function is bound below,
# keeps ``dshal.backends`` the function after discovery imports dshal.backends.reference.
import dshal.backends  # noqa: F401  (empty package; imports nothing else)
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
