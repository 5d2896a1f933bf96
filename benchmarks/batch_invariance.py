"""Batch and chunk invariance of the model core's numbers: does a prompt get the same logits
(and greedy tokens) alone as in a batch with other prompts, whatever the prefill chunk size,
and through the static (graph) decode step as through the plain one?

Each check runs the tiny built-in model (random weights, seed 0) twice on the same prompt and
compares the prompt's logits (row 0): max abs difference, whether every bit is equal, and
whether every greedy token is. Decode steps are teacher-forced (the batched row is fed the
alone run's tokens), so each step's logits are comparable; "greedy" says whether each step's
argmax equals the alone run's.

- ``batch``: alone ``[1, L]`` vs row 0 of ``[3, L]`` (same length): the prefill's logits at
  every position (no cache), then the cached prefill's last logits and each decode step's;
- ``same cache``: the decode steps alone vs as row 0 of 3 or 9 rows whose caches hold the bits
  of each row's prompt prefilled alone (what a server that prefills each request alone and
  then batches its decode steps sees);
- ``ragged rows``: :func:`dshal.model.decode.generate_rows` (each row at its own positions)
  alone vs row 0 of a batch with prompts of L-3 and L+2 tokens;
- ``ragged window``: a model with an attention window (``generate``'s PromptBatch path: the
  shortest prompt's length prefilled for all rows, the rest fed as one-token steps of the
  batch), alone vs the same batch;
- ``chunk C``: a prompt prefilled in chunks of C tokens vs one forward: the last logits and
  every layer's KV cache entries;
- ``static step``: decode through the static step (:class:`StaticDecoder`, eager: what a
  device graph replays) vs the plain step ``model(token, pos, cache)``.

Each backend variant runs in a child process (``DSHAL_CPU_KERNELS`` is read once per process):

    python benchmarks/batch_invariance.py [--variants cpu,cpu-torch,reference,strict,cpu-fp8-block] [--dtypes float32,bfloat16]
    python benchmarks/batch_invariance.py --variants nvidia-emulated,amd-emulated   # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

import dshal
from dshal.model import random_model, tiny_args
from dshal.model.decode import StaticDecoder, generate_rows
from dshal.model.generate import PromptBatch
from dshal.model.prefill import prefill

#: variant -> (backend, environment, use() keywords, whether every op is its reference).
VARIANTS: dict[str, tuple[str, dict[str, str], dict[str, Any], bool]] = {
    "cpu": ("cpu", {}, {}, False),
    "cpu-torch": ("cpu", {"DSHAL_CPU_KERNELS": "0"}, {}, False),
    "reference": ("cpu", {}, {}, True),
    "strict": ("cpu", {}, {"determinism": "strict"}, False),
    "cpu-fp8-block": ("cpu", {}, {"precision": {"gemm": "fp8-block"}}, False),
    "nvidia-emulated": ("nvidia", {"DSHAL_EMULATE": "1"}, {"emulate": True}, False),
    "amd-emulated": ("amd", {"DSHAL_EMULATE": "1"}, {"emulate": True}, False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _prompt(rows: int, length: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, bool, bool]:
    """(max abs difference, bitwise equal, argmax equal) over paired logits tensors."""
    worst, bitwise, greedy = 0.0, True, True
    for x, y in zip(a, b, strict=True):
        x, y = x.float(), y.float()
        worst = max(worst, (x - y).abs().max().item())
        bitwise &= torch.equal(x, y)
        greedy &= torch.equal(x.argmax(-1), y.argmax(-1))
    return worst, bitwise, greedy


def _cached_steps(model: Any, ids: torch.Tensor, steps: int, forced: list[int] | None) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill ``ids`` (one forward), then ``steps`` plain decode steps; row 0 fed ``forced``
    (else its own greedy tokens). Returns row 0's logits (prefill's last, then each step's)
    and row 0's tokens."""
    batch, length = ids.shape
    cache = model.new_cache(batch, length + steps)
    logits = prefill(model, ids, cache, None)
    seen, tokens = [logits[0].clone()], []
    for i in range(steps):
        token = logits.argmax(-1)
        if forced is not None:
            token[0] = forced[i]
        tokens.append(int(token[0]))
        logits = model(token[:, None], length + i, cache, last_only=True)[:, -1]
        seen.append(logits[0].clone())
    return seen, tokens


def _rows(model: Any, ids: torch.Tensor, lens: list[int], steps: int, forced: list[int] | None) -> tuple[list[torch.Tensor], list[int]]:
    """``generate_rows`` (each row at its own positions), row 0 teacher-forced as above."""
    seen: list[torch.Tensor] = []
    tokens: list[int] = []

    def choose(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits[0].clone())  # the static step's output buffer: copied before the next step
        token = logits.argmax(-1)
        if forced is not None and len(tokens) < len(forced):
            token[0] = forced[len(tokens)]
        tokens.append(int(token[0]))
        return token

    generate_rows(model, ids, lens, steps + 1, choose, prefill_chunk=None)
    return seen, tokens[:-1]


def _window_steps(model: Any, ids: torch.Tensor, lens: list[int], steps: int, forced: list[int] | None) -> tuple[list[torch.Tensor], list[int]]:
    """``generate``'s PromptBatch loop (a model with an attention window): row 0's logits at
    positions ``lens[0] - 1`` to ``lens[0] + steps - 1``, row 0 fed ``forced`` from ``lens[0]`` on."""
    prompts = PromptBatch("batch_invariance", ids, lens)
    end = lens[0] + steps
    cache = model.new_cache(ids.shape[0], max(ids.shape[1], end) + 1)
    logits = prefill(model, prompts.ids[:, : prompts.start], cache, None)
    seen, tokens = [], []
    for pos in range(prompts.start, end + 1):
        if pos >= lens[0]:
            seen.append(logits[0].clone())
        if pos == end:
            break
        token = logits.argmax(-1)
        if pos >= lens[0]:
            if forced is not None:
                token[0] = forced[pos - lens[0]]
            tokens.append(int(token[0]))
        token = prompts.force(token, pos)
        logits = model(token[:, None], pos, cache, last_only=True)[:, -1]
    return seen, tokens


def _same_cache_steps(model: Any, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Row 0's decode logits alone and in the batch ``ids``, on caches holding the same bits: each
    row prefilled alone and copied into its row of the batch's cache (only the steps differ)."""
    batch, length = ids.shape
    caches = [model.new_cache(batch, length + steps), model.new_cache(1, length + steps)]
    firsts = []
    for b in range(batch):
        alone = model.new_cache(1, length + steps)
        firsts.append(prefill(model, ids[b : b + 1], alone, None))
        for big, small in caches[0].buffer_pairs(alone):
            big[b] = small[0]
        if b == 0:
            for big, small in caches[1].buffer_pairs(alone):
                big.copy_(small)
    caches[0].length = caches[1].length = length
    token, want, got = torch.cat(firsts).argmax(-1), [], []
    for i in range(steps):
        batched = model(token[:, None], length + i, caches[0], last_only=True)[:, -1]
        got.append(batched[0].clone())
        want.append(model(token[:1, None], length + i, caches[1], last_only=True)[0, -1].clone())
        token = batched.argmax(-1)
    return want, got


def _chunked(model: Any, ids: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache = model.new_cache(1, ids.shape[1])
    last = prefill(model, ids, cache, chunk)[0].clone()
    return last, [buf[:, : ids.shape[1]].clone() for layer in cache.buffers for buf in layer]


def _static_vs_plain(model: Any, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    length = ids.shape[1]
    plain, static = model.new_cache(1, length + steps, "absorb"), model.new_cache(1, length + steps, "absorb", static=True)
    logits = prefill(model, ids, plain, None)
    prefill(model, ids, static, None)
    decoder = StaticDecoder(model, static, lambda fn: fn)
    want, got = [], []
    for i in range(steps):
        token = logits.argmax(-1)
        logits = model(token[:, None], length + i, plain, last_only=True)[:, -1]
        want.append(logits[0].clone())
        got.append(decoder(token, length + i)[0].clone())
    return want, got


def measure(dtype: torch.dtype, length: int, steps: int, chunks: list[int], layers: int | None) -> list[dict[str, Any]]:
    """Every check on the active runtime, for the tiny model in ``dtype``."""
    extra = {} if layers is None else {"num_hidden_layers": layers}
    model = random_model(tiny_args(dtype=dtype, **extra), seed=0)
    vocab = model.args.vocab_size
    alone = _prompt(1, length, 1, vocab)
    rows: list[dict[str, Any]] = []

    def row(check: str, a: list[torch.Tensor], b: list[torch.Tensor], scale: float) -> None:
        worst, bitwise, greedy = _diff(a, b)
        rows.append({"check": check, "max_abs": worst, "rel": worst / scale if scale else 0.0, "bitwise": bitwise, "greedy": greedy})

    with torch.inference_mode():
        batch = torch.cat((alone, _prompt(2, length, 2, vocab)))
        full_alone, full_batch = model(alone)[0], model(batch)[0]
        scale = full_alone.float().abs().max().item()
        row("batch: prefill, every position", [full_alone], [full_batch], scale)
        want, tokens = _cached_steps(model, alone, steps, None)
        got, _ = _cached_steps(model, batch, steps, tokens)
        row("batch: cached prefill, last", want[:1], got[:1], scale)
        row(f"batch: {steps} decode steps", want[1:], got[1:], scale)

        for rows_in_batch in (3, 9):  # the cpu backend's C paths take up to 8 rows
            want, got = _same_cache_steps(model, _prompt(rows_in_batch, length, 6, vocab), steps)
            row(f"same cache: {steps} decode steps, {rows_in_batch} rows", want, got, scale)

        lens = [length, length - 3, length + 2]
        ragged = torch.cat((torch.cat((alone, _prompt(1, 2, 3, vocab)), dim=1), _prompt(2, length + 2, 4, vocab)))
        want, tokens = _rows(model, alone, [length], steps, None)
        got, _ = _rows(model, ragged, lens, steps, tokens)
        row("ragged rows: prefill, last", want[:1], got[:1], scale)
        row(f"ragged rows: {steps} decode steps", want[1:], got[1:], scale)

        windowed = random_model(tiny_args(dtype=dtype, attention_window=4 * length, **extra), seed=0)
        want, tokens = _window_steps(windowed, alone, [length], steps, None)
        got, _ = _window_steps(windowed, ragged, lens, steps, tokens)
        row("ragged window: prefill, last", want[:1], got[:1], scale)
        row(f"ragged window: {steps} decode steps", want[1:], got[1:], scale)

        long = _prompt(1, 4 * length, 5, vocab)
        whole_last, whole_cache = _chunked(model, long, None)
        for chunk in chunks:
            last, cache = _chunked(model, long, chunk)
            row(f"chunk {chunk}: last logits ({4 * length} tokens)", [whole_last], [last], scale)
            worst, bitwise, _ = _diff(whole_cache, cache)
            ref = max(t.float().abs().max().item() for t in whole_cache)
            rows.append({"check": f"chunk {chunk}: KV cache", "max_abs": worst, "rel": worst / ref, "bitwise": bitwise, "greedy": None})

        want, got = _static_vs_plain(model, alone, steps)
        row(f"static step: {steps} decode steps", want, got, scale)
    return rows


@contextlib.contextmanager
def _all_references(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    with dshal.runtime.reference_ops():
        yield


def child(variant: str, opts: argparse.Namespace) -> None:
    backend, _env, keywords, references = VARIANTS[variant]
    runtime = dshal.use(backend=backend, **keywords)
    torch.set_num_threads(opts.threads)
    out = []
    for name in opts.dtypes.split(","):
        with _all_references(references):
            for r in measure(DTYPES[name], opts.prompt_len, opts.new_tokens, [int(c) for c in opts.chunks.split(",")], opts.layers):
                out.append({"variant": variant, "dtype": name, "emulated": runtime.emulated, **r})
    print(json.dumps(out))


def _fmt(r: dict[str, Any]) -> str:
    greedy = "-" if r["greedy"] is None else ("yes" if r["greedy"] else "NO")
    return (f"| {r['variant']} | {r['dtype']} | {r['check']} | {r['max_abs']:.3g} | {r['rel']:.2g} | "
            f"{'yes' if r['bitwise'] else 'no'} | {greedy} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="cpu,cpu-torch,reference,strict", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=4, help="decode steps compared")
    parser.add_argument("--chunks", default="1,7,16", help="comma-separated prefill chunk sizes (vs one forward)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the tiny model's 3 (emulated runs)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.prompt_len < 4:
        parser.error("--prompt-len must be at least 4 (the ragged batch holds a prompt 3 tokens shorter)")
    if opts.child is not None:
        child(opts.child, opts)
        return 0
    print(f"tiny model ({opts.layers or 3} layers, hidden 128, 16 experts top-4), prompt {opts.prompt_len} tokens (chunks: {4 * opts.prompt_len}), "
          f"{opts.threads} thread(s); {platform.processor() or platform.machine()}; torch {torch.__version__}")
    print("| variant | dtype | check (row 0 vs alone / one forward / plain step) | max abs diff | relative (to the largest logit or cache entry) | bitwise | greedy equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(opts).items() if k not in ("variants", "child") and v is not None]
    failed = 0
    for variant in opts.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: unknown {variant!r}, expected some of {', '.join(VARIANTS)}")
        env = {**os.environ, **VARIANTS[variant][1]}
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--child", variant], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            failed += 1
            print(f"| {variant} | - | failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode} | | | | |")
            continue
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            print(_fmt(r))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
