"""``dshal kernels``' options, importable without torch or triton: ``dshal kernels --help`` and
its usage errors start at once; :func:`main` imports the command
(:mod:`dshal.kernels.triton.crosscompile`) to run it."""

from __future__ import annotations

import argparse

#: The targets ``--target`` takes: the names of ``crosscompile.COMPILE_TARGETS`` (whose module
#: imports torch; a test keeps the two the same).
TARGET_NAMES = ("sm_90a", "sm_100a", "sm_120a", "gfx942", "gfx950")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", action="append", choices=sorted(TARGET_NAMES), required=True,
                        help="GPU target to compile for (repeat for several): sm_90a (H100/H200), sm_100a (B200/GB200/B300), "
                             "sm_120a (RTX PRO 6000 Blackwell / RTX 50), gfx942 (MI300X), gfx950 (MI350)")  # fmt: skip
    parser.add_argument("--json", metavar="F", help="also write the rows as JSON to F")
    parser.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2; at most the CPUs this process may use)")
    parser.add_argument("--no-cache", action="store_true", help="recompile every config (ignore the result cache)")


def main(args: argparse.Namespace) -> int:
    from dshal.kernels.triton.crosscompile import main as run_kernels  # lazy: start-up time (--help loads no torch)

    return run_kernels(args)


__all__ = ["TARGET_NAMES", "add_arguments", "main"]
