"""What the nvidia plugin says serves each weight format of linear is what runs (emulated:
CPU tensors, Triton interpreter): a bf16 linear is a torch matmul, an FP8-block linear the
Triton quantize + block-GEMM kernels; ``dshal info`` shows both. The op code is shared with
amd (dshal.backends.triton_gpu)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dshal
from dshal.kernels.triton import ensure_interpreter_if_cpu

ensure_interpreter_if_cpu("cpu")  # before anything imports triton (read when functions are decorated)


@pytest.fixture
def rt():
    runtime = dshal.use(backend="nvidia", emulate=True)
    assert runtime.emulated
    return runtime


def test_linear_kind_per_weight_format(rt):
    paths = rt.capabilities.op_paths["linear"]
    assert (paths["bf16"].kind, rt.provider_kind("linear", "bf16")) == ("native", "native")
    assert "torch matmul" in paths["bf16"].via and "Triton" not in paths["bf16"].via
    assert (paths["fp8-block"].kind, rt.provider_kind("linear", "fp8-block")) == ("triton", "triton")
    assert "Triton block-FP8 kernel" in paths["fp8-block"].via
    assert paths["fp8-row"].kind == "native" and "torch._scaled_mm rowwise" in paths["fp8-row"].via
    assert paths["int8"].kind == "reference"
    # op_kinds keeps one kind per op: the FP8 checkpoint's path (documented on Capabilities).
    assert rt.capabilities.fp8_checkpoint_gemm == "fp8-block" and rt.provider_kind("linear") == "triton"
    assert rt.describe()["providers"]["linear"]["paths"]["bf16"]["kind"] == "native"
    assert "paths" not in rt.describe()["providers"]["rms_norm"]  # one path for every input


def test_the_declared_paths_are_the_ones_that_run(rt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(256, 256, generator=g).to(torch.bfloat16)
    # bf16: exactly torch's matmul.
    assert torch.equal(rt.backend.linear(x, w), torch.nn.functional.linear(x, w))
    # fp8-block: exactly the Triton activation quantization and block GEMM.
    kernels, target = rt.backend.kernels(), rt.backend.target()
    wq, ws = kernels.quant.fp8_quantize_blocks(w.float(), (128, 128), torch.float8_e4m3fn, target=target)
    xq, xs = kernels.quant.fp8_quantize_blocks(x, (1, 128), torch.float8_e4m3fn, target=target)
    want = kernels.gemm.fp8_block_gemm(xq, xs, wq, ws, torch.bfloat16, target=target)
    assert torch.equal(rt.backend.linear(x, wq, None, ws), want)


def test_dshal_info_shows_the_path_per_weight_format():
    env = {k: v for k, v in os.environ.items() if k not in ("DSHAL_CONFIG", "DSHAL_BACKEND", "DSHAL_PLUGINS")}
    proc = subprocess.run([sys.executable, "-m", "dshal", "info", "--backend", "nvidia"], env={**env, "DSHAL_EMULATE": "1"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "bf16: native -- torch matmul (torch.nn.functional.linear)" in proc.stdout
    assert "fp8-block: triton -- activations quantized per 1x128 by the Triton kernel" in proc.stdout


def test_conformance_report_records_the_path_per_weight_format():
    runner = pytest.importorskip("dshal_conformance.runner", reason="dshal-conformance is not installed")
    from dshal_conformance import report

    rep = runner.run(runner.resolve("nvidia", emulate=True),
                     runner.Options(cases=["capability/*"], collectives=False, progress=False))
    report.validate(rep)
    assert rep["platform"]["emulated"] is True
    linear = next(c for c in rep["cases"] if c["id"] == "capability/linear")
    assert linear["status"] == "pass" and linear["details"]["kind"] == "triton"
    assert linear["details"]["paths"]["bf16"]["kind"] == "native"
    assert "torch matmul" in linear["details"]["paths"]["bf16"]["via"]
    assert linear["details"]["paths"]["fp8-block"]["kind"] == "triton"
    norm = next(c for c in rep["cases"] if c["id"] == "capability/rms_norm")
    assert norm["details"] == {"provider": "nvidia", "kind": "triton"}
