"""``dshal profile``'s options, importable without torch: ``dshal profile --help`` and its
usage errors start at once; :func:`main` imports the command (:mod:`dshal.perf.profile`) to run it."""

from __future__ import annotations

import argparse

from dshal.cliargs import seed
from dshal.hub import CHECKPOINT_HELP, CHECKPOINT_METAVAR
from dshal.perf.options import add_common_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "profile")
    parser.add_argument(
        "--checkpoint", metavar=CHECKPOINT_METAVAR, help=f"{CHECKPOINT_HELP} (default: the tiny random model)"
    )
    parser.add_argument("--prompt-len", type=int, default=32, metavar="N", help="prompt tokens (default 32)")
    parser.add_argument(
        "--new-tokens", type=int, default=8, metavar="N", help="tokens generated while profiling (default 8)"
    )
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="sequences generated together (default 1)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random weights and prompt (default 0)")
    parser.add_argument(
        "--overhead-pairs",
        type=int,
        default=7,
        metavar="N",
        help="interleaved A/B forward pairs measuring the profiling-off overhead (0 skips; default 7)",
    )


def main(args: argparse.Namespace) -> int:
    from dshal.perf.profile import main as run_profile  # lazy: start-up time (dshal profile --help loads no torch)

    return run_profile(args)


__all__ = ["add_arguments", "main"]
