"""The hardware-matrix workflow parses and every leg names an existing tox env; tox pins torch."""

from __future__ import annotations

import configparser
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
