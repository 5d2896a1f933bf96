"""The dry parts of tools/npu_host_check.sh (the 910B host script): its commands and configs.

Nothing here runs on an NPU: DRY_RUN=1 prints the commands and writes the configs only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import dshal
from dshal import cli
from dshal.config import GEMM_MODES

SCRIPT = Path(__file__).parents[1] / "tools" / "npu_host_check.sh"
REPO = Path(__file__).parents[3]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ascend_host_script_dry_run(tmp_path, capsys):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=dict(os.environ, DRY_RUN="1"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("+ [")]
    assert [ln.split("]")[0][3:] for ln in lines] == ["install", "info", "conformance", "run-int8", "run-high"]
    assert "./plugins/ascend[npu]" in lines[0]
    assert lines[1].startswith("+ [info] dshal info --backend ascend")
    assert "dshal conformance --backend ascend --tier ci" in lines[2]
    assert lines[3].startswith(f"+ [run-int8] dshal run --config {out}/int8.yaml")
    assert lines[4].startswith(f"+ [run-high] dshal run --config {out}/high.yaml")
    from dshal.cli import build_parser

    for line in lines[3:5]:  # dshal's own parser takes each run line; the tiny model runs in bf16
        parsed = build_parser("run").parse_args(shlex.split(line.split("] ", 1)[1])[1:])
        assert parsed.dtype == "bfloat16" and parsed.new_tokens == 8
    assert not (out / "install.log").exists()  # a dry run runs nothing, and says so
    assert done.stdout.strip().splitlines()[-1] == f"done (dry run): configs in {out}; nothing was installed or run"
    # The configs are valid dshal configs selecting ascend: W8A8 int8, and high precision.
    for name, mode in (("int8", "int8"), ("high", "high")):
        config = dshal.load_config(str(out / f"{name}.yaml"))
        assert config.backend == "ascend" and config.precision.gemm == mode and mode in GEMM_MODES
    # Each command's options exist in the real CLI (its --help lists them), so a renamed option fails here.
    for line in lines[1:]:
        argv = line.split("] ", 1)[1].split("#")[0].split()
        assert argv[0] == "dshal"
        with pytest.raises(SystemExit) as done_help:
            cli.main([argv[1], "--help"])
        assert done_help.value.code == 0
        usage = capsys.readouterr().out
        assert all(opt in usage for opt in argv[2:] if opt.startswith("--")), (argv, usage)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ascend_host_script_sources_set_env_with_paths_unset(tmp_path):
    """CANN's set_env.sh appends to PYTHONPATH / LD_LIBRARY_PATH without checking they are set;
    the script's ``set -u`` must not stop it there (FlagGems PR #4672 met "unbound variable")."""
    stub = tmp_path / "set_env.sh"
    stub.write_text('export LD_LIBRARY_PATH=/cann/lib64:$LD_LIBRARY_PATH\nexport PYTHONPATH=/cann/python:$PYTHONPATH\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    env.update(ASCEND_SET_ENV=str(stub), ENV_ONLY="1")
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "check")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "unbound variable" not in done.stderr
    assert done.stdout.splitlines() == [f"env: sourced {stub}", "LD_LIBRARY_PATH=/cann/lib64:", "PYTHONPATH=/cann/python:"]
    assert not (tmp_path / "check" / "int8.yaml").exists()  # stopped after the environment step
