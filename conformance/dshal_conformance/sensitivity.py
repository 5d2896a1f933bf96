"""How far the model family's drift moves when a correct backend rounds differently: the
measurement behind the model bounds in :mod:`dshal_conformance.tolerances`.

A backend that computes every op correctly in float32 still differs from the cpu backend in
the last bits (another summation order, an approximate ``exp``). This measures what that
does to the ``model`` family's drift: every output of ``linear``, ``attention``,
``moe_experts`` and ``rms_norm`` on the cpu backend is scaled by ``1 + u * ulps * 2^-24``,
``u`` uniform in [-1, 1] from a seeded generator, and the model case's drift is measured as
the case measures it (float64 reference, router near-ties given the reference's experts),
with the greedy-token agreement of the ``/tokens`` judgement beside it.

In the FP8 modes the drift is not a sum of roundings: an activation re-quantized to E4M3
flips a code where the two sides round ``x / scale`` differently, and the layers after it
amplify the flip, so one run gives ~1e-6 and the next ~4e-2. Seeds show the spread.

    python -m dshal_conformance.sensitivity --mode fp8-tensor --size full --ulps 0,16,64,128 --seeds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

import dshal
from dshal_conformance import modelcheck as mc
from dshal_conformance.tolerances import model_tolerance

#: The ops whose outputs carry the perturbation: every op that does arithmetic on activations.
PERTURBED_OPS = ("linear", "attention", "moe_experts", "rms_norm")


def perturbed(provider: Callable[..., Any], generator: torch.Generator, relative: float) -> Callable[..., Any]:
    """``provider`` with each floating-point tensor output scaled by ``1 + u * relative``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        out = provider(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            u = torch.rand(out.shape, generator=generator, dtype=torch.float32, device=out.device) * 2 - 1
            out = (out.float() * (1 + relative * u)).to(out.dtype)
        return out

    return call


@dataclass
class Spread:
    """Drift over the seeds at one perturbation size."""

    ulps: float
    logit_drift: list[float]
    max_layer_drift: list[float]
    bound: float
    #: Per seed, the share of decisive greedy positions that agree (the ``/tokens`` judgement) ...
    token_agreement: list[float]
    #: ... and its bound (at least).
    token_bound: float

    @property
    def over(self) -> int:
        """Seeds whose drift (logits or a layer) is over the bound."""
        return sum(max(a, b) > self.bound for a, b in zip(self.logit_drift, self.max_layer_drift))

    @property
    def tokens_under(self) -> int:
        """Seeds whose greedy agreement is under its bound."""
        return sum(a < self.token_bound for a in self.token_agreement)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "over_bound": self.over, "tokens_under_bound": self.tokens_under}

    def line(self) -> str:
        d = self.logit_drift
        return (f"{self.ulps:>7g} ulps: logit drift min {min(d):.3g}, median {statistics.median(d):.3g}, "
                f"max {max(d):.3g}; max layer {max(self.max_layer_drift):.3g}; over {self.bound:g}: {self.over}/{len(d)}; "
                f"greedy agreement min {min(self.token_agreement):.3g} (under {self.token_bound:g}: {self.tokens_under}/{len(d)})")


def measure(mode: str, size: str, ulps: Iterable[float], seeds: int) -> list[Spread]:
    """The drift spread of ``mode`` on the suite checkpoint of ``size`` (``ci`` or ``full``,
    the model case's sizes) for each perturbation in ``ulps`` (0: the cpu backend as it is,
    one run) over ``seeds`` seeds. Leaves the active runtime as it found it."""
    args = mc.suite_args(size)
    checkpoint = mc.suite_checkpoint(args)
    prompt = mc.suite_prompt(args, mc.PROMPT_LEN[size])
    tol = model_tolerance(mode, args.dtype)
    active = dshal.current()
    try:
        precision = mc.precision_for(mode, mc.backend_runtime("cpu"))
        ref_model = mc.build(mc.reference_runtime(), args, checkpoint, precision, torch.float64)
        sequence = mc.greedy_reference(ref_model, prompt, mc.STEPS[size])
        ref = mc.trace(ref_model, sequence, keep_inputs=frozenset({"moe_gate"}))
        del ref_model
        spreads = []
        for n in ulps:
            logit, layer, tokens = [], [], []
            for seed in range(seeds if n else 1):
                runtime = mc.backend_runtime("cpu")
                generator = torch.Generator().manual_seed(seed)
                for op in PERTURBED_OPS:
                    runtime.table[op] = perturbed(runtime.table[op], generator, n * 2.0**-24)
                    runtime.unchecked[op] = perturbed(runtime.unchecked[op], generator, n * 2.0**-24)
                model = mc.build(runtime, args, checkpoint, precision)
                out = mc.trace(model, sequence, route=mc.RouterTies(ref.calls, tol.drift))
                logit.append(mc.rel_drift(out.logits, ref.logits))
                layer.append(max(mc.layer_drifts(out, ref).values(), default=0.0))
                basis = mc.ambiguity_basis(logit[-1], tol.drift)
                tokens.append(mc.token_agreement(out.logits, ref.logits, prompt.shape[1], basis).value)
            spreads.append(Spread(n, logit, layer, tol.drift, tokens, tol.tokens))
        return spreads
    finally:
        active.activate()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dshal_conformance.sensitivity", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mode", default="fp8-tensor", choices=mc.mode_labels(), help="precision mode (default fp8-tensor)")
    parser.add_argument("--size", default="full", choices=("ci", "full"), help="ci: the 3-layer model; full: the 6-layer one")
    parser.add_argument("--ulps", default="0,16,64,128", help="comma-separated perturbation sizes in float32 ulps")
    parser.add_argument("--seeds", type=int, default=10, help="runs per perturbation size (default 10)")
    parser.add_argument("--json", metavar="F", help="also write the spreads as JSON")
    args = parser.parse_args(argv)
    try:
        ulps = [float(u) for u in args.ulps.split(",")]
    except ValueError:
        parser.error(f"--ulps: got {args.ulps!r}, expected comma-separated numbers")
    if any(u < 0 for u in ulps) or args.seeds < 1:
        parser.error("--ulps must be >= 0 and --seeds >= 1")
    spreads = measure(args.mode, args.size, ulps, args.seeds)
    print(f"model/{'deep/' if args.size == 'full' else ''}{args.mode}: drift bound {spreads[0].bound:g}")
    for spread in spreads:
        print(spread.line())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": args.mode, "size": args.size, "spreads": [s.as_dict() for s in spreads]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
