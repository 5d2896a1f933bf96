"""dshal's C kernels for the cpu backend against the torch code they replace, side by side.

Part 1, one kernel at a time (µs per call, best of interleaved rounds): each checked
wrapper in ``dshal.kernels.cpu`` against the torch path the cpu backend takes without it
(``F.linear``, the torch-only providers in ``dshal.backends.cpu_native``, the router's
reference). GEMVs are timed on weights that come from memory ("cold": a rotating set
larger than the last-level cache, as in a decode step that reads every layer's weights
once) and on one cached weight ("hot").

Part 2, the model core: a decode step (after 64 tokens; of one row, and of 8) and a 64-token
prefill of the model_vs_hf.py checkpoint, and a 64-token prefill of its FP8 128x128-block
version, with the C kernels on and off in the same process.

    python benchmarks/cpu_kernels.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from dshal.backends import cpu_native
from dshal.kernels import cpu as cpu_kernels
from dshal.model import from_pretrained
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint
from dshal.ops.catalogue import SPECS

CLOCK = time.perf_counter
#: Bytes of distinct weights cycled through for the "cold" GEMVs (above a 32 MiB L3).
COLD_BYTES = 96 << 20


def best_of(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """µs per call of each function: the fastest of ``rounds`` interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = CLOCK()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (CLOCK() - start) / calls * 1e6)
    return best


def _cycle(items: list) -> Callable[[], object]:
    """A callable that returns the next item each call (round robin)."""
    state = {"i": -1}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return nxt


def kernel_rows(rounds: int) -> list[tuple[str, float, float]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in [(256, 256), (384, 192), (2048, 256), (4096, 2048), (1536, 7168)]:
        x = torch.randn(1, k, generator=gen)
        count = max(2, COLD_BYTES // (n * k * 4))
        weights = [torch.randn(n, k, generator=gen) for _ in range(count)]
        for label, pool in (("cold", weights), ("hot", weights[:1])):
            a, b = _cycle(pool), _cycle(pool)
            t = best_of(
                {"c": lambda x=x, a=a: cpu_kernels.gemv(x, a()), "torch": lambda x=x, b=b: F.linear(x, b())},
                rounds,
                len(pool) * 4,
            )
            rows.append((f"linear, 1 row, [{n}x{k}] weight, {label}", t["c"], t["torch"]))
        del weights

    experts, hidden, inter, top_k = 16, 256, 128, 4
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / 16
    w2 = torch.randn(experts, hidden, inter, generator=gen) / 11
    for tokens in (1, 4, 8, 64):  # a decode step's batch (one C call up to 8 tokens), a prefill
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        t = best_of(
            {
                "c": partial(cpu_native.moe_experts, x, weights, ids, w13, w2),
                "torch": partial(cpu_native.moe_experts_torch, x, weights, ids, w13, w2),
            },
            rounds,
            20,
        )
        rows.append((f"moe_experts, T={tokens}, E={experts} top-{top_k}, H={hidden}, I={inter}", t["c"], t["torch"]))

    quantize, reference_linear = SPECS["quantize_fp8"].reference_impl, SPECS["linear"].reference_impl
    for n, k in [(256, 256), (1536, 7168)]:
        x = torch.randn(1, k, generator=gen)
        wq, scale = quantize(torch.randn(n, k, generator=gen) / k**0.5, (128, 128), "e4m3", None)
        t = best_of(
            {
                "c": partial(cpu_kernels.fp8_block_gemm, x, wq, scale),
                "torch": partial(reference_linear, x, wq, None, scale),
            },
            rounds,
            20,
        )
        rows.append((f"linear, 1 row, FP8 128x128 blocks, [{n}x{k}] weight", t["c"], t["torch"]))
    q13, s13 = zip(*(quantize(w, (128, 128), "e4m3", None) for w in w13))
    q2, s2 = zip(*(quantize(w, (128, 128), "e4m3", None) for w in w2))
    fp8_experts = [torch.stack(t) for t in (q13, q2, s13, s2)]
    x = torch.randn(1, hidden, generator=gen)
    ids = torch.randperm(experts, generator=gen)[:top_k][None]
    weights = torch.rand(1, top_k, generator=gen)
    t = best_of(
        {
            "c": lambda: cpu_native.moe_experts(x, weights, ids, *fp8_experts),
            "torch": lambda: cpu_native.moe_experts_torch(x, weights, ids, *fp8_experts),
        },
        rounds,
        20,
    )
    rows.append((f"moe_experts, T=1, FP8 blocks, E={experts} top-{top_k}", t["c"], t["torch"]))

    # A prefill's FP8 activations: quantized per (1, 128) and dequantized (the values an FP8
    # linear multiplies with its cached float32 weight); torch: the backend's path without C.
    f32, bf16 = torch.float32, torch.bfloat16
    for shape, dtype in [((64, 256), f32), ((64, 192), f32), ((256, 128), f32), ((512, 256), f32), ((2048, 128), f32),
                         ((64, 256), bf16)]:  # fmt: skip
        x = torch.randn(*shape, generator=gen).to(dtype)
        t = best_of(
            {
                "c": partial(cpu_kernels.fp8_fake_quant_rows, x, torch.float8_e4m3fn),
                "torch": partial(cpu_native._quantized_activations_torch, x, torch.float8_e4m3fn),
            },
            rounds,
            50,
        )
        label = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
        rows.append((f"FP8 prefill activations {list(shape)}{label}, 1x128 quantize + dequantize", t["c"], t["torch"]))

    for tokens, e, top_k, groups, kept in [(1, 16, 4, 4, 2), (64, 16, 4, 4, 2), (1, 256, 8, 8, 4), (64, 256, 8, 8, 4)]:
        logits, bias = torch.randn(tokens, e, generator=gen), torch.randn(e, generator=gen)
        ref = SPECS["moe_gate"].reference_impl
        t = best_of(
            {
                "c": partial(cpu_kernels.moe_gate, logits, bias, top_k, groups, kept, 2.5, True),
                "torch": partial(ref, logits, bias, top_k, groups, kept, 2.5, True),
            },
            rounds,
            200,
        )
        rows.append((f"moe_gate, T={tokens}, E={e}, {groups} groups", t["c"], t["torch"]))

    for tokens in (1, 64):
        x, res = torch.randn(1, tokens, 256, generator=gen), torch.randn(1, tokens, 256, generator=gen)
        w = torch.rand(256, generator=gen)
        t = best_of(
            {
                "c": partial(cpu_kernels.rms_norm, x, w, 1e-6, res),
                "torch": partial(cpu_native.rms_norm_torch, x, w, 1e-6, res),
            },
            rounds,
            500,
        )
        rows.append((f"rms_norm + residual, [1, {tokens}, 256]", t["c"], t["torch"]))
        q = torch.randn(1, tokens, 8, 48, generator=gen)[..., 32:]
        cos, sin = torch.randn(tokens, 1, 8, generator=gen), torch.randn(tokens, 1, 8, generator=gen)
        t = best_of(
            {
                "c": partial(cpu_kernels.rotary, q, cos, sin, True),
                "torch": partial(cpu_native.rotary_embedding_torch, q, cos, sin, True),
            },
            rounds,
            500,
        )
        rows.append((f"rotary, q_pe [1, {tokens}, 8, 16] of [.., 48]", t["c"], t["torch"]))
    return rows


def model_rows(rounds: int) -> list[tuple[str, float, float]]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from model_vs_hf import bench_args


    args = bench_args()
    directory = Path(tempfile.mkdtemp(prefix="dshal-bench-"))
    tensors = random_checkpoint(args, seed=0, std=0.02)
    save_checkpoint(directory, args, tensors)
    save_checkpoint(directory / "fp8", args, quantize_checkpoint_fp8(tensors))
    model = from_pretrained(directory, {"backend": "cpu", "precision": {"gemm": "bf16"}})
    fp8_model = from_pretrained(directory / "fp8", {"backend": "cpu"})  # gemm auto: FP8 blocks
    ids = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    nxt = torch.tensor([[5]])

    def prefill():
        model(ids, 0, model.new_cache(1, 64), last_only=True)

    def prefill_fp8():
        fp8_model(ids, 0, fp8_model.new_cache(1, 64), last_only=True)

    def decode_steps(steps: int = 16, batch: int = 1) -> Callable[[], None]:
        def run():
            cache = model.new_cache(batch, 64 + steps + 1)
            model(ids.expand(batch, -1), 0, cache, last_only=True)
            step = nxt.expand(batch, -1)
            model(step, 64, cache, last_only=True)  # the checked first decode step
            start = CLOCK()
            for i in range(steps):
                model(step, 65 + i, cache, last_only=True)
            run.elapsed = (CLOCK() - start) / steps  # type: ignore[attr-defined]

        return run

    timings: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}, "decode_b8": {}, "prefill_fp8": {}}
    with torch.inference_mode():
        # Untimed: the first FP8 prefill fills the float32 weight copies both modes then share
        # (with one round, the first mode paid for them and the second did not).
        prefill_fp8()
        for _ in range(rounds):
            for mode in ("c", "torch"):
                os.environ["DSHAL_CPU_KERNELS"] = "1" if mode == "c" else "0"
                cpu_kernels.reload()
                start = CLOCK()
                prefill()
                timings["prefill"][mode] = min(timings["prefill"].get(mode, 1e9), (CLOCK() - start) * 1e6)
                start = CLOCK()
                prefill_fp8()
                timings["prefill_fp8"][mode] = min(timings["prefill_fp8"].get(mode, 1e9), (CLOCK() - start) * 1e6)
                for key, batch in (("decode", 1), ("decode_b8", 8)):
                    step = decode_steps(batch=batch)
                    step()
                    elapsed = step.elapsed  # type: ignore[attr-defined]
                    timings[key][mode] = min(timings[key].get(mode, 1e9), elapsed * 1e6)
    os.environ.pop("DSHAL_CPU_KERNELS")
    cpu_kernels.reload()
    return [
        ("model_vs_hf model: prefill, 64 tokens", timings["prefill"]["c"], timings["prefill"]["torch"]),
        ("model_vs_hf model, FP8 checkpoint: prefill, 64 tokens", *(timings["prefill_fp8"][m] for m in ("c", "torch"))),
        ("model_vs_hf model: decode step after 64 tokens", timings["decode"]["c"], timings["decode"]["torch"]),
        ("model_vs_hf model: decode step of 8 rows after 64 tokens", timings["decode_b8"]["c"], timings["decode_b8"]["torch"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the C kernels use one)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the fastest counts (default 5)")
    parser.add_argument("--skip-model", action="store_true", help="only the per-kernel table")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    state = cpu_kernels.status()
    if not state.available:
        print(f"dshal cpu C kernels unavailable: {state.detail}")
        return 1
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); kernels: {state.detail}")  # fmt: skip
    rows = kernel_rows(opts.rounds) + ([] if opts.skip_model else model_rows(opts.rounds))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'C µs':>9}  {'torch µs':>9}  {'torch / C':>9}")
    for name, c, t in rows:
        print(f"{name:<{width}}  {c:>9.1f}  {t:>9.1f}  {t / c:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
