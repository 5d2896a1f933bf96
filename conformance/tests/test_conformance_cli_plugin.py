"""`dshal conformance` options and the pytest plugin (`pytest --pyargs dshal_conformance`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from dshal import cli
from dshal_conformance.runner import with_timeout


def test_cli_writes_reports_and_reproduces_one_case(tmp_path: Path, capsys) -> None:
    code = cli.main(["conformance", "--backend", "cpu", "--ops", "rms_norm", "--case", "rms_norm/f32/nan_inf",
                     "--report-dir", str(tmp_path), "--seed", "7", "--quiet", "--bundle", str(tmp_path / "bundle")])
    assert code == 0
    rep = json.loads((tmp_path / "cpu.json").read_text())
    assert [c["id"] for c in rep["cases"]] == ["rms_norm/f32/nan_inf"] and rep["seed"] == 7
    assert (tmp_path / "cpu.junit.xml").is_file() and (tmp_path / "bundle" / "SHA256SUMS").is_file()
    env = json.loads((tmp_path / "bundle" / "environment.json").read_text())
    # the bundle names what it ran on as the matrix does: driver and runtime keys always present
    assert {"device", "driver", "runtime", "torch", "triton", "suite_version", "git_commit"} <= env.keys()
    assert env["device"] == rep["platform"]["device"] and env["runtime"] == rep["platform"]["runtime"]
    assert cli.main(["conformance", "--backend", "cpu", "--tier", "full", "--list", "--ops", "fp8_gemm"]) == 0
    listed = capsys.readouterr().out.split()
    assert "fp8_gemm/block/deepgemm/M4096xN7168xK2048/vs-prequant" in listed and "capability/fp8_gemm" in listed


def _pytest(args: list[str], cwd: Path, extra_path: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "dshal_conformance", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_pytest_plugin_runs_the_suite_in_a_vendor_repo(tmp_path: Path, wrong_backend_path: list[str]) -> None:
    good = _pytest(["--dshal-backend", "cpu", "--dshal-ops", "rms_norm", "--dshal-report-dir", str(tmp_path)], tmp_path)
    assert good.returncode == 0, good.stdout[-2000:]
    assert "passed" in good.stdout and "failed" not in good.stdout
    rep = json.loads((tmp_path / "cpu.json").read_text())
    # graph/rms_norm is unsupported on cpu (no device graph, no host/device split), with its reason.
    assert rep["summary"]["failed"] == 0 and rep["summary"]["passed"] + rep["summary"]["unsupported"] == len(rep["cases"]) > 10
    assert all(c["kind"] == "graph" for c in rep["cases"] if c["status"] == "unsupported")

    bad = _pytest(["--dshal-backend", "wrong", "--dshal-case", "rms_norm/f32/*", "--junitxml", str(tmp_path / "p.xml")],
                  tmp_path, wrong_backend_path)
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout and "rms_norm/f32/small-eps-matters" in bad.stdout and "max_err_ratio" in bad.stdout
    # pytest's own JUnit: a failure's message is the case's one line (it was an assert's diff and source)
    failure = ET.parse(tmp_path / "p.xml").getroot().find(".//testcase[@name='test_conformance[rms_norm/f32/small-eps-matters]']/failure")
    assert failure.get("message").startswith("Failed: rms_norm/f32/small-eps-matters: fail: out.max_err_ratio = ")
    assert "\n" not in failure.get("message") and "assert 'fail' == 'pass'" not in failure.get("message")

    unselected = _pytest([], tmp_path)
    assert unselected.returncode == 0 and "1 skipped" in unselected.stdout


@pytest.mark.slow
def test_pytest_plugin_checks_nothing_only_when_told(tmp_path: Path, broken_plugin_path: list[str]) -> None:
    """As `dshal conformance`: a backend that cannot run fails unless allowed, a broken plugin
    fails even then, and a selection of nothing is a usage error (all of them passed with
    "1 skipped" before)."""
    typo = _pytest(["--dshal-backend", "nvdia"], tmp_path)
    assert typo.returncode == 1 and "not-run" in typo.stdout and "'nvdia' is not installed" in typo.stdout
    # A name close to an installed one is a typo, not a missing plugin: allowed to be absent, it still fails.
    misspelled = _pytest(["--dshal-backend", "nvdia", "--dshal-allow-unavailable"], tmp_path)
    assert misspelled.returncode == 1 and "Did you mean 'nvidia'?" in misspelled.stdout
    allowed = _pytest(["--dshal-backend", "notinstalled", "--dshal-allow-unavailable"], tmp_path)
    assert allowed.returncode == 0 and "1 skipped" in allowed.stdout
    broken = _pytest(["--dshal-backend", "broken", "--dshal-allow-unavailable"], tmp_path, broken_plugin_path)
    assert broken.returncode == 1 and "failed to load" in broken.stdout
    for args, said in ((["--dshal-case", "rms_nrom/*"], "--dshal-case ['rms_nrom/*'] select no case"),
                       (["--dshal-ops", "rms_norm,bogus"], "--dshal-ops: got 'rms_norm,bogus'")):
        run = _pytest(["--dshal-backend", "cpu", *args], tmp_path)
        assert run.returncode == 4 and said in run.stderr, (run.stdout[-500:], run.stderr[-500:])


def test_a_broken_plugin_fails_its_leg_even_with_allow_unavailable(tmp_path: Path, broken_plugin_path: list[str], capsys) -> None:
    import sys as _sys

    from dshal.registry import REGISTRY

    _sys.path[:0] = broken_plugin_path
    REGISTRY.refresh()
    try:
        code = cli.main(["conformance", "--backend", "broken", "--allow-unavailable", "--ops", "rms_norm",
                         "--report-dir", str(tmp_path), "--quiet"])
    finally:
        for p in broken_plugin_path:
            _sys.path.remove(p)
        REGISTRY.refresh()
    assert code == 1  # was 0: a load crash passed as "not run"
    err = capsys.readouterr().err
    assert "failed to load" in err and "not a broken one" in err
    rep = json.loads((tmp_path / "broken.json").read_text())
    assert "failed to load" in rep["platform"]["not_run"]
    # The report, JUnit and matrix say "broken" (they drew it as a skipped, grey "not run" leg).
    assert "the plugin failed to load" in rep["platform"]["broken"]
    junit = (tmp_path / "broken.junit.xml").read_text()
    assert 'tests="1"' in junit and 'errors="1"' in junit and 'skipped="0"' in junit
    assert "<error" in junit and "<skipped" not in junit
    from dshal_conformance import matrix

    column = matrix.column_of(rep)
    assert column.broken and column.not_run_text.startswith("broken, the leg fails: the plugin failed to load")
    # A missing plugin is still an allowed "not run" leg.
    assert cli.main(["conformance", "--backend", "notinstalled", "--allow-unavailable", "--ops", "rms_norm",
                     "--report-dir", str(tmp_path), "--quiet"]) == 0
    missing = json.loads((tmp_path / "notinstalled.json").read_text())
    assert "broken" not in missing["platform"] and not matrix.column_of(missing).broken
    junit = (tmp_path / "notinstalled.junit.xml").read_text()  # counts that add up: 1 test, 1 skipped
    assert "<skipped" in junit and 'tests="1"' in junit and 'skipped="1"' in junit and 'errors="0"' in junit
    # A misspelled one is not (it passed as "not run" before): the leg fails and says the name it meant.
    assert cli.main(["conformance", "--backend", "nvida", "--allow-unavailable", "--ops", "rms_norm",
                     "--report-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "'nvidia' is: a misspelled name is not a missing plugin" in err
    assert "Did you mean 'nvidia'?" in json.loads((tmp_path / "nvida.json").read_text())["platform"]["not_run"]


def test_a_hanging_case_is_an_error_not_a_hang() -> None:
    import threading


    release = threading.Event()
    outcomes = with_timeout(lambda: release.wait(30) and [], 0.2, ("",))
    release.set()
    assert outcomes[0].verdict.status == "error" and "timed out after 0.2 s" in outcomes[0].verdict.reason


def test_a_run_whose_every_case_was_waived_away_is_not_a_pass(tmp_path: Path, capsys) -> None:
    waivers = tmp_path / "w.yaml"
    waivers.write_text("waivers:\n  - match: '*'\n    skip: true\n    reason: everything waived\n")
    args = ["conformance", "--backend", "cpu", "--case", "rms_norm/f32/nan_inf", "--report-dir", str(tmp_path), "--quiet"]
    assert cli.main([*args, "--waivers", str(waivers)]) == 1  # was 0: "passed 0 ... skipped 1"
    assert "nothing was checked" in capsys.readouterr().err
    assert cli.main(args) == 0


@pytest.mark.parametrize("vendor", ["nvidia", "amd", "ascend"])
def test_a_plugins_waivers_file_ships_inside_its_package(vendor, tmp_path):
    """``plugins/<vendor>/conformance-waivers.yaml`` sat outside the package: an installed
    wheel had none, and a waiver a vendor filed was lost outside a source checkout. It lives in
    the package now, declared as package data, and is found from the plugin wherever the
    command runs."""
    import importlib
    import tomllib

    from dshal_conformance import waivers

    module = importlib.import_module(f"dshal_{vendor}")
    backend_class = next(getattr(module, n) for n in module.__all__ if n.endswith("Backend"))
    found = waivers.default_path(backend_class(), vendor, search_from=tmp_path)  # no plugins/ folder there
    package = Path(module.__file__).resolve().parent
    assert found == package / waivers.FILE_NAME
    project = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert waivers.FILE_NAME in project["tool"]["setuptools"]["package-data"][f"dshal_{vendor}"]


def test_the_summary_prints_reasons_and_ids_as_text_not_markup(tmp_path: Path) -> None:
    """rich read ``[triton]`` in an install hint as a markup tag and dropped it: the printed
    line said ``pip install 'dshal-nvidia'`` (already installed) where the report said
    ``'dshal-nvidia[triton]'``."""
    import io

    from rich.console import Console

    from dshal_conformance.command import _print_summary

    hint = "needs triton (pip install 'dshal-nvidia[triton]') to run the kernels on CPU"
    result = {"backend": "nvidia[x]", "tier": "ci", "seed": 0, "duration_s": 0.0, "waivers": [],
              "platform": {"not_run": hint, "device": "not run", "arch": "", "emulated": True},
              "cases": [{"status": "fail", "id": "linear/[bf16]/M1", "reason": "out: [bold]x[/bold] off"}],
              "summary": {"passed": 0, "failed": 1, "errors": 0, "unsupported": 0, "skipped": 0}}
    out = io.StringIO()
    _print_summary(Console(file=out, width=400), result, tmp_path / "r.json", tmp_path / "r.xml", None)
    text = out.getvalue()
    assert hint in text and "nvidia[x]" in text and "linear/[bf16]/M1: out: [bold]x[/bold] off" in text, text


def test_a_log_gets_each_report_path_whole_on_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """Written to a CI log (not a terminal, no COLUMNS), the summary was wrapped at rich's 80
    columns: a long --report-dir came out as ``.../colu`` and ``mns/for/sure/cpu.json``."""
    monkeypatch.delenv("COLUMNS", raising=False)
    deep = tmp_path / "a-report-folder-whose-path-is-longer-than-eighty-columns" / "for-a-ci-job" / "leg-nvidia"
    code = cli.main(["conformance", "--backend", "cpu", "--case", "capability/quantize_fp8", "--no-collectives",
                     "--report-dir", str(deep), "--quiet"])
    assert code == 0
    lines = capsys.readouterr().err.splitlines()
    assert f"report: {deep / 'cpu.json'}" in lines and f"junit:  {deep / 'cpu.junit.xml'}" in lines, lines
