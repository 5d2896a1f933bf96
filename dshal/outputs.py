"""Writing report files: check the destination before a run, then replace it atomically.

Every command that writes a report (``dshal conformance``, ``matrix``, ``bench``,
``profile``, ``run --json``) checks its output paths first, so an unwritable
``--report-dir`` is found before minutes of work, and writes through
:func:`atomic_write` (or :func:`atomic_output` for a file written piecewise, such as the
conformance bundle's ``.tar.gz``): the bytes go to a temporary file in the same folder, are
flushed to disk, then renamed over the destination. A full disk or a Ctrl-C mid-write leaves the
previous report whole, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dshal.errors import ArgumentError


def console(*, stderr: bool = False, piped_width: int | None = 160, **options: Any) -> Any:
    """The CLI's rich Console: ``piped_width`` columns when its stream is not a terminal (logs,
    CI; None: rich's default), and a reader that left (``dshal info | head``) raises
    BrokenPipeError, which the CLI ends with 141 as for its plain prints (rich's own handler
    exits 1, which a ``pipefail`` shell cannot tell from a failure). ``options`` go to Console."""
    from rich.console import Console  # rich: only for the commands that print tables

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    stream = sys.stderr if stderr else sys.stdout
    if "width" not in options and piped_width is not None and not is_terminal(stream):
        options["width"] = piped_width
    return PipeAwareConsole(stderr=stderr, **options)


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` (sys.stdout, ...) is a terminal; False when it is closed (None: ``>&-``)."""
    return stream is not None and stream.isatty()


def check_writable(path: Any, what: str, *, directory: bool = False) -> Path:
    """Make sure ``path`` (a file, or with ``directory=True`` a folder) can be written:
    its folder is created if missing and a probe file is written and removed there.
    Raises ArgumentError naming ``what`` (e.g. "--report-dir"), the path and the reason."""
    path = Path(path)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise ArgumentError(f"{what}: {path} is a directory, expected a file path")
    if directory and path.exists() and not path.is_dir():
        raise ArgumentError(f"{what}: {path} is a file, expected a folder")
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)  # the nearest that exists
    if blocking is not None and not blocking.is_dir():
        raise ArgumentError(f"{what}: {blocking} is a file, expected a folder to hold {path}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dshal-write-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ArgumentError(f"{what}: cannot write to {folder} ({reason}); expected a writable folder") from None
    return path


@contextlib.contextmanager
def atomic_output(path: Any, *, private: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file in the same folder, flushed
    to disk and renamed over ``path`` when the block ends; when the block raises (a full disk,
    Ctrl-C), the temporary file is removed and ``path`` is left as it was. ``private``: mode
    0600 (a cache entry dshal trusts later), else a report's usual 0666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # closed before the rename or unlink (Windows refuses both on an open file)
            if not private:  # mkstemp makes 0600; fchmod (POSIX; Windows from 3.13) cannot follow a swapped name
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
                else:
                    os.chmod(tmp, 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: Any, data: str | bytes, *, encoding: str = "utf-8", private: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename:
    readers see the old file or the new one, never a partial one (``private``: see
    :func:`atomic_output`)."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_output(path, private=private) as f:
        f.write(raw)
    return Path(path)


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere it is read by setting and
    restoring it, which for that instant gives other threads' new files 022."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


__all__ = ["atomic_output", "atomic_write", "check_writable", "console", "is_terminal"]
