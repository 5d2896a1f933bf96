"""``dshal tune``'s options, importable without torch or triton: ``dshal tune --help`` and its
usage errors start at once; :func:`main` imports the command (:mod:`dshal.kernels.triton.tune`)
to run it."""

from __future__ import annotations

import argparse

from dshal.kernels.kernels_command import TARGET_NAMES

#: ``--dry-run``'s (N, K) shapes and M rows: 1, 16 (``target.DECODE_M``, the decode tiles'
#: bound, whose module imports torch; a test keeps the two the same) and 48.
DRY_RUN_SHAPES = ((256, 512), (200, 384))
DRY_RUN_M = (1, 16, 48)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", help="GPU backend whose kernel target is tuned (default: the configured one)")
    parser.add_argument("--shapes", help="'N,K;N,K...' (default: DeepSeek-V3's FP8 linear shapes; with --dry-run, "
                        f"{';'.join(f'{n},{k}' for n, k in DRY_RUN_SHAPES)})")
    parser.add_argument("--m", help="comma-separated M values; each tunes its power-of-two bucket (default 1..4096; "
                        f"with --dry-run, {','.join(map(str, DRY_RUN_M))})")
    parser.add_argument("--output", metavar="F", help="table to write (default: $DSHAL_CACHE_DIR/gemm-tuning/<target>.json; "
                        "with --dry-run, none: the check writes no table)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run each candidate tile once under the Triton interpreter on tiny shapes and "
                             "check it (no timings; the table is marked dry_run and never chooses tiles)")  # fmt: skip
    parser.add_argument("--target", choices=sorted(TARGET_NAMES), help="with --dry-run: the target's tiles")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="start no new (N, K, M bucket) after S seconds; the table then says complete: false "
                             "(default: no limit). The table is rewritten after every entry")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from dshal.kernels.triton.tune import main as run_tune  # lazy: start-up time (dshal tune --help loads no torch)

    return run_tune(args)


__all__ = ["DRY_RUN_M", "DRY_RUN_SHAPES", "add_arguments", "main"]
