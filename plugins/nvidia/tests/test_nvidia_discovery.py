"""Discovery of the nvidia plugin: ``dshal info`` here (no GPU) and emulated, and no vendor
import (triton, pynvml, amdsmi) at ``import dshal`` or discovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERMETIC = ("DSHAL_CONFIG", "DSHAL_BACKEND", "DSHAL_EMULATE", "DSHAL_PLUGINS", "TRITON_INTERPRET")


def run_python(args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in HERMETIC}
    return subprocess.run(
        [sys.executable, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def info_json(**env: str) -> dict:
    proc = run_python(["-m", "dshal", "info", "--json"], **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def entry(data: dict, name: str) -> dict:
    return next(b for b in data["backends"] if b["name"] == name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the 'no device' reason cannot be shown here")
def test_nvidia_info_says_unavailable_with_the_reason():
    nvidia = entry(info_json(), "nvidia")
    assert nvidia["loaded"] is True and nvidia["available"] is False and nvidia["emulated"] is False
    if torch.version.cuda is None:
        assert "CPU-only build (torch.version.cuda is None)" in nvidia["reason"]
        assert "DSHAL_EMULATE=1" in nvidia["reason"]


@pytest.mark.needs_interpreter
def test_nvidia_info_emulated_is_available_and_selected():
    data = info_json(DSHAL_EMULATE="1")
    nvidia = entry(data, "nvidia")
    assert nvidia["available"] is True and nvidia["emulated"] is True
    assert "emulated" in nvidia["reason"]
    caps = nvidia["capabilities"]
    assert caps["emulated"] is True and caps["arch"] == "sm_90" and caps["native_e4m3"] == "e4m3fn"
    assert caps["op_kinds"]["rms_norm"] == "triton" and caps["op_kinds"]["attention"] == "native"
    assert "Triton block-FP8 kernel" in caps["notes"]["fp8_gemm block path"]
    runtime = data["runtime"]
    assert runtime["backend"] == "nvidia" and runtime["emulated"] is True and runtime["device"] == "cpu"
    kinds = {op: p["kind"] for op, p in runtime["providers"].items()}
    assert kinds["fp8_gemm"] == "triton" and kinds["moe_experts"] == "triton"
    assert kinds["int8_gemm"] == "fallback"  # not a GPU-plugin path: visibly the reference
    assert runtime["providers"]["int8_gemm"]["provider"] == "reference"


LAZY_CHECK = """
import json, sys
import dshal
after_import = [m for m in ("triton", "pynvml", "amdsmi") if m in sys.modules]
dshal.backends(emulate=False)
dshal.backends(emulate=True)
dshal.use(backend="nvidia", emulate=True)
dshal.use(backend="amd", emulate=True)
after_discovery = [m for m in ("triton", "pynvml", "amdsmi") if m in sys.modules]
import torch
dshal.use(backend="nvidia", emulate=True)
dshal.ops.silu_and_mul(torch.ones(2, 8))
after_op = [m for m in ("triton", "pynvml", "amdsmi") if m in sys.modules]
print(json.dumps([after_import, after_discovery, after_op]))
"""


@pytest.mark.needs_interpreter
def test_nvidia_no_vendor_import_at_import_or_discovery():
    proc = run_python(["-c", LAZY_CHECK])
    assert proc.returncode == 0, proc.stderr
    after_import, after_discovery, after_op = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after_import == []
    assert after_discovery == []
    assert after_op == ["triton"]  # the kernels are really used once an op runs


@pytest.mark.needs_interpreter  # emulation itself: Triton >= 3.8
def test_emulated_nvidia_after_a_model_was_built_on_cpu():
    """A service that built a model on cpu could never switch to emulated nvidia: the meta
    build's arange imported triton (torch._refs -> dynamo) before TRITON_INTERPRET was set."""
    code = (
        "import sys, torch, dshal, dshal.model\n"
        "dshal.use(backend='cpu')\n"
        "model = dshal.model.random_model(dshal.model.tiny_args(), seed=1)\n"
        "model.generate(torch.tensor([[1, 2, 3]]), 2)\n"
        "print('triton imported:', 'triton' in sys.modules)\n"
        "print('emulated:', dshal.use(backend='nvidia', emulate=True).emulated)\n"
    )
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "triton imported: False" in proc.stdout and "emulated: True" in proc.stdout
