"""The cpu backend's FP8 prefill against the budget of its float32 weight copies, side by side.

Beyond 32 rows an FP8 linear (and the routed experts) multiplies with a float32 copy of the
weight, kept in ``dshal.backends.cpu_native.DEQUANTIZED`` up to ``DSHAL_CPU_DEQUANT_CACHE_GIB``
(default a quarter of RAM). Past the budget a weight is dequantized per call. This times a
64-token prefill of model_vs_hf.py's checkpoint in its FP8 128x128-block version with the
budget unbounded, at half of what the copies need, and at 0 (nothing kept), in one process,
interleaved; the first pass of each round fills the copies and is not timed.

    python benchmarks/cpu_dequant_cache.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dshal.backends.cpu_native import DEQUANTIZED
from dshal.model import from_pretrained
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from model_vs_hf import bench_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the fastest counts (default 5)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    args = bench_args()
    directory = Path(tempfile.mkdtemp(prefix="dshal-bench-"))
    save_checkpoint(directory, args, quantize_checkpoint_fp8(random_checkpoint(args, seed=0, std=0.02)))
    model = from_pretrained(directory, {"backend": "cpu"})  # gemm auto: FP8 128x128 blocks
    ids = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))

    def prefill() -> torch.Tensor:
        return model(ids, 0, model.new_cache(1, 64), last_only=True)

    with torch.inference_mode():
        prefill()
        full = DEQUANTIZED.nbytes()  # what every copy takes
        budgets = {"unbounded": None, "half": full // 2, "0 (none kept)": 0}
        best = dict.fromkeys(budgets, float("inf"))
        held = dict.fromkeys(budgets, 0)
        outputs = {}
        for _ in range(opts.rounds):
            for name, budget in budgets.items():
                DEQUANTIZED.clear()  # each setting starts empty and fills on its first pass
                DEQUANTIZED.max_bytes = budget
                prefill()
                start = time.perf_counter()
                outputs[name] = prefill()
                best[name] = min(best[name], time.perf_counter() - start)
                held[name] = DEQUANTIZED.nbytes()
        DEQUANTIZED.max_bytes = None
    base = best["unbounded"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); FP8 weights' float32 copies: {full / 2**20:.1f} MiB in all")
    print(f"{'budget':<16} {'prefill ms':>10} {'vs unbounded':>12} {'copies kept MiB':>16}  same logits")
    for name in budgets:
        same = torch.equal(outputs[name], outputs["unbounded"])
        print(f"{name:<16} {best[name] * 1e3:>10.1f} {best[name] / base:>11.2f}x {held[name] / 2**20:>16.1f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
