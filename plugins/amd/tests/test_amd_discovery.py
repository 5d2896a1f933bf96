"""``dshal info`` for the amd plugin: unavailable here with the reason, available emulated
(as gfx942, e4m3 = e4m3fnuz) under DSHAL_EMULATE=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERMETIC = ("DSHAL_CONFIG", "DSHAL_BACKEND", "DSHAL_EMULATE", "DSHAL_PLUGINS", "TRITON_INTERPRET")


def amd_info(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in HERMETIC}
    proc = subprocess.run(
        [sys.executable, "-m", "dshal", "info", "--json"], env={**clean, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return next(b for b in json.loads(proc.stdout)["backends"] if b["name"] == "amd")


@pytest.mark.skipif(torch.version.hip is not None, reason="a ROCm build of torch: the 'not ROCm' reason cannot be shown")
def test_amd_info_says_unavailable_with_the_reason():
    amd = amd_info()
    assert amd["loaded"] is True and amd["available"] is False
    assert "not ROCm (torch.version.hip is None)" in amd["reason"] and "DSHAL_EMULATE=1" in amd["reason"]


@pytest.mark.needs_interpreter
def test_amd_info_emulated_is_available_as_gfx942():
    amd = amd_info(DSHAL_EMULATE="1", DSHAL_BACKEND="amd")
    assert amd["available"] is True and amd["emulated"] is True and "e4m3 = e4m3fnuz" in amd["reason"]
    caps = amd["capabilities"]
    assert caps["emulated"] is True and caps["arch"] == "gfx942" and caps["native_e4m3"] == "e4m3fnuz"
    assert caps["op_kinds"]["fp8_gemm"] == "triton"
