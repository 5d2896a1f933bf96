"""How long the host takes to convert an FP8 checkpoint to W8A8 int8, per weight and for all
of DeepSeek-V3.

A backend that cannot hold float8 tensors (``Capabilities.fp8_storage`` False: Ascend) gets
an FP8 checkpoint converted on the host at load: each 128x128-block FP8 weight dequantized to
float32, then quantized to int8 with one scale per output row, by the ops' references (the
loader's path: ``dshal.model.precision.dequantize_weight`` and ``ops.quantize_int8`` under
``dshal.runtime.reference_ops()``). This times that for DeepSeek-V3's weight shapes and
scales the rate to all its FP8 weights (the checkpoint listing ``dshal plan`` builds from
DeepSeek-V3's config.json). Side by side: a plain float32 copy of the same FP8 bytes (torch's cast), the least
any conversion has to do.

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
from dshal.model.precision import dequantize_weight
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
    print(f"{'weight':<14} {'N x K':>13} {'convert ms':>10} {'M params/s':>10} {'fp32 cast ms':>12} {'convert / cast':>14}")
    rates = []
    for name, n, k in SHAPES:
        weight, scale = quantize(torch.randn(n, k) / 16, (128, 128), "e4m3", None)
        with reference_ops():
            convert = best_seconds(lambda w=weight, s=scale: ops.quantize_int8(dequantize_weight(w, s, torch.float32)), opts.rounds)
        cast = best_seconds(lambda w=weight: w.to(torch.float32), opts.rounds)
        rates.append(n * k / convert)
        print(f"{name:<14} {f'{n}x{k}':>13} {convert * 1e3:>10.1f} {n * k / convert / 1e6:>10.1f} {cast * 1e3:>12.1f} "
              f"{convert / cast:>13.1f}x")
    listing = checkpoint_listing(ModelArgs.from_file(default_config()))
    fp8_params = sum(math.prod(t.shape) for t in listing.values() if t.dtype == torch.float8_e4m3fn)
    rate = min(rates)
    print(f"DeepSeek-V3's FP8 weights: {fp8_params / 1e9:.1f}B parameters; at the slowest rate above "
          f"({rate / 1e6:.1f} M/s) the host conversion takes {fp8_params / rate / 60:.1f} min on {torch.get_num_threads()} "
          f"thread(s) (one process; torch's elementwise ops scale with threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
