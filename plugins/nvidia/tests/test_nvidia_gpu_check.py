"""benchmarks/gpu_check.py --dry-run: the H200 check script's own code on CPU (emulated
nvidia backend, Triton interpreter, tiny shapes). Figures from it are meaningless; the
test proves every stage runs and the JSON/table are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"


def test_nvidia_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=120, check=False,
        cwd=SCRIPT.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"]["dry_run"] is True and data["device"]["capabilities"]["emulated"] is True
    assert data["device"]["gemm_block_path"] == "triton"
    paths = {r["path"] for r in data["gemm"]}
    assert paths == {"triton", "bf16_matmul", "rowwise_scaled_mm"}  # no cuBLASLt blockwise on CPU
    assert all("us" in r and "error" not in r for r in data["gemm"]), data["gemm"]
    assert all(r["similarity_gap"] < 1e-5 for r in data["gemm"] if r["path"] == "triton")
    norm = data["add_rmsnorm"]
    assert norm["max_abs_err"] < 0.05 and norm["norm_us"] > 0 and norm["copy_us"] > 0
    assert "conformance" in data and data["conformance"]["command"].startswith("-m dshal conformance --backend nvidia")
    assert set(data["targets"]) == {"fp8_block_vs_bf16_at_4096x7168x16384", "triton_vs_cublaslt_blockwise", "add_rmsnorm_vs_copy_bandwidth"}
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("target add_rmsnorm_vs_copy_bandwidth")  # the table comes last
    assert any("DRY RUN" in line for line in last)
