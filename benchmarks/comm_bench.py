"""Collective bandwidth: dshal.comm vs raw torch.distributed, side by side in one run.

    python benchmarks/comm_bench.py                  # gloo, 2 and 4 local ranks
    python benchmarks/comm_bench.py --ranks 2 --sizes 65536,1048576 --markdown

For each collective and message size the same processes time ``dshal.comm.<op>`` and the
equivalent raw ``torch.distributed`` call, alternating the two in rounds, and report
the nccl-tests figures:

* algbw = S / t, where S is the message size (all_reduce: the buffer; all_gather: the
  gathered output; reduce_scatter and all_to_all: the full input);
* busbw = algbw * factor: all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n;
* overhead = t(dshal) / t(torch) (goal <= 1.05).

A round's time is the slowest rank's; the figure is the best (minimum) round, which is
the least disturbed by other processes on a shared machine (the median is kept in the
JSON). The raw baseline allocates its output each call, as dshal's functional API does.

dshal's side runs in checked mode by default (each collective first exchanges the ranks'
shapes, dtypes and splits); ``--trusted`` runs it inside ``dshal.ops.trusted()`` (no
agreement exchange), which is how the model core's decode steps call collectives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from local_ranks import run_ranks

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}
DEFAULT_SIZES = (4096, 65536, 1 << 20, 8 << 20)


def _calls(name: str, numel: int, n: int):
    """(dshal call, raw torch call, message bytes) for a float32 message of ``numel`` elements."""
    import torch
    import torch.distributed as dist

    from dshal import comm  # lazy: start-up time: the launcher imports no torch, only its workers do

    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if name == "all_reduce":
        t = torch.ones(numel)
        return (lambda: comm.all_reduce(t)), (lambda: dist.all_reduce(t)), t.nbytes
    if name == "all_gather":
        t = torch.ones(numel // n)
        return (lambda: comm.all_gather(t)), (lambda: gather_single(torch.empty(t.numel() * n), t)), t.nbytes * n
    if name == "reduce_scatter":
        t = torch.ones(numel)
        return (lambda: comm.reduce_scatter(t)), (lambda: scatter_single(torch.empty(numel // n), t)), t.nbytes
    if name == "all_to_all":
        t = torch.ones(numel)
        return (lambda: comm.all_to_all(t)), (lambda: dist.all_to_all_single(torch.empty_like(t), t)), t.nbytes
    raise ValueError(name)


def _time_round(fn, iters: int) -> float:
    """Seconds per call of ``fn`` on the slowest rank."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = torch.tensor([(time.perf_counter() - start) / iters])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import dshal  # lazy: start-up time: the launcher imports no torch, only its workers do
    from dshal import comm  # lazy: start-up time: the launcher imports no torch, only its workers do

    dshal.use(backend="cpu", distributed={"timeout_s": 120})
    world = comm.init()
    n = world.world_size
    rows = []
    mode = dshal.ops.trusted() if args.trusted else contextlib.nullcontext()
    with mode:
        _measure(args, n, rows)
    if world.rank == 0:
        print("RESULTS " + json.dumps(rows), flush=True)
    dist.barrier()
    comm.shutdown()


def _measure(args: argparse.Namespace, n: int, rows: list[dict]) -> None:
    for name in args.collectives:
        for size in args.sizes:
            numel = max(n, size // 4 // n * n)
            ours, raw, nbytes = _calls(name, numel, n)
            ours(), raw()  # warm up connections and allocator
            probe = _time_round(raw, 3)
            iters = max(3, min(2000, int(args.seconds / args.rounds / max(probe, 1e-6))))
            t_ours, t_raw = [], []
            for _ in range(args.rounds):
                t_ours.append(_time_round(ours, iters))
                t_raw.append(_time_round(raw, iters))
            t_d, t_t = min(t_ours), min(t_raw)
            factor = BUS_FACTOR[name](n)
            rows.append({
                "collective": name, "ranks": n, "bytes": nbytes, "iters": iters,
                "dshal_us": t_d * 1e6, "torch_us": t_t * 1e6,
                "dshal_algbw_GBps": nbytes / t_d / 1e9, "torch_algbw_GBps": nbytes / t_t / 1e9,
                "dshal_busbw_GBps": nbytes / t_d / 1e9 * factor, "torch_busbw_GBps": nbytes / t_t / 1e9 * factor,
                "overhead": t_d / t_t,
                "median_overhead": statistics.median(t_ours) / statistics.median(t_raw),
            })


def launch(args: argparse.Namespace, ranks: int) -> list[dict]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker",
            "--sizes", ",".join(map(str, args.sizes)), "--collectives", ",".join(args.collectives),
            "--rounds", str(args.rounds), "--seconds", str(args.seconds)] + (["--trusted"] if args.trusted else [])
    return run_ranks("comm_bench", argv, ranks)


def machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, gloo on 127.0.0.1"


def human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:g} {unit}"
        nbytes /= 1024
    return str(nbytes)


def table(rows: list[dict], markdown: bool) -> str:
    head = ["collective", "ranks", "size", "dshal µs", "torch µs", "dshal algbw GB/s", "torch algbw GB/s",
            "dshal busbw GB/s", "torch busbw GB/s", "overhead"]
    body = [[r["collective"], str(r["ranks"]), human(r["bytes"]), f"{r['dshal_us']:.1f}", f"{r['torch_us']:.1f}",
             f"{r['dshal_algbw_GBps']:.3f}", f"{r['torch_algbw_GBps']:.3f}", f"{r['dshal_busbw_GBps']:.3f}",
             f"{r['torch_busbw_GBps']:.3f}", f"{r['overhead']:.3f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ranks", default="2,4", help="comma-separated world sizes to run (default 2,4)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="message sizes in bytes")
    parser.add_argument("--collectives", default=",".join(COLLECTIVES))
    parser.add_argument("--rounds", type=int, default=9, help="alternating dshal/torch rounds (best one taken)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per collective and size and side")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--trusted", action="store_true", help="time dshal inside ops.trusted() (no agreement exchange)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.collectives = [c for c in str(args.collectives).split(",") if c]
    unknown = sorted(set(args.collectives) - set(COLLECTIVES))
    if unknown:
        parser.error(f"--collectives: unknown {unknown}, expected some of {', '.join(COLLECTIVES)}")
    if args.worker:
        worker(args)
        return 0
    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        rows += launch(args, ranks)
    print(f"machine: {machine()}")
    print(table(rows, args.markdown))
    worst = max(r["overhead"] for r in rows)
    print(f"overhead dshal/torch: median {statistics.median(r['overhead'] for r in rows):.3f}, worst {worst:.3f} (goal <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
