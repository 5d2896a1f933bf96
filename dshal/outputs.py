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

#: The width of output that is not a terminal (a log, ``| grep``, ``| less -S``) when COLUMNS
#: does not say one: in practice none, so each table row and each line stays one line.
UNBOUNDED_WIDTH = 100_000


def console(*, stderr: bool = False, **options: Any) -> Any:
    """The CLI's rich Console.

    Width: a terminal's own (or COLUMNS); output that is not a terminal gets COLUMNS when it is
    set, else :data:`UNBOUNDED_WIDTH`, so a CI log or a pipe never has a row split over lines.
    A rich Table it prints is laid out by :func:`fit_table`: at any width every cell keeps
    every character (rich alone cut numbers and names to "…" at 60 or 80 columns).
    A reader that left (``dshal info | head``) raises BrokenPipeError, which the CLI ends with
    141 as for its plain prints (rich's own handler exits 1, which a ``pipefail`` shell cannot
    tell from a failure). ``options`` go to Console."""
    from rich.console import Console  # rich: only for the commands that print tables
    from rich.table import Table

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

        def print(self, *objects: Any, **kwargs: Any) -> None:
            super().print(*(_FittedTable(o) if isinstance(o, Table) else o for o in objects), **kwargs)

    stream = sys.stderr if stderr else sys.stdout
    if "width" not in options and not is_terminal(stream):
        options["width"] = _size_env("COLUMNS") or UNBOUNDED_WIDTH
    # rich reads COLUMNS / LINES itself and crashes on a Unicode digit ("²".isdigit() is True):
    # it sees them only when they are plain positive numbers.
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES") or _size_env(k)}
    return PipeAwareConsole(stderr=stderr, _environ=environ, **options)


def _size_env(name: str) -> int | None:
    """COLUMNS or LINES when it is a positive whole number in ASCII digits (the size the user
    asked for), else None."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


class _FittedTable:
    """A rich Table printed through :func:`fit_table` at the width it is given."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield fit_table(self.table, console, options)

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement.get(console, options, self.table)


def fit_table(table: Any, console: Any, options: Any) -> Any:
    """``table`` laid out in ``options.max_width`` columns without losing a character.

    Rich shrinks a table that is too wide by cutting cells to "…" (or, with ``no_wrap``,
    cropping them), and it shrinks token columns as readily as prose. Here: a table that fits
    is left alone; one that fits once its cells wrap at spaces gets column widths no narrower
    than each column's longest word (numbers, names and paths stay whole on one line); one
    whose longest words alone are too wide is printed as one "header  value" block per row."""
    import copy

    from rich.measure import Measurement

    room = options.max_width
    unbounded = options.update_width(UNBOUNDED_WIDTH)
    whole = Measurement.get(console, unbounded, table)
    if whole.maximum <= room:
        return table
    spans = [_column_span(console, unbounded, table, column) for column in table.columns]
    frame = whole.maximum - sum(most for _, most in spans)  # borders and cell padding
    if sum(least for least, _ in spans) > room - frame:
        return _stacked(table, console, unbounded, room)
    fitted = copy.copy(table)
    fitted.columns = []
    for column, width in zip(table.columns, _share(room - frame, spans), strict=True):
        column = copy.copy(column)
        column.width, column.min_width, column.max_width = width, None, None
        column.no_wrap, column.overflow = False, "fold"  # fold: a safety net, never "…"
        fitted.columns.append(column)
    return fitted


def _column_span(console: Any, options: Any, table: Any, column: Any) -> tuple[int, int]:
    """(longest word, longest line) of a column's header and cells, padding not included."""
    from rich.measure import Measurement

    cells = ([column.header] if table.show_header else []) + list(column.cells)
    spans = [Measurement.get(console, options, cell) for cell in cells]
    return max((s.minimum for s in spans), default=0), max((s.maximum for s in spans), default=0)


def _share(room: int, spans: list[tuple[int, int]]) -> list[int]:
    """Column widths adding up to ``room``: each its longest word, and what is left shared in
    proportion to how much more each column's longest line needs."""
    widths = [least for least, _ in spans]
    wants = [most - least for least, most in spans]
    spare = room - sum(widths)
    total = sum(wants)
    if total:
        widths = [w + spare * want // total for w, want in zip(widths, wants, strict=True)]
    for i, (_, most) in enumerate(spans):  # the rounding's leftover, one column at a time
        if sum(widths) >= room:
            break
        if widths[i] < most:
            widths[i] += 1
    return widths


def _stacked(table: Any, console: Any, unbounded: Any, width: int) -> Any:
    """``table`` as one block per row: each non-empty cell after its header, or on the lines
    below it (indented) where its longest word would not fit beside the header."""
    from rich.console import Group
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    headers = [console.render_str(h, style="bold") if isinstance(h, str) else h for h in
               (column.header for column in table.columns)]
    key_width = min(max((Measurement.get(console, unbounded, h).maximum for h in headers), default=0),
                    max(8, width // 3))
    lines: list[Any] = []
    if table.title is not None:
        title = table.title
        lines.append(console.render_str(title, style="table.title") if isinstance(title, str) else title)
    for i, row in enumerate(zip(*(list(column.cells) for column in table.columns), strict=True)):
        if i:
            lines.append(Text(""))
        for header, cell in zip(headers, row, strict=True):
            if not str(cell).strip():
                continue
            if key_width + 1 + Measurement.get(console, unbounded, cell).minimum <= width:
                pair = Table.grid(padding=(0, 1))
                pair.add_column(width=key_width, overflow="fold")
                pair.add_column(overflow="fold")
                pair.add_row(header, cell)
                lines.append(pair)
            else:  # a grid column, not a Padding: it folds even in a soft_wrap console, which crops
                below = Table.grid(padding=(0, 0, 0, 2), pad_edge=True)
                below.add_column(overflow="fold")
                below.add_row(cell)
                lines.extend((header, below))
    return Group(*lines)


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


__all__ = ["UNBOUNDED_WIDTH", "atomic_output", "atomic_write", "check_writable", "console", "fit_table", "is_terminal"]
