"""``dshal bench``'s options, importable without torch: ``dshal bench --help`` and its usage
errors start at once; :func:`main` imports the command (:mod:`dshal.perf.bench`) to run it."""

from __future__ import annotations

import argparse

from dshal.cliargs import seed
from dshal.perf.options import add_common_arguments

#: Auto rotation: enough input sets to cover this many bytes (past most last-level caches)...
ROTATE_TARGET_BYTES = 64 << 20
#: ...between 2 and this many sets; a single set when one set alone exceeds ROTATE_SINGLE_BYTES.
ROTATE_MAX_SETS = 8
ROTATE_SINGLE_BYTES = 1 << 30
#: Timed calls a case gets at least, unless --min-runs or a smaller --runs says otherwise.
DEFAULT_MIN_RUNS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "bench")
    parser.add_argument(
        "--ops", metavar="a,b", help="comma-separated ops to bench (default: every op in the shape set)"
    )
    parser.add_argument(
        "--shapes",
        default="ci",
        metavar="ci|full|FILE.yaml",
        help="shape set: ci (small, seconds on a CPU), full (DeepSeek-V3 dims) or a YAML file of cases (default ci)",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, metavar="N", help="untimed calls per provider and case (default 3)"
    )
    parser.add_argument(
        "--runs", type=int, default=200, metavar="N", help="at most N timed calls per provider and case (default 200)"
    )
    parser.add_argument("--min-runs", type=int, metavar="N",
                        help=f"at least N timed calls (default {DEFAULT_MIN_RUNS}, or --runs where that is fewer)")
    parser.add_argument(
        "--time-per-case",
        type=float,
        default=0.25,
        metavar="S",
        help="stop timing a provider after S seconds once --min-runs are done (default 0.25)",
    )
    parser.add_argument(
        "--rotate", type=int, metavar="N",
        help=f"input sets cycled between calls (default: auto by size, 2-{ROTATE_MAX_SETS}; 1 where one set alone "
        f"holds {ROTATE_SINGLE_BYTES >> 30} GiB or more)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference column")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-direct column")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random inputs (default 0)")


def main(args: argparse.Namespace) -> int:
    from dshal.perf.bench import main as run_bench  # lazy: start-up time (dshal bench --help loads no torch)

    return run_bench(args)


__all__ = ["DEFAULT_MIN_RUNS", "ROTATE_MAX_SETS", "ROTATE_SINGLE_BYTES", "ROTATE_TARGET_BYTES", "add_arguments", "main"]
