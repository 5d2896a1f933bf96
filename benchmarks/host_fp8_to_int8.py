"""How long the host takes to convert an FP8 checkpoint to W8A8 int8, per weight and for all
of DeepSeek-V3.

A backend that cannot hold float8 tensors (``Capabilities.fp8_storage`` False: Ascend) gets
an FP8 checkpoint converted on the host at load, and ``dshal-ascend-convert`` does the same
once, to disk: each 128x128-block FP8 weight to int8 with one scale per output row. Side by
side, per DeepSeek-V3 weight shape:

* ``references``: the ops' references composed (dequantize to float32, then
  ``quantize_int8``; the loader's path before ``dshal.model.weights.int8_rows``);
* ``slabs``: ``dshal.ops.quant.fp8_block_to_int8_rows``, the path the loader and the converter
  take now (the same bits, checked here on every shape);
* ``fp32 cast``: a plain float32 copy of the same FP8 bytes, the least any conversion does.

The slowest ``slabs`` rate is scaled to all of DeepSeek-V3's FP8 weights (the checkpoint
listing ``dshal plan`` builds from its config.json).

    python benchmarks/host_fp8_to_int8.py [--threads N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

import dshal
from dshal import ops
from dshal.model.args import ModelArgs
from dshal.model.weights import dequantize_weight, int8_rows
from dshal.ops.catalogue import SPECS
from dshal.plan.names import checkpoint_listing
from dshal.plan.plan import default_config
from dshal.runtime import reference_ops

#: (name, N, K): an expert's gate/up and down projections, the attention's q up-projection,
#: the dense MLP's up-projection.
SHAPES = (("expert w1/w3", 2048, 7168), ("expert w2", 7168, 2048), ("q_b_proj", 24576, 1536), ("dense w1", 18432, 7168))


def best_seconds(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats; the fastest counts (default 3)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    dshal.use(backend="cpu")
    quantize = SPECS["quantize_fp8"].reference_impl
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'weight':<14} {'N x K':>12} {'references ms':>13} {'slabs ms':>9} {'speedup':>8} {'M params/s':>10} "
          f"{'fp32 cast ms':>12} {'slabs / cast':>12}")
    rates = []
    for name, n, k in SHAPES:
        weight, scale = quantize(torch.randn(n, k) / 16, (128, 128), "e4m3", None)
        with reference_ops():
            by_references = ops.quantize_int8(dequantize_weight(weight, scale, torch.float32))
            old = best_seconds(lambda w=weight, s=scale: ops.quantize_int8(dequantize_weight(w, s, torch.float32)), opts.rounds)
        by_slabs = int8_rows(weight, scale)
        if not (torch.equal(by_slabs[0], by_references[0]) and torch.equal(by_slabs[1], by_references[1])):
            raise SystemExit(f"{name}: the slab path's int8 differs from the references'")
        new = best_seconds(lambda w=weight, s=scale: int8_rows(w, s), opts.rounds)
        cast = best_seconds(lambda w=weight: w.to(torch.float32), opts.rounds)
        rates.append(n * k / new)
        print(f"{name:<14} {f'{n}x{k}':>12} {old * 1e3:>13.1f} {new * 1e3:>9.1f} {old / new:>7.2f}x "
              f"{n * k / new / 1e6:>10.1f} {cast * 1e3:>12.1f} {new / cast:>11.2f}x")
    listing = checkpoint_listing(ModelArgs.from_file(default_config()))
    fp8_params = sum(math.prod(t.shape) for t in listing.values() if t.dtype == torch.float8_e4m3fn)
    rate = min(rates)
    print(f"DeepSeek-V3's FP8 weights: {fp8_params / 1e9:.1f}B parameters; at the slowest slab rate above "
          f"({rate / 1e6:.1f} M/s) the host conversion takes {fp8_params / rate / 60:.1f} min on {torch.get_num_threads()} "
          f"thread(s) (one process; torch's elementwise ops scale with threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
