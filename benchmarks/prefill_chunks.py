"""Chunked prefill (``generate(..., prefill_chunk=C)``) side by side: time and peak memory of a
long prompt's prefill in one forward and in chunks, on the cpu backend.

Time: one process, the settings interleaved over ``--rounds`` rounds, the fastest round of
each counts (``generate(prompt, 1)``: the prefill and the first token). Peak memory: a fresh
child process per setting, its peak resident set after the same prefill minus its peak after
loading alone (the model, the cache and torch's own), so only the prefill's activations count.
The tokens of every setting must equal the one-forward run's (checked).

    python benchmarks/prefill_chunks.py [--prompt-len 4096] [--chunks 2048,1024,512] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from process_memory import reset_peak, status_kib

import dshal
from dshal.model import random_model, tiny_args


def _model(prompt_len: int) -> torch.nn.Module:
    dshal.use(backend="cpu")
    return random_model(tiny_args(hidden_size=256, num_attention_heads=8, max_position_embeddings=prompt_len + 8), seed=0)


def _prompt(model: torch.nn.Module, prompt_len: int) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))


def _peak_child(prompt_len: int, chunk: int | None) -> None:
    """Child process: print the resident set (KiB) before the prefill and its peak during it
    (Linux: writing 5 to clear_refs resets the peak, VmHWM, to the current resident set)."""
    model = _model(prompt_len)
    prompt = _prompt(model, prompt_len)
    model.generate(prompt[:, :8], 1)  # first-call allocations out of the measurement
    reset_peak()
    before = status_kib("VmRSS")
    ids = model.generate(prompt, 1, prefill_chunk=chunk)
    print(json.dumps({"loaded_kib": before, "peak_kib": status_kib("VmHWM"), "token": int(ids[0, -1])}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--chunks", default="2048,1024,512", help="comma-separated chunk sizes (one forward is always run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.child is not None:
        _peak_child(opts.prompt_len, None if opts.child == "none" else int(opts.child))
        return 0
    settings: list[int | None] = [None, *(int(c) for c in opts.chunks.split(","))]
    model = _model(opts.prompt_len)
    prompt = _prompt(model, opts.prompt_len)
    best: dict[int | None, float] = {}
    tokens: dict[int | None, int] = {}
    for _ in range(opts.rounds):
        for chunk in settings:
            start = time.perf_counter()
            ids = model.generate(prompt, 1, prefill_chunk=chunk)
            best[chunk] = min(best.get(chunk, float("inf")), time.perf_counter() - start)
            tokens[chunk] = int(ids[0, -1])
    print(f"cpu backend, tiny model (hidden 256, 8 heads, 3 layers), prompt {opts.prompt_len} tokens, "
          f"{opts.threads} thread(s); {platform.processor() or platform.machine()}; torch {torch.__version__}")
    print(f"{'prefill chunk':>14} {'prefill s':>10} {'x one forward':>14} {'activation peak MiB':>20} {'same token':>11}")
    for chunk in settings:
        child = subprocess.run([sys.executable, __file__, "--prompt-len", str(opts.prompt_len), "--threads", str(opts.threads),
                                "--child", "none" if chunk is None else str(chunk)], capture_output=True, text=True, check=True)
        peak = json.loads(child.stdout.strip().splitlines()[-1])
        rise_mib = (peak["peak_kib"] - peak["loaded_kib"]) / 1024
        label = "one forward" if chunk is None else str(chunk)
        same = tokens[chunk] == tokens[None] == peak["token"]
        print(f"{label:>14} {best[chunk]:>10.3f} {best[chunk] / best[None]:>13.2f}x {rise_mib:>20.1f} {str(same):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
