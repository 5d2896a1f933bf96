"""``dshal diff``'s options, importable without torch: ``dshal diff --help`` and its usage
errors start at once; :func:`main` imports the command (:mod:`dshal_conformance.diff`) to run it."""

from __future__ import annotations

import argparse

from dshal.hub import CHECKPOINT_HELP, CHECKPOINT_METAVAR

#: Decode steps compared by default: the generate path (KV cache, absorbed MLA, trusted
#: steps) is where most inference time goes and where prefill-only comparisons are blind;
#: a few one-token steps cost little next to the prefill.
DEFAULT_DECODE = 4
#: How the decode steps run (see :mod:`dshal_conformance.diff`'s docstring).
DECODE_PATHS = ("generate", "static")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", required=True, metavar="NAME",
                        help="a backend to compare; give it twice (A, then B). 'reference' is the float64 oracle")
    parser.add_argument("--checkpoint", metavar=CHECKPOINT_METAVAR,
                        help=f"{CHECKPOINT_HELP} (default: the conformance suite's seeded tiny one)")
    parser.add_argument("--precision", metavar="MODE", default="high",
                        help="precision mode of both models: high (the checkpoint's dtype) or a precision.gemm mode "
                             "(fp8-block, fp8-row, fp8-tensor, ...); default: high")
    parser.add_argument("--prompt-len", type=int, default=8, metavar="N", help="prompt tokens (seeded random ids; default 8)")
    parser.add_argument("--emulate", action="store_true", default=None,
                        help="run GPU plugins' own code on CPU tensors (same as DSHAL_EMULATE=1)")
    parser.add_argument("--json", metavar="F", help="write the comparison as JSON to F")
    parser.add_argument("--html", metavar="F", help="write an HTML report to F (the profile report's style)")
    parser.add_argument("--top", type=int, default=12, metavar="N", help="op calls shown in the terminal table (default 12)")
    parser.add_argument("--decode", type=int, default=DEFAULT_DECODE, metavar="N",
                        help=f"after the prefill, compare N greedy decode steps (KV cache, absorbed MLA, trusted steps); "
                             f"both backends are fed the same tokens, A's greedy choice (teacher forcing), so one flipped "
                             f"argmax does not make later steps incomparable; each step reports whether B's greedy token "
                             f"would have differed. 0 = the prefill alone, without a cache (default {DEFAULT_DECODE})")
    parser.add_argument("--decode-path", choices=DECODE_PATHS, default="generate",
                        help="generate: the decode step model.generate() runs (cache in the checkpoint's mla_mode); "
                             "static: dshal.model.decode's static step, what a device graph captures, run eagerly "
                             "(absorb cache); default generate")


def main(args: argparse.Namespace) -> int:
    from dshal_conformance.diff import main as run_diff  # lazy: start-up time (dshal diff --help loads no torch)

    return run_diff(args)


__all__ = ["DECODE_PATHS", "DEFAULT_DECODE", "add_arguments", "main"]
