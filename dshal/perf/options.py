"""The options ``dshal bench`` and ``dshal profile`` share, importable without torch: the
commands' parsers are built from here, so their ``--help`` and usage errors start at once."""

from __future__ import annotations

import argparse


def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """``--config --backend --emulate --output --json --threads --no-progress``."""
    parser.add_argument(
        "--config", metavar="F", help="dshal config file (default: DSHAL_CONFIG or the built-in defaults)"
    )
    parser.add_argument("--backend", metavar="NAME", help="backend to use (default: the config's, usually auto)")
    parser.add_argument("--emulate", action="store_true", default=None,
                        help="run GPU plugins' own code on CPU tensors (same as DSHAL_EMULATE=1)")
    default = f"dshal-{command}.html"
    parser.add_argument("--output", default=default, metavar="report.html", help=f"HTML report (default {default})")
    parser.add_argument("--json", metavar="F", help="JSON results (default: the HTML path with .json)")
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch CPU threads (default: torch's, at most a container's CPU quota; 1 is steadier on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


__all__ = ["add_common_arguments"]
