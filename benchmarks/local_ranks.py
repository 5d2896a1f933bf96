"""Run a benchmark's ranks on this machine and read what rank 0 prints.

A benchmark started with ``--worker`` runs as one rank (gloo on 127.0.0.1, through
:class:`dshal.parallel.launch.LocalJob`) and rank 0 prints one line ``RESULTS <json>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def run_ranks(name: str, argv: Sequence[str], ranks: int, timeout_s: float = 1800) -> Any:
    """Start ``argv`` as ``ranks`` local ranks and return rank 0's ``RESULTS`` value; a rank
    that fails ends the benchmark (``name`` prefixes the message) with its stderr."""
    from dshal.parallel.launch import LocalJob  # lazy: torch loads only when ranks are launched

    with LocalJob(list(argv), ranks, capture=True) as job:
        runs = job.communicate(timeout_s=timeout_s)
    for code, _, err in runs:
        if code != 0:
            raise SystemExit(f"{name}: a rank exited with {code}:\n{err[-3000:]}")
    line = next(line for line in runs[0][1].splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])
