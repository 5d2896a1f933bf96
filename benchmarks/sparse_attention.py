"""What DeepSeek-V3.2's sparse attention costs in the model core: a decode step and a prefill
chunk past ``index_topk`` (indexer scores + per-query key mask) against the same model keeping
every key (the dense path), and, for one layer's decode attention, a key mask over every key
against the kept keys gathered into the plain ``attention`` op and against
``sparse_mla_attention`` (what the model core calls).

Usage: ``python benchmarks/sparse_attention.py [--context S] [--topk K] [--repeat N]``
(CPU by default: the active dshal runtime's backend). Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import time

import torch

import dshal
from dshal import ops
from dshal.model import build_model, tiny_args
from dshal.model.checkpoint import random_checkpoint
from dshal.model.loader import DictReader


def _best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    dshal.use({"backend": "cpu"})
    torch.manual_seed(0)
    shape = dict(hidden_size=512, num_attention_heads=16, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64,
                 qk_rope_head_dim=32, v_head_dim=64, num_hidden_layers=2, first_k_dense_replace=2,
                 max_position_embeddings=opts.context + 1, rope_scaling=None, dtype=torch.bfloat16)
    sizes = dict(index_n_heads=16, index_head_dim=64)
    sparse = tiny_args(**shape, **sizes, index_topk=opts.topk)
    tensors = random_checkpoint(sparse, seed=0)
    models = {
        "sparse": build_model(sparse, DictReader(tensors), device="cpu"),
        "dense (topk >= context)": build_model(sparse.with_(index_topk=opts.context), DictReader(tensors), device="cpu"),
    }
    ids = torch.randint(0, sparse.vocab_size, (1, opts.context))
    print(f"context {opts.context}, index_topk {opts.topk}, bf16, {torch.get_num_threads()} threads")
    for name, model in models.items():
        cache = model.new_cache(1, opts.context)
        start = opts.context - 1 - opts.chunk
        with torch.inference_mode():
            model(ids[:, :start], 0, cache, last_only=True)

            def prefill(model=model, cache=cache, start=start) -> None:
                model(ids[:, start : start + opts.chunk], start, cache, last_only=True)

            def step(model=model, cache=cache) -> None:
                model(ids[:, -1:], opts.context - 1, cache, last_only=True)

            prefill_s = _best(prefill, opts.repeat)
            step_s = _best(step, opts.repeat)
        print(f"{name:24s} prefill chunk of {opts.chunk}: {prefill_s * 1e3:8.1f} ms   decode step: {step_s * 1e3:7.2f} ms")

    # One layer's decode attention over the latent, both ways of keeping topk keys.
    heads, width, rank = 16, 256 + 32, 256
    q = torch.randn(1, heads, 1, width, dtype=torch.bfloat16)
    latent = torch.randn(1, opts.context, width, dtype=torch.bfloat16)
    kept = torch.randperm(opts.context)[: opts.topk].sort().values
    bias = torch.full((1, 1, opts.context), -1.0e4)
    bias[..., kept] = 0.0
    scale = width**-0.5

    def masked() -> None:
        columns = (bias / scale).to(latent.dtype).mT  # [B, S, 1]
        keys = torch.cat((latent, columns), dim=-1)[:, None]
        ops.attention(torch.cat((q, torch.ones_like(q[..., :1])), dim=-1), keys, latent[:, None, :, :rank], False, scale)

    def gathered() -> None:
        keys = latent[:, kept][:, None]
        ops.attention(q, keys, keys[..., :rank], False, scale)

    def sparse_op() -> None:  # what the model core calls: the backend's sparse_mla_attention
        ops.sparse_mla_attention(q, latent, kept[None, None], scale, rank)

    with torch.inference_mode():
        print(f"one layer's decode attention: key mask {_best(masked, 10) * 1e6:8.0f} us   "
              f"gather of the kept keys {_best(gathered, 10) * 1e6:8.0f} us   "
              f"sparse_mla_attention {_best(sparse_op, 10) * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
