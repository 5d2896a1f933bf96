"""Options and start-up shared by ``dshal bench`` and ``dshal profile``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from dshal.errors import DshalError


def add_common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """``--config --backend --output --json --threads --no-progress``."""
    parser.add_argument(
        "--config", metavar="F", help="dshal config file (default: DSHAL_CONFIG or the built-in defaults)"
    )
    parser.add_argument("--backend", metavar="NAME", help="backend to use (default: the config's, usually auto)")
    default = f"dshal-{command}.html"
    parser.add_argument("--output", default=default, metavar="report.html", help=f"HTML report (default {default})")
    parser.add_argument("--json", metavar="F", help="JSON results (default: the HTML path with .json)")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None: leave torch's setting)."""
    if threads is None:
        return
    if threads < 1:
        raise DshalError(f"--threads: got {threads}, expected an integer >= 1")
    torch.set_num_threads(threads)


def start(args: argparse.Namespace) -> Any:
    """Apply ``--threads`` and activate the runtime of ``--config`` / ``--backend``."""
    import dshal
    from dshal.outputs import check_writable

    check_writable(args.output, "--output")  # before the run, not after it
    check_writable(json_path(args), "--json")
    set_threads(args.threads)
    return dshal.use(args.config, **({"backend": args.backend} if args.backend else {}))


def json_path(args: argparse.Namespace) -> Path:
    """``--json``, or the HTML path with ``.json``."""
    return Path(args.json) if args.json else Path(args.output).with_suffix(".json")


__all__ = ["add_common_arguments", "json_path", "set_threads", "start"]
