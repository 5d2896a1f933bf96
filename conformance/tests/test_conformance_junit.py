"""The JUnit XML report as CI dashboards read it (Jenkins junit, GitLab unit test reports,
GitHub test-reporter actions, Azure DevOps), checked by a structural checker of our own.

The facts it relies on:
- the de-facto schema, Jenkins' junit-10.xsd (a copy: https://github.com/pytest-dev/pytest/blob/main/testing/example_scripts/junit-10.xsd):
  <testsuite> needs name, tests, failures, errors; skipped, time, timestamp are optional; a
  suite's time is a decimal with at most 3 fraction digits; <testcase> needs name and holds
  only skipped, error, failure, system-out, system-err; a property needs name and value;
- GitLab (https://docs.gitlab.com/ci/testing/unit_test_reports): of tests with the same name
  only the first is kept; its Suite column is the testcase's classname
  (https://gitlab.com/gitlab-org/gitlab/-/issues/299086);
- Jenkins' junit plugin merges <testsuite>s of one name read from several files (JENKINS-12457,
  TestResult.add in jenkinsci/junit-plugin).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from dshal import cli
from dshal_conformance import report

_DECIMAL = re.compile(r"\d+(\.\d+)?")
_SUITE_TIME = re.compile(r"\d+(\.\d{1,3})?")
_CASE_CHILDREN = {"skipped", "error", "failure", "system-out", "system-err"}
_OUTCOMES = ("failure", "error", "skipped")


def junit_problems(root: ET.Element) -> list[str]:
    """What a dashboard would read wrongly in a JUnit file whose root is ``root`` ([] if nothing)."""
    problems = []
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite") if root.tag == "testsuites" else []
    if not suites:
        return [f"root <{root.tag}>: expected <testsuite> or <testsuites> holding them"]
    keys: set[tuple[str, str]] = set()
    for suite in suites:
        for attr in ("name", "tests", "failures", "errors"):
            if not suite.get(attr):
                problems.append(f"testsuite: no {attr}")
        cases = suite.findall("testcase")
        counted = {"tests": len(cases), **{f"{o}s" if o != "skipped" else o: 0 for o in _OUTCOMES}}
        for case in cases:
            where = f"testcase {case.get('classname')!r} {case.get('name')!r}"
            if not case.get("name") or not case.get("classname"):
                problems.append(f"{where}: empty name or classname")
            key = (case.get("classname") or "", case.get("name") or "")
            if key in keys:
                problems.append(f"{where}: classname + name repeated (GitLab keeps only the first)")
            keys.add(key)
            if not _DECIMAL.fullmatch(case.get("time", "0")):
                problems.append(f"{where}: time {case.get('time')!r} is not a non-negative decimal")
            outcomes = [child for child in case if child.tag in _OUTCOMES]
            problems += [f"{where}: <{child.tag}> is not a testcase child" for child in case if child.tag not in _CASE_CHILDREN]
            if len(outcomes) > 1:
                problems.append(f"{where}: {len(outcomes)} outcomes")
            for child in outcomes:
                counted["skipped" if child.tag == "skipped" else f"{child.tag}s"] += 1
                message = child.get("message") or ""
                if not message.strip() or "\n" in message:
                    problems.append(f"{where}: <{child.tag}> message {message!r} is not one line")
                if child.tag != "skipped" and not (child.text or "").strip():
                    problems.append(f"{where}: <{child.tag}> has no body")
        for attr, n in counted.items():
            if suite.get(attr, "0") != str(n):
                problems.append(f"testsuite {attr}={suite.get(attr)!r}, {n} counted from its testcases")
        if not _SUITE_TIME.fullmatch(suite.get("time", "0")):
            problems.append(f"testsuite time {suite.get('time')!r}: expected a decimal with at most 3 fraction digits")
        stamp = suite.get("timestamp")
        if stamp is not None:
            try:
                datetime.fromisoformat(stamp)
            except ValueError:
                problems.append(f"testsuite timestamp {stamp!r} is not ISO 8601")
        for prop in suite.iter("property"):
            if prop.get("name") is None or prop.get("value") is None:
                problems.append(f"property {prop.attrib}: needs name and value")
    return problems


def _case(case_id: str, status: str, reason: str = "", waivers: tuple[str, ...] = (), metric: str | None = None) -> dict:
    return {"id": case_id, "op": case_id.split("/")[0], "kind": "accuracy", "params": {}, "dtype": "float32",
            "status": status, "metric": metric, "value": 2.5 if metric else None, "threshold": 1.0 if metric else None,
            "reason": reason, "seed": 1, "duration_s": 0.0123, "waivers": list(waivers)}


@pytest.fixture
def every_outcome() -> dict:
    """A report with each case status, a skip waiver and a loosening waiver whose case passed."""
    cases = [
        _case("rms_norm/f32/a", "pass"),
        _case("rms_norm/f32/loosened", "pass", "out.max_err_ratio = 1.5 (passes; threshold 1 loosened to 2 by a waiver)",
              waivers=("eps differs on this part, issue #7",), metric="max_err_ratio"),
        _case("rms_norm/f32/b", "fail", "out.max_err_ratio = 2.5 (FAILED: needs <= 1)", metric="max_err_ratio"),
        _case("linear/f32/c", "error", "crashed with RuntimeError: boom (kernel.py:12)"),
        _case("linear/f32/d", "skip", "waived: sliding window lands later", waivers=("sliding window lands later",)),
        _case("graph/linear/replay", "unsupported", "graph() returns the function itself"),
    ]
    return {"backend": "nvidia", "plugin_version": "1.0", "dshal_version": "0.1.0", "seed": 7, "tier": "ci",
            "platform": {"device": "NVIDIA H100", "arch": "sm_90", "emulated": False, "driver": None, "leg": "h100"},
            "started": "2026-12-06T19:04:33+00:00", "duration_s": 12.5, "summary": report.summarize(cases), "cases": cases}


def _written(rep: dict, path: Path) -> ET.Element:
    return ET.parse(report.write_junit(rep, path)).getroot()


def test_every_outcome_reads_as_dashboards_count_it(every_outcome: dict, tmp_path: Path) -> None:
    root = _written(every_outcome, tmp_path / "nvidia.junit.xml")
    assert junit_problems(root) == []
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("6", "1", "1", "2")
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["graph/linear/replay"].find("skipped").get("message").startswith("unsupported: ")
    assert cases["linear/f32/d"].find("skipped").get("message") == "skip: waived: sliding window lands later"
    props = {p.get("name"): p.get("value") for p in root.iter("property")}  # as the JSON report says them
    assert (props["seed"], props["platform.emulated"], props["platform.driver"], props["tier"]) == ("7", "false", "null", "ci")


def test_two_legs_of_one_backend_stay_apart_in_one_dashboard(every_outcome: dict, tmp_path: Path) -> None:
    """The h100 and h200 legs both run `nvidia`: with the same suite name and the same classname +
    name, Jenkins merged them into one suite and GitLab kept one leg's case of each pair, so an
    h200 failure could hide behind the h100 pass."""
    h200 = copy.deepcopy(every_outcome)
    h200["platform"]["leg"] = "h200"
    a, b = _written(every_outcome, tmp_path / "a.xml"), _written(h200, tmp_path / "b.xml")
    assert (a.get("name"), b.get("name")) == ("dshal-conformance.nvidia@h100", "dshal-conformance.nvidia@h200")
    names = [{(c.get("classname"), c.get("name")) for c in root.iter("testcase")} for root in (a, b)]
    assert not names[0] & names[1]
    assert ("nvidia@h200.rms_norm", "rms_norm/f32/b") in names[1]  # Jenkins: package nvidia@h200, class rms_norm
    both = ET.Element("testsuites")
    both.extend([a, b])
    assert junit_problems(both) == []  # as one file aggregating the legs: no case repeated
    del h200["platform"]["leg"]  # no leg: named by the backend alone, as before
    assert _written(h200, tmp_path / "c.xml").get("name") == "dshal-conformance.nvidia"


def test_a_waived_case_says_so_and_a_failure_says_how_to_rerun_it(every_outcome: dict, tmp_path: Path) -> None:
    """A case that passed only through a loosened threshold read as a plain pass; a failure's body
    repeated its message."""
    every_outcome["tier"], every_outcome["platform"]["emulated"] = "full", True
    cases = {c.get("name"): c for c in _written(every_outcome, tmp_path / "r.xml").iter("testcase")}
    assert cases["rms_norm/f32/loosened"].findtext("system-out") == "waived: eps differs on this part, issue #7\n"
    assert cases["rms_norm/f32/a"].find("system-out") is None
    failure = cases["rms_norm/f32/b"].find("failure")
    assert failure.get("message") == "max_err_ratio=2.5 threshold=1.0: out.max_err_ratio = 2.5 (FAILED: needs <= 1)"
    assert failure.text.splitlines()[-1] == ("rerun: dshal conformance --backend nvidia --case 'rms_norm/f32/b' "
                                             "--seed 7 --tier full --emulate")
    assert "--case 'linear/f32/c'" in cases["linear/f32/c"].find("error").text


def test_legs_that_did_not_run_and_a_real_run_pass_the_checker(every_outcome: dict, tmp_path: Path) -> None:
    for broken in (None, "failed to load"):
        rep = {**every_outcome, "cases": [], "summary": report.summarize([])}
        rep["platform"] = {"device": "not run", "not_run": "no CUDA device", "leg": "h100",
                           **({"broken": broken} if broken else {})}
        root = _written(rep, tmp_path / "n.xml")
        assert junit_problems(root) == [] and root.get("tests") == "1"
        assert root.find("testcase").get("classname") == "nvidia@h100"
    out = tmp_path / "real"
    assert cli.main(["conformance", "--backend", "cpu", "--ops", "rms_norm", "--report-dir", str(out), "--quiet"]) == 0
    root = ET.parse(out / "cpu.junit.xml").getroot()
    assert junit_problems(root) == [] and int(root.get("tests")) == len(json.loads((out / "cpu.json").read_text())["cases"])


def test_the_checker_names_what_a_dashboard_would_misread() -> None:
    bad = ET.fromstring(
        '<testsuite name="s" tests="3" failures="0" errors="0" time="1.23456" timestamp="yesterday">'
        '<testcase classname="c" name="n" time="-1"><failure message="two&#10;lines"/></testcase>'
        '<testcase classname="c" name="n"><properties/></testcase></testsuite>')
    said = "\n".join(junit_problems(bad))
    for expected in ("repeated", "not a non-negative decimal", "is not one line", "has no body", "<properties> is not",
                     "tests='3', 2 counted", "failures='0', 1 counted", "at most 3 fraction digits", "not ISO 8601"):
        assert expected in said, (expected, said)


def test_a_failures_rerun_command_judges_the_case_as_the_run_did(wrong_backend_installed, tmp_path: Path) -> None:
    """The rerun line left out --waivers, --determinism and --timeout: it judged the case by the
    plugin's own waivers file, the default mode and timeout, not by the run's."""
    import shlex

    from dshal_conformance.runner import DEFAULT_SEED

    case = "rms_norm/f32/small-eps-matters"  # the wrong backend's eps is off by 10x: fails by far
    waivers_file = tmp_path / "our waivers.yaml"
    waivers_file.write_text("waivers:\n  - match: 'rms_norm/*'\n    reason: 'eps differs here, issue #9'\n"
                            "    thresholds: {max_err_ratio: 2}\n")
    with wrong_backend_installed():
        assert cli.main(["conformance", "--backend", "wrong", "--case", case, "--waivers", str(waivers_file),
                         "--determinism", "strict", "--timeout", "90", "--report-dir", str(tmp_path / "run"), "--quiet"]) == 1
        failure = ET.parse(tmp_path / "run" / "wrong.junit.xml").getroot().find("testcase/failure")
        rerun = failure.text.splitlines()[-1].removeprefix("rerun: ")
        assert rerun == (f"dshal conformance --backend wrong --case '{case}' --seed {DEFAULT_SEED} "
                         f"--waivers '{waivers_file}' --determinism strict --timeout 90")
        assert cli.main([*shlex.split(rerun)[1:], "--report-dir", str(tmp_path / "rerun"), "--quiet"]) == 1
    run, again = (json.loads((tmp_path / d / "wrong.json").read_text()) for d in ("run", "rerun"))
    judged = [[(c["id"], c["status"], c["threshold"], c["waivers"]) for c in r["cases"]] for r in (run, again)]
    assert judged[0] == judged[1] and judged[0][0][2:] == (2.0, ["eps differs here, issue #9"])  # the waiver loosened it
    assert run["judging"] == again["judging"] == {"waivers_file": str(waivers_file), "determinism": "strict", "case_timeout_s": 90.0}
