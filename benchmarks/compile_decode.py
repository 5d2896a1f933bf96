"""Decode steps eager against ``torch.compile`` (inductor by default), side by side.

What a gpt-fast or vLLM user tries first: ``torch.compile(model)`` around the model core's
own decode call ``model(token, pos, cache)`` (a KV cache that grows by one position a step),
and ``torch.compile(static_decode_step, fullgraph=True)``, the step whose position is a
device tensor (what ``--graphs`` captures on a GPU). The cpu backend's ops are opaque
operators under compile (``dshal.backends.cpu_opaque``: the same C kernels run), so inductor
compiles the glue between them: views, concatenations, MLA's per-head products, the
embedding, SiLU-and-mul.

Model: the tiny built-in one (``tiny_args``: 3 layers, 1 dense + 2 MoE, hidden 128), random
weights, cpu backend, batch 1, a 16-token prompt. Each timed run rewinds the cache to the
prompt and decodes ``--steps`` tokens; times are the process's CPU time (one torch thread),
fastest of ``--repeats`` runs, the two interleaved. Compile time (the first calls) is
reported apart. The compiled logits are compared with eager's.

    python benchmarks/compile_decode.py [--dtype float32 bfloat16] [--steps 32] [--repeats 5] [--backend inductor]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo
from model_vs_hf import CLOCK, best_times, machine_line

import dshal
from dshal.model import random_model, tiny_args
from dshal.model.decode import static_decode_step

#: Tokens prefilled before the timed decode steps.
PROMPT = 16


def _paths(model: torch.nn.Module, backend: str, steps: int) -> dict[str, dict]:
    """Per path: its eager and compiled step runners (each decodes ``steps`` tokens after the
    prompt), the compiled one's first-call time, and the last logits of each."""
    prompt = torch.randint(0, model.args.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    out: dict[str, dict] = {}

    caches = {kind: model.new_cache(1, PROMPT + steps) for kind in ("eager", "compiled")}
    compiled_model = torch.compile(model, backend=backend)
    plain = {"eager": model, "compiled": compiled_model}
    logits: dict[str, torch.Tensor] = {}

    def dynamic(kind: str):
        def run():
            token = prompt[:, -1:]
            for i in range(steps):
                logits[kind] = plain[kind](token, PROMPT + i, caches[kind])
        return run

    with torch.inference_mode():
        for cache in caches.values():
            model(prompt, 0, cache)
    out["model(token, pos, cache)"] = {"runs": {k: dynamic(k) for k in plain}, "logits": logits}

    static = {kind: model.new_cache(1, PROMPT + steps, "absorb", static=True) for kind in ("eager", "compiled")}
    step = {"eager": static_decode_step, "compiled": torch.compile(static_decode_step, backend=backend, fullgraph=True)}
    token, position = prompt[:, -1:].clone(), torch.zeros(1, dtype=torch.int64)
    static_logits: dict[str, torch.Tensor] = {}

    def fixed(kind: str):
        def run():
            with torch.inference_mode(), dshal.ops.trusted():
                for i in range(steps):
                    position.fill_(PROMPT + i)
                    static_logits[kind] = step[kind](model, token, position, static[kind])
        return run

    with torch.inference_mode():
        for cache in static.values():
            model(prompt, 0, cache)
    out["static_decode_step"] = {"runs": {k: fixed(k) for k in step}, "logits": static_logits}

    for path in out.values():  # the first calls compile: timed apart (wall time: inductor compiles in workers too)
        path["runs"]["eager"]()
        start = time.perf_counter()
        path["runs"]["compiled"]()
        path["runs"]["compiled"]()  # a second run: dynamo's second compile (dynamic positions) happens here
        path["compile_s"] = time.perf_counter() - start
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the fastest counts (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor; eager, aot_eager)")
    opts = parser.parse_args()
    if opts.steps < 1 or opts.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    torch.set_num_threads(opts.threads)
    dshal.use(backend="cpu")
    print(machine_line())
    print(f"tiny model (3 layers: 1 dense + 2 MoE), batch 1, {PROMPT}-token prompt, {opts.steps} decode steps a run, "
          f"torch.compile backend {opts.backend!r}; process CPU time, fastest of {opts.repeats}")
    print(f"  {'dtype':9s} {'path':26s} {'eager tok/s':>12s} {'compiled tok/s':>15s} {'compiled/eager':>15s} "
          f"{'compile s':>10s} {'max |logit gap|':>16s}")
    for name in opts.dtype:
        torch._dynamo.reset()
        model = random_model(tiny_args(dtype=getattr(torch, name)), seed=0)
        for path, parts in _paths(model, opts.backend, opts.steps).items():
            best = best_times(parts["runs"], opts.repeats)
            rate = {kind: opts.steps / seconds for kind, seconds in best.items()}
            gap = float((parts["logits"]["compiled"].float() - parts["logits"]["eager"].float()).abs().max())
            print(f"  {name:9s} {path:26s} {rate['eager']:12.1f} {rate['compiled']:15.1f} "
                  f"{rate['compiled'] / rate['eager']:14.2f}x {parts['compile_s']:10.1f} {gap:16.2e}")
    print(f"(CPU time clock: {CLOCK.__name__}; the compile column is wall time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
