"""The static (graph) decode step on a cache made for it against one without, side by side.

A static step attends over a layer's whole cache buffer and masks the unwritten slots with
one more key dimension (:mod:`dshal.model.cache`). On a plain cache that dimension is
appended to a copy of the buffer, per layer and step: ``B x S x (kv_lora + rope + 1)``
elements read and written. A cache from ``new_cache(..., static=True)`` holds spare
columns for it, so a step writes ``B x S`` elements instead. The copy grows with the
batch and the cache length, while the weights a step reads do not.

Model: ``benchmarks/model_vs_hf.py``'s shapes (4 layers, fp32) with DeepSeek-V3's MLA cache
width (kv_lora 512 + rope 64), random weights, cpu backend, the steps run as a captured
graph would (trusted, static buffers). Times are the process's CPU time (one torch thread),
fastest of ``--repeats``, interleaved; the logits of both are compared.

    python benchmarks/static_step_cache.py [--threads 1] [--repeats 5] [--batch 8] [--cache-len 4096]
"""

from __future__ import annotations

import argparse

import torch
from model_vs_hf import bench_args, best_times, machine_line

import dshal
from dshal.model import random_model
from dshal.model.decode import static_decode_step

#: Tokens prefilled before the timed decode steps.
PROMPT = 16

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cache-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    opts = parser.parse_args()
    if opts.steps < 1 or opts.cache_len < PROMPT + opts.steps:
        parser.error(f"--cache-len {opts.cache_len} must hold the {PROMPT}-token prompt and --steps {opts.steps} "
                     f"(at least {PROMPT + max(opts.steps, 1)}), and --steps must be >= 1")
    torch.set_num_threads(opts.threads)
    dshal.use(backend="cpu")
    args = bench_args().with_(kv_lora_rank=512, qk_rope_head_dim=64, max_position_embeddings=max(opts.cache_len, 2048))
    model = random_model(args, seed=0)
    prompt = torch.randint(0, args.vocab_size, (opts.batch, PROMPT), generator=torch.Generator().manual_seed(1))
    caches = {"plain cache": model.new_cache(opts.batch, opts.cache_len, "absorb"),
              "static cache": model.new_cache(opts.batch, opts.cache_len, "absorb", static=True)}
    token = prompt[:, -1:].clone()
    logits = {}

    def steps(cache):
        def run():
            with torch.inference_mode(), dshal.ops.trusted():
                for i in range(opts.steps):
                    logits[id(cache)] = static_decode_step(model, token, torch.tensor([PROMPT + i]), cache)
        return run

    with torch.inference_mode():
        for cache in caches.values():
            model(prompt, 0, cache)
    runs = {name: steps(cache) for name, cache in caches.items()}
    for run in runs.values():
        run()  # warm-up
    best = best_times(runs, opts.repeats)
    plain, static = (logits[id(c)] for c in caches.values())
    gap = float((plain - static).abs().max() / plain.abs().max())
    print(machine_line())
    print(f"static decode step, batch {opts.batch}, cache of {opts.cache_len} slots, latent width "
          f"{args.kv_lora_rank + args.qk_rope_head_dim}, {args.num_hidden_layers} layers, {opts.steps} steps")
    for name, seconds in best.items():
        print(f"  {name:13s} {seconds / opts.steps * 1e3:8.2f} ms per step")
    print(f"  static step speed vs plain: {best['plain cache'] / best['static cache']:.2f}x (plain time / static time); "
          f"logits max rel gap {gap:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
