"""Expert-parallel decode steps: fixed shapes + one all-reduce vs the all_to_all dispatch, side by side.

An EP rank serves a decode step's routed experts one of two ways (``ShardedExperts``):

* fixed shapes (up to ``FIXED_SHAPE_SLOTS`` (token, expert) slots): every rank runs its own
  experts' share of every token, the other ranks' experts as ``NO_EXPERT`` slots, and one
  all-reduce over the EP group sums the shares. No host read: the step can be captured.
* the dispatch (past the bound, and every call before this release): the rank keeps the
  slots its EP group serves (``torch.nonzero``), exchanges the counts (read on the host) and
  sends each slot to its owner and back with three all_to_all, then all-gathers the tokens.

The same processes run both, alternating runs; a run is ``--steps`` trusted decode steps
(as ``generate`` runs them after the first), its time the slowest rank's, the figure the
fastest of ``--repeats`` runs; the two paths' first logits are compared. (Host syncs are not
counted here: the cpu backend reads values on the host freely; a test counts them on the
emulated nvidia plugin's ops: ``test_a_split_experts_decode_step_does_no_host_sync``.) Model:
``benchmarks/model_vs_hf.py``'s shapes (4 layers, 16 experts, top-4, fp32), random weights,
experts spread over every rank; cpu backend, gloo on 127.0.0.1, one torch thread per rank.

    python benchmarks/ep_decode.py [--ranks 2,4] [--batch 1,8] [--steps 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from local_ranks import run_ranks

#: Tokens prefilled before the timed decode steps.
PROMPT = 8


def _decode_run(model, cache, steps: int, batch: int):
    """``steps`` trusted decode steps from position PROMPT (rewritten each run); returns the
    first step's logits and the seconds the run took on the slowest rank."""
    import torch
    import torch.distributed as dist

    import dshal  # lazy: the launcher imports no torch, only its ranks do

    first = None
    dist.barrier()
    start = time.perf_counter()
    with dshal.ops.trusted():
        for i in range(steps):
            token = torch.full((batch, 1), 3 + i, dtype=torch.int64)
            cache.vouch_for(token)
            logits = model(token, PROMPT + i, cache, last_only=True)
            first = logits if first is None else first
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return first, float(elapsed)


def _set_fixed_slots(model, slots: int | None) -> None:
    from dshal.parallel.layers import ShardedExperts  # lazy: the launcher imports no torch

    for module in model.modules():
        if isinstance(module, ShardedExperts):
            if slots is None:
                vars(module).pop("FIXED_SHAPE_SLOTS", None)  # the class's bound again
            else:
                module.FIXED_SHAPE_SLOTS = slots


def worker(opts: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from model_vs_hf import bench_args

    import dshal  # lazy: the launcher imports no torch, only its ranks do
    from dshal import comm
    from dshal.model import random_model
    from dshal.parallel import expert_parallel

    torch.set_num_threads(1)
    dshal.use(backend="cpu", distributed={"timeout_s": 300})
    world = comm.init()
    args = bench_args()
    rows = []
    for batch in opts.batch:
        model = expert_parallel(random_model(args, seed=0), None)
        cache = model.new_cache(batch, PROMPT + opts.steps + 1)
        prompt = torch.arange(batch * PROMPT, dtype=torch.int64).reshape(batch, PROMPT) % args.vocab_size
        model(prompt, 0, cache)
        paths = {"fixed shapes + all_reduce": None, "all_to_all dispatch": 0}
        best, logits = dict.fromkeys(paths, float("inf")), {}
        for slots in paths.values():  # the checked first step of this length, then a warm-up run
            _set_fixed_slots(model, slots)
            model(torch.full((batch, 1), 3, dtype=torch.int64), PROMPT, cache, last_only=True)
            _decode_run(model, cache, 1, batch)
        for _ in range(opts.repeats):
            for name, slots in paths.items():
                _set_fixed_slots(model, slots)
                logits[name], seconds = _decode_run(model, cache, opts.steps, batch)
                best[name] = min(best[name], seconds)
        fixed, dispatch = (logits[name] for name in paths)
        rows.append({
            "ranks": world.world_size, "batch": batch, "steps": opts.steps,
            "ms_per_step": {name: best[name] / opts.steps * 1e3 for name in paths},
            "max_abs_logit_diff": float((fixed - dispatch).abs().max()),
        })
    if world.rank == 0:
        print("RESULTS " + json.dumps(rows), flush=True)
    dist.barrier()
    comm.shutdown()


def launch(opts: argparse.Namespace, ranks: int) -> list[dict]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", ",".join(map(str, opts.batch)),
            "--steps", str(opts.steps), "--repeats", str(opts.repeats)]
    return run_ranks("ep_decode", argv, ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4", help="comma-separated EP world sizes (default 2,4; 16 experts each)")
    parser.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes (default 1,8)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed run (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per path, the fastest kept (default 5)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    try:
        opts.batch = [int(b) for b in opts.batch.split(",")]
        ranks = [int(r) for r in opts.ranks.split(",")]
    except ValueError as err:
        parser.error(f"--batch / --ranks: {err}, expected comma-separated integers")
    if opts.steps < 1 or opts.repeats < 1 or min(opts.batch) < 1 or min(ranks) < 2:
        parser.error("--steps, --repeats and --batch must be >= 1 and --ranks >= 2")
    if opts.worker:
        worker(opts)
        return 0
    import torch
    from model_vs_hf import machine_line  # lazy: it imports torch

    rows = [row for n in ranks for row in launch(opts, n)]
    torch.set_num_threads(1)  # as each rank runs
    print(f"machine: {machine_line()} per rank, gloo on 127.0.0.1")
    print("ranks  batch  fixed+all_reduce ms/step  dispatch ms/step  fixed speed vs dispatch  max |logit diff|")
    for r in rows:
        fixed, dispatch = r["ms_per_step"].values()
        print(f"{r['ranks']:>5}  {r['batch']:>5}  {fixed:>24.2f}  {dispatch:>16.2f}  {dispatch / fixed:>22.2f}x  "
              f"{r['max_abs_logit_diff']:>16.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
