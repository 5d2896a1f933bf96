"""`dshal conformance` options and the pytest plugin (`pytest --pyargs dshal_conformance`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_pytest_plugin_runs_the_suite_in_a_vendor_repo(tmp_path: Path, wrong_backend_path: list[str]) -> None:
    good = _pytest(["--dshal-backend", "cpu", "--dshal-ops", "rms_norm", "--dshal-report-dir", str(tmp_path)], tmp_path)
    assert good.returncode == 0, good.stdout[-2000:]
    assert "passed" in good.stdout and "failed" not in good.stdout
    rep = json.loads((tmp_path / "cpu.json").read_text())
    # graph/rms_norm is unsupported on cpu (no device graph, no host/device split), with its reason.
    assert rep["summary"]["failed"] == 0 and rep["summary"]["passed"] + rep["summary"]["unsupported"] == len(rep["cases"]) > 10
    assert all(c["kind"] == "graph" for c in rep["cases"] if c["status"] == "unsupported")

    bad = _pytest(["--dshal-backend", "wrong", "--dshal-case", "rms_norm/f32/*"], tmp_path, wrong_backend_path)
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout and "rms_norm/f32/small-eps-matters" in bad.stdout and "max_err_ratio" in bad.stdout

    unselected = _pytest([], tmp_path)
    assert unselected.returncode == 0 and "1 skipped" in unselected.stdout


def test_a_hanging_case_is_an_error_not_a_hang() -> None:
    import threading


    release = threading.Event()
    outcomes = with_timeout(lambda: release.wait(30) and [], 0.2, ("",))
    release.set()
    assert outcomes[0].verdict.status == "error" and "timed out after 0.2 s" in outcomes[0].verdict.reason
