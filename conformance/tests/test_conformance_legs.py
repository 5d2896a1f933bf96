"""Matrix cells that say when and on what: versions and date per leg, stale legs (old, or
another plugin version than installed), same-leg reports merged keeping the newest -- in
both the HTML and the Markdown; and the op / model / determinism / graph columns."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dshal import cli
from dshal_conformance.legs import installed_plugin_version, parse_age, prepare


class Legs(HTMLParser):
    """The legs table's rows (their data-* attributes and text) and the family cells."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.family: list[dict[str, str]] = []
        self._row: dict[str, str] | None = None
        self._cell: dict[str, str] | None = None
        self.stale_badges = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-stale" in a:
            self._row = {**a, "text": ""}
        if tag == "td" and "data-family" in a:
            self._cell = {**a, "text": ""}
        if tag == "span" and "stale" in (a.get("class") or "").split():
            self.stale_badges += 1

    def handle_data(self, data: str) -> None:
        for open_ in (self._row, self._cell):
            if open_ is not None:
                open_["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "td" and self._cell is not None:
            self.family.append(self._cell)
            self._cell = None


def _write(tmp_path: Path, name: str, rep: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _dated(rep: dict, when: datetime, plugin: str | None = None) -> dict:
    out = copy.deepcopy(rep)
    out["started"] = when.isoformat(timespec="seconds")
    if plugin is not None:
        out["plugin_version"] = plugin
    return out


def test_reports_carry_versions(cpu_report: dict) -> None:
    p = cpu_report["platform"]
    assert {"torch", "triton", "driver", "runtime", "python", "host"} <= set(p)
    assert p["driver"] is None and p["runtime"] is None  # the cpu backend has neither
    assert cpu_report["plugin_version"] == installed_plugin_version("cpu")


def test_parse_age() -> None:
    assert parse_age("30d") == timedelta(days=30) and parse_age("12h") == timedelta(hours=12)
    assert parse_age("2w") == timedelta(days=14)
    with pytest.raises(ValueError, match="expected a number and a unit"):
        parse_age("30 days")


@pytest.mark.parametrize(("age", "said"), [
    ("30 days", "got '30 days', expected a number and a unit s, m, h, d or w (e.g. 30d)"),
    ("9999999999999d", "got '9999999999999d', expected at most 999999999 days"),  # was an OverflowError traceback
    ("1" * 400 + "s", "expected at most 999999999 days"),
])
def test_matrix_stale_after_that_is_no_age_is_one_error_line(cpu_report: dict, tmp_path: Path, capsys, age, said) -> None:  # noqa: ANN001
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(cpu_report))
    assert cli.main(["matrix", str(path), "--stale-after", age, "--markdown", str(tmp_path / "m.md")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dshal matrix: error: --stale-after: ") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.md").exists()


def test_stale_and_duplicate_legs_in_html_and_markdown(cpu_report: dict, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    fresh = _dated(cpu_report, now - timedelta(days=1))
    older_same_leg = _dated(cpu_report, now - timedelta(days=3))
    old = _dated(cpu_report, now - timedelta(days=45))
    old["backend"], old["platform"] = "amd", {**old["platform"], "device": "CPU emulating gfx942", "emulated": True}
    other_version = _dated(cpu_report, now - timedelta(days=2), plugin="0.0.9")
    other_version["platform"] = {**other_version["platform"], "device": "cpu-b"}
    paths = [_write(tmp_path, n, r) for n, r in
             (("a", older_same_leg), ("b", fresh), ("c", old), ("d", other_version))]
    html_path, md_path = tmp_path / "m.html", tmp_path / "m.md"
    assert cli.main(["matrix", *paths, "--html", str(html_path), "--markdown", str(md_path), "--stale-after", "30d"]) == 0

    parser = Legs()
    parser.feed(html_path.read_text())
    rows = {r["data-leg"]: r for r in parser.rows}
    assert len(rows) == 3  # the two cpu reports of one leg merged into one
    cpu = rows["cpu (hardware) · cpu"]
    assert cpu["data-merged"] == "1" and cpu["data-stale"] == "0"
    assert "newest of 2 reports of this leg kept" in cpu["text"] and older_same_leg["started"] in cpu["text"]
    assert fresh["started"] in cpu["text"]  # the kept one's date is shown
    amd = rows["amd (emulated) · CPU emulating gfx942"]
    assert amd["data-stale"] == "1" and "STALE: report is 45 d old (over 30 d)" in amd["text"]
    other = rows["cpu (hardware) · cpu-b"]
    assert other["data-stale"] == "1" and f"produced by plugin 0.0.9, installed here: {installed_plugin_version('cpu')}" in other["text"]
    assert "torch " in cpu["text"] and "triton " in cpu["text"] and "driver " in cpu["text"] and "runtime " in cpu["text"]
    assert parser.stale_badges >= 2

    md = md_path.read_text()
    legs = md.split("## Legs", 1)[1]
    cpu_line = next(line for line in legs.splitlines() if line.startswith("| cpu (hardware) · cpu |"))
    assert "newest of 2 reports of this leg kept" in cpu_line and "STALE" not in cpu_line
    amd_line = next(line for line in legs.splitlines() if line.startswith("| amd (emulated)"))
    assert "`STALE`" in amd_line and "45 d old" in amd_line
    # The op table's column headers and cells carry the mark too.
    header = next(line for line in md.splitlines() if line.startswith("| op | dtype |"))
    assert header.count("`STALE`") == 2
    # Without --stale-after nothing is stale, the merge still happens.
    assert cli.main(["matrix", *paths, "--markdown", str(md_path)]) == 0
    assert "STALE" not in md_path.read_text() and "newest of 2 reports" in md_path.read_text()


def test_family_columns_per_leg(cpu_report: dict, tmp_path: Path) -> None:
    html_path, md_path = tmp_path / "m.html", tmp_path / "m.md"
    assert cli.main(["matrix", _write(tmp_path, "cpu", cpu_report), "--html", str(html_path), "--markdown", str(md_path)]) == 0
    md = md_path.read_text()
    head = next(line for line in md.split("## Legs", 1)[1].splitlines() if line.startswith("| leg |"))
    assert [c.strip() for c in head.strip("|").split("|")][3:8] == ["op", "model", "determinism", "graph", "hooks"]
    parser = Legs()
    parser.feed(html_path.read_text())
    by = {(c["data-family"], c["data-row"]): c["text"] for c in parser.family}
    assert by[("model", "high")].startswith("✅ drift") and "tokens 4/4" in by[("model", "high")]
    assert "deterministic" in by[("determinism", "linear (float32)")]
    assert by[("graph", "rms_norm")] == "replay = eager ➖ · sync-free ➖"
    assert by[("hooks", "memory_stats")] == "consistent ✅ · tracks allocation ➖"
    assert by[("hooks", "topology")] == "consistent ➖" and by[("hooks", "timer")] == "consistent ✅"
    cpu_leg = next(line for line in md.split("## Legs", 1)[1].splitlines() if line.startswith("| cpu (hardware)"))
    assert "| consistent 2/2 (1 not reported); tracks allocation ➖ |" in cpu_leg
    # The op table has no model / determinism / graph rows.
    assert "| model |" not in md.split("## Reports")[0]


def test_prepare_keeps_order_and_newest() -> None:
    base = {"backend": "x", "platform": {"device": "d", "emulated": False}, "cases": []}
    a = {**base, "started": "2026-01-02T00:00:00+00:00"}
    b = {**base, "started": "2026-01-01T00:00:00+00:00"}
    kept, notes = prepare([a, b])
    assert kept == [a] and notes[0].dropped == ["2026-01-01T00:00:00+00:00"]


def test_a_partial_rerun_is_its_own_leg_and_a_kernel_update_is_not(tmp_path: Path) -> None:
    """A newer `--ops rms_norm` run replaced the whole run it followed (its other ops and
    their failures vanished from the matrix), and a runner's new kernel release made its
    baseline leg "GONE" and the same leg "new"."""
    from dshal_conformance.legs import leg_key, leg_label
    from dshal_conformance.matrix import to_markdown

    host = "Linux-6.8.0-1014-azure-x86_64-with-glibc2.39 x86_64"
    base = {"backend": "x", "platform": {"device": "d", "arch": "a", "emulated": False, "host": host}, "cases": [], "tier": "ci",
            "summary": {"passed": 0, "failed": 0, "errors": 0, "unsupported": 0, "skipped": 0}, "seed": 0,
            "plugin_version": "1", "dshal_version": "1"}
    whole = {**base, "started": "2026-01-01T00:00:00+00:00", "selection": {"ops": None, "cases": None, "collectives": True}}
    partial = {**base, "started": "2026-01-02T00:00:00+00:00", "selection": {"ops": ["rms_norm"], "cases": None, "collectives": True}}
    rerun = {**whole, "started": "2026-01-03T00:00:00+00:00"}
    kept, _ = prepare([whole, partial, rerun])
    assert kept == [rerun, partial]  # the rerun replaces the whole run; the partial run stands beside it
    assert leg_label(partial) == "x (hardware) · d [--ops rms_norm]" and leg_label(whole) == "x (hardware) · d"
    assert leg_label({**whole, "tier": "full"}) == "x (hardware) · d [tier full]"
    assert "x [--ops rms_norm" in to_markdown([whole, partial])
    new_kernel = {**whole, "platform": {**whole["platform"], "host": "Linux-6.11.0-1004-azure-x86_64-with-glibc2.39 x86_64"}}
    assert leg_key(new_kernel) == leg_key(whole)
    other_arch = {**whole, "platform": {**whole["platform"], "host": "Linux-6.8.0-aarch64-with-glibc2.39 aarch64"}}
    assert leg_key(other_arch) != leg_key(whole)
    # Reports from before the selection was recorded are whole runs of their tier.
    legacy = {k: v for k, v in whole.items() if k != "selection"}
    assert leg_key(legacy) == leg_key(whole)
