"""The matrix's legs: when and on what each was measured, which are stale, which merged;
and the families beyond single ops (``model``, ``determinism``, ``graph``, ``hooks``) per leg.

- :func:`prepare` merges reports of the same leg (backend, device, kind) keeping the
  newest (by ``started``) and says which were dropped; with ``stale_after`` it marks a leg
  stale when its report is older than that age or was produced by another plugin version
  than the one installed here;
- :func:`markdown` / :func:`html_tables` render the legs table (versions, date, notes,
  and one column per family: op, model, determinism, graph, hooks) and one table per family.

Reading reports needs no torch (``dshal matrix`` stays light).
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

#: Case kinds of the families beyond single ops (not rows of the op table).
FAMILY_KINDS = ("model", "determinism", "graph", "hooks")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s`` -> a timedelta (ValueError otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise ValueError(f"got {text!r}, expected a number and a unit s, m, h, d or w (e.g. 30d)")
    try:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:  # past timedelta's range: was a traceback, not the caller's ValueError
        raise ValueError(f"got {text!r}, expected at most {timedelta.max.days} days") from None


@dataclass
class LegNote:
    """What the matrix says about one leg besides its cases."""

    stale: list[str] = field(default_factory=list)
    #: ``started`` of the reports of this leg that were dropped for a newer one.
    dropped: list[str] = field(default_factory=list)

    @property
    def merged(self) -> str:
        if not self.dropped:
            return ""
        return (f"newest of {len(self.dropped) + 1} reports of this leg kept; dropped the one(s) started "
                + ", ".join(self.dropped))


def leg_key(report: dict[str, Any]) -> tuple[str, str, str, str, str, str, str]:
    """What makes two reports the same leg (a rerun, merged keeping the newest): backend,
    device, kind, arch, host system, the CI leg name (``platform.leg``: two runners whose
    devices were both missing report the same device, "not run") and what the run checked
    (tier and selection: a partial rerun never replaces a whole run). Legs that share a header
    but differ in arch or host stay apart (the matrix tags their columns with their files)."""
    p = report["platform"]
    kind = "not-run" if "not_run" in p else ("emulated" if p.get("emulated") else "hardware")
    return (report["backend"], p.get("device", ""), kind, str(p.get("arch") or ""), host_system(p.get("host")),
            str(p.get("leg") or ""), checked(report))


def leg_order(key: tuple[str, ...]) -> tuple[str, ...]:
    """Where a leg (its :func:`leg_key`) stands among the matrix's columns: by CI leg name, then
    backend and device, whatever order the reports were given in (a shell glob's or ``find |
    sort``'s order depends on the locale) -- so a column keeps its place from run to run, also
    when its runner lost its device and the leg became "not run"."""
    backend, device, kind, arch, host, leg, what = key
    return (leg, backend, device, kind, arch, host, what)


def host_system(host: Any) -> str:
    """``Linux x86_64`` of a report's ``platform.host`` (``Linux-6.8.0-1014-azure-x86_64-with-glibc2.39
    x86_64``): the kernel release and libc change with every runner image, and a leg with them
    in its key never met its baseline."""
    text = str(host or "")
    return f"{text.split('-', 1)[0]} {text.split()[-1]}" if text.split() else ""


def checked(report: dict[str, Any]) -> str:
    """What the run checked, as a label: the tier where not ci, and ``--ops`` / ``--case`` /
    ``--no-collectives`` where given ('' for a whole ci run)."""
    parts = [] if report.get("tier", "ci") == "ci" else [f"tier {report['tier']}"]
    chosen = report.get("selection") or {}
    if chosen.get("ops"):  # sorted: an earlier suite wrote them in the order given
        parts.append("--ops " + ",".join(sorted(set(chosen["ops"]))))
    for case in sorted(set(chosen.get("cases") or ())):
        parts.append(f"--case {case}")
    if chosen.get("collectives") is False:
        parts.append("--no-collectives")
    return " ".join(parts)


def _recency(report: dict[str, Any]) -> tuple[datetime, str]:
    """Which of two reports of one leg is the newer: by ``started`` (to the second), then by
    content, so that two started in the same second keep the same one in any given order."""
    content = json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return _started(report), content


def _started(report: dict[str, Any]) -> datetime:
    try:
        when = datetime.fromisoformat(report["started"])
    except (KeyError, TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def installed_plugin_version(backend: str) -> str | None:
    """Version of the distribution that registers ``backend`` here (None: not installed)."""
    import importlib.metadata as md

    for ep in md.entry_points(group="dshal.backends"):
        if ep.name == backend and ep.dist is not None:
            return ep.dist.version
    return None


def prepare(reports: list[dict[str, Any]], stale_after: timedelta | None = None,
            now: datetime | None = None) -> tuple[list[dict[str, Any]], list[LegNote]]:
    """The reports with one per leg (the newest) and a note each, legs in :func:`leg_order`."""
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    dropped: dict[tuple[str, str, str], list[str]] = {}
    order: list[tuple[str, str, str]] = []
    for rep in reports:
        key = leg_key(rep)
        if key not in newest:
            newest[key] = rep
            order.append(key)
            continue
        older, kept = sorted((newest[key], rep), key=_recency)
        newest[key] = kept
        dropped.setdefault(key, []).append(older["started"])
    now = now or datetime.now(UTC)
    kept_reports, notes = [], []
    for key in sorted(order, key=leg_order):
        rep = newest[key]
        note = LegNote(dropped=sorted(dropped.get(key, [])))
        if stale_after is not None:  # a "not run" or broken cell ages too: it says what was true then
            age = now - _started(rep)
            if age > stale_after:
                note.stale.append(f"report is {_age(age)} old (over {_age(stale_after)})")
            installed = installed_plugin_version(rep["backend"])
            if key[2] != "not-run" and installed is not None and rep.get("plugin_version") not in (None, installed):
                note.stale.append(f"produced by plugin {rep['plugin_version']}, installed here: {installed}")
        kept_reports.append(rep)
        notes.append(note)
    return kept_reports, notes


def _age(delta: timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f} d" if days >= 1 else f"{delta.total_seconds() / 3600:.1f} h"


# ------------------------------------------------------------------ per-family summaries
def _cases(report: dict[str, Any], kind: str | None) -> list[dict[str, Any]]:
    if kind is None:
        return [c for c in report["cases"] if c.get("kind") not in FAMILY_KINDS]
    return [c for c in report["cases"] if c.get("kind") == kind]


def _count(cases: list[dict[str, Any]]) -> str:
    if not cases:
        return "no cases"
    n = Counter(c["status"] for c in cases)
    mark = "❌" if n["fail"] or n["error"] else ("✅" if n["pass"] else "➖")
    extra = ", ".join(f"{n[s]} {s}" for s in ("fail", "error", "unsupported", "skip") if n[s])
    return f"{mark} {n['pass']}/{len(cases)} pass" + (f", {extra}" if extra else "")


def family_summary(report: dict[str, Any], family: str) -> str:
    """One cell of the legs table: the family's outcome on this leg."""
    if "not_run" in report["platform"]:
        return "not run"
    if family == "op":
        return _count(_cases(report, None))
    cases = _cases(report, family)
    if not cases:
        return "not in this report"
    if family == "determinism":
        det = [c for c in cases if c["id"].endswith("/repeat")]
        inv = [c for c in cases if c["id"].endswith("/batch-invariant")]
        ok = lambda group: sum(c["status"] == "pass" for c in group)  # noqa: E731
        return f"deterministic {ok(det)}/{len(det)}, batch-invariant {ok(inv)}/{len(inv)}"
    if family == "graph":
        replay = [c for c in cases if c["id"].endswith("/replay")]
        sync = [c for c in cases if c["id"].endswith("/host-sync")]
        if replay and all(c["status"] == "unsupported" and not c.get("finding") for c in replay):
            text = "replay: no device graph"
        else:
            text = f"replay = eager {sum(c['status'] == 'pass' for c in replay)}/{len(replay)}"
        if sync and all(c["status"] == "unsupported" and not c.get("finding") for c in sync):
            return text + "; host syncs: n/a"
        return text + f"; sync-free {sum(c['status'] == 'pass' for c in sync)}/{len(sync)}"
    if family == "hooks":
        consistent = [c for c in cases if c["id"].endswith("/consistent")]
        judged = [c for c in consistent if c["status"] != "unsupported"]
        text = f"consistent {sum(c['status'] == 'pass' for c in judged)}/{len(judged)}"
        if len(judged) < len(consistent):
            text += f" ({len(consistent) - len(judged)} not reported)"
        tracking = _pair_cell(cases, "/tracks-allocation", "/none", (HOOK_LABELS[1], ""))
        return text + (f"; {tracking}" if tracking else "")
    return _count(cases)


def _versions(report: dict[str, Any]) -> str:
    p = report["platform"]
    parts = [f"plugin {report.get('plugin_version') or '-'}", f"suite {report.get('suite_version') or '-'}",
             f"torch {p.get('torch') or '-'}",
             f"triton {p.get('triton') or '-'}", f"driver {p.get('driver') or '-'}", f"runtime {p.get('runtime') or '-'}"]
    return ", ".join(parts)


def leg_label(report: dict[str, Any]) -> str:
    """``backend (kind) · device``: how the tables name a leg."""
    key = leg_key(report)
    backend, device, kind, leg, what = key[0], key[1], key[2], key[5], key[-1]
    return f"{backend} ({kind}) · {device}" + (f" @{leg}" if leg else "") + (f" [{what}]" if what else "")


# ------------------------------------------------------------------ family detail rows
def _model_cell(cases: list[dict[str, Any]]) -> str:
    drift = next((c for c in cases if c["id"].endswith("/drift")), None)
    tokens = next((c for c in cases if c["id"].endswith("/tokens")), None)
    if drift is None:
        return ""
    if drift["status"] in ("unsupported", "skip", "error"):
        return f"{drift['status']}: {drift['reason']}"
    d = drift.get("details") or {}
    mark = "✅" if drift["status"] == "pass" and (tokens is None or tokens["status"] == "pass") else "❌"
    text = f"{mark} drift {_num(d.get('logit_drift'))} (≤ {_num(d.get('tolerance'))})"
    if d.get("first_layer_over"):
        text += f", first layer over: {d['first_layer_over']}"
    if tokens is not None and tokens.get("details"):
        t = tokens["details"]
        text += f"; tokens {t['agreed']}/{t['decisive']}"
    if d.get("reference_served"):
        text += f"; reference served: {', '.join(d['reference_served'])}"
    return text


def _pair_cell(cases: list[dict[str, Any]], first: str, second: str, labels: tuple[str, str]) -> str:
    out = []
    for suffix, label in zip((first, second), labels):
        c = next((c for c in cases if c["id"].endswith(suffix)), None)
        if c is None:
            continue
        if c["status"] == "pass":
            out.append(f"{label} ✅")
        elif c.get("finding"):
            out.append(f"{label} ❌ ({c['finding']})")
        elif c["status"] == "unsupported":
            out.append(f"{label} ➖")
        else:
            out.append(f"{label} {c['status'].upper()}")
    return " · ".join(out)


def _num(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.2e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3g}"


def family_rows(reports: list[dict[str, Any]], family: str) -> tuple[list[str], dict[str, list[str]]]:
    """Row labels and, per row, one cell text per report."""
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    for i, rep in enumerate(reports):
        for c in _cases(rep, family):
            row = c["params"].get("mode", c["op"]) if family == "model" else f"{c['op']} ({c['dtype']})" if family == "determinism" else c["op"]
            if family == "model" and c["id"].startswith("model/deep/"):
                row += " (deep)"
            groups.setdefault(row, [[] for _ in reports])[i].append(c)
    cells: dict[str, list[str]] = {}
    for row, per_report in groups.items():
        out = []
        for rep, cases in zip(reports, per_report):
            if "not_run" in rep["platform"]:
                out.append("not run")
            elif family == "model":
                out.append(_model_cell(cases))
            elif family == "determinism":
                out.append(_pair_cell(cases, "/repeat", "/batch-invariant", ("deterministic", "batch-invariant")))
            elif family == "hooks":
                out.append(_pair_cell(cases, "/consistent", "/tracks-allocation", HOOK_LABELS))
            else:
                out.append(_pair_cell(cases, "/replay", "/host-sync", ("replay = eager", "sync-free")))
        cells[row] = out
    return list(groups), cells


FAMILY_TITLES = {
    "model": "Model: drift against the float64 reference model, greedy tokens",
    "determinism": "Determinism: same bits twice, batch invariance (❌ = a finding, not a failure)",
    "graph": "Graph: captured replay = eager; host syncs on the op path",
    "hooks": "Hooks: memory_stats() consistent, and its free memory tracks an allocation",
}
LEG_HEADERS = ["leg", "started", "versions", "op", "model", "determinism", "graph", "hooks", "notes"]
#: What the hooks family's two judgements are called in the tables.
HOOK_LABELS = ("consistent", "tracks allocation")


def _note_text(report: dict[str, Any], note: LegNote) -> str:
    parts = []
    if note.stale:
        parts.append("STALE: " + "; ".join(note.stale))
    if note.merged:
        parts.append(note.merged)
    if "not_run" in report["platform"]:
        parts.append(f"not run: {report['platform']['not_run']}")
    return " — ".join(parts)


#: Longest report-provided text one Markdown cell or list item shows: a plugin's reason can be
#: a whole traceback, and GitHub refuses a step summary over 1 MiB (the HTML and JSON keep it all).
MD_CELL_CHARS = 300


def clip(text: str, limit: int, rest: str = "in the HTML/JSON") -> str:
    """``text``, cut to ``limit`` characters when longer, saying how many more there are and
    where they are (``rest``): a cell that shows a report's text kept whole elsewhere."""
    return text if len(text) <= limit else text[:limit].rstrip() + f"… ({len(text) - limit} more characters {rest})"


#: An underscore that CommonMark could read as emphasis: not between two letters or digits.
WORD_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_cell(text: Any, limit: int = MD_CELL_CHARS) -> str:
    """``text`` as one Markdown table cell or list item, at most ``limit`` characters of it: a
    ``|`` (escaped, so "max |err|" still reads so) or a line break (``\\n``, ``\\r``, ...) would
    end the cell or the row, a ``<`` would open an HTML tag, a backtick would pair with the cell's
    own code spans, ``](`` would make a link, ``*`` (``2*3*4``) or a ``_`` at a word's edge
    (``_x_``; ``moe_gate`` is left as it is) emphasis, ``~`` (``~1e-6 ... ~50%``) GitHub's
    strikethrough, and ``&`` an entity (``&nbsp;``): a device or reason text is the report's,
    not markup."""
    flat = clip(" ".join(str(text).splitlines()), limit)
    flat = (flat.replace("\\", "\\\\").replace("`", "\\`").replace("&", "&amp;").replace("<", "&lt;")
            .replace("|", "\\|").replace("](", "]\\(").replace("*", "\\*").replace("~", "\\~"))
    return WORD_EDGE_UNDERSCORE.sub(r"\\_", flat)


def md_code(text: Any, limit: int = MD_CELL_CHARS) -> str:
    """``text`` for inside a Markdown code span (a list item's, not a table's): one line, no
    backtick to close the span early; escapes would show literally there, so none are made."""
    return clip(" ".join(str(text).splitlines()).replace("`", "'"), limit)


def markdown(reports: list[dict[str, Any]], notes: list[LegNote]) -> str:
    """The legs table and the three family tables, as Markdown."""
    esc = md_cell
    lines = ["", "## Legs", "", "| " + " | ".join(LEG_HEADERS) + " |", "|" + "---|" * len(LEG_HEADERS)]
    for rep, note in zip(reports, notes):
        stale = " `STALE`" if note.stale else ""
        row = [rep.get("started", ""), _versions(rep), *(family_summary(rep, f) for f in ("op", *FAMILY_KINDS)), _note_text(rep, note)]
        lines.append("| " + " | ".join([esc(leg_label(rep)) + stale, *(esc(x) for x in row)]) + " |")
    for family in FAMILY_KINDS:
        rows, cells = family_rows(reports, family)
        if not rows:
            continue
        head = ["mode" if family == "model" else "op"] + [esc(leg_label(r)) + (" `STALE`" if n.stale else "") for r, n in zip(reports, notes)]
        lines += ["", f"## {FAMILY_TITLES[family]}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            lines.append("| " + " | ".join(esc(x) for x in [row, *cells[row]]) + " |")
    return "\n".join(lines) + "\n"


LEGS_CSS = """
table.legs td,table.family td,table.legs th,table.family tbody th{font-size:13px}tr.stale th:first-child,th.stale{background:#fff3cd}
.badge.stale{background:#c77700;color:#fff}.badge.merged{background:#5a5aa0;color:#fff}
"""


def html_tables(reports: list[dict[str, Any]], notes: list[LegNote]) -> str:
    """The legs table and the three family tables, as HTML (inside the matrix page, whose
    head carries :data:`LEGS_CSS`: a ``<style>`` belongs in the head)."""
    e = html.escape
    out = ["<h2>Legs</h2><table class='legs' id='legs'><thead><tr>"
           + "".join(f"<th scope='col'>{e(h)}</th>" for h in LEG_HEADERS) + "</tr></thead><tbody>"]
    for rep, note in zip(reports, notes):
        badges = ("<span class='badge stale'>STALE</span>" if note.stale else "") + (
            "<span class='badge merged'>MERGED</span>" if note.dropped else "")
        attrs = (f"data-leg='{e(leg_label(rep))}' data-stale='{1 if note.stale else 0}' "
                 f"data-merged='{len(note.dropped)}'")
        cells = [e(leg_label(rep)) + badges, e(rep.get("started", "")), e(_versions(rep)),
                 *(e(family_summary(rep, f)) for f in ("op", *FAMILY_KINDS)), e(_note_text(rep, note))]
        out.append(f"<tr class='{'stale' if note.stale else ''}' {attrs}><th scope='row'>{cells[0]}</th>"
                   + "".join(f"<td>{c}</td>" for c in cells[1:]) + "</tr>")
    out.append("</tbody></table>")
    for family in FAMILY_KINDS:
        rows, cells = family_rows(reports, family)
        if not rows:
            continue
        out.append(f"<h2>{e(FAMILY_TITLES[family])}</h2><table class='family' data-family='{family}'><thead><tr>"
                   f"<th scope='col'>{'mode' if family == 'model' else 'op'}</th>")
        for rep, note in zip(reports, notes):
            stale = " class='stale'" if note.stale else ""
            out.append(f"<th scope='col'{stale}>{e(leg_label(rep))}" + ("<span class='badge stale'>STALE</span>" if note.stale else "") + "</th>")
        out.append("</tr></thead><tbody>")
        for row in rows:
            out.append(f"<tr><th scope='row'>{e(row)}</th>" + "".join(
                f"<td data-family='{family}' data-row='{e(row)}' data-leg='{e(leg_label(rep))}'>{e(text)}</td>"
                for rep, text in zip(reports, cells[row])) + "</tr>")
        out.append("</tbody></table>")
    return "\n".join(out)


__all__ = ["FAMILY_KINDS", "LegNote", "clip", "family_summary", "html_tables", "leg_key", "leg_label", "leg_order", "markdown",
           "md_cell", "md_code", "parse_age", "prepare"]
