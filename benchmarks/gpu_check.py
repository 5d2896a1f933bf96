#!/usr/bin/env python
"""One prepared check of the nvidia plugin on an NVIDIA H200 (any Hopper works), < 8 minutes.

    python benchmarks/gpu_check.py                 # on the GPU machine; results under $OUT (default ./out)
    python benchmarks/gpu_check.py --dry-run       # CPU, emulated backend, tiny shapes (CI)

It runs, in this order (each stage writes its part of ``$OUT/gpu_check.json`` as soon as
it finishes, so a stage cut short by the time budget leaves the others' results):

1. **device**: torch/CUDA versions, the device, and what the nvidia backend declares
   (``dshal info``'s view, including which block-FP8 GEMM path it uses);
2. **block-FP8 GEMM** on DeepGEMM's shapes (N x K in ``GEMM_SHAPES``, M in ``GEMM_MS``), one
   row per shape and path: ``triton`` (dshal's kernel), ``torch_blockwise``
   (``torch.nn.functional.scaled_mm`` 1x128/128x128, cuBLASLt; only where the backend's
   probe says it works), ``bf16_matmul`` (``torch.matmul`` on bf16 copies) and
   ``rowwise_scaled_mm`` (``torch._scaled_mm`` with row scales). Timing: CUDA events around
   each call, median of ``--iters`` calls after ``--warmup`` calls (Triton's autotuning
   happens in the warm-up), inputs rotated over enough copies to defeat the 50 MB L2;
3. **fused add+RMSNorm** (``dshal.ops.rms_norm`` with ``residual``, the Triton kernel) against
   a device-to-device copy moving the same number of bytes;
4. **conformance** ``full`` tier for ``nvidia`` (``dshal conformance`` in a subprocess, with
   the time left; its JSON/JUnit reports land in ``$OUT/conformance``).

It ends with a short table of the figures and the issue's targets (printed last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: (N, K) of DeepSeek-V3's linears as benchmarked by DeepGEMM.
GEMM_SHAPES = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
GEMM_MS = (1, 64, 128, 4096)
DRY_SHAPES = ((256, 256), (128, 384))
DRY_MS = (1, 16)
#: Rows x hidden of the add+RMSNorm check (DeepSeek-V3 hidden size 7168).
NORM_SHAPE = (16384, 7168)
DRY_NORM_SHAPE = (64, 256)
L2_BYTES = 50 * 2**20  # H100/H200 L2
TARGETS = {
    "fp8_block_vs_bf16_at_4096x7168x16384": 1.6,
    "triton_vs_cublaslt_blockwise": 0.9,
    "add_rmsnorm_vs_copy_bandwidth": 0.8,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, emulated nvidia backend (Triton interpreter), tiny shapes")
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else ./out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole check (default 450)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per measurement (default 5; dry run 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 30; dry run 2)")
    p.add_argument("--skip-conformance", action="store_true", help="do not run the conformance stage")
    return p.parse_args(argv)


# ---------------------------------------------------------------- helpers
class Check:
    """Collects results and rewrites the JSON after every stage."""

    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {"schema": "dshal.gpu_check/1", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out_dir.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> Path:
        path = self.out_dir / "gpu_check.json"
        path.write_text(json.dumps(self.data, indent=2, default=str))
        return path


def timed_median(fn: Callable[[int], Any], warmup: int, iters: int, on_gpu: bool) -> float:
    """Median seconds of ``fn(i)`` (i selects the rotating input), after ``warmup`` calls."""
    import torch

    for i in range(warmup):
        fn(i)
    if on_gpu:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            fn(warmup + i)
            end.record()
        torch.cuda.synchronize()
        return statistics.median(b.elapsed_time(e) for b, e in events) * 1e-3
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(warmup + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copies_for(bytes_per_set: int, cap: int = 16) -> int:
    """How many input copies to rotate so that consecutive calls miss L2."""
    return max(2, min(cap, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


# ---------------------------------------------------------------- stages
def stage_device(check: Check, backend: Any, dry_run: bool) -> None:
    import torch

    import dshal

    info = next(i for i in dshal.backends(emulate=dry_run) if i.name == "nvidia")
    device: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "dry_run": dry_run,
        "nvidia_available": info.available,
        "nvidia_reason": info.reason,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, capability=list(torch.cuda.get_device_capability(0)),
                      memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                      device_count=torch.cuda.device_count())
    caps = backend.capabilities()
    device["capabilities"] = {
        "device_name": caps.device_name, "arch": caps.arch, "fp8_formats": list(caps.fp8_formats),
        "peak_flops": dict(caps.peak_flops), "peak_bandwidth": caps.peak_bandwidth,
        "op_kinds": dict(caps.op_kinds), "notes": dict(caps.notes), "emulated": caps.emulated,
    }
    device["gemm_block_path"] = backend.gemm_plan().block_path
    check.data["device"] = device
    check.save()


def stage_gemm(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int) -> None:
    import torch

    from dshal.backends.gpu_common import scaled_mm_rowwise_or_tensorwise, torch_blockwise_gemm
    from dshal.ops import reference as ref

    on_gpu = not dry_run
    dev = backend.device()
    gemm = backend.kernels().gemm  # imports triton (interpreter first when emulated)
    target = backend.kernel_target()
    torch_blockwise = backend.gemm_plan().block_path == "torch-blockwise"
    rows: list[dict[str, Any]] = []
    check.data["gemm"] = rows
    gen = torch.Generator(device=dev).manual_seed(0)

    def time_paths(m: int, w: Any, wq: Any, ws: Any, wr: Any, wr_scale: Any) -> list[dict[str, Any]]:
        """One row per GEMM path at ``m`` rows; the rotated inputs are freed on return."""
        n, k = w.shape
        copies = copies_for(m * k + n * k)
        xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
        blk = [ref.quantize_fp8(x, (1, 128), "e4m3fn") for x in xs]
        row = [ref.quantize_fp8(x, (1, -1), "e4m3fn") for x in xs]
        # Weights rotate too (they dominate the bytes at small M).
        extra = min(copies, 4) - 1
        wqs = [wq] + [wq.clone() for _ in range(extra)]
        wbs = [w] + [w.clone() for _ in range(extra)]
        wrs = [wr] + [wr.clone() for _ in range(extra)]
        paths: dict[str, Callable[[int], Any]] = {
            "triton": lambda i: gemm.fp8_block_gemm(
                blk[i % copies][0], blk[i % copies][1], wqs[i % len(wqs)], ws, torch.bfloat16, target=target
            ),
            "bf16_matmul": lambda i: torch.matmul(xs[i % copies], wbs[i % len(wbs)].t()),
            "rowwise_scaled_mm": lambda i: scaled_mm_rowwise_or_tensorwise(
                row[i % copies][0], row[i % copies][1], wrs[i % len(wrs)], wr_scale, "row", torch.bfloat16
            ),
        }
        if torch_blockwise:
            paths["torch_blockwise"] = lambda i: torch_blockwise_gemm(
                blk[i % copies][0], blk[i % copies][1], wqs[i % len(wqs)], ws, torch.bfloat16
            )
        want = ref.fp8_gemm(blk[0][0], blk[0][1], wq, ws, torch.float32)
        entries = []
        for name, fn in paths.items():
            entry: dict[str, Any] = {"m": m, "n": n, "k": k, "path": name}
            try:
                out = fn(0).float()
                if name in ("triton", "torch_blockwise"):  # same inputs as the reference
                    entry["similarity_gap"] = float(1 - 2 * (out * want).sum() / (out * out + want * want).sum())
                seconds = timed_median(fn, warmup, iters, on_gpu)
                entry.update(us=seconds * 1e6, tflops=2 * m * n * k / seconds / 1e12)
            except Exception as err:  # noqa: BLE001 - one path failing must not stop the check
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            entries.append(entry)
        return entries

    for n, k in DRY_SHAPES if dry_run else GEMM_SHAPES:
        # Weights once per shape (bf16 and FP8 copies), activations per M.
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) / math.sqrt(k)
        wq, ws = ref.quantize_fp8(w, (128, 128), "e4m3fn")
        wr, wr_scale = ref.quantize_fp8(w, (1, -1), "e4m3fn")
        for m in DRY_MS if dry_run else GEMM_MS:
            if check.left() < 60:
                rows.append({"m": m, "n": n, "k": k, "path": "*", "skipped": "time budget"})
                continue
            rows.extend(time_paths(m, w, wq, ws, wr, wr_scale))
        check.save()


def stage_norm(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int) -> None:
    import torch

    import dshal

    dev = backend.device()
    tokens, hidden = DRY_NORM_SHAPE if dry_run else NORM_SHAPE
    per = tokens * hidden * 2  # one bf16 [T, H] tensor
    copies = copies_for(4 * per, cap=4)
    gen = torch.Generator(device=dev).manual_seed(1)
    xs = [torch.randn(tokens, hidden, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
    rs = [torch.randn(tokens, hidden, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
    weight = torch.randn(hidden, device=dev, generator=gen, dtype=torch.bfloat16)
    rms_norm = dshal.current().op("rms_norm")
    # add+RMSNorm reads x and residual, writes y and x+residual: 4 tensors. The copy moves
    # a 2-tensor buffer: 2 read + 2 written, the same bytes.
    srcs = [torch.cat([x, r]) for x, r in zip(xs, rs)]
    dsts = [torch.empty_like(s) for s in srcs]
    moved = 4 * per
    result: dict[str, Any] = {"tokens": tokens, "hidden": hidden, "bytes": moved}
    try:
        y, s = rms_norm(xs[0], weight, 1e-6, rs[0])
        y_ref, s_ref = dshal.ops.reference.rms_norm(xs[0], weight, 1e-6, rs[0])
        result["max_abs_err"] = float((y.float() - y_ref.float()).abs().max())
        norm_s = timed_median(lambda i: rms_norm(xs[i % copies], weight, 1e-6, rs[i % copies]), warmup, iters, not dry_run)
        copy_s = timed_median(lambda i: dsts[i % copies].copy_(srcs[i % copies]), warmup, iters, not dry_run)
        result.update(norm_us=norm_s * 1e6, copy_us=copy_s * 1e6, norm_gbs=moved / norm_s / 1e9,
                      copy_gbs=moved / copy_s / 1e9, ratio=copy_s / norm_s)
    except Exception as err:  # noqa: BLE001
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    check.data["add_rmsnorm"] = result
    check.save()


def stage_conformance(check: Check, dry_run: bool) -> None:
    report_dir = check.out_dir / "conformance"
    cmd = [sys.executable, "-m", "dshal", "conformance", "--backend", "nvidia", "--report-dir", str(report_dir)]
    cmd += ["--tier", "ci", "--ops", "silu_and_mul"] if dry_run else ["--tier", "full"]
    env = dict(os.environ, **({"DSHAL_EMULATE": "1"} if dry_run else {}))
    timeout = max(30.0, check.left() - 20)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": round(timeout)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        result.update(returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-3000:])
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:]
        result.update(returncode=None, error=f"timed out after {timeout:.0f} s",
                      output_tail=tail.decode(errors="replace") if isinstance(tail, bytes) else str(tail))
    result["seconds"] = round(time.monotonic() - t0, 1)
    report = report_dir / "nvidia.json"
    if report.is_file():
        try:
            data = json.loads(report.read_text())
            result["summary"] = data.get("summary")
            result["emulated"] = data.get("platform", {}).get("emulated")
        except (OSError, ValueError) as err:
            result["report_error"] = str(err)
    check.data["conformance"] = result
    check.save()


# ---------------------------------------------------------------- summary
def _best(rows: list[dict[str, Any]], m: int, n: int, k: int, path: str) -> float | None:
    for r in rows:
        if (r["m"], r["n"], r["k"], r["path"]) == (m, n, k, path) and "us" in r:
            return r["us"]
    return None


def summarize(check: Check, dry_run: bool) -> list[str]:
    rows = check.data.get("gemm", [])
    lines = []
    header = f"{'M':>5} {'N':>6} {'K':>6} " + " ".join(f"{p:>17}" for p in ("triton", "torch_blockwise", "bf16_matmul", "rowwise_scaled_mm"))
    lines.append("block-FP8 GEMM, TFLOP/s (median of CUDA-event timings)" if not dry_run else "block-FP8 GEMM, TFLOP/s (DRY RUN: CPU interpreter, meaningless)")
    lines.append(header)
    shapes = sorted({(r["m"], r["n"], r["k"]) for r in rows}, key=lambda s: (s[1], s[2], s[0]))
    for m, n, k in shapes:
        cells = []
        for p in ("triton", "torch_blockwise", "bf16_matmul", "rowwise_scaled_mm"):
            r = next((r for r in rows if (r["m"], r["n"], r["k"], r["path"]) == (m, n, k, p)), None)
            cells.append(f"{r['tflops']:17.1f}" if r and "tflops" in r else f"{('err' if r and 'error' in r else '-'):>17}")
        lines.append(f"{m:>5} {n:>6} {k:>6} " + " ".join(cells))
    targets: dict[str, Any] = {}
    m, n, k = (4096, 7168, 16384)
    bf16 = _best(rows, m, n, k, "bf16_matmul")
    fp8 = [t for t in (_best(rows, m, n, k, "triton"), _best(rows, m, n, k, "torch_blockwise")) if t]
    if bf16 and fp8:
        targets["fp8_block_vs_bf16_at_4096x7168x16384"] = bf16 / min(fp8)
    ratios = []
    for mm, nn, kk in shapes:
        tri, cub = _best(rows, mm, nn, kk, "triton"), _best(rows, mm, nn, kk, "torch_blockwise")
        if tri and cub:
            ratios.append(cub / tri)
    if ratios:
        targets["triton_vs_cublaslt_blockwise"] = statistics.geometric_mean(ratios)
    norm = check.data.get("add_rmsnorm", {})
    if "ratio" in norm:
        targets["add_rmsnorm_vs_copy_bandwidth"] = norm["ratio"]
        lines.append(f"add+RMSNorm [{norm['tokens']}x{norm['hidden']}] bf16: {norm['norm_gbs']:.0f} GB/s; "
                     f"copy of the same bytes: {norm['copy_gbs']:.0f} GB/s")
    conf = check.data.get("conformance")
    if conf:
        lines.append(f"conformance: rc={conf.get('returncode')} summary={conf.get('summary')} {conf.get('error', '')}".rstrip())
    for name, goal in TARGETS.items():
        got = targets.get(name)
        verdict = "n/a" if got is None else ("meets" if got >= goal else "misses")
        lines.append(f"target {name}: {'-' if got is None else f'{got:.2f}x'} (goal >= {goal}x) {verdict}")
    check.data["targets"] = {k: {"value": targets.get(k), "goal": v} for k, v in TARGETS.items()}
    check.save()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["DSHAL_EMULATE"] = "1"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    out_dir = Path(args.out or os.environ.get("OUT") or "out")
    check = Check(out_dir, args.budget_s)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    iters = args.iters if args.iters is not None else (2 if args.dry_run else 30)

    import torch

    import dshal

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    rt = dshal.use(backend="nvidia", emulate=args.dry_run)
    backend = rt.backend
    t0 = time.monotonic()
    stage_device(check, backend, args.dry_run)
    print(f"[{time.monotonic() - t0:6.1f}s] device: {check.data['device'].get('name', backend.capabilities().device_name)}; "
          f"block path {check.data['device']['gemm_block_path']}", flush=True)
    stage_gemm(check, backend, args.dry_run, warmup, iters)
    print(f"[{time.monotonic() - t0:6.1f}s] gemm: {len(check.data['gemm'])} measurements", flush=True)
    stage_norm(check, backend, args.dry_run, warmup, iters)
    print(f"[{time.monotonic() - t0:6.1f}s] add+rmsnorm done", flush=True)
    if not args.skip_conformance:
        stage_conformance(check, args.dry_run)
        print(f"[{time.monotonic() - t0:6.1f}s] conformance rc={check.data['conformance'].get('returncode')}", flush=True)
    check.data["seconds"] = round(time.monotonic() - t0, 1)
    lines = summarize(check, args.dry_run)
    path = check.save()
    print(f"results: {path}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
