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
* **now failing**: unsupported or skipped in the baseline, fails or errors now (a plugin that
  began to declare an op it then fails, a waiver removed);
* cases added and removed (the suite grew or shrank), and legs that appeared or are gone; a
  leg that did not run in the baseline and runs now (a runner that got its device) came online;
  a leg whose plugin failed to load now is broken.

``--fail-on-regression`` makes ``dshal matrix`` exit 1 when any leg regressed or has new or
now failing cases, a leg is broken now, or a baseline leg did not run now (a hardware leg that
became "not run" is another leg), so a CI step can gate on it. A leg coming online is not a
regression.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dshal.errors import ConfigError
from dshal_conformance.legs import leg_key, leg_label, md_cell, md_code, prepare

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
    now_failing: list[tuple[str, str, str, str]] = field(default_factory=list)
    added: int = 0
    removed: int = 0
    #: ``"suite 0.0.9 -> 0.1.0"`` when the two runs' suites differ (cases added / removed follow), else "".
    suite_change: str = ""

    @property
    def bad(self) -> bool:
        return bool(self.regressed or self.new_failing or self.now_failing)


@dataclass
class Comparison:
    legs: list[LegChanges]
    new_legs: list[str]
    gone_legs: list[str]
    #: Legs that did not run in the baseline and whose backend runs now (not a regression).
    online_legs: list[str] = field(default_factory=list)
    #: Legs whose plugin failed to load now (``platform.broken``).
    broken_legs: list[str] = field(default_factory=list)

    @property
    def bad(self) -> bool:
        """A leg regressed or has new failures, a leg is broken now, or a leg of the baseline
        did not run now (e.g. a runner lost its device: its hardware leg became "not run")."""
        return any(leg.bad for leg in self.legs) or bool(self.gone_legs or self.broken_legs)


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
    legs: list[LegChanges] = []
    new_legs: list[str] = []
    unmatched: list[dict[str, Any]] = []  # current reports of legs the baseline lacks
    matched: set[int] = set()  # baseline reports compared with a current one
    for rep in now_reports:
        before = _baseline_of(rep, then_reports)
        if before is None:
            new_legs.append(leg_label(rep))
            unmatched.append(rep)
            continue
        matched.add(id(before))
        legs.append(_leg_changes(before, rep))
    broken = [f"{leg_label(r)}: {r['platform']['broken']}" for r in now_reports if r["platform"].get("broken")]
    # A not-run leg is a hardware leg's absence: a hardware leg new to the baseline may be it, come
    # online; one that met its own baseline leg is not (another runner's report is then missing).
    ran_now = [r for r in unmatched if leg_key(r)[2] == "hardware"]
    gone, online = [], []
    for rep in then_reports:
        if id(rep) in matched:
            continue
        came_online = "not_run" in rep["platform"] and any(_same_leg(rep, r, ignore=(1, 2, 3)) for r in ran_now)
        (online if came_online else gone).append(leg_label(rep))
    return Comparison(legs, new_legs, gone, online, broken)


#: Position of the CI leg name in :func:`~dshal_conformance.legs.leg_key` (device, kind, arch: 1, 2, 3).
_LEG_NAME = 5


def _same_leg(a: dict[str, Any], b: dict[str, Any], ignore: tuple[int, ...] = ()) -> bool:
    """``a`` and ``b`` are one leg, leaving out the key positions in ``ignore``; a CI leg name
    that only one side has (a baseline made before reports carried ``platform.leg``) matches."""
    ka, kb = leg_key(a), leg_key(b)
    for i, (x, y) in enumerate(zip(ka, kb, strict=True)):
        if i in ignore or x == y or (i == _LEG_NAME and not (x and y)):
            continue
        return False
    return True


def _baseline_of(report: dict[str, Any], baseline: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline report of ``report``'s leg: the same key, else the same key but for a CI leg
    name only one of them has."""
    exact = next((b for b in baseline if leg_key(b) == leg_key(report)), None)
    return exact or next((b for b in baseline if _same_leg(b, report)), None)


def _leg_changes(before: dict[str, Any], now: dict[str, Any]) -> LegChanges:
    old = {c["id"]: c for c in before["cases"]}
    new = {c["id"]: c for c in now["cases"]}
    out = LegChanges(leg_label(now), before.get("started", ""))
    if before.get("suite_version") != now.get("suite_version"):
        out.suite_change = f"suite {before.get('suite_version') or '-'} -> {now.get('suite_version') or '-'}"
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
        elif was in NOT_PASSING and status in FAILED:
            out.now_failing.append(row)
    out.removed = sum(1 for case_id in old if case_id not in new)
    return out


CATEGORIES = (("regressed", "regressed (pass -> fail/error)"), ("new_failing", "new and failing"),
              ("now_failing", "now failing (unsupported/skip -> fail/error)"),
              ("lost", "lost (pass -> unsupported/skip)"), ("fixed", "fixed (fail/error -> pass)"))


def summary_line(leg: LegChanges) -> str:
    counts = ", ".join(f"{len(getattr(leg, name))} {name.replace('_', ' ')}" for name, _ in CATEGORIES)
    suite = f", {leg.suite_change}" if leg.suite_change else ""
    return f"{leg.leg}: {counts}; {leg.added} cases added, {leg.removed} removed (baseline {leg.baseline_started}{suite})"


def leg_lists(comparison: Comparison) -> list[tuple[str, list[str]]]:
    """The legs that are not compared case by case, under their titles."""
    return [("legs not in the baseline", comparison.new_legs), ("baseline legs not run now", comparison.gone_legs),
            ("came online (not run in the baseline, run now)", comparison.online_legs),
            ("broken now (the plugin failed to load)", comparison.broken_legs)]


def markdown(comparison: Comparison) -> str:
    lines = ["", "## Changes since the baseline", ""]
    if comparison.legs:
        lines += ["| leg | baseline run | regressed | new failing | now failing | lost | fixed | cases added / removed |",
                  "|---|---|---|---|---|---|---|---|"]
        for leg in comparison.legs:
            mark = "❌ " if leg.bad else ""
            lines.append(f"| {mark}{md_cell(leg.leg)} | {md_cell(leg.baseline_started)} | {len(leg.regressed)} | "
                         f"{len(leg.new_failing)} | {len(leg.now_failing)} | {len(leg.lost)} | {len(leg.fixed)} | "
                         f"{leg.added} / {leg.removed} |")
    for title, legs in leg_lists(comparison):
        if legs:
            lines += ["", f"{title}: " + md_cell(", ".join(legs))]
    for leg in comparison.legs:
        for name, title in CATEGORIES:
            rows = getattr(leg, name)
            if not rows:
                continue
            lines += ["", f"### {md_cell(leg.leg)}: {title}", ""]
            for case_id, was, status, reason in rows[:SHOWN]:  # a report's text: no markup, no code span it could close
                lines.append(f"- `{md_code(case_id)}`: {md_cell(was)} -> {md_cell(status)}" + (f": {md_cell(reason)}" if reason else ""))
            if len(rows) > SHOWN:
                lines.append(f"- ... and {len(rows) - SHOWN} more (all of them: the HTML matrix and the JSON reports)")
    return "\n".join(lines) + "\n"


def html_section(comparison: Comparison) -> str:
    e = html.escape
    out = ["<h2 id='changes'>Changes since the baseline</h2>"]
    if comparison.legs:
        out.append("<table class='family' id='changes-table'><thead><tr><th scope='col'>leg</th><th scope='col'>baseline run</th>"
                   "<th scope='col'>regressed</th><th scope='col'>new failing</th><th scope='col'>now failing</th>"
                   "<th scope='col'>lost</th><th scope='col'>fixed</th><th scope='col'>cases added / removed</th>"
                   "</tr></thead><tbody>")
        for leg in comparison.legs:
            out.append(f"<tr data-leg='{e(leg.leg)}' data-bad='{1 if leg.bad else 0}'><th scope='row'>{e(leg.leg)}</th>"
                       f"<td>{e(leg.baseline_started)}</td><td>{len(leg.regressed)}</td><td>{len(leg.new_failing)}</td>"
                       f"<td>{len(leg.now_failing)}</td><td>{len(leg.lost)}</td><td>{len(leg.fixed)}</td>"
                       f"<td>{leg.added} / {leg.removed}</td></tr>")
        out.append("</tbody></table>")
    for title, legs in leg_lists(comparison):
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
