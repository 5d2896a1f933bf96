"""The hardware-matrix workflow parses and every leg names an existing tox env; tox pins torch."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _tox() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini")
    return parser


def test_workflow_legs_name_existing_tox_envs() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "hardware-matrix.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers and "workflow_dispatch" in triggers
    leg, final = workflow["jobs"]["leg"], workflow["jobs"]["matrix"]
    legs = leg["strategy"]["matrix"]["include"]
    envs = {s.split(":", 1)[1] for s in _tox().sections() if s.startswith("testenv:")}
    labels = set()
    for item in legs:
        assert item["tox_env"] in envs, f"leg {item['leg']} names tox env {item['tox_env']!r}, not in tox.ini"
        runner = item["runner"]
        labels.update([runner] if isinstance(runner, str) else runner)
    assert {"ubuntu-latest", "h100", "h200", "mi300x", "ascend-910b"} <= labels
    assert {i["tox_env"] for i in legs} == {"conformance-cpu", "conformance-nvidia", "conformance-amd", "conformance-ascend"}
    steps = " ".join(str(s.get("run", "")) + str(s.get("uses", "")) for s in leg["steps"])
    assert "tox -e ${{ matrix.tox_env }}" in steps and "upload-artifact" in steps
    assert final["needs"] == "leg" and final["if"] == "always()"
    assert leg["env"]["DSHAL_CONFORMANCE_LEG"] == "${{ matrix.leg }}"  # each report names its leg
    build = next(str(s["run"]) for s in final["steps"] if "dshal matrix" in str(s.get("run", "")))
    assert f"--expect {','.join(item['leg'] for item in legs)}" in build  # a leg whose report never came fails
    assert 'exit $status' in build  # after the summary is written


def test_tox_envs_pin_torch_through_constraints() -> None:
    tox = _tox()
    base = tox["testenv"]
    assert "-c {toxinidir}/constraints.txt" in base["install_command"]
    assert "PIP_CONSTRAINT = {toxinidir}/constraints.txt" in base["setenv"]
    assert "torch==" in (ROOT / "constraints.txt").read_text()
    for section in tox.sections():
        deps = tox[section].get("deps", "")
        assert not any(line.strip().startswith("torch") for line in deps.splitlines()), f"{section} installs torch unpinned"
    for leg in ("conformance-cpu", "conformance-nvidia", "conformance-amd", "conformance-ascend"):
        commands = tox[f"testenv:{leg}"]["commands"]
        assert "dshal conformance --backend" in commands and "--report-dir" in commands
    assert "tests" in tox["tox"]["envlist"]


def test_ci_script_runs_the_legs_and_builds_the_matrix() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "dshal conformance --backend cpu" in script and "dshal matrix" in script
    assert "for leg in nvidia amd" in script and "DSHAL_EMULATE=1 dshal conformance" in script
    assert "dshal conformance --backend ascend" in script and "--allow-unavailable" in script


def test_matrix_step_writes_a_summary_and_keeps_the_status_when_dshal_matrix_refuses(tmp_path) -> None:
    """The step, run as GitHub runs it (bash -e -o pipefail), where `dshal matrix` refuses before
    writing (no report came): it ended at `cat` on the missing matrix.md with cat's status and an
    empty step summary."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "hardware-matrix.yml").read_text())
    build = next(str(s["run"]) for s in workflow["jobs"]["matrix"]["steps"] if "dshal matrix" in str(s.get("run", "")))
    (tmp_path / "all-reports").mkdir()
    summary = tmp_path / "summary.md"
    dshal_bin = Path(shutil.which("dshal") or Path(sys.executable).with_name("dshal"))
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary), "PATH": f"{dshal_bin.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", build], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # dshal matrix's usage error, not cat's 1
    assert not (tmp_path / "reports" / "matrix.md").exists()
    assert f"dshal matrix wrote no matrix (exit status {done.returncode})" in summary.read_text()
