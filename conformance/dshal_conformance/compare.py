"""``dshal matrix ... --baseline REPORT|DIR``: what changed on each leg since a baseline run.

A CI maintainer keeps the matrix green by knowing what broke since the last green run. Each
leg of the current reports (after merging reruns, :func:`dshal_conformance.legs.prepare`) is
matched with the same leg (:func:`~dshal_conformance.legs.leg_key`) in the baseline reports,
and its cases are compared by id:

* **regressed**: passed in the baseline, fails or errors now;
* **lost**: passed in the baseline, unsupported or skipped now (a capability the plugin no
  longer declares, or a device it no longer sees);
* **fixed**: failed or errored in the baseline, passes now;
* **new failing**: not in the baseline, fails or errors now;
* cases added and removed (the suite grew or shrank), and legs that appeared or are gone.

``--fail-on-regression`` makes ``dshal matrix`` exit 1 when any leg regressed or has new
failures, or a baseline leg did not run now (a hardware leg that became "not run" is another
leg), so a CI step can gate on it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dshal.errors import ConfigError
from dshal_conformance.legs import leg_key, leg_label, prepare

FAILED = ("fail", "error")
NOT_PASSING = ("unsupported", "skip")
#: Case ids listed per category and leg (the counts are always complete).
SHOWN = 20


@dataclass
class LegChanges:
    """One leg's changes against the baseline. Each list holds ``(case id, before, now, reason now)``."""

    leg: str
    baseline_started: str
    regressed: list[tuple[str, str, str, str]] = field(default_factory=list)
    lost: list[tuple[str, str, str, str]] = field(default_factory=list)
    fixed: list[tuple[str, str, str, str]] = field(default_factory=list)
    new_failing: list[tuple[str, str, str, str]] = field(default_factory=list)
    added: int = 0
    removed: int = 0

    @property
    def bad(self) -> bool:
        return bool(self.regressed or self.new_failing)


@dataclass
class Comparison:
    legs: list[LegChanges]
    new_legs: list[str]
    gone_legs: list[str]

    @property
    def bad(self) -> bool:
        """A leg regressed or has new failures, or a leg of the baseline did not run now
        (e.g. a runner lost its device: its hardware leg became "not run")."""
        return any(leg.bad for leg in self.legs) or bool(self.gone_legs)


def baseline_paths(given: list[str]) -> list[str]:
    """``--baseline`` values: report files, or folders whose ``*.json`` files (searched
    recursively, JUnit XML and other files left out) are the baseline's reports."""
    paths: list[str] = []
    for value in given:
        path = Path(value)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.json"))
            if not found:
                raise ConfigError(f"--baseline: {value} is a folder with no *.json reports in it")
            paths += found
        else:
            paths.append(value)
    return paths


def compare(current: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> Comparison:
    """Each current leg against the same leg of ``baseline`` (both merged to one report per leg)."""
    now_reports, _ = prepare(current)
    then_reports, _ = prepare(baseline)
    then_by_leg = {leg_key(r): r for r in then_reports}
    now_keys = {leg_key(r) for r in now_reports}
    legs: list[LegChanges] = []
    new_legs: list[str] = []
    for rep in now_reports:
        before = then_by_leg.get(leg_key(rep))
        if before is None:
            new_legs.append(leg_label(rep))
            continue
        legs.append(_leg_changes(before, rep))
    gone = [leg_label(r) for r in then_reports if leg_key(r) not in now_keys]
    return Comparison(legs, new_legs, gone)


def _leg_changes(before: dict[str, Any], now: dict[str, Any]) -> LegChanges:
    old = {c["id"]: c for c in before["cases"]}
    new = {c["id"]: c for c in now["cases"]}
    out = LegChanges(leg_label(now), before.get("started", ""))
    for case_id, case in new.items():
        status, reason = case["status"], case.get("reason", "")
        prior = old.get(case_id)
        if prior is None:
            out.added += 1
            if status in FAILED:
                out.new_failing.append((case_id, "-", status, reason))
            continue
        was = prior["status"]
        row = (case_id, was, status, reason)
        if was == "pass" and status in FAILED:
            out.regressed.append(row)
        elif was == "pass" and status in NOT_PASSING:
            out.lost.append(row)
        elif was in FAILED and status == "pass":
            out.fixed.append(row)
    out.removed = sum(1 for case_id in old if case_id not in new)
    return out


CATEGORIES = (("regressed", "regressed (pass -> fail/error)"), ("new_failing", "new and failing"),
              ("lost", "lost (pass -> unsupported/skip)"), ("fixed", "fixed (fail/error -> pass)"))


def summary_line(leg: LegChanges) -> str:
    counts = ", ".join(f"{len(getattr(leg, name))} {name.replace('_', ' ')}" for name, _ in CATEGORIES)
    return f"{leg.leg}: {counts}; {leg.added} cases added, {leg.removed} removed (baseline {leg.baseline_started})"


def markdown(comparison: Comparison) -> str:
    lines = ["", "## Changes since the baseline", ""]
    if comparison.legs:
        lines += ["| leg | baseline run | regressed | new failing | lost | fixed | cases added / removed |",
                  "|---|---|---|---|---|---|---|"]
        for leg in comparison.legs:
            mark = "❌ " if leg.bad else ""
            lines.append(f"| {mark}{leg.leg} | {leg.baseline_started} | {len(leg.regressed)} | {len(leg.new_failing)} | "
                         f"{len(leg.lost)} | {len(leg.fixed)} | {leg.added} / {leg.removed} |")
    for title, legs in (("legs not in the baseline", comparison.new_legs), ("baseline legs not run now", comparison.gone_legs)):
        if legs:
            lines += ["", f"{title}: " + ", ".join(legs)]
    for leg in comparison.legs:
        for name, title in CATEGORIES:
            rows = getattr(leg, name)
            if not rows:
                continue
            lines += ["", f"### {leg.leg}: {title}", ""]
            for case_id, was, status, reason in rows[:SHOWN]:
                lines.append(f"- `{case_id}`: {was} -> {status}" + (f": {reason}".replace("\n", " ") if reason else ""))
            if len(rows) > SHOWN:
                lines.append(f"- ... and {len(rows) - SHOWN} more")
    return "\n".join(lines) + "\n"


def html_section(comparison: Comparison) -> str:
    e = html.escape
    out = ["<h2 id='changes'>Changes since the baseline</h2>"]
    if comparison.legs:
        out.append("<table class='family' id='changes-table'><thead><tr><th>leg</th><th>baseline run</th><th>regressed</th>"
                   "<th>new failing</th><th>lost</th><th>fixed</th><th>cases added / removed</th></tr></thead><tbody>")
        for leg in comparison.legs:
            out.append(f"<tr data-leg='{e(leg.leg)}' data-bad='{1 if leg.bad else 0}'><td>{e(leg.leg)}</td>"
                       f"<td>{e(leg.baseline_started)}</td><td>{len(leg.regressed)}</td><td>{len(leg.new_failing)}</td>"
                       f"<td>{len(leg.lost)}</td><td>{len(leg.fixed)}</td><td>{leg.added} / {leg.removed}</td></tr>")
        out.append("</tbody></table>")
    for title, legs in (("legs not in the baseline", comparison.new_legs), ("baseline legs not run now", comparison.gone_legs)):
        if legs:
            out.append(f"<p>{e(title)}: {e(', '.join(legs))}</p>")
    for leg in comparison.legs:
        for name, title in CATEGORIES:
            rows = getattr(leg, name)
            if rows:
                items = "".join(f"<li data-change='{name}'><code>{e(i)}</code>: {e(w)} -&gt; {e(s)}"
                                + (f": {e(r)}" if r else "") + "</li>" for i, w, s, r in rows[:SHOWN])
                more = f"<li>... and {len(rows) - SHOWN} more</li>" if len(rows) > SHOWN else ""
                out.append(f"<h3>{e(leg.leg)}: {e(title)}</h3><ul>{items}{more}</ul>")
    return "\n".join(out)


__all__ = ["Comparison", "LegChanges", "baseline_paths", "compare", "html_section", "markdown", "summary_line"]
