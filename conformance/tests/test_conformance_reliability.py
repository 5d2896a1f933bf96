"""CLI outputs under hostile conditions (issue #16, class 7): unwritable outputs are found
before the run, reports are replaced atomically, selecting nothing is an error, ``dshal
matrix`` turns bad inputs into one-line errors and warns about suspicious ones, and a
Ctrl-C during op cases exits 130 without a report."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dshal import cli
from dshal_conformance import report

HERE = Path(__file__).resolve().parent


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


# ----------------------------------------------------------------- before the run
def test_unwritable_report_dir_is_found_before_any_case_runs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.perf_counter()
    code, err = _run(capsys, "conformance", "--backend", "cpu", "--report-dir", str(blocker / "reports"), "--quiet")
    assert code == 1 and f"--report-dir: {blocker} is a file, expected a folder to hold" in err and "passed" not in err
    code, err = _run(capsys, "conformance", "--backend", "cpu", "--report-dir", str(blocker), "--quiet")
    assert code == 1 and f"--report-dir: {blocker} is a file, expected a folder" in err  # was "(File exists)"
    assert time.perf_counter() - started < 30


def test_unwritable_bench_output_is_found_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _run(capsys, "bench", "--backend", "cpu", "--ops", "rms_norm", "--output", str(blocker / "b.html"))
    assert code == 1 and f"--output: {blocker} is a file, expected a folder to hold" in err
    code, err = _run(capsys, "run", "--new-tokens", "1", "--json", str(blocker / "r.json"))
    assert code == 1 and f"--json: {blocker} is a file, expected a folder to hold" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ops", "no_such_op"], "--ops: got 'no_such_op', expected comma-separated op names"),
        (["--ops", ","], "--ops: got ','"),
        (["--case", "rms_norm/no-such-case*"], "select no case"),
        (["--ops", "all_reduce", "--no-collectives"], "select no case"),
        (["--timeout", "-1"], "--timeout: got -1.0, expected a positive finite number"),
        (["--timeout", "nan"], "--timeout: got nan"),
    ],
)
def test_a_run_that_would_check_nothing_or_has_a_bad_flag_is_an_error(tmp_path, capsys, argv, message):
    code, err = _run(capsys, "conformance", "--backend", "cpu", "--report-dir", str(tmp_path), "--quiet", *argv)
    assert code == 1 and message in err, err
    assert not (tmp_path / "cpu.json").exists()


def test_bench_rejects_nan_budget(capsys):
    code, err = _run(capsys, "bench", "--backend", "cpu", "--ops", "rms_norm", "--time-per-case", "nan")
    assert code == 1 and "--time-per-case: got nan" in err


# ----------------------------------------------------------------- atomic writes
def test_a_failed_write_keeps_the_old_report_whole(tmp_path, monkeypatch):
    path = tmp_path / "cpu.json"
    report.write_json({"old": True}, path)

    def disk_full(fd):  # noqa: ANN001
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        report.write_json({"new": "x" * 10000}, path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["cpu.json"]  # no temporary file left behind


# ----------------------------------------------------------------- dshal matrix
@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("small")
    assert cli.main(["conformance", "--backend", "cpu", "--ops", "rms_norm", "--report-dir", str(out), "--quiet"]) == 0
    return json.loads((out / "cpu.json").read_text())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"schema": "dshal.conformance/1", ', "not valid JSON"),
        (b'{"schema": "other/2", "cases": []}', "schema is 'other/2', expected 'dshal.conformance/1'"),
        (b'{"schema": "dshal.conformance/1"}', "does not follow dshal.conformance/1"),
        (b"[1, 2]", "a JSON list, expected a conformance report object"),
        (b'{"schema": "dshal.conformance/1", "x": "\xff"}', "not UTF-8 text"),
        (None, "no such file"),
    ],
)
def test_matrix_bad_input_is_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_bytes(content)
    code, err = _run(capsys, "matrix", str(path))
    assert code == 1 and message in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_matrix_warns_on_duplicates_and_contradicting_summaries_and_tags_identical_headers(tmp_path, capsys, small_report):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(small_report))
    rerun = copy.deepcopy(small_report)
    rerun["started"] = "2031-01-01T00:00:00+00:00"
    rerun["summary"]["passed"] += 5  # claims more than its cases show
    rerun["platform"]["host"] = "another machine"  # the same header, another leg (a rerun of one leg is merged)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(rerun))
    md = tmp_path / "m.md"
    code, err = _run(capsys, "matrix", str(a), str(a), str(b), "--markdown", str(md))
    assert code == 0
    assert f"{a} is the same report as {a}" in err
    assert f"{b}: its summary contradicts its cases" in err
    header = next(line for line in md.read_text().splitlines() if line.startswith("| op"))
    # Tagged by the shortest tail of their paths that tells them apart (not the paths as given).
    assert header.count("cpu [") == 2 and "cpu [a.json]" in header and "cpu [b.json]" in header
    passed = small_report["summary"]["passed"]
    assert md.read_text().count(f"passed {passed},") == 2  # the counted cases, not the claim


# ----------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_op_cases_exits_130_without_a_report(tmp_path, sigint_deliverable):
    site = tmp_path / "site"
    info = site / "dshal_slow-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dshal-slow\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[dshal.backends]\nslow = conformance_slow_backend:SlowBackend\n")
    marker, out = tmp_path / "in-case", tmp_path / "reports"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(HERE), *sys.path]),
        "DSHAL_TEST_MARKER": str(marker),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dshal", "conformance", "--backend", "slow", "--ops", "rms_norm",
         "--no-collectives", "--report-dir", str(out), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_deliverable,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; no report written" in err
    assert "terminate called" not in err and "Traceback" not in err
    assert not (out / "slow.json").exists() and not (out / "slow.junit.xml").exists()


# ----------------------------------------------------------------- what the files hold
def test_junit_and_json_stay_parseable_with_control_characters_and_infinities(tmp_path, small_report):
    """A CUDA error's ANSI colours in a reason made the JUnit file unreadable XML; a determinism
    case's ``inf`` difference was written as ``Infinity``, which strict JSON parsers refuse."""
    from xml.etree import ElementTree as ET

    rep = copy.deepcopy(small_report)
    case = rep["cases"][0]
    case.update(status="error", metric=None, value=None, threshold=None,
                reason="crashed with RuntimeError: \x1b[31mCUDA error\x1b[0m: an illegal memory access\x00")
    failing = rep["cases"][1]
    failing.update(status="fail", value=float("inf"), details={"row": 0, "max_diff": float("nan")})
    rep["platform"]["driver"] = "bad\x07bell"
    rep["summary"] = report.summarize(rep["cases"])
    junit = report.write_junit(rep, tmp_path / "r.junit.xml")
    suite = ET.parse(junit).getroot()
    error = suite.find(".//error")
    assert error.get("message") == "crashed with RuntimeError: \\x1b[31mCUDA error\\x1b[0m: an illegal memory access\\x00"
    assert int(suite.get("errors")) == 1 and int(suite.get("failures")) == 1  # counts as in the JSON
    text = report.write_json(rep, tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    back = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert back["cases"][1]["value"] is None and back["cases"][1]["details"] == {"row": 0, "max_diff": None}
    assert back["cases"][0]["reason"] == case["reason"]  # JSON escapes control characters itself


def test_a_backend_name_with_a_path_in_it_is_refused_before_any_file_is_written(tmp_path, capsys):
    code, err = _run(capsys, "conformance", "--backend", "x/../../escape", "--report-dir", str(tmp_path / "r"),
                     "--allow-unavailable", "--quiet")
    assert code == 1 and "backend: got 'x/../../escape', expected a backend's name (no path separators)" in err, err
    assert not list(tmp_path.rglob("*.json"))


def test_matrix_refuses_a_report_whose_start_time_is_not_a_time(tmp_path, capsys, small_report):
    rep = {**small_report, "started": "yesterday"}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(rep))
    code, err = _run(capsys, "matrix", str(path))
    assert code == 1 and f"{path}: started is 'yesterday', expected an ISO 8601 time" in err, err


def test_an_old_not_run_or_broken_leg_is_marked_stale_and_names_are_not_markup(tmp_path, capsys, small_report):
    """`--stale-after` skipped legs that did not run: a 23-month-old "broken" column looked
    current. A device name is the report's text, not Markdown or HTML."""
    broken = copy.deepcopy(small_report)
    broken["backend"], broken["started"] = "npu", "2025-01-01T00:00:00+00:00"
    broken["platform"] = {**broken["platform"], "device": "not run", "arch": "", "not_run": "import failed",
                          "broken": "the plugin failed to load"}
    broken["cases"], broken["summary"] = [], report.summarize([])
    odd = copy.deepcopy(small_report)
    odd["platform"]["device"] = "<i>GPU</i>\nnext"
    paths = []
    for name, rep in (("npu", broken), ("odd", odd)):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(rep))
    md = tmp_path / "m.md"
    assert cli.main(["matrix", *paths, "--markdown", str(md), "--stale-after", "30d"]) == 0
    text = md.read_text()
    legs = next(line for line in text.splitlines() if line.startswith("| npu (not-run)"))
    assert "`STALE`" in legs and "STALE: report is" in legs, legs
    reports = text.split("## Reports", 1)[1].split("\n## ", 1)[0]
    assert "<i>" not in reports and "&lt;i>GPU&lt;/i> next" in reports, reports


def test_a_reports_case_names_are_text_in_the_markdown_tables(tmp_path, capsys, small_report):
    """A case's op and dtype went into the matrix table raw, and a baseline change's leg and
    case id into its list: one vendor's report could forge rows (a ✅ for another leg) or put
    a script in CI's step summary. They are table text now."""
    evil = copy.deepcopy(small_report)
    case = evil["cases"][0]
    case["op"] = "<script>x</script>|forged\n| injected | row |"
    case["dtype"] = "bf16</td><img src=x>"
    case["id"] = "a`\n| injected | id |"
    path, base = tmp_path / "now.json", tmp_path / "base.json"
    path.write_text(json.dumps(evil))
    before = copy.deepcopy(evil)
    before["cases"][0]["status"] = "fail" if case["status"] == "pass" else "pass"
    base.write_text(json.dumps(before))
    md = tmp_path / "m.md"
    assert cli.main(["matrix", str(path), "--baseline", str(base), "--markdown", str(md)]) in (0, 1)
    text = md.read_text()
    assert "<script" not in text and "<img" not in text and "\n| injected" not in text, text


def test_matrix_refuses_json_nested_past_the_decoders_limit(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code, err = _run(capsys, "matrix", str(path))
    assert code == 1 and "nested too deeply" in err and "Traceback" not in err, err
