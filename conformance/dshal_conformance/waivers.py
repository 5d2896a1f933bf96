"""Waivers: the only way a vendor may skip a case or loosen a threshold.

They live in the plugin's ``conformance-waivers.yaml``, in its package (``plugins/<vendor>/dshal_<vendor>/``
in this repository; see :func:`default_path`), or ``--waivers PATH``::

    waivers:
      - match: "attention/*/window*"       # fnmatch glob over case ids (result ids too)
        skip: true
        reason: "sliding window lands in v0.3 (issue #12)"
      - match: "fp8_gemm/*/vs-prequant"
        thresholds: {similarity_vs_prequant: 2.0e-3}   # metric -> loosened limit
        reason: "e5m2 activations on this part; see docs/precision.md"

Every entry needs a ``reason``. The report lists each waiver with the case ids it
touched; a waiver that matched nothing is listed too (with no cases), so stale
waivers are visible.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dshal.config import read_yaml
from dshal.errors import ConfigError
from dshal.redact import code_path
from dshal_conformance.tolerances import CLOSENESS_METRIC, THRESHOLDS

FILE_NAME = "conformance-waivers.yaml"
LOOSENABLE = (CLOSENESS_METRIC, *THRESHOLDS, "seconds_to_error")


@dataclass
class Waiver:
    match: str
    reason: str
    skip: bool = False
    thresholds: dict[str, float] = field(default_factory=dict)
    #: The file it came from, as :func:`dshal.redact.code_path` names it (a plugin's own file:
    #: ``dshal_nvidia/conformance-waivers.yaml``, not this machine's site-packages folder).
    source: str = ""
    used_by: list[str] = field(default_factory=list)

    def matches(self, case_id: str) -> bool:
        return fnmatch.fnmatchcase(case_id, self.match)

    def as_dict(self) -> dict[str, Any]:
        return {
            "match": self.match,
            "reason": self.reason,
            "action": "skip" if self.skip else "loosen",
            "thresholds": dict(self.thresholds),
            "source": self.source,
            "cases": list(self.used_by),
        }


def load(path: str | Path) -> list[Waiver]:
    """Parse and validate a waivers file; errors name the file and the entry."""
    path = Path(path)
    data = read_yaml(path, "waivers file").data or {}
    entries = data.get("waivers") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise ConfigError("expected a top-level 'waivers:' list", file=str(path))
    out = []
    for i, entry in enumerate(entries):
        where = f"waivers[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with match, reason and skip or thresholds", file=str(path))
        unknown = set(entry) - {"match", "reason", "skip", "thresholds"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}, expected match, reason, skip, thresholds", file=str(path))
        match, reason = entry.get("match"), entry.get("reason")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}.match: got {match!r}, expected a case-id glob such as 'attention/*'", file=str(path))
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(f"{where}.reason: every waiver needs a reason (got {reason!r})", file=str(path))
        skip = entry.get("skip", False)
        thresholds = entry.get("thresholds") or {}
        if not isinstance(skip, bool):
            raise ConfigError(f"{where}.skip: got {skip!r}, expected true or false", file=str(path))
        if not isinstance(thresholds, Mapping) or not all(
            k in LOOSENABLE and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for k, v in thresholds.items()
        ):
            raise ConfigError(
                f"{where}.thresholds: got {thresholds!r}, expected metric -> a finite number >= 0 with metrics from {list(LOOSENABLE)}",
                file=str(path),
            )
        if not skip and not thresholds:
            raise ConfigError(f"{where}: says neither skip: true nor thresholds: {{...}}", file=str(path))
        out.append(Waiver(match, reason.strip(), skip, {k: float(v) for k, v in thresholds.items()}, code_path(str(path))))
    return out


def default_path(backend: Any, name: str, search_from: Path | None = None) -> Path | None:
    """The waivers file of the plugin serving ``backend``: ``conformance-waivers.yaml`` inside
    its package (shipped in its wheel as package data), else next to it (one level up: a
    source checkout's distribution root, the layout before the file moved into the package),
    else ``plugins/<name>/`` under the working directory."""
    candidates = []
    try:
        module_file = inspect.getsourcefile(type(backend))
    except TypeError:
        module_file = None
    if module_file:
        pkg = Path(module_file).resolve().parent
        candidates += [pkg / FILE_NAME, pkg.parent / FILE_NAME]
    candidates.append((search_from or Path.cwd()) / "plugins" / name / FILE_NAME)
    return next((p for p in candidates if p.is_file()), None)


def for_case(waivers: list[Waiver], result_ids: list[str]) -> list[Waiver]:
    return [w for w in waivers if any(w.matches(i) for i in result_ids)]


def thresholds(waivers: list[Waiver]) -> dict[str, float]:
    """metric -> loosened threshold, from ``waivers`` (a later waiver's value wins)."""
    return {metric: limit for w in waivers for metric, limit in w.thresholds.items()}
