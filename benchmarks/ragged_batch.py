"""A batch of prompts of different lengths: dshal's ragged batch against the same prompts one
at a time, and against HF transformers (left-padded batch with an attention mask).

dshal (``generate(..., prompt_lens=)``) prefills each prompt alone into its row of the cache,
then decodes the rows together, each at its own position (the cache slots past it masked).
HF left-pads and masks, prefilling the padded batch in one forward. Two prompt sets: lengths
close together, and lengths spread apart (where feeding the longer prompts' rest by one-token
steps, DeepSeek-V3's scheme and dshal's for a model with an attention window, costs most).

Model: ``benchmarks/model_vs_hf.py``'s checkpoint (4 layers, fp32, cpu backend with its
defaults; HF eager). Greedy, a fixed number of new tokens (no EOS). Times are the process's
CPU time (one torch thread), fastest of ``--repeats``, the four runs interleaved.

    python benchmarks/ragged_batch.py [--threads 1] [--repeats 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from model_vs_hf import bench_args, best_times, machine_line

from dshal.model import from_pretrained
from dshal.model.checkpoint import random_checkpoint, save_checkpoint
from dshal.model.generate import completions

#: Prompt lengths per set: 8 prompts each.
PROMPT_SETS = {"close (60-67 tokens)": list(range(60, 68)), "spread (8-120 tokens)": [8, 24, 40, 56, 72, 88, 104, 120]}


def _measure(ours, hf, prompts: list[list[int]], new: int, repeats: int) -> tuple[dict[str, float], dict[str, bool]]:
    """Tokens/s of the four ways to run ``prompts``, and whether each gives dshal's one-by-one tokens."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    right = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    left = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf_kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    runs = {
        "ours_batch": lambda: completions(ours.generate(right, new, prompt_lens=lengths), lengths, new),
        "ours_alone": lambda: [ours.generate(torch.tensor([p]), new)[0, len(p):].tolist() for p in prompts],
        "hf_batch": lambda: hf.generate(left, attention_mask=mask, **hf_kwargs)[:, width:].tolist(),
        "hf_alone": lambda: [hf.generate(torch.tensor([p]), **hf_kwargs)[0, len(p):].tolist() for p in prompts],
    }
    tokens = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens compared
    best = best_times(runs, repeats)
    rates = {name: len(prompts) * new / best[name] for name in runs}
    return rates, {name: tokens[name] == tokens["ours_alone"] for name in runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    import transformers

    args = bench_args()
    directory = Path(tempfile.mkdtemp(prefix="dshal-ragged-"))
    save_checkpoint(directory, args, random_checkpoint(args, seed=0, std=0.02))
    ours = from_pretrained(directory, {"backend": "cpu"})
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    new = opts.new_tokens
    print(f"machine: {machine_line()}; transformers {transformers.__version__}")
    print(f"8 prompts, {new} new tokens each, greedy; tokens/s = 8 x {new} / time")
    print(f"{'prompts':<24}{'dshal batch':>12}{'dshal 1 by 1':>14}{'gain':>7}{'HF batch':>10}{'HF 1 by 1':>11}{'gain':>7}"
          f"{'dshal/HF batch':>16}")
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for label, lengths in PROMPT_SETS.items():
            prompts = [torch.randint(0, args.vocab_size, (n,), generator=gen).tolist() for n in lengths]
            rate, same = _measure(ours, hf, prompts, new, opts.repeats)
            print(f"{label:<24}{rate['ours_batch']:>12.1f}{rate['ours_alone']:>14.1f}"
                  f"{rate['ours_batch'] / rate['ours_alone']:>6.2f}x{rate['hf_batch']:>10.1f}{rate['hf_alone']:>11.1f}"
                  f"{rate['hf_batch'] / rate['hf_alone']:>6.2f}x{rate['ours_batch'] / rate['hf_batch']:>15.2f}x")
            print(f"{'':<24}greedy tokens equal to dshal one by one: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
