#!/usr/bin/env python
"""One prepared check of the nvidia plugin on an NVIDIA H100/H200 (any Hopper works), < 8 minutes.

    python3 benchmarks/gpu_check.py --fetch-wheels wheels   # here, with network: the wheels it carries
    python3 benchmarks/gpu_check.py --wheels wheels         # on the GPU machine (no network); results in $OUT
                                                            # (the device tool: carry ["wheels"], $OUT as it sets it)
    python benchmarks/gpu_check.py --dry-run                # CPU, emulated backend, tiny shapes (CI)

The GPU machine has no network. Its python3 (itself a venv, ``/opt/torch/.venv``) has torch,
Triton, numpy, PyYAML, rich, safetensors and matplotlib, but not stevedore or jsonschema.
``--fetch-wheels DIR`` builds dshal, dshal-nvidia and dshal-conformance as wheels and
downloads the pure-Python dependencies (plus PyYAML's and numpy's binary wheels for the
machine's CPython 3.12; ``--python-version`` for another) into ``DIR`` (git-ignored
``wheels/``, about 20 MiB: the device tool carries 64 MiB with the working tree). On the GPU
machine ``--wheels DIR`` installs dshal's three and whatever that python lacks with ``pip
--no-index --no-deps --target`` into a folder outside ``$OUT`` (``--site``) and runs the
check again with that folder first on ``PYTHONPATH`` (that python's own torch and Triton stay
visible); ``--stack`` prints where each package is imported from.

It runs, in this order; each stage writes its part of ``$OUT/gpu_check.json`` as soon as
it finishes, so a stage cut short by the time budget leaves the others' results:

1. **device**: torch/CUDA/Triton versions against the ranges dshal supports, the device,
   its L2 size (read from the device), and what the nvidia backend declares (``dshal
   info``'s view, including which block-FP8 GEMM path it uses);
2. **conformance**: the ``ci`` tier for ``nvidia`` on the device (``dshal conformance`` in
   a subprocess; the ``full`` tier's float64 oracles run on the host for minutes); reports in
   ``$OUT/conformance``; collective cases needing more GPUs than present are skipped, and so
   are the cases its ``--budget-s`` (at most 150 s) leaves unstarted (a cold Triton cache
   compiles for most of them), the report still written;
3. **block-FP8 GEMM** on DeepGEMM's shapes, the lm_head (129280 x 7168) and one K that is
   not a multiple of 128, one row per shape and path: ``triton`` (dshal's kernel),
   ``torch_blockwise`` (cuBLASLt, where the backend's probe says it works), ``bf16_matmul``
   and ``rowwise_scaled_mm``. Timing: for M <= 128, kernel-only: ``--graph-reps`` calls
   captured back to back in one CUDA graph, the replay timed with CUDA events (no Python
   launch cost in the figure; back-to-back launches where capture fails); larger M: CUDA
   events around each call; median of ``--iters`` after ``--warmup`` (autotuning happens in
   the warm-up); inputs rotated over enough copies to exceed twice the device's L2;
4. **fused add+RMSNorm** (the Triton kernel) against a device copy of the same bytes;
5. **one MoE layer** at DeepSeek-V3's sizes (256 experts, top 8 of 8 groups x 4, hidden 7168,
   expert width 2048, FP8 128x128 weights): ``moe_gate`` + ``moe_experts`` through the
   runtime, kernel-only timings, and the output against the reference at one token;
6. **attention** at a decode step of DeepSeek-V3's absorbed MLA on one TP=8 rank (16 heads on
   the shared 576-wide latent, values 512; 4096 cached tokens; batch 1 and 8): the op as the
   nvidia backend serves it (its non-finite guard, then SDPA) against torch's SDPA alone on
   the same inputs, kernel-only; the eager step (causal) and the static one (the cache's 8
   spare key columns for the mask, non-causal). The guard's cost on a device was never measured;
7. **dshal run**: the model core on the device (``dshal run --graphs auto --speculative mtp``):
   decode tokens/s with and without CUDA graphs, compile/autotune time apart, and greedy
   decoding with the (random) MTP layer's drafts, its steps' forwards captured as CUDA graphs,
   whose tokens must be the eager run's;
8. **tune**: ``dshal tune`` on DeepSeek-V3's FP8 linear shapes with the time left (at most
   3 minutes, less what ragged needs; small M first), writing ``$OUT/tuned/nvidia-sm90.json``: the table to ship in
   ``dshal/kernels/triton/tuned/``. (Until a table is shipped, the GEMM stage's warm-up
   autotunes at run time, so its figures do not depend on this stage);
9. **ragged**: prompts of different lengths (the tiny model): eager, and through the per-row
   static decode step captured as a CUDA graph; the tokens must match and the step capture.
   Then sampled speculative decoding on them (temperature 0.8): its forwards captured, its
   draws made between them; and two turns of a conversation through one captured decode step
   kept with its cache (``generate(..., cache=, decoder=)``, as ``--interactive`` runs).
   (After a failed graph capture earlier in the process these steps run eagerly: torch 2.11's
   allocator may abort on a later capture, pytorch#180395.)

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
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: (N, K) of DeepSeek-V3's linears as benchmarked by DeepGEMM, the lm_head, and a K that is
#: not a multiple of 128 (the kernels' masked last K block).
GEMM_SHAPES = (
    (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048),
    (129280, 7168), (4096, 7200),
)
GEMM_MS = (1, 16, 64, 128, 4096)
DRY_SHAPES = ((256, 256), (128, 200))
DRY_MS = (1, 16)
#: M up to this is timed kernel-only (graph of back-to-back calls): launch cost dominates there.
KERNEL_ONLY_MAX_M = 128
#: Rows x hidden of the add+RMSNorm check (DeepSeek-V3 hidden size 7168).
NORM_SHAPE = (16384, 7168)
DRY_NORM_SHAPE = (64, 256)
#: One MoE layer: experts, hidden, expert width, top-k, groups, groups kept; tokens timed.
#: Absorbed MLA decode attention on one TP=8 rank: (batch, query heads, cached tokens, latent
#: width (kv_lora + rope), value width (kv_lora)).
ATTENTION_CASES = ((1, 16, 4096, 576, 512), (8, 16, 4096, 576, 512))
DRY_ATTENTION_CASES = ((1, 2, 64, 48, 32),)
MOE_DIMS = {"experts": 256, "hidden": 7168, "inter": 2048, "top_k": 8, "n_group": 8, "topk_group": 4}
MOE_TOKENS = (1, 64, 4096)
DRY_MOE_DIMS = {"experts": 8, "hidden": 256, "inter": 128, "top_k": 2, "n_group": 2, "topk_group": 1}
DRY_MOE_TOKENS = (1, 4)
#: The most the tuning stage may take (it gets what the other stages leave, up to this).
TUNE_MAX_S = 180.0
#: The least time left for which the late stages still start (below it they are skipped, so the
#: whole check ends within its budget: the device tool stops a command at 600 s).
RUN_MIN_S, RAGGED_MIN_S, TUNE_MIN_S = 40.0, 45.0, 40.0
#: Per-case timeout of the conformance stage (a cold Triton cache compiles a few kernels per case).
CONFORMANCE_CASE_S = 40.0
FALLBACK_L2_BYTES = 50 * 2**20  # H100/H200 L2, when the device does not report it
TARGETS = {
    "fp8_block_vs_bf16_at_4096x7168x16384": 1.6,
    "triton_vs_cublaslt_blockwise": 0.9,
    "add_rmsnorm_vs_copy_bandwidth": 0.8,
    "decode_graphs_vs_eager": 2.0,
}
#: What the carried wheels provide: import name -> distribution (pure Python, or the
#: per-CPython binary wheels of PyYAML and numpy, for a machine whose python3 lacks them).
#: jsonschema is optional (conformance reports are then not schema-validated), so rpds-py,
#: which has no pure-Python wheel, is not needed.
CARRIED = {"stevedore": "stevedore", "rich": "rich", "markdown_it": "markdown-it-py", "mdurl": "mdurl",
           "pygments": "pygments", "yaml": "pyyaml", "numpy": "numpy"}
BINARY = ("pyyaml", "numpy")
#: The GPU machine's CPython (Python 3.12.3 there): the binary wheels fetched by default.
GPU_MACHINE_PYTHON = "3.12"
#: What the device tool carries beside the working tree, in all (its ``carry`` limit).
CARRY_LIMIT_BYTES = 64 * 2**20
#: dshal's own distributions, built here as wheels.
OWN = {"dshal": ".", "dshal-nvidia": "plugins/nvidia", "dshal-conformance": "conformance"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, emulated nvidia backend (Triton interpreter), tiny shapes")
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else ./out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for the whole check (default 450)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per measurement (default 5; dry run 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 30; dry run 2)")
    p.add_argument("--graph-reps", type=int, default=None, help="calls per captured graph in kernel-only timings (default 20; dry run 2)")
    p.add_argument("--skip-conformance", action="store_true", help="do not run the conformance stage")
    p.add_argument("--skip-tune", action="store_true", help="do not run the tuning stage (dshal tune with the time left)")
    p.add_argument("--wheels", metavar="DIR", help="first install dshal and the dependencies this python lacks from DIR (no network) into --site, then run with it on PYTHONPATH")
    p.add_argument("--fetch-wheels", metavar="DIR", help="(with network) build/download the wheels --wheels needs into DIR, then exit")
    p.add_argument("--site", default=str(Path(tempfile.gettempdir()) / "dshal-gpu-check-site"),
                   help="with --wheels: the folder to install into (default: %(default)s; not under $OUT, which the device tool sends back)")
    p.add_argument("--stack", action="store_true",
                   help="print where torch, Triton and dshal are imported from and the backends found, then exit (checks an install)")
    p.add_argument("--python-version", default=GPU_MACHINE_PYTHON,
                   help=f"with --fetch-wheels: the CPython whose binary wheels (PyYAML, numpy) to fetch (default {GPU_MACHINE_PYTHON}, the GPU machine's)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- carried wheels
def fetch_wheels(dest: Path, python_version: str = GPU_MACHINE_PYTHON) -> int:
    """Build dshal's wheels and download the dependencies the GPU machine may lack into
    ``dest``: the pure-Python ones, and PyYAML's and numpy's binary wheels for CPython
    ``python_version`` only (one set: all four CPythons' would exceed what the device tool
    carries). Fails if the folder ends up larger than :data:`CARRY_LIMIT_BYTES`."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    steps = [
        pip + ["wheel", "--no-deps", "-w", str(dest), *(str(REPO / path) for path in OWN.values())],
        pip + ["download", "--no-deps", "-d", str(dest), *(d for d in CARRIED.values() if d not in BINARY)],
        pip + ["download", "--no-deps", "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
               "--python-version", python_version, "-d", str(dest), *BINARY],
    ]
    for step in steps:
        print("+", " ".join(step[2:]), flush=True)
        if subprocess.run(step, check=False).returncode:
            return 1
    files = list(dest.glob("*.whl"))
    size = sum(f.stat().st_size for f in files)
    print(f"wheels in {dest}: {len(files)} files, {size / 2**20:.1f} MiB (CPython {python_version} binaries)")
    if size > CARRY_LIMIT_BYTES:
        print(f"gpu_check: {dest} holds {size / 2**20:.1f} MiB, more than the {CARRY_LIMIT_BYTES >> 20} MiB the device "
              f"tool carries with the working tree; remove old wheels from it", file=sys.stderr)
        return 1
    return 0


def install_plan(present: set[str], wheels: Sequence[str]) -> tuple[list[str], list[str]]:
    """(distributions to install from the wheels, modules missing with no wheel for them):
    dshal's own three always, plus each carried dependency whose module is not ``present``."""
    have = {w.split("-")[0].lower().replace("_", "-") for w in wheels}
    wanted = list(OWN) + [dist for module, dist in CARRIED.items() if module not in present]
    return [d for d in wanted if d in have], [d for d in wanted if d not in have]


def install_and_reexec(wheels_dir: Path, site_dir: Path, argv: Sequence[str]) -> int:
    """Install from ``wheels_dir`` into the folder ``site_dir`` (``pip --target``; outside
    ``$OUT``, whose files the device tool sends back) and run this script again with that
    folder first on ``PYTHONPATH``. Returns its exit code.

    A folder, not a venv: the GPU machine's python3 is itself a venv (``/opt/torch/.venv``),
    and a venv made from a venv does not see the first one's packages, even with
    ``--system-site-packages`` (it sees the base interpreter's), so torch would be missing.
    Packages on ``PYTHONPATH`` come before the interpreter's own, entry points included."""
    import importlib.util

    present = {m for m in CARRIED if importlib.util.find_spec(m) is not None}
    wheels = sorted(p.name for p in wheels_dir.glob("*.whl"))
    to_install, missing = install_plan(present, wheels)
    if missing:
        print(f"gpu_check: no wheel in {wheels_dir} for {missing}; run --fetch-wheels where there is network", file=sys.stderr)
        return 2
    site = Path(site_dir).resolve()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), "--find-links", str(wheels_dir), *to_install]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    rest = [a for i, a in enumerate(argv) if a not in ("--wheels", "--site") and (i == 0 or argv[i - 1] not in ("--wheels", "--site"))]
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], env=env, check=False).returncode


def stack_facts() -> dict[str, Any]:
    """The software this check runs on: interpreter, where torch, Triton and dshal's
    packages are imported from (``--wheels`` puts dshal's first), their versions against
    :data:`dshal.versions.SUPPORTED`, and the ``dshal.backends`` entry points found."""
    import importlib.metadata
    import importlib.util

    from dshal.versions import stack_report  # lazy: dshal is installed by this script's first step

    def origin(module: str) -> str | None:
        spec = importlib.util.find_spec(module)
        return str(Path(spec.origin).parent) if spec is not None and spec.origin else None

    backends = sorted(f"{ep.name} ({ep.value})" for ep in importlib.metadata.entry_points(group="dshal.backends"))
    return {"python": sys.executable, "python_version": platform.python_version(),
            "from": {m: origin(m) for m in ("torch", "triton", "dshal", "dshal_nvidia", "dshal_conformance", "stevedore")},
            "versions": stack_report(), "backends": backends}


# ---------------------------------------------------------------- helpers
class Check:
    """Collects results and rewrites the JSON after every stage."""

    def __init__(self, out_dir: Path, budget_s: float):
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {"schema": "dshal.gpu_check/2", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.l2_bytes = FALLBACK_L2_BYTES
        #: The first kernel-timing capture that failed (then no later one is tried).
        self.capture_error: str | None = None
        out_dir.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> Path:
        """Write the JSON whole (a temporary file renamed): a run killed mid-write keeps the last one."""
        path = self.out_dir / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, path)
        return path


def timed_median(fn: Callable[[int], Any], warmup: int, iters: int, on_gpu: bool) -> float:
    """Median seconds of ``fn(i)`` (i selects the rotating input), after ``warmup`` calls;
    CUDA events around each call on the GPU (includes the Python launch cost)."""
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


def timed_kernel(
    fn: Callable[[int], Any], warmup: int, iters: int, reps: int, on_gpu: bool, check: Check | None = None
) -> tuple[float, str]:
    """Kernel-only seconds per call of ``fn(i)``: ``reps`` calls (rotating inputs) captured back
    to back in one CUDA graph, each replay timed with events, median of ``iters`` / reps.
    Where capture fails, the same ``reps`` calls launched back to back between two events.
    Returns (seconds, method). On the CPU (dry run): the per-call median.

    Runs inside ``dshal.ops.trusted()``, as a captured decode step does: a checked op reads
    values on the host (the MoE ids' range), which a capture refuses. A failed capture is
    recorded on ``check`` (``capture_error``) and no later call captures: torch 2.11 leaves the
    caching allocator in capture mode after one (pytorch#180395), so a second capture in the
    same process is not trustworthy."""

    import dshal  # lazy: dshal is installed by this script's first step

    if not on_gpu:
        return timed_median(fn, warmup, iters, False), "wall clock per call (dry run)"
    with dshal.ops.trusted():
        return _timed_kernel_trusted(fn, warmup, iters, reps, check)


def _timed_kernel_trusted(fn: Callable[[int], Any], warmup: int, iters: int, reps: int, check: Check | None) -> tuple[float, str]:
    import torch

    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()

    def timed(run: Callable[[], Any]) -> float:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for begin, end in pairs:
            begin.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(b.elapsed_time(e) for b, e in pairs) * 1e-3 / reps

    def launches() -> None:
        for i in range(reps):
            fn(i)

    earlier = check.capture_error if check is not None else None
    if earlier:
        return timed(launches), f"{reps} back-to-back launches (no capture after a failed one: {earlier})"
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph):
                launches()
        torch.cuda.current_stream().wait_stream(side)
        return timed(graph.replay), f"CUDA graph of {reps} back-to-back calls"
    except (RuntimeError, TypeError) as err:
        torch.cuda.synchronize()
        note = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
        if check is not None:
            check.capture_error = note
            check.data["capture_error"] = note
        return timed(launches), f"{reps} back-to-back launches (graph capture failed: {note})"


def copies_for(bytes_per_set: int, l2_bytes: int, cap: int = 16) -> int:
    """How many input copies to rotate so that consecutive calls miss L2."""
    return max(2, min(cap, math.ceil(2 * l2_bytes / max(bytes_per_set, 1))))


def weight_copies(copies: int, n: int, k: int) -> int:
    """How many copies of an ``[N, K]`` weight the GEMM rotation uses beside ``copies`` input
    sets: all of them (weights dominate the bytes at small M, and the rotation must pass twice
    the L2: at most 16 copies, ~0.5 GB of bf16 for the smallest shape), but at most 2 of a
    weight of 2**28 elements or more (the lm_head's, 0.9 GB each in bf16: twice the L2 alone)."""
    return copies if n * k < 2**28 else min(copies, 2)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# ---------------------------------------------------------------- stages
def stage_device(check: Check, backend: Any, dry_run: bool) -> None:
    import torch

    import dshal  # lazy: dshal is installed by this script's first step

    info = next(i for i in dshal.backends(emulate=dry_run) if i.name == "nvidia")
    stack = stack_facts()
    device: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "dry_run": dry_run,
        "nvidia_available": info.available,
        "nvidia_reason": info.reason,
        "supported_versions": stack["versions"],
        "stack": stack,
    }
    if torch.cuda.is_available():
        index = backend.device().index
        props = torch.cuda.get_device_properties(index)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        device.update(name=props.name, capability=list(torch.cuda.get_device_capability(index)),
                      memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                      device_count=torch.cuda.device_count(), l2_bytes=l2 or None,
                      l2_source="device" if l2 else f"not reported: {FALLBACK_L2_BYTES >> 20} MiB assumed")
        check.l2_bytes = l2 or FALLBACK_L2_BYTES
    caps = backend.capabilities()
    device["capabilities"] = {
        "device_name": caps.device_name, "arch": caps.arch, "fp8_formats": list(caps.fp8_formats),
        "peak_flops": dict(caps.peak_flops), "peak_bandwidth": caps.peak_bandwidth,
        "op_kinds": dict(caps.op_kinds), "notes": dict(caps.notes), "emulated": caps.emulated,
        "op_paths": {op: {fmt: p.as_dict() for fmt, p in by_fmt.items()} for op, by_fmt in caps.op_paths.items()},
    }
    device["gemm_block_path"] = backend.gemm_plan().block_path
    check.data["device"] = device
    check.save()


def stage_gemm(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int, reps: int) -> None:
    import torch

    from dshal.ops import reference as ref  # lazy: dshal is installed by this script's first step
    from dshal.plugin import scaled_mm_rowwise_or_tensorwise  # lazy: as above
    from dshal_nvidia.cublaslt import blockwise_fits, torch_blockwise_gemm  # lazy: as above

    on_gpu = not dry_run
    dev = backend.device()
    gemm = backend.kernels().gemm  # imports triton (interpreter first when emulated)
    target = backend.kernel_target()
    torch_blockwise = backend.gemm_plan().block_path == "native"  # the nvidia plugin's cuBLASLt blockwise
    rows: list[dict[str, Any]] = []
    check.data["gemm"] = rows
    gen = torch.Generator(device=dev).manual_seed(0)

    def time_paths(m: int, w: Any, wq: Any, ws: Any, wr: Any, wr_scale: Any) -> list[dict[str, Any]]:
        """One row per GEMM path at ``m`` rows; the rotated inputs are freed on return."""
        n, k = w.shape
        copies = copies_for(m * k + n * k, check.l2_bytes)
        xs = [torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
        blk = [ref.quantize_fp8(x, (1, 128), "e4m3fn") for x in xs]
        row = [ref.quantize_fp8(x, (1, -1), "e4m3fn") for x in xs]
        extra = weight_copies(copies, n, k) - 1
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
        if torch_blockwise and blockwise_fits(blk[0][0], wq):  # the shapes the backend sends to cuBLASLt
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
                if m <= KERNEL_ONLY_MAX_M:
                    seconds, entry["timing"] = timed_kernel(fn, warmup, iters, reps, on_gpu, check)
                else:
                    seconds, entry["timing"] = timed_median(fn, warmup, iters, on_gpu), "CUDA events per call"
                entry.update(us=seconds * 1e6, tflops=2 * m * n * k / seconds / 1e12)
            except Exception as err:  # noqa: BLE001 - one path failing must not stop the check
                entry["error"] = _error(err)
            entries.append(entry)
        return entries

    for n, k in DRY_SHAPES if dry_run else GEMM_SHAPES:
        if check.left() < 150:  # keep time for the MoE layer and dshal run
            rows.append({"m": "*", "n": n, "k": k, "path": "*", "skipped": "time budget"})
            continue
        # Weights once per shape (bf16 and FP8 copies), activations per M.
        w = torch.randn(n, k, device=dev, generator=gen, dtype=torch.bfloat16) / math.sqrt(k)
        wq, ws = ref.quantize_fp8(w, (128, 128), "e4m3fn")
        wr, wr_scale = ref.quantize_fp8(w, (1, -1), "e4m3fn")
        for m in DRY_MS if dry_run else GEMM_MS:
            rows.extend(time_paths(m, w, wq, ws, wr, wr_scale))
        del w, wq, ws, wr, wr_scale
        check.save()


def stage_norm(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int) -> None:
    import torch

    import dshal  # lazy: dshal is installed by this script's first step

    dev = backend.device()
    tokens, hidden = DRY_NORM_SHAPE if dry_run else NORM_SHAPE
    per = tokens * hidden * 2  # one bf16 [T, H] tensor
    copies = copies_for(4 * per, check.l2_bytes, cap=4)
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
        result["error"] = _error(err)
    check.data["add_rmsnorm"] = result
    check.save()


def stage_attention(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int, reps: int) -> None:
    """Decode attention as the model's absorbed MLA step calls it: the op as served (non-finite
    guard + SDPA) against SDPA alone, kernel-only; eager (causal, the filled slots) and static
    (the whole buffer with the cache's spare key columns for the mask, non-causal)."""
    from dshal.model.cache import KVCache  # lazy: dshal is installed by this script's first step

    rows: list[dict[str, Any]] = []
    check.data["attention"] = {"rows": rows}
    for batch, heads, slots, width, value in DRY_ATTENTION_CASES if dry_run else ATTENTION_CASES:
        for step, extra, causal in (("eager", 0, True), ("static", KVCache.STATIC_BIAS_COLUMNS, False)):
            row: dict[str, Any] = {"step": step, "batch": batch, "heads": heads, "cached": slots, "d": width + extra,
                                   "dv": value}
            rows.append(row)
            try:
                row.update(_attention_timings(check, backend, row, causal, dry_run, warmup, iters, reps))
            except Exception as err:  # noqa: BLE001
                row["error"] = _error(err)
            check.save()


def _attention_timings(
    check: Check, backend: Any, row: dict[str, Any], causal: bool, dry_run: bool, warmup: int, iters: int, reps: int
) -> dict[str, Any]:
    """One :func:`stage_attention` case: the served op and SDPA alone on the same rotated inputs."""
    import torch

    import dshal  # lazy: dshal is installed by this script's first step

    dev = backend.device()
    attention = dshal.current().op("attention")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gen = torch.Generator(device=dev).manual_seed(3)
    batch, heads, slots, d, value = row["batch"], row["heads"], row["cached"], row["d"], row["dv"]
    per = batch * slots * d * 2
    copies = copies_for(per, check.l2_bytes, cap=4)
    qs = [torch.randn(batch, heads, 1, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
    latents = [torch.randn(batch, slots, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
    kv = [(lat[:, None], lat[:, None, :, :value]) for lat in latents]  # one shared head; values its first columns
    scale = 1 / math.sqrt(192)  # DeepSeek-V3's qk head dim

    def served(i: int) -> Any:
        return attention(qs[i % copies], *kv[i % copies], causal, scale)

    def alone(i: int) -> Any:
        return sdpa(qs[i % copies], *kv[i % copies], scale=scale, enable_gqa=True)

    want = alone(0).float()
    gap = float((served(0).float() - want).abs().max() / want.abs().max())
    served_s, how = timed_kernel(served, warmup, iters, reps, not dry_run, check)
    alone_s, _ = timed_kernel(alone, warmup, iters, reps, not dry_run, check)
    return {"served_us": served_s * 1e6, "sdpa_us": alone_s * 1e6, "guard_cost": served_s / alone_s,
            "similarity_gap": gap, "timing": how, "cache_gbs_sdpa": per / alone_s / 1e9}


def stage_moe(check: Check, backend: Any, dry_run: bool, warmup: int, iters: int, reps: int) -> None:
    """One DeepSeek-V3 MoE layer through the runtime: gate + FP8 routed experts."""
    import torch

    import dshal  # lazy: dshal is installed by this script's first step
    from dshal.ops import reference as ref  # lazy: as above

    dims = DRY_MOE_DIMS if dry_run else MOE_DIMS
    e, h, inter = dims["experts"], dims["hidden"], dims["inter"]
    dev = backend.device()
    gen = torch.Generator(device=dev).manual_seed(2)
    rt = dshal.current()
    gate, experts = rt.op("moe_gate"), rt.op("moe_experts")
    result: dict[str, Any] = {"dims": dims, "provider": rt.providers["moe_experts"], "kind": rt.provider_kind("moe_experts"),
                              "rows": []}
    check.data["moe"] = result
    try:
        w13 = torch.empty(e, 2 * inter, h, dtype=torch.float8_e4m3fn, device=dev)
        w13_scale = torch.empty(e, 2 * inter // 128, math.ceil(h / 128), device=dev)
        for i in range(e):  # one expert at a time: the bf16 copy of all of them would not fit beside
            w13[i], w13_scale[i] = ref.quantize_fp8(torch.randn(2 * inter, h, device=dev, generator=gen) / math.sqrt(h), (128, 128), "e4m3fn")
        w2 = torch.empty(e, h, inter, dtype=torch.float8_e4m3fn, device=dev)
        w2_scale = torch.empty(e, math.ceil(h / 128), inter // 128, device=dev)
        for i in range(e):
            w2[i], w2_scale[i] = ref.quantize_fp8(torch.randn(h, inter, device=dev, generator=gen) / math.sqrt(inter), (128, 128), "e4m3fn")
        router = torch.randn(e, h, device=dev, generator=gen) / math.sqrt(h)
        bias = torch.randn(e, device=dev, generator=gen) * 0.01
        gate_args = (dims["top_k"], dims["n_group"], dims["topk_group"], 2.5)
        for t in DRY_MOE_TOKENS if dry_run else MOE_TOKENS:
            if check.left() < 90:
                result["rows"].append({"tokens": t, "skipped": "time budget"})
                continue
            row: dict[str, Any] = {"tokens": t}
            x = torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16)
            try:
                weights, ids = gate(x.float() @ router.t(), bias, *gate_args)
                out = experts(x, weights, ids, w13, w2, w13_scale, w2_scale)
                if t == 1:  # the contract's math on the same inputs
                    want = ref.moe_experts(x, weights, ids, w13, w2, w13_scale, w2_scale).float()
                    got = out.float()
                    row["similarity_gap"] = float(1 - 2 * (got * want).sum() / (got * got + want * want).sum())
                how = timed_kernel if t <= KERNEL_ONLY_MAX_M else None
                gate_fn = lambda i, x=x: gate(x.float() @ router.t(), bias, *gate_args)  # noqa: E731
                experts_fn = lambda i, x=x, weights=weights, ids=ids: experts(x, weights, ids, w13, w2, w13_scale, w2_scale)  # noqa: E731
                for name, fn in (("gate_us", gate_fn), ("experts_us", experts_fn)):
                    if how is not None:
                        seconds, row["timing"] = how(fn, warmup, iters, reps, not dry_run, check)
                    else:
                        with dshal.ops.trusted():  # as the kernel-only rows: no host checks
                            seconds, row["timing"] = timed_median(fn, warmup, iters, not dry_run), "CUDA events per call"
                    row[name] = seconds * 1e6
            except Exception as err:  # noqa: BLE001
                row["error"] = _error(err)
            result["rows"].append(row)
            check.save()
    except Exception as err:  # noqa: BLE001 - e.g. out of memory building the weights
        result["error"] = _error(err)
    check.save()


def stage_run(check: Check, dry_run: bool) -> None:
    """``dshal run`` on the device: the tiny model, decode tokens/s with and without graphs,
    and with MTP drafts (its random MTP layer: the two-token steps' kernels and their tokens)."""
    out = check.out_dir / "run.json"
    cmd = [sys.executable, "-m", "dshal", "run", "--no-progress", "--speculative", "mtp", "--json", str(out)]
    cmd += ["--graphs", "on", "--prompt-len", "4", "--new-tokens", "3"] if dry_run else ["--graphs", "auto", "--new-tokens", "64"]
    env = dict(os.environ, DSHAL_BACKEND="nvidia", **({"DSHAL_EMULATE": "1"} if dry_run else {}))
    result: dict[str, Any] = {"command": " ".join(cmd[1:])}
    check.data["run"] = result
    if not dry_run and check.left() < RUN_MIN_S:
        result["skipped"] = "time budget"
        check.save()
        return
    # what tune (the table to ship) and ragged need is left to them
    result.update(_subprocess(cmd, env, max(RUN_MIN_S, check.left() - TUNE_MIN_S - RAGGED_MIN_S) - 10))
    if out.is_file():
        report = json.loads(out.read_text())
        result.update({k: report.get(k) for k in ("device", "emulated", "prefill_tokens_per_s", "decode_tokens_per_s",
                                                  "decode_tokens_per_s_graphs", "graphs", "warmup_s", "compile_autotune_s",
                                                  "decode_tokens_per_s_speculative", "speculative",
                                                  "reference_inside")})  # ops the kernels left to the reference
    check.save()


def stage_ragged(check: Check, backend: Any, dry_run: bool) -> None:
    """Prompts of different lengths on the device (the tiny model): eager ``generate(...,
    prompt_lens=)`` and through the per-row static step captured as a graph
    (``generate_with_graphs``); the tokens must match, and the step must capture. Then sampled
    speculative decoding of the same prompts with the step's forwards captured (the random MTP
    layer's drafts; the draws between the forwards): whether it captured, and every id in range."""
    import torch

    from dshal.model import random_model, tiny_args  # lazy: dshal is installed by this script's first step
    from dshal.model.decode import StaticDecoder, generate_with_graphs  # lazy: as above
    from dshal.model.speculative import generate_speculative  # lazy: as above

    if not dry_run and check.left() < RAGGED_MIN_S:
        check.data["ragged"] = {"skipped": "time budget"}
        return
    # torch 2.11 leaves the allocator mid-capture after a failed capture_end (pytorch#180395): a
    # later capture in this process may abort it, so after one failure the steps run eagerly
    graph = backend.graph if check.capture_error is None else (lambda fn: fn)
    model = random_model(tiny_args(num_nextn_predict_layers=1, mtp_layers=1), seed=0)  # the MTP layer after the others
    device = model.rope_cos.device
    lens, new = ([3, 6], 2) if dry_run else ([5, 17, 9, 30], 32)  # the interpreter is slow
    ids = torch.randint(0, model.args.vocab_size, (len(lens), max(lens)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    result: dict[str, Any] = {"prompt_lens": lens, "new_tokens": new}
    if check.capture_error is not None:
        result["graphs_off"] = f"an earlier capture failed: {check.capture_error}"
    check.data["ragged"] = result

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        fn()  # warm-up: compilation, and the graph's capture
        backend.synchronize()
        start = time.perf_counter()
        out = fn()
        backend.synchronize()
        return out, time.perf_counter() - start

    eager, result["eager_s"] = timed(lambda: model.generate(ids, new, prompt_lens=lens))
    # each call builds (and captures) its own per-row step: the time includes that capture
    (graphed, decoder), result["graphs_incl_capture_s"] = timed(lambda: generate_with_graphs(model, ids, new, graph,
                                                                                             prompt_lens=lens))
    result.update(tokens_match=bool(torch.equal(eager, graphed)), captured=bool(decoder and decoder.captured),
                  capture_error=decoder.capture_error if decoder else "")
    check.save()
    sampler = torch.Generator(device=device).manual_seed(0)
    sampled, stats = generate_speculative(model, ids, new, 0.8, generator=sampler, prompt_lens=lens, graph=graph)
    result["speculative_sampled"] = {
        **stats.as_dict(), "ids_in_range": bool(((sampled >= 0) & (sampled < model.args.vocab_size)).all())}
    check.save()
    # Two turns of a conversation: one captured step on a kept cache, the second turn reusing it.
    first_turn = ids[:1, : lens[0]]
    cache = model.new_cache(1, lens[0] + 2 * new + 4, "absorb", static=True)
    decoder = StaticDecoder(model, cache, graph)
    first = model.generate(first_turn, new, cache=cache, decoder=decoder)
    follow = torch.cat((first, ids[:1, :4]), dim=1)
    again = model.generate(follow, new, cache=cache, cached=first.shape[1] - 1, decoder=decoder)
    result["conversation"] = {
        "tokens_match": bool(torch.equal(first, model.generate(first_turn, new))
                             and torch.equal(again, model.generate(follow, new))),
        "captured": decoder.captured, "capture_error": decoder.capture_error,
    }
    check.save()


def stage_tune(check: Check, dry_run: bool) -> None:
    """``dshal tune`` with the time the other stages left (at most :data:`TUNE_MAX_S`): the
    tuned table to ship as ``dshal/kernels/triton/tuned/nvidia-sm90.json``, small M first."""
    table = check.out_dir / "tuned" / "nvidia-sm90.json"
    cmd = [sys.executable, "-m", "dshal", "tune", "--output", str(table)]
    if dry_run:
        cmd += ["--dry-run", "--target", "sm_90a", "--shapes", "256,512", "--m", "1,40", "--budget-s", "60"]
    else:
        budget = max(0.0, min(check.left() - 20 - RAGGED_MIN_S, TUNE_MAX_S))  # ragged runs after it
        cmd += ["--backend", "nvidia", "--budget-s", f"{budget:.0f}"]
    result: dict[str, Any] = {"command": " ".join(cmd[1:])}
    check.data["tune"] = result
    if not dry_run and check.left() < TUNE_MIN_S + RAGGED_MIN_S:  # ragged runs after it
        result["skipped"] = "time budget"
        check.save()
        return
    result.update(_subprocess(cmd, dict(os.environ), 60.0 if dry_run else check.left() - RAGGED_MIN_S))
    if table.is_file():
        data = json.loads(table.read_text())
        result.update(table=str(table), entries=len(data["entries"]), complete=data.get("complete"),
                      device=data.get("device"))
    check.save()


def _subprocess(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    result: dict[str, Any] = {"timeout_s": round(timeout)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        result.update(returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-3000:])
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:]
        result.update(returncode=None, error=f"timed out after {timeout:.0f} s",
                      output_tail=tail.decode(errors="replace") if isinstance(tail, bytes) else str(tail))
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def stage_conformance(check: Check, dry_run: bool) -> None:
    report_dir = check.out_dir / "conformance"
    cmd = [sys.executable, "-m", "dshal", "conformance", "--backend", "nvidia", "--report-dir", str(report_dir), "--tier", "ci"]
    cmd += ["--ops", "silu_and_mul"] if dry_run else []
    env = dict(os.environ, **({"DSHAL_EMULATE": "1"} if dry_run else {}))
    # Cases not started within the budget are reported skipped and the report is still written
    # (killed at a timeout, the run left none). The margin covers the start-up before the
    # budget's clock and the case under way (each case at most CONFORMANCE_CASE_S).
    margin = 30 + CONFORMANCE_CASE_S
    budget = max(30.0, min(check.left() - 300 - margin, 150.0))  # the rest of the stages need ~5 minutes
    cmd += ["--budget-s", f"{budget:.0f}", "--timeout", f"{CONFORMANCE_CASE_S:.0f}"]
    result: dict[str, Any] = {"command": " ".join(cmd[1:])}
    result.update(_subprocess(cmd, env, budget + margin))
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


def run_stages(check: Check, stages: Sequence[tuple[str, Callable[[], None], Callable[[], str]]],
               done: Callable[[str], None]) -> list[str]:
    """Run each ``(name, stage, summary)`` in order. A stage that raises is recorded under
    ``stage_errors`` (its traceback's end) and the next one still runs: one GPU window
    should not be lost to one stage's bug. Returns the names of the stages that failed."""
    failed = []
    for name, stage, summary in stages:
        try:
            stage()
        except Exception as err:  # noqa: BLE001 - recorded in the JSON, and the exit code says so
            check.data.setdefault("stage_errors", {})[name] = traceback.format_exc()[-3000:]
            check.save()
            failed.append(name)
            done(f"{name}: FAILED {_error(err)} (traceback in gpu_check.json; the next stages still run)")
            continue
        done(summary())
    return failed


# ---------------------------------------------------------------- summary
#: A GEMM row whose result is further than this from the reference (1 - cosine-like
#: similarity) is wrong: its time counts toward no target.
SIMILARITY_GAP_MAX = 1e-3


def _best(rows: list[dict[str, Any]], m: int, n: int, k: int, path: str) -> float | None:
    for r in rows:
        if (r["m"], r["n"], r["k"], r["path"]) == (m, n, k, path) and "us" in r:
            return r["us"] if r.get("similarity_gap", 0.0) < SIMILARITY_GAP_MAX else None
    return None


def summarize(check: Check, dry_run: bool) -> list[str]:
    rows = check.data.get("gemm", [])
    lines = []
    header = f"{'M':>5} {'N':>6} {'K':>6} " + " ".join(f"{p:>17}" for p in ("triton", "torch_blockwise", "bf16_matmul", "rowwise_scaled_mm"))
    lines.append(f"block-FP8 GEMM, TFLOP/s (M <= {KERNEL_ONLY_MAX_M}: kernel-only, graph of back-to-back calls; "
                 "larger M: CUDA events per call)" if not dry_run else "block-FP8 GEMM, TFLOP/s (DRY RUN: CPU interpreter, meaningless)")
    lines.append(header)
    rows = [r for r in rows if "skipped" not in r]
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
    for row in check.data.get("moe", {}).get("rows", []):
        if "experts_us" in row:
            lines.append(f"MoE layer, {row['tokens']} token(s): gate {row['gate_us']:.0f} us, routed experts "
                         f"{row['experts_us']:.0f} us ({check.data['moe']['provider']}/{check.data['moe']['kind']})")
    run = check.data.get("run", {})
    eager, graphed = run.get("decode_tokens_per_s"), run.get("decode_tokens_per_s_graphs")
    if eager:
        lines.append(f"dshal run decode: {eager:.1f} tokens/s eager, "
                     f"{'-' if graphed is None else f'{graphed:.1f}'} tokens/s with graphs "
                     f"({(run.get('graphs') or {}).get('why') or 'captured'})")
        if graphed:
            targets["decode_graphs_vs_eager"] = graphed / eager
        speculative = run.get("speculative") or {}
        if speculative.get("run"):
            lines.append(f"dshal run with MTP drafts (random MTP layer): {run['decode_tokens_per_s_speculative'] or 0:.1f} "
                         f"tokens/s, {speculative['accepted']} of {speculative['drafted']} drafts accepted, steps "
                         f"captured {speculative['captured']} {speculative['capture_error']}".rstrip()
                         + f", tokens {'match' if speculative['tokens_match_eager'] else 'DIFFER'}")
    for row in check.data.get("attention", {}).get("rows", []):
        what = f"attention {row['step']} decode B{row['batch']} H{row['heads']} {row['cached']} cached D{row['d']}/{row['dv']}"
        lines.append(f"{what}: {row['error']}" if "error" in row else
                     f"{what}: served {row['served_us']:.1f} us, SDPA alone {row['sdpa_us']:.1f} us "
                     f"(guard {row['guard_cost']:.2f}x)")
    ragged = check.data.get("ragged", {})
    if "tokens_match" in ragged:
        how = "captured" if ragged["captured"] else f"not captured {ragged['capture_error']}".rstrip()
        lines.append(f"prompts of {ragged['prompt_lens']} tokens, {ragged['new_tokens']} new: eager {ragged['eager_s']:.3f} s, "
                     f"per-row graph step {ragged['graphs_incl_capture_s']:.3f} s with its capture ({how}); tokens "
                     f"{'match' if ragged['tokens_match'] else 'DIFFER'}")
    sampled = ragged.get("speculative_sampled")
    if sampled:
        how = "captured" if sampled["captured"] else f"not captured {sampled['capture_error']}".rstrip()
        lines.append(f"sampled speculative decoding on them: {sampled['steps']} steps ({how}), "
                     f"{sampled['accepted']} of {sampled['drafted']} drafts kept, ids in range {sampled['ids_in_range']}")
    turns = ragged.get("conversation")
    if turns:
        how = "captured" if turns["captured"] else f"not captured {turns['capture_error']}".rstrip()
        lines.append(f"two conversation turns through one kept decode step ({how}): tokens "
                     f"{'match' if turns['tokens_match'] else 'DIFFER'}")
    tuned = check.data.get("tune")
    if tuned:
        lines.append(f"dshal tune: rc={tuned.get('returncode')}, {tuned.get('entries')} entries "
                     f"({'complete' if tuned.get('complete') else 'incomplete'}) in {tuned.get('table')}")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.fetch_wheels), args.python_version)
    out_dir = Path(args.out or os.environ.get("OUT") or "out")
    if args.wheels:
        return install_and_reexec(Path(args.wheels), Path(args.site), argv)
    if args.stack:
        print(json.dumps(stack_facts(), indent=2))
        return 0
    if args.dry_run:
        os.environ["DSHAL_EMULATE"] = "1"
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    check = Check(out_dir, args.budget_s)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)
    iters = args.iters if args.iters is not None else (2 if args.dry_run else 30)
    reps = args.graph_reps if args.graph_reps is not None else (2 if args.dry_run else 20)

    import torch

    import dshal  # lazy: dshal is installed by this script's first step

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    try:
        rt = dshal.use(backend="nvidia", emulate=args.dry_run)
    except dshal.DshalError as err:  # nothing to measure: record why, with the stack it saw
        check.data.update(backend_error=_error(err), stack=stack_facts())
        print(f"gpu_check: the nvidia backend cannot be used: {err}\nresults: {check.save()}", file=sys.stderr)
        return 2
    backend = rt.backend
    t0 = time.monotonic()

    def done(what: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {what}", flush=True)

    data = check.data
    stages: list[tuple[str, Callable[[], None], Callable[[], str]]] = [
        ("device", lambda: stage_device(check, backend, args.dry_run),
         lambda: f"device: {data['device'].get('name', backend.capabilities().device_name)}; "
                 f"block path {data['device']['gemm_block_path']}"),
        ("conformance", lambda: stage_conformance(check, args.dry_run),
         lambda: f"conformance rc={data['conformance'].get('returncode')} {data['conformance'].get('summary')}"),
        ("gemm", lambda: stage_gemm(check, backend, args.dry_run, warmup, iters, reps),
         lambda: f"gemm: {len(data['gemm'])} measurements"),
        ("add_rmsnorm", lambda: stage_norm(check, backend, args.dry_run, warmup, iters), lambda: "add+rmsnorm"),
        ("moe", lambda: stage_moe(check, backend, args.dry_run, warmup, iters, reps),
         lambda: f"moe layer: {len(data['moe'].get('rows', []))} token counts"),
        ("attention", lambda: stage_attention(check, backend, args.dry_run, warmup, iters, reps),
         lambda: f"attention: {len(data['attention']['rows'])} decode cases"),
        ("run", lambda: stage_run(check, args.dry_run), lambda: f"dshal run rc={data['run'].get('returncode')}"),
        # tune before ragged: its table is what this run ships
        ("tune", lambda: stage_tune(check, args.dry_run),
         lambda: f"dshal tune rc={data['tune'].get('returncode')}: {data['tune'].get('entries')} entries, "
                 f"complete={data['tune'].get('complete')}"),
        ("ragged", lambda: stage_ragged(check, backend, args.dry_run),
         lambda: f"ragged batch: tokens match {data['ragged'].get('tokens_match')}, "
                 f"captured {data['ragged'].get('captured')}"),
    ]
    skipped = {"conformance"} if args.skip_conformance else set()
    skipped |= {"tune"} if args.skip_tune else set()
    failed = run_stages(check, [stage for stage in stages if stage[0] not in skipped], done)
    check.data["seconds"] = round(time.monotonic() - t0, 1)
    lines = summarize(check, args.dry_run)
    path = check.save()
    print(f"results: {path}")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
