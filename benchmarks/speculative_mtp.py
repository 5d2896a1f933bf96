"""Speculative decoding with the MTP layer against plain greedy decoding, side by side.

No trained MTP weights can be had here, so the drafts' quality is set two ways:

- ``random MTP``: the checkpoint's random MTP layer, whose drafts are almost never right
  (the cost of a step with nothing gained);
- ``every draft right``: the MTP layer still runs (its cost is paid), but its draft is
  replaced by the known greedy continuation (the most a draft can buy).

A trained DeepSeek-V3 MTP layer lies between: its report gives 85-90 % of drafts accepted.
Each speculative step is one main-model forward of two tokens plus one MTP forward; plain
decoding is one forward of one token per token. The tokens of every run are compared with
plain greedy decoding's.

Model: ``benchmarks/model_vs_hf.py``'s shapes (4 layers, fp32) with one MTP layer, random
weights, cpu backend. Times are the process's CPU time (one torch thread), fastest of
``--repeats``, the runs interleaved.

    python benchmarks/speculative_mtp.py [--threads 1] [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse

import torch
from model_vs_hf import bench_args, best_times, machine_line

import dshal
from dshal.model import random_model
from dshal.model.speculative import generate_speculative


def _known_drafts(model, continuation: torch.Tensor):
    """``model.draft`` that runs the MTP layer, then drafts the known next-but-one token."""
    real, ids = model.draft, continuation[0].tolist()

    def draft(hidden, next_ids, start_pos, cache=None, last_only=False):
        logits = real(hidden, next_ids, start_pos, cache, last_only=last_only)
        last = start_pos + next_ids.shape[1] - 1
        right = torch.zeros_like(logits)
        right[0, -1, ids[last + 2] if last + 2 < len(ids) else 0] = 1.0
        return right

    return draft


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    dshal.use(backend="cpu")
    args = bench_args().with_(num_nextn_predict_layers=1, mtp_layers=1)
    model = random_model(args, seed=0)
    prompt = torch.randint(0, args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(1))
    new = opts.new_tokens
    plain = model.generate(prompt, new)
    stats = {}

    def speculative(name: str):
        def run():
            ids, stats[name] = generate_speculative(model, prompt, new)
            return ids
        return run

    known, right = _known_drafts(model, plain), speculative("every draft right")

    def every_draft_right():
        model.draft = known  # an instance attribute over the method, for this run only
        try:
            return right()
        finally:
            del model.draft

    runs = {"plain greedy": lambda: model.generate(prompt, new), "random MTP": speculative("random MTP"),
            "every draft right": every_draft_right}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens compared
    best = best_times(runs, opts.repeats)  # all three interleaved, so each ratio is side by side
    print(f"machine: {machine_line()}")
    print(f"one sequence: {opts.prompt_len}-token prompt, {new} new tokens, greedy; tokens/s = {new} / time (prefill included)")
    print(f"{'run':<20}{'tokens/s':>10}{'vs plain':>10}{'accepted':>12}{'tokens/step':>13}  same tokens")
    base = new / best["plain greedy"]
    for name, seconds in best.items():
        rate, s = new / seconds, stats.get(name)
        accepted = f"{s.accepted}/{s.steps}" if s else "-"
        per_step = "1.00" if not s else "-" if s.tokens_per_step is None else f"{s.tokens_per_step:.2f}"
        print(f"{name:<20}{rate:>10.1f}{rate / base:>9.2f}x{accepted:>12}{per_step:>13}  {torch.equal(outputs[name], plain)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
