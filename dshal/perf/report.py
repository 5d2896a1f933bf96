"""What ``dshal bench`` and ``dshal profile`` share around the measurement: their common
options and start-up, and their output -- self-contained HTML reports (inline SVG plots,
tables; no network) and JSON.

Plots are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot, no
global backend switch) and inlined as ``<svg>`` elements.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import torch

from dshal.backend import host_cpus, host_cpus_text
from dshal.cgroups import cpu_quota
from dshal.errors import DshalError
from dshal.outputs import atomic_write, check_writable, console as output_console
from dshal.perf.options import add_common_arguments  # where it was defined: importers keep working
from dshal.redact import shareable, shareable_text
from dshal.runtime import use_for_command

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em; color: #1d1d1f; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
p.note { color: #555; font-size: 0.9em; }
"""

#: Op-type colours shared by every plot of a report (stable across plots).
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
    "#86bcb6",
    "#d37295",
    "#8cd17d",
)


def svg_of(fig: Any) -> str:
    """``fig`` (a matplotlib Figure) as an inline ``<svg>`` element."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})  # reproducible output
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: invalid inside HTML


def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A Figure with one Axes, without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot()


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    #: Indices of columns holding text (left-aligned).
    text_columns: Sequence[int] = (0,)
    caption: str = ""


@dataclass
class Section:
    title: str
    parts: list[tuple[str, Any]] = field(default_factory=list)


class HtmlReport:
    """Build a report: ``meta`` key/values, then sections of tables, figures and notes."""

    def __init__(self, title: str, meta: Mapping[str, Any]):
        self.title = title
        self.meta = dict(meta)
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        s = Section(title)
        self.sections.append(s)
        return s

    @staticmethod
    def add_table(section: Section, table: Table) -> None:
        section.parts.append(("table", table))

    @staticmethod
    def add_figure(section: Section, fig: Any, caption: str) -> None:
        section.parts.append(("figure", (svg_of(fig), caption)))

    @staticmethod
    def add_note(section: Section, text: str) -> None:
        section.parts.append(("note", text))

    def render(self) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
            '<dl class="meta">',
        ]
        out += [f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in self.meta.items()]
        out.append("</dl>")
        for s in self.sections:
            out.append(f"<h2>{e(s.title)}</h2>")
            for kind, part in s.parts:
                if kind == "table":
                    out.append(_table_html(part))
                elif kind == "figure":
                    svg, caption = part
                    out.append(f"<figure>{svg}<figcaption>{e(caption)}</figcaption></figure>")
                else:
                    out.append(f'<p class="note">{e(part)}</p>')
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, path: str | Path) -> Path:
        # temp file + rename: never a half-written report; shareable: no secret, no home folder
        return atomic_write(path, shareable_text(self.render()))


def _table_html(t: Table) -> str:
    e = html.escape
    cls = lambda i: ' class="text"' if i in t.text_columns else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{e(str(h))}</th>" for i, h in enumerate(t.headers))
    body = "\n".join(
        "<tr>" + "".join(f"<td{cls(i)}>{e(str(v))}</td>" for i, v in enumerate(r)) + "</tr>" for r in t.rows
    )
    caption = f"<caption>{e(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (NaN/inf written as null, so any JSON reader takes it), its
    text :func:`~dshal.redact.shareable` (no secret of the environment, no home folder)."""
    return atomic_write(path, json.dumps(shareable(_finite(data)), indent=2, default=str))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


@dataclass
class ReportContents:
    """What a written HTML report holds, read back (for checks and tools)."""

    svgs: int = 0
    imgs: int = 0
    #: Table rows outside the plots, each the list of its cell texts (header rows included).
    rows: list[list[str]] = field(default_factory=list)
    #: Anything a browser would fetch: src/href URLs, script/link/iframe tags.
    external: list[str] = field(default_factory=list)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found = ReportContents()
        self._cell: list[str] | None = None
        self._svg_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.external += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v and "://" in v]
        if tag in ("script", "link", "iframe"):
            self.found.external.append(tag)
        if tag == "svg":
            self.found.svgs += 1
            self._svg_depth += 1
        elif tag == "img":
            self.found.imgs += 1
        elif self._svg_depth:
            return
        elif tag == "tr":
            self.found.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg_depth -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self.found.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_report(text: str) -> ReportContents:
    """Parse an HTML report (``html.parser``): its plots, table rows and external references."""
    reader = _Reader()
    reader.feed(text)
    return reader.found


# ---------------------------------------------------------------- options both commands share
def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None: leave torch's setting)."""
    if threads is None:
        return
    cpus = host_cpus()  # taskset / a container's cpuset: os.cpu_count() counts the machine's
    if not 1 <= threads <= cpus:  # more threads than CPUs only contend (10000 took a minute per case)
        raise DshalError(f"--threads: got {threads}, expected an integer in [1, {cpus}] (the CPUs this process may use)")
    torch.set_num_threads(threads)


def start(args: argparse.Namespace) -> Any:
    """Apply ``--threads`` and activate the runtime of ``--config`` / ``--backend`` / ``--emulate``."""
    check_writable(args.output, "--output")  # before the run, not after it
    check_writable(json_path(args), "--json")
    set_threads(args.threads)
    return use_for_command(args.config, args.backend, emulate=args.emulate)


def json_path(args: argparse.Namespace) -> Path:
    """``--json``, or the HTML path with ``.json``."""
    return Path(args.json) if args.json else Path(args.output).with_suffix(".json")


def platform_info() -> dict[str, Any]:
    """The host: CPU model (as lscpu names it), cores (its affinity), the container's CPU quota
    (None: none), both as the report says them (``cpus``), torch and Python versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    quota = cpu_quota()
    return {"cpu": model, "cores": host_cpus(), "cpu_quota": None if quota is None else quota.cpus,
            "cpus": host_cpus_text(), "torch": torch.__version__, "python": platform.python_version()}


def machine_text(plat: dict[str, Any]) -> str:
    """A report's machine line: ``AMD EPYC ..., 2 cores, torch 2.13.0`` (the CPUs as
    :func:`platform_info` says them; a report written before it did: its core count)."""
    return f"{plat['cpu']}, {plat.get('cpus', str(plat['cores']) + ' cores')}, torch {plat['torch']}"


def console() -> Any:
    """The CLI's rich Console (:func:`dshal.outputs.console`: unbounded width when not a terminal)."""
    return output_console()


# ---------------------------------------------------------------- number formatting
def si(value: float | None, unit: str = "", digits: int = 3) -> str:
    """``1.23 G<unit>``-style formatting; "n/a" for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".rstrip()


def percent(value: float | None) -> str:
    """A percentage with 3 significant digits ("n/a" when unknown)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g} %"


def duration(seconds: float | None) -> str:
    """Seconds as ns/us/ms/s with 3 significant digits."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    for factor, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= factor:
            return f"{seconds / factor:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


# ---------------------------------------------------------------- shared plots
@dataclass(frozen=True)
class RooflineMark:
    """One point on a roofline plot."""

    label: str
    intensity: float
    flops_per_s: float
    #: Legend group (provider name, op type...).
    group: str


def roofline_figure(
    marks: Sequence[RooflineMark],
    peak_flops: Mapping[str, float],
    bandwidth: float | None,
    title: str,
    peak_note: str = "",
) -> Any:
    """Log-log roofline: one roof per peak dtype, the bandwidth slope, and the marks."""
    fig, ax = new_figure(9, 5.5)
    points = [
        m
        for m in marks
        if m.intensity > 0 and math.isfinite(m.intensity) and m.flops_per_s > 0 and math.isfinite(m.flops_per_s)
    ]
    xs = [m.intensity for m in points] or [1.0]
    lo, hi = min(xs) / 4, max(xs) * 4
    if bandwidth and peak_flops:
        lo = min(lo, min(peak_flops.values()) / bandwidth / 8)
        hi = max(hi, max(peak_flops.values()) / bandwidth * 8)
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        for i, (key, peak) in enumerate(sorted(peak_flops.items(), key=lambda kv: -kv[1])):
            ax.plot(
                grid,
                [min(peak, x * bandwidth) for x in grid],
                color="#444",
                lw=1.2,
                ls=("-", "--", ":", "-.")[i % 4],
                label=f"roof {key}: {si(peak, 'FLOP/s')}",
            )
        ax.text(lo * 1.2, lo * bandwidth * 1.5, f"{si(bandwidth, 'B/s')}", color="#444", fontsize=8, rotation=0)
    groups = sorted({m.group for m in points})
    markers = "osD^v<>p*h"
    for gi, g in enumerate(groups):
        mine = [m for m in points if m.group == g]
        ax.scatter(
            [m.intensity for m in mine],
            [m.flops_per_s for m in mine],
            s=36,
            marker=markers[gi % len(markers)],
            color=PALETTE[gi % len(PALETTE)],
            label=g,
            zorder=3,
            edgecolors="black",
            linewidths=0.4,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title + (f"  [{peak_note}]" if peak_note else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:  # nothing measured (every case failed): matplotlib warns on stderr
        ax.legend(fontsize=7, loc="lower right")
    return fig


__all__ = [
    "add_common_arguments",
    "json_path",
    "set_threads",
    "start",
    "HtmlReport",
    "PALETTE",
    "ReportContents",
    "RooflineMark",
    "Section",
    "Table",
    "console",
    "duration",
    "machine_text",
    "new_figure",
    "percent",
    "platform_info",
    "read_report",
    "roofline_figure",
    "si",
    "svg_of",
    "write_json",
]
