"""``dshal matrix REPORT.json... --html F --markdown F``: the hardware matrix.

One column per report (backend on a device), one row per op x dtype. A cell counts the
cases by status and names the worst metric (the case closest to, or furthest past, its
threshold). Each column is one of three kinds, shown apart in both outputs:

* ``hardware`` -- measured on the real device;
* ``emulated`` -- the plugin's own kernels ran on CPU tensors (``platform.emulated``);
* ``not-run``  -- the leg could not run (``platform.not_run`` gives the reason).

The HTML is one self-contained file (inline CSS and JS, no network): click a header to
sort, type to filter rows, pick a kind or status to show only those cells.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from dshal.errors import ConfigError
from dshal.outputs import atomic_write, check_writable
from dshal.redact import shareable
from dshal_conformance.compare import (
    Comparison,
    baseline_paths,
    compare,
    html_section as changes_html,
    markdown as changes_markdown,
    summary_line,
)
from dshal_conformance.legs import (
    FAMILY_KINDS,
    LEGS_CSS,
    checked,
    clip,
    html_tables as legs_html,
    leg_key,
    markdown as legs_markdown,
    md_cell,
    parse_age,
    prepare as prepare_legs,
)
from dshal_conformance.report import is_environment_file, load, summarize

KIND_LABEL = {"hardware": "HW", "emulated": "EMU", "not-run": "NOT RUN"}
#: Status as a symbol, beside the cell's colour (a colour-blind reader, a monochrome print).
STATUS_MARK = {"pass": "✅", "fail": "❌", "unsupported": "➖", "skip": "⏭"}
#: The Markdown's default size cap: GitHub refuses a ``$GITHUB_STEP_SUMMARY`` over 1 MiB (1,048,576 bytes).
MARKDOWN_MAX_BYTES = 1_000_000
#: How much of a not-run leg's reason each of its op-table cells repeats (all of it: under Reports).
NOT_RUN_CELL_CHARS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", metavar="REPORT.json", help="conformance reports (dshal.conformance/1)")
    parser.add_argument("--html", metavar="F", help="write the HTML matrix here")
    parser.add_argument("--markdown", metavar="F", help="write the Markdown matrix here")
    parser.add_argument("--no-dtype", action="store_true", help="one row per op instead of per op x dtype")
    parser.add_argument("--baseline", metavar="REPORT|DIR", action="append", default=[],
                        help="reports of an earlier run (files, or folders searched for *.json; repeatable): each "
                        "leg's cases are compared with the same leg's there: regressed, new failing, lost, fixed")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="with --baseline: exit 1 when a case that passed there (or was unsupported or "
                        "skipped) fails now, a new case fails, a leg is broken now, or a leg there did not run now")
    parser.add_argument("--expect", metavar="LEG,LEG", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                        help="the CI legs that must have a report (their platform.leg, set by "
                             "DSHAL_CONFORMANCE_LEG): exit 1 naming each one no report comes from (a runner that "
                             "never ran or uploaded nothing would otherwise just vanish from the matrix)")
    parser.add_argument("--markdown-max-bytes", metavar="N", type=int, default=MARKDOWN_MAX_BYTES,
                        help="cut the Markdown at N bytes (UTF-8), ending it with a line that says how much was left "
                             f"out (default {MARKDOWN_MAX_BYTES}: GitHub refuses a step summary over 1 MiB; 65000 for a "
                             "PR comment)")
    parser.add_argument("--stale-after", metavar="AGE",
                        help="mark a leg stale when its report is older than AGE (30d, 12h, 2w) or came from another "
                             "plugin version than the one installed here")


@dataclass
class Column:
    key: str
    backend: str
    device: str
    arch: str
    kind: str
    reason: str = ""
    summary: dict[str, int] = field(default_factory=dict)
    #: Set by build() when another column would have the same header: what tells them apart.
    tag: str = ""
    #: A leg that did not run because it is broken (``platform.broken``: a plugin that failed to
    #: load, a misspelled backend): drawn as a failure, not a grey "not run".
    broken: str = ""

    @property
    def not_run_text(self) -> str:
        return f"broken, the leg fails: {self.broken}: {self.reason}" if self.broken else f"not run: {self.reason}"

    @property
    def label(self) -> str:
        base = f"{self.backend} ({KIND_LABEL[self.kind].lower()})" if self.kind != "hardware" else self.backend
        return f"{base} [{self.tag}]" if self.tag else base


@dataclass
class Cell:
    counts: Counter = field(default_factory=Counter)
    worst: dict[str, Any] | None = None
    worst_key: tuple[bool, float] = (False, -1.0)

    @property
    def status(self) -> str:
        if self.counts["fail"] or self.counts["error"]:
            return "fail"
        if self.counts["pass"]:
            return "pass"
        if self.counts["unsupported"]:
            return "unsupported"
        return "skip"

    def add(self, case: dict[str, Any]) -> None:
        self.counts[case["status"]] += 1
        b = badness(case)
        if b is None:
            return
        key = (case["status"] in ("fail", "error"), b)  # failing cases first, then the worst margin
        if self.worst is None or key > self.worst_key:
            self.worst, self.worst_key = case, key

    def text(self) -> str:
        total = sum(self.counts.values())
        ok = self.counts["pass"]
        parts = [f"{ok}/{total} pass"]
        for status in ("fail", "error", "unsupported", "skip"):
            if self.counts[status]:
                parts.append(f"{self.counts[status]} {status}")
        return ", ".join(parts)

    def worst_text(self) -> str:
        if not self.worst:
            return ""
        w = self.worst
        if not w.get("metric"):  # a failure with no number (a crash, a broken contract): say which case
            return f"{w['status']} {w['id']}"
        op = ">=" if "sqnr" in w["metric"] else "<="
        text = f"{w['metric']} {_fmt(w['value'])} ({op} {_fmt(w['threshold'])})"
        # A case that errored before its metric was measured can carry a passing-looking number.
        return f"{text}, {w['status']}" if w["status"] in ("fail", "error") else text


def _fmt(v: Any) -> str:
    if v is None:
        return "inf"
    v = float(v)
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def badness(case: dict[str, Any]) -> float | None:
    """How close a case came to its threshold (1 = at it; larger is worse); None without numbers."""
    v, t, m = case.get("value"), case.get("threshold"), case.get("metric") or ""
    if v is None and t is None:
        return math.inf if case["status"] in ("fail", "error") else None
    if v is None:  # infinite value: SQNR inf is perfect, an error ratio inf is a failure
        return 0.0 if "sqnr" in m else math.inf
    if t is None:
        return None
    if "sqnr" in m:
        return t / v if v > 0 else math.inf
    return v / t if t else (0.0 if v == 0 else math.inf)


def column_of(report: dict[str, Any]) -> Column:
    p = report["platform"]
    kind = "not-run" if "not_run" in p else ("emulated" if p["emulated"] else "hardware")
    key = f"{report['backend']}@{p['device']}:{kind}"
    return Column(key, report["backend"], p["device"], p["arch"], kind, p.get("not_run", ""), dict(report["summary"]),
                  broken=p.get("broken", ""))


def distinct_tails(paths: list[str]) -> list[str]:
    """Each of ``paths`` by as few of its last parts as tell it from the others
    (``["/w/reports/h100/nvidia.json", "reports/h200/nvidia.json"]`` -> ``["h100/nvidia.json",
    "h200/nvidia.json"]``): the same however each path was given (absolute, relative, from which
    folder), and no runner's workspace folder in a shared matrix. A path that no tail tells apart
    (the same file given twice) is given whole."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    out = []
    for mine in parts:
        for n in range(1, len(mine) + 1):
            if sum(other[-n:] == mine[-n:] for other in parts) == 1:
                out.append("/".join(mine[-n:]))
                break
        else:
            out.append(str(Path(*mine)))
    return out


def build(reports: list[dict[str, Any]], by_dtype: bool = True) -> tuple[list[Column], list[tuple[str, str]], dict[tuple[str, str, str], Cell]]:
    """Columns, row keys (op, dtype) and cells keyed (column key, op, dtype). Columns that
    would share a header (one backend, device and kind twice) get a tag telling them apart:
    the report's file (``_source``, set by :func:`main`; as few of its last path parts as tell
    it from the others', so that ``reports/h100/nvidia.json`` reads ``h100/nvidia.json`` however
    the path was given and wherever the runner's workspace was), else its start time and seed."""
    columns: list[Column] = []
    cells: dict[tuple[str, str, str], Cell] = {}
    rows: set[tuple[str, str]] = set()
    clashing = Counter(column_of(rep).key for rep in reports)
    selections: dict[str, set[str]] = {}
    sources: dict[str, list[str]] = {}
    for rep in reports:
        selections.setdefault(column_of(rep).key, set()).add(checked(rep))
        if rep.get("_source"):
            sources.setdefault(column_of(rep).key, []).append(rep["_source"])
    tails = {key: dict(zip(paths, distinct_tails(paths))) for key, paths in sources.items()}
    for index, rep in enumerate(reports, 1):
        col = column_of(rep)
        if clashing[col.key] > 1:  # what the run checked, where that differs (a partial run); then where it came from
            where = tails[col.key][rep["_source"]] if rep.get("_source") else f"#{index}, {rep['started']}, seed {rep['seed']}"
            col.tag = ", ".join(part for part in (checked(rep) if len(selections[col.key]) > 1 else "", where) if part)
        n, base = 2, col.key
        while any(c.key == col.key for c in columns):  # two reports of one backend/device/kind
            col.key, n = f"{base}#{n}", n + 1
        columns.append(col)
        for case in rep["cases"]:
            if case.get("kind") in FAMILY_KINDS:  # model / determinism / graph: their own tables (legs.py)
                continue
            row = (case["op"], case["dtype"] if by_dtype else "")
            rows.add(row)
            cells.setdefault((col.key, *row), Cell()).add(case)
    return columns, sorted(rows), cells


# ------------------------------------------------------------------ Markdown
def to_markdown(reports: list[dict[str, Any]], by_dtype: bool = True, stale_after: timedelta | None = None,
                changes: Comparison | None = None, missing: Sequence[str] = (),
                max_bytes: int | None = MARKDOWN_MAX_BYTES) -> str:
    """The matrix as Markdown (GitHub's), cut to ``max_bytes`` by :func:`cap_markdown` (None: whole)."""
    reports, notes = prepare_legs(reports, stale_after)
    columns, rows, cells = build(reports, by_dtype)
    head = ["op", "dtype"] + [md_cell(f"{c.label} · {c.device}") + f" `{KIND_LABEL[c.kind]}`" + (" `STALE`" if n.stale else "")
                              for c, n in zip(columns, notes)]
    lines = [
        "# dshal hardware matrix",
        "",
        "`HW` = measured on the device; `EMU` = the plugin's kernels emulated on CPU tensors (not a hardware result); "
        "`NOT RUN` = the leg could not run (reason given).",
        "",
        *[f"**❌ MISSING leg: {md_cell(missing_text(leg))}**\n" for leg in missing],
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    mark = STATUS_MARK
    for op, dtype in rows:
        out = [md_cell(op), md_cell(dtype or "-")]  # a report's text, not markup
        for c in columns:
            if c.kind == "not-run":
                out.append(md_cell(("❌ " if c.broken else "⏸ ") + c.not_run_text, NOT_RUN_CELL_CHARS))
                continue
            cell = cells.get((c.key, op, dtype))
            if cell is None:
                out.append("")
                continue
            worst = cell.worst_text()
            out.append(md_cell(f"{mark[cell.status]} {cell.text()}") + (f"<br>worst: {md_cell(worst)}" if worst else "") + f" `{KIND_LABEL[c.kind]}`"
                       + (" `STALE`" if notes[columns.index(c)].stale else ""))
        lines.append("| " + " | ".join(out) + " |")
    lines += ["", "## Reports", ""]
    for c, rep in zip(columns, reports):
        note = f" — {md_cell(c.not_run_text)}" if c.kind == "not-run" else ""
        lines.append(f"- **{md_cell(c.label)}** {report_line(c, rep, lambda text: md_cell(text, 1000))}{note}")
    text = "\n".join(lines) + "\n" + (changes_markdown(changes) if changes else "") + legs_markdown(reports, notes)
    return text if max_bytes is None else cap_markdown(text, max_bytes)


def cap_markdown(text: str, max_bytes: int) -> str:
    """``text`` whole if it fits in ``max_bytes`` (UTF-8), else its first whole lines and a last
    line saying how much was left out and where all of it is: GitHub refuses a step summary over
    1 MiB and a PR comment over 65,536 characters, and the step's summary would be lost."""
    size = len(text.encode())
    if size <= max_bytes:
        return text

    def note(lines_left: int, bytes_left: int) -> str:  # after a blank line: a table above it ends there
        return (f"\n**✂️ Cut at {max_bytes} bytes: {lines_left} more lines ({bytes_left} bytes) not shown here; "
                "see the HTML matrix and the JSON reports (the workflow's artifacts) for all of it.**\n")

    lines = text.splitlines(keepends=True)
    budget = max_bytes - len(note(len(lines), size).encode())  # the longest the note can be
    used = kept = 0
    for line in lines:
        n = len(line.encode())
        if used + n > budget:
            break
        used, kept = used + n, kept + 1
    if 0 < kept < len(lines) and _DELIMITER_ROW.fullmatch(lines[kept].rstrip("\n")):
        # its delimiter row cut off, a table's header would show as a stray line of bars
        kept -= 1
        used -= len(lines[kept].encode())
    return "".join(lines[:kept]) + note(len(lines) - kept, size - used)


#: A Markdown table's delimiter row (``|---|---|``), the line after its header.
_DELIMITER_ROW = re.compile(r"\|(\s*:?-+:?\s*\|)+")


def report_line(c: Column, rep: dict[str, Any], escape: Any) -> str:
    """One report's provenance and totals (``escape``: str for Markdown, html.escape for HTML)."""
    s = c.summary
    return escape(
        f"on {c.device} ({c.arch or '-'}, {c.kind}): passed {s['passed']}, failed {s['failed']}, errors {s['errors']}, "
        f"unsupported {s['unsupported']}, skipped {s['skipped']}; plugin {rep['plugin_version']}, "
        f"dshal {rep['dshal_version']}, seed {rep['seed']}, {rep['started']}"
    )


# ------------------------------------------------------------------ HTML
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}tbody th{text-align:left}#matrix thead th{cursor:pointer;user-select:none}th.sorted-asc:after{content:" ▲"}th.sorted-desc:after{content:" ▼"}
td.cell{min-width:11em}
td.kind-hardware{border:2px solid #333}
td.kind-emulated{border:2px dashed #8a6d00;background-image:repeating-linear-gradient(45deg,transparent 0 8px,rgba(255,200,0,.10) 8px 16px)}
td.kind-not-run{background:#eee;color:#666;font-style:italic}
td.status-pass{background-color:#e7f6e7}td.status-fail{background-color:#fbe3e3}
td.status-unsupported{background-color:#f0f0ff}td.status-skip{background-color:#f7f7f7}
.badge{display:inline-block;font-size:11px;font-weight:bold;padding:0 4px;border-radius:3px;margin-left:4px}
.badge.hardware{background:#333;color:#fff}.badge.emulated{background:#ffd34d;color:#333}.badge.not-run{background:#999;color:#fff}
.worst{font-size:12px;color:#555}.controls{margin:1em 0}.controls *{margin-right:1em}
"""

JS = """
(function(){
  const table=document.getElementById('matrix');
  const body=table.tBodies[0],heads=table.tHead.querySelectorAll('th');
  document.getElementById('controls').hidden=false;
  heads.forEach((th,i)=>th.addEventListener('click',()=>{
    const asc=!th.classList.contains('sorted-asc');
    heads.forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
    th.classList.add(asc?'sorted-asc':'sorted-desc');
    const key=r=>{const c=r.cells[i];return c.dataset.sort!==undefined?parseFloat(c.dataset.sort):c.textContent.trim();};
    const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);
      const d=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));return asc?d:-d;});
    rows.forEach(r=>body.appendChild(r));
  }));
  const text=document.getElementById('filter'),kind=document.getElementById('kind'),status=document.getElementById('status');
  function apply(){
    const q=text.value.toLowerCase();
    Array.from(body.rows).forEach(r=>{
      const hit=!q||r.cells[0].textContent.toLowerCase().includes(q)||r.cells[1].textContent.toLowerCase().includes(q);
      let any=false;
      Array.from(r.cells).slice(2).forEach(c=>{
        const show=(!kind.value||c.dataset.kind===kind.value)&&(!status.value||c.dataset.status===status.value);
        c.style.opacity=show?'1':'0.15';any=any||show;});
      r.style.display=(hit&&any)?'':'none';
    });
  }
  [text,kind,status].forEach(e=>e.addEventListener('input',apply));
})();
"""


def to_html(reports: list[dict[str, Any]], by_dtype: bool = True, stale_after: timedelta | None = None,
            changes: Comparison | None = None, missing: Sequence[str] = ()) -> str:
    reports, notes = prepare_legs(reports, stale_after)
    columns, rows, cells = build(reports, by_dtype)
    e = html.escape
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dshal hardware matrix</title>",
        f"<style>{CSS}{LEGS_CSS}</style></head><body>",
        "<h1>dshal hardware matrix</h1>",
        "<p>Cells: cases passed / total, then the worst metric against its threshold. "
        "<span class='badge hardware'>HW</span> measured on the device (solid border); "
        "<span class='badge emulated'>EMU</span> the plugin's kernels emulated on CPU tensors (dashed, striped: not a hardware result); "
        "<span class='badge not-run'>NOT RUN</span> the leg could not run (grey, with the reason).</p>",
        *[f"<p class='missing' data-missing-leg='{e(leg)}'><b>❌ MISSING leg: {e(missing_text(leg))}</b></p>" for leg in missing],
        # hidden until the script shows it: without JavaScript the controls would do nothing
        "<div class='controls' id='controls' hidden><label>filter ops <input id='filter' type='search' placeholder='e.g. fp8_gemm'></label>"
        "<label>kind <select id='kind'><option value=''>all</option><option value='hardware'>hardware</option>"
        "<option value='emulated'>emulated</option><option value='not-run'>not run</option></select></label>"
        "<label>status <select id='status'><option value=''>all</option><option>pass</option><option>fail</option>"
        "<option>unsupported</option><option>skip</option><option value='not-run'>not run</option></select></label></div>",
        "<table id='matrix'><thead><tr><th scope='col'>op</th><th scope='col'>dtype</th>",
    ]
    for c in columns:
        out.append(
            f"<th scope='col' data-backend='{e(c.backend)}' data-kind='{c.kind}' title='{e(c.device)} {e(c.arch)}'>{e(c.backend)} "
            f"<span class='badge {c.kind}'>{KIND_LABEL[c.kind]}</span>"
            + ("<span class='badge stale'>STALE</span>" if notes[columns.index(c)].stale else "")
            + f"<br><small>{e(c.device)}</small>"
            + (f"<br><small>{e(c.tag)}</small>" if c.tag else "")
            + "</th>"
        )
    out.append("</tr></thead><tbody>")
    for op, dtype in rows:
        out.append(f"<tr><th scope='row'>{e(op)}</th><td>{e(dtype or '-')}</td>")
        for c in columns:
            attrs = f"data-backend='{e(c.backend)}' data-column='{e(c.key)}' data-op='{e(op)}' data-dtype='{e(dtype)}' data-kind='{c.kind}'"
            if c.kind == "not-run":
                status = "fail" if c.broken else "not-run"
                out.append(
                    f"<td class='cell kind-not-run status-{status}' {attrs} data-status='{status}' data-sort='-1'>"
                    f"{'❌ ' if c.broken else ''}{e(clip(c.not_run_text, NOT_RUN_CELL_CHARS, 'under Reports'))}</td>"
                )
                continue
            cell = cells.get((c.key, op, dtype))
            if cell is None:
                out.append(f"<td class='cell kind-{c.kind}' {attrs} data-status='none' data-sort='-2'></td>")
                continue
            sort = cell.counts["pass"] / max(sum(cell.counts.values()), 1)
            worst = e(cell.worst_text())
            stale = notes[columns.index(c)].stale
            out.append(
                f"<td class='cell kind-{c.kind} status-{cell.status}{' stale' if stale else ''}' {attrs} data-status='{cell.status}' "
                f"data-stale='{1 if stale else 0}' "
                f"data-passed='{cell.counts['pass']}' data-failed='{cell.counts['fail'] + cell.counts['error']}' data-sort='{sort:.4f}'>"
                f"{STATUS_MARK[cell.status]} {e(cell.text())}<span class='badge {c.kind}'>{KIND_LABEL[c.kind]}</span>"
                + ("<span class='badge stale'>STALE</span>" if stale else "")
                + (f"<div class='worst'>worst: {worst}</div>" if worst else "")
                + "</td>"
            )
        out.append("</tr>")
    out.append("</tbody></table><h2>Reports</h2><ul>")
    for c, rep in zip(columns, reports):
        note = f" — <em>{e(c.not_run_text)}</em>" if c.kind == "not-run" else ""
        out.append(f"<li><b>{e(c.label)}</b> {report_line(c, rep, e)}{note}</li>")
    out.append("</ul>" + (changes_html(changes) if changes else "") + legs_html(reports, notes))
    out.append(f"<script>{JS}</script></body></html>")
    return "\n".join(out)


def _stale_after(args: argparse.Namespace) -> timedelta | None:
    if not getattr(args, "stale_after", None):
        return None
    try:
        return parse_age(args.stale_after)
    except ValueError as err:
        raise ConfigError(f"--stale-after: {err}") from None


def read_reports(paths: list[str], warn: Any = None) -> list[dict[str, Any]]:
    """Load ``paths`` (ReportError on a bad one), warning through ``warn(message)`` about a
    report given twice (kept once) and a summary that contradicts its own cases (the
    matrix counts the cases)."""
    warn = warn or (lambda message: print(f"dshal matrix: warning: {message}", file=sys.stderr))
    reports: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], str] = {}
    for path in paths:
        if is_environment_file(path):  # `reports/*/*.json` over a bundle folder
            warn(f"{path} is a bundle's environment file, not a report; left out")
            continue
        rep = shareable(load(path))  # an earlier suite's report may name a home folder; the matrix is shared
        identity = (rep["backend"], rep["started"], rep["seed"], rep["platform"].get("device"), rep["platform"].get("leg"),
                    len(rep["cases"]), rep["duration_s"])
        if identity in seen:
            warn(f"{path} is the same report as {seen[identity]} (backend {rep['backend']}, started {rep['started']}); "
                 "listed once")
            continue
        seen[identity] = path
        for note in rep.pop("_read_notes", ()):
            warn(f"{path}: {note}")
        counted = summarize(rep["cases"])
        if counted != rep["summary"]:
            diff = ", ".join(f"{k} {rep['summary'].get(k)} vs {v}" for k, v in counted.items() if rep["summary"].get(k) != v)
            warn(f"{path}: its summary contradicts its cases ({diff} counted); the matrix uses the counted cases")
            rep["summary"] = counted
        rep["_source"] = str(path)
        reports.append(rep)
    return reports


#: The smallest --markdown-max-bytes: the note that ends a cut document must fit.
MIN_MARKDOWN_BYTES = 1000


def main(args: argparse.Namespace) -> int:
    max_bytes = getattr(args, "markdown_max_bytes", MARKDOWN_MAX_BYTES)
    if max_bytes < MIN_MARKDOWN_BYTES:
        raise ConfigError(f"--markdown-max-bytes: got {max_bytes}, expected at least {MIN_MARKDOWN_BYTES} "
                          "(room for the line that says what was cut)")
    for flag in ("html", "markdown"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag}")
    reports = read_reports(args.reports)
    by_dtype = not args.no_dtype
    stale_after = _stale_after(args)
    if args.fail_on_regression and not args.baseline:
        raise ConfigError("--fail-on-regression needs --baseline REPORT|DIR (what to compare with)")
    changes = None
    if args.baseline:
        changes = compare(reports, read_reports(baseline_paths(args.baseline), warn=lambda message: None))
    # With no file named, stdout is the Markdown document (`dshal matrix ... > matrix.md`): the
    # lines about it go to stderr, or they ended up in the document.
    markdown_on_stdout = not args.html and not args.markdown
    notes = sys.stderr if markdown_on_stdout else sys.stdout
    for rep, note in zip(*prepare_legs(reports, stale_after)):
        if note.dropped:
            print(f"{leg_key(rep)[0]} ({leg_key(rep)[2]}): {note.merged}", file=notes)
    missing = missing_legs(reports, getattr(args, "expect", None) or [])
    if markdown_on_stdout:
        print(to_markdown(reports, by_dtype, stale_after, changes, missing, max_bytes), end="")
    if args.html:
        atomic_write(args.html, to_html(reports, by_dtype, stale_after, changes, missing))
        print(f"html: {args.html}")
    if args.markdown:
        atomic_write(args.markdown, to_markdown(reports, by_dtype, stale_after, changes, missing, max_bytes))
        print(f"markdown: {args.markdown}")
    failed = False
    if changes is not None:
        for leg in changes.legs:
            print(("REGRESSED " if leg.bad else "") + summary_line(leg), file=notes)
        for title, legs in (("new leg", changes.new_legs), ("GONE baseline leg not run now", changes.gone_legs),
                            ("came online (not run in the baseline)", changes.online_legs),
                            ("BROKEN now", changes.broken_legs)):
            for leg_name in legs:
                print(f"{title}: {leg_name}", file=notes)
        failed = args.fail_on_regression and changes.bad
    for leg in missing:
        print(f"MISSING leg: {missing_text(leg)}", file=notes)
    return 1 if failed or missing else 0


def missing_text(leg: str) -> str:
    return f"{leg} (no report has platform.leg {leg!r}: its runner did not run, or uploaded nothing)"


def missing_legs(reports: list[dict[str, Any]], expected: list[str]) -> list[str]:
    """The names in ``expected`` that no report's ``platform.leg`` carries."""
    present = {rep["platform"].get("leg") for rep in reports}
    return [leg for leg in expected if leg not in present]
