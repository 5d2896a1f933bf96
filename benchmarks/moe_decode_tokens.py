"""The routed experts of a decode step's few tokens on the cpu backend: one C call for all the
tokens (``dshal.kernels.cpu.moe_tokens`` / ``moe_tokens_fp8``: each expert's weights read once
for its tokens, each token's result its own row's alone) against torch's grouped GEMM (the
tokens grouped by expert in C, one ``torch._grouped_mm`` per projection; FP8: on the weights'
cached float32 copies). ``dshal.backends.cpu_native.FEW_TOKENS`` / ``FEW_FP8_TOKENS`` say up to
how many tokens the cpu backend takes the C call.

Process CPU time per call (one torch thread), the fastest of ``--rounds`` interleaved rounds.
``--ep``: instead, an expert-parallel rank's decode step: the cpu backend's ``moe_experts``
provider with every other slot ``NO_EXPERT`` (served by another rank; weight NaN), float32 and
FP8 experts (run it on two dshal versions to compare them).

    python benchmarks/moe_decode_tokens.py [--shapes 16,128,64,4;16,256,128,4;64,1024,512,8] [--tokens 1,2,3,4,8] [--ep]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from functools import partial

import torch

from dshal.backends import cpu_native
from dshal.kernels import cpu as cpu_kernels
from dshal.ops.catalogue import SPECS
from dshal.ops.moe import NO_EXPERT


def best_us(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """µs per call of each function: the fastest of ``rounds`` interleaved rounds of ~20 ms
    (each warmed by one call first: a first FP8 grouped call makes the weights' float32 copies)."""
    best = dict.fromkeys(fns, float("inf"))
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.process_time()
        fn()
        calls[name] = max(1, int(0.02 / max(time.process_time() - start, 1e-6)))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.process_time() - start) / calls[name] * 1e6)
    return best


def grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The cpu backend's float32 path past FEW_TOKENS."""
    xs, order, ends = cpu_kernels.moe_group(x, ids, w13.shape[0])
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=ends)
    y = torch._grouped_mm(cpu_native.silu_and_mul(h), w2.transpose(1, 2), offs=ends)
    return cpu_kernels.moe_combine(y, order, weights)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16,128,64,4;16,256,128,4;64,1024,512,8",
                        help="experts,hidden,inter,top_k; ... (the tiny model's, model_vs_hf's, a wider one)")
    parser.add_argument("--tokens", default="1,2,3,4,8")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ep", action="store_true", help="time moe_experts with half the slots NO_EXPERT")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    state = cpu_kernels.status()
    if not state.available:
        print(f"dshal cpu C kernels unavailable: {state.detail}")
        return 1
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    if opts.ep:
        print("| experts, H, I, top-k | tokens | float32: moe_experts µs | FP8: moe_experts µs |\n| --- | --- | --- | --- |")
    else:
        print("| experts, H, I, top-k | tokens | float32: C µs | grouped GEMM µs | grouped / C | FP8: C µs | grouped GEMM µs | grouped / C |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    quantize = SPECS["quantize_fp8"].reference_impl
    for shape in opts.shapes.split(";"):
        experts, hidden, inter, top_k = (int(v) for v in shape.split(","))
        w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
        q13, s13 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), "e4m3", None) for w in w13)))
        q2, s2 = (torch.stack(t) for t in zip(*(quantize(w, (128, 128), "e4m3", None) for w in w2)))
        for tokens in (int(t) for t in opts.tokens.split(",")):
            x, weights = torch.randn(tokens, hidden, generator=gen), torch.rand(tokens, top_k, generator=gen)
            ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
            routed, fp8 = (x, weights, ids, w13, w2), (x, weights, ids, q13, q2, s13, s2)
            if opts.ep:  # every other slot another rank's (the ids each rank gets under --ep 2)
                skipped = torch.arange(tokens * top_k).reshape(tokens, top_k) % 2 == 1
                ep_ids, ep_weights = ids.masked_fill(skipped, NO_EXPERT), weights.masked_fill(skipped, float("nan"))
                t = best_us({
                    "f32": partial(cpu_native.moe_experts, x, ep_weights, ep_ids, w13, w2),
                    "fp8": partial(cpu_native.moe_experts, x, ep_weights, ep_ids, q13, q2, s13, s2),
                }, opts.rounds)  # fmt: skip
                print(f"| {experts}, {hidden}, {inter}, {top_k} | {tokens} | {t['f32']:.0f} | {t['fp8']:.0f} |")
                continue
            t = best_us({
                "c": partial(cpu_kernels.moe_tokens, *routed), "grouped": partial(grouped, *routed),
                "c8": partial(cpu_kernels.moe_tokens_fp8, *fp8), "grouped8": partial(cpu_native._moe_experts_fp8_grouped, *fp8),
            }, opts.rounds)  # fmt: skip
            print(f"| {experts}, {hidden}, {inter}, {top_k} | {tokens} | {t['c']:.0f} | {t['grouped']:.0f} | "
                  f"{t['grouped'] / t['c']:.2f} | {t['c8']:.0f} | {t['grouped8']:.0f} | {t['grouped8'] / t['c8']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
