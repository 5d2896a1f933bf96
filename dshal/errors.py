"""The error hierarchy. Every error dshal raises on purpose is a :class:`DshalError`.

Messages name the argument, the value seen and what was expected, so a user can fix
the call without reading dshal's source.
"""

from __future__ import annotations


class DshalError(Exception):
    """Base class of every error dshal raises deliberately."""


class ConfigError(DshalError, ValueError):
    """A config file, dict or environment override is invalid.

    ``file`` and ``line`` locate the offending key when it came from a file.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.file, self.line, self.key = file, line, key
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(where + message)


class PluginLoadError(DshalError, ImportError):
    """A backend plugin could not be imported, constructed or validated."""


class BackendUnavailableError(DshalError, RuntimeError):
    """A backend loaded but cannot run here (no device, missing runtime...)."""


class UnsupportedOpError(DshalError, NotImplementedError):
    """The backend does not implement this op (or this variant of it)."""


class ShapeError(DshalError, ValueError):
    """A tensor argument has the wrong shape."""


class DTypeError(DshalError, TypeError):
    """A tensor argument has the wrong dtype (or an option names an unknown format)."""


class DeviceError(DshalError, RuntimeError):
    """A tensor argument lives on the wrong device."""


class ProviderError(DshalError, RuntimeError):
    """An op's provider broke the op's contract: it returned a tensor of another shape,
    dtype or device than the contract says (a plugin defect, not a caller's)."""


class CommError(DshalError, RuntimeError):
    """A collective failed: timeout, dead peer, bad group or mismatched world size.

    ``peer_failed`` is True when it failed because a peer did (closed its connection, or did
    not answer within the timeout): the failure to read first is that peer's.
    """

    def __init__(self, message: str, *, peer_failed: bool = False):
        self.peer_failed = peer_failed
        super().__init__(message)


class ArgumentError(DshalError, ValueError):
    """A non-tensor argument has an invalid value (a flag out of range, ``temperature=nan``,
    ``max_new_tokens`` beyond the model's context...)."""


class CheckpointError(DshalError, ValueError):
    """A checkpoint is incomplete, has extra tensors, or a tensor has the wrong shape,
    dtype or non-finite values."""


__all__ = [
    "DshalError",
    "ConfigError",
    "PluginLoadError",
    "BackendUnavailableError",
    "UnsupportedOpError",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "CommError",
    "ArgumentError",
    "CheckpointError",
]
