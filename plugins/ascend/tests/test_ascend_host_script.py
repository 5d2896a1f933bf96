"""The dry parts of tools/npu_host_check.sh (the 910B host script): its commands and configs.

Nothing here runs on an NPU: DRY_RUN=1 prints the commands and writes the configs only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import dshal
from dshal.config import GEMM_MODES

SCRIPT = Path(__file__).parents[1] / "tools" / "npu_host_check.sh"
REPO = Path(__file__).parents[3]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ascend_host_script_dry_run(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=dict(os.environ, DRY_RUN="1"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("+ [")]
    assert [ln.split("]")[0][3:] for ln in lines] == ["install", "info", "conformance", "run-int8", "run-bf16"]
    assert "./plugins/ascend[npu]" in lines[0]
    assert "--backend ascend --tier ci" in lines[2]
    assert not (out / "install.log").exists()  # a dry run runs nothing
    bf16 = dshal.load_config(str(out / "bf16.yaml"))
    assert bf16.backend == "ascend" and bf16.precision.gemm == "bf16"
    text = (out / "int8.yaml").read_text()
    assert "gemm: int8" in text
    if "int8" in GEMM_MODES:  # the int8 precision mode comes with the precision issue (#14)
        assert dshal.load_config(str(out / "int8.yaml")).precision.gemm == "int8"
