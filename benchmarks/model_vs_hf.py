"""dshal's model core (cpu backend) against Hugging Face transformers' DeepseekV3ForCausalLM.

One random DeepSeek-V3-shaped checkpoint is written once and loaded by both, fp32 on
the CPU. Measured side by side, interleaved, fastest of ``--repeats``:

- prefill tokens/s at 64 and 512 prompt tokens (one forward that fills the KV cache and
  returns the last token's logits: what generation's first step does);
- greedy decode tokens/s for 64 new tokens after a 64- and a 512-token prompt: the median time
  between consecutive new tokens (each model's own ``generate``, token times taken by a
  callback / streamer), best of ``--repeats`` runs.

Times are the process's CPU time (``time.process_time``, one torch thread by default):
on a shared machine, wall time also counts the time spent waiting for a core.

HF runs eager (attn_implementation="eager", experts_implementation="eager"), and, for
reference, with its defaults (sdpa attention + grouped_mm experts).

dshal runs with its default config (``precision.gemm: auto``: the float32 checkpoint in
float32), and a second dshal model loads the FP8 128x128-block version of the same
weights (auto keeps it FP8, activations float32): its prefill and decode are printed
beside the float32 model's (``fp8 / f32``).

    python benchmarks/model_vs_hf.py [--threads 1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dshal.kernels import cpu as cpu_kernels
from dshal.model import RopeScaling, from_pretrained, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint


def bench_args():
    """DeepSeek-V3's structure at a CPU-friendly size: q LoRA, YaRN, 1 dense + 3 MoE layers,
    16 experts in 4 groups (2 kept), top-4 + 1 shared expert."""
    return tiny_args(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        max_position_embeddings=2048,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=512, mscale=1.0, mscale_all_dim=1.0),
    )


#: The process's CPU time: with one torch thread it is the wall time of an idle machine,
#: and unlike wall time it does not count waiting for a core another process holds.
CLOCK = time.process_time


def best_times(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each callable, the callables interleaved so that
    load from other processes hits all of them alike (the minimum is the least noisy
    estimate on a shared machine)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            best[name] = min(best[name], CLOCK() - start)
    return best


class _Stamps:
    """A transformers streamer that only calls ``mark`` for each generated token (the
    first ``put`` is the prompt)."""

    def __init__(self, mark):
        self.mark, self.prompt_seen = mark, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.mark()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def machine_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import os

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both (default 1: steadier on shared machines)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the fastest counts (default 5)")
    parser.add_argument("--prefill", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-prompts", type=int, nargs="+", default=[64, 512], help="prompt lengths for decode")
    parser.add_argument("--json", help="write the figures here too")
    opts = parser.parse_args()
    if opts.new_tokens < 3:  # decode is the median gap between consecutive new tokens
        parser.error(f"--new-tokens {opts.new_tokens}: expected at least 3 (two gaps between new tokens to time)")
    torch.set_num_threads(opts.threads)
    import transformers

    args = bench_args()
    directory = Path(tempfile.mkdtemp(prefix="dshal-bench-"))
    tensors = random_checkpoint(args, seed=0, std=0.02)
    save_checkpoint(directory, args, tensors)
    save_checkpoint(directory / "fp8", args, quantize_checkpoint_fp8(tensors))
    ours = from_pretrained(directory, {"backend": "cpu"})  # the defaults: gemm auto
    ours_fp8 = from_pretrained(directory / "fp8", {"backend": "cpu"})
    modes = {"dshal": ours.describe()["precision"]["mode"], "dshal_fp8": ours_fp8.describe()["precision"]["mode"]}
    load = transformers.DeepseekV3ForCausalLM.from_pretrained
    hf_eager = load(directory, attn_implementation="eager", experts_implementation="eager").eval()
    hf_default = load(directory).eval()
    models = {"dshal": ours, "hf_eager": hf_eager, "hf_default": hf_default, "dshal_fp8": ours_fp8}

    def prefill(name: str, ids: torch.Tensor):
        model = models[name]
        if name.startswith("dshal"):
            return lambda: model(ids, 0, model.new_cache(ids.shape[0], ids.shape[1]), last_only=True)
        return lambda: model(ids, use_cache=True, logits_to_keep=1)

    def generate(name: str, ids: torch.Tensor, new: int, stamps: list[float] | None = None):
        """A greedy-generation callable; ``stamps`` gets the time each new token came out."""
        model = models[name]
        mark = (lambda *_: stamps.append(CLOCK())) if stamps is not None else None
        if name.startswith("dshal"):
            return lambda: model.generate(ids, new, on_token=mark)
        streamer = _Stamps(mark) if mark else None
        return lambda: model.generate(
            ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, streamer=streamer
        )

    gen = torch.Generator().manual_seed(1)
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.inference_mode():
        for length in opts.prefill:
            ids = torch.randint(0, args.vocab_size, (1, length), generator=gen)
            for name in models:
                prefill(name, ids)()  # warm-up
            best = best_times({name: prefill(name, ids) for name in models}, opts.repeats)
            for name in models:
                results[name][f"prefill_{length}_tok_s"] = length / best[name]
        same = True
        for prompt in opts.decode_prompts:
            ids = torch.randint(0, args.vocab_size, (1, prompt), generator=gen)
            outputs = {name: generate(name, ids, opts.new_tokens)() for name in models}
            same = same and all(torch.equal(outputs["dshal"], out) for n, out in outputs.items() if n != "dshal_fp8")
            # Decode: the median gap between consecutive new tokens of one run (robust to
            # bursts of load from other processes), the best run of each, runs interleaved.
            gaps: dict[str, float] = dict.fromkeys(models, float("inf"))
            for _ in range(opts.repeats):
                for name in models:
                    stamps: list[float] = []
                    generate(name, ids, opts.new_tokens, stamps)()
                    steps = [b - a for a, b in zip(stamps, stamps[1:])]
                    gaps[name] = min(gaps[name], statistics.median(steps))
            for name in models:
                results[name][f"decode_{opts.new_tokens}_after_{prompt}_tok_s"] = 1.0 / gaps[name]


    kernels = cpu_kernels.status()
    print(f"machine: {machine_line()}; transformers {transformers.__version__}")
    print(f"dshal cpu C kernels: {'on' if kernels.available else 'off'} ({kernels.detail})")
    print(
        f"model: {args.num_hidden_layers} layers, hidden {args.hidden_size}, {args.n_routed_experts} experts, fp32; "
        f"greedy tokens identical (dshal f32 and HF): {same}; dshal precision (gemm auto): {modes}"
    )
    header = f"{'metric':<28}{'dshal':>10}{'HF eager':>10}{'ratio':>8}{'HF default':>12}{'ratio':>8}"
    header += f"{'dshal fp8':>11}{'fp8 / f32':>10}"
    print(header)
    for metric in results["dshal"]:
        d, e, h, f = (results[n][metric] for n in ("dshal", "hf_eager", "hf_default", "dshal_fp8"))
        print(f"{metric:<28}{d:>10.1f}{e:>10.1f}{d / e:>7.2f}x{h:>12.1f}{d / h:>7.2f}x{f:>11.1f}{f / d:>9.2f}x")
    if opts.json:
        report = {"machine": machine_line(), "cpu_kernels": kernels.available, "same_tokens": same, "modes": modes}
        Path(opts.json).write_text(json.dumps({**report, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
