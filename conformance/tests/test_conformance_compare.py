"""``dshal matrix --baseline``: each leg's cases against the same leg of an earlier run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from dshal import cli


def _write(folder: Path, name: str, rep: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _set(rep: dict, case_id: str, status: str, reason: str = "") -> None:
    case = next(c for c in rep["cases"] if c["id"] == case_id)
    case["status"], case["reason"] = status, reason or case["reason"]


def test_baseline_names_what_regressed_was_lost_fixed_and_is_new(cpu_report: dict, tmp_path: Path, capsys) -> None:
    passing = [c["id"] for c in cpu_report["cases"] if c["status"] == "pass"]
    regress, lose, fix, drop = passing[:4]
    baseline = copy.deepcopy(cpu_report)
    _set(baseline, fix, "fail", "out.max_err_ratio 3.1 > 1")
    current = copy.deepcopy(cpu_report)
    current["started"] = "2099-01-01T00:00:00+00:00"
    _set(current, regress, "fail", "out.max_err_ratio 85.8 > 1")
    _set(current, lose, "unsupported", "backend does not provide it")
    current["cases"] = [c for c in current["cases"] if c["id"] != drop]
    current["cases"].append({**copy.deepcopy(cpu_report["cases"][0]), "id": "rms_norm/new-row", "status": "error", "reason": "boom"})
    new_leg = copy.deepcopy(cpu_report)
    new_leg["backend"], new_leg["platform"] = "amd", {**cpu_report["platform"], "device": "CPU emulating gfx942", "emulated": True}
    base_dir = tmp_path / "baseline"
    _write(base_dir, "cpu", baseline)
    (base_dir / "cpu.junit.xml").write_text("<testsuite/>")  # a folder of a CI run's reports: XML left out
    reports = [_write(tmp_path / "now", "cpu", current), _write(tmp_path / "now", "amd", new_leg)]
    md, page = tmp_path / "m.md", tmp_path / "m.html"

    args = ["matrix", *reports, "--baseline", str(base_dir), "--markdown", str(md), "--html", str(page)]
    assert cli.main([*args, "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED cpu (hardware) · cpu: 1 regressed, 1 new failing, 1 lost, 1 fixed; 1 cases added, 1 removed" in out
    assert "new leg: amd (emulated) · CPU emulating gfx942" in out
    text = md.read_text()
    assert "## Changes since the baseline" in text and "| ❌ cpu (hardware) · cpu |" in text and "| 1 | 1 | 1 | 1 | 1 / 1 |" in text
    assert f"- `{regress}`: pass -> fail: out.max_err_ratio 85.8 > 1" in text
    assert f"- `{fix}`: fail -> pass" in text and f"- `{lose}`: pass -> unsupported" in text
    assert "- `rms_norm/new-row`: - -> error: boom" in text and "legs not in the baseline: amd (emulated)" in text
    html_text = page.read_text()
    assert "id='changes'" in html_text and "data-bad='1'" in html_text and "data-change='regressed'" in html_text
    assert cli.main(args) == 0  # without --fail-on-regression: reported, not gating


def test_an_unchanged_leg_passes_the_gate_and_the_flag_needs_a_baseline(cpu_report: dict, tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "now", "cpu", cpu_report)
    same = _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", path, "--baseline", same, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 0
    assert "cpu (hardware) · cpu: 0 regressed, 0 new failing, 0 lost, 0 fixed; 0 cases added, 0 removed" in capsys.readouterr().out
    assert cli.main(["matrix", path, "--fail-on-regression"]) == 1
    assert "--fail-on-regression needs --baseline" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["matrix", path, "--baseline", str(empty)]) == 1
    assert "is a folder with no *.json reports in it" in capsys.readouterr().err


def test_a_hardware_leg_that_did_not_run_now_fails_the_gate(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """The runner lost its device: the leg that ran on hardware is "not run" now, another leg."""
    gone = copy.deepcopy(cpu_report)
    gone["platform"] = {**gone["platform"], "not_run": "backend 'cpu' is not available: no device"}
    gone["cases"] = []
    now = _write(tmp_path / "now", "cpu", gone)
    then = _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 1
    out = capsys.readouterr().out
    assert "GONE baseline leg not run now: cpu (hardware) · cpu" in out and "new leg: cpu (not-run)" in out
