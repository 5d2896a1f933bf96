"""Example inputs: the shape rows every op declares next to its spec and reference, and the
one input builder per op that bench, conformance and tests all draw from.

A :class:`ShapeRow` is data: an op, a name, the row's parameters (shapes, dtypes, op
arguments, value patterns) and the tiers it belongs to. An op module declares its rows
with its builder (``@rms_norm.examples(ROWS)`` on ``def build(draw, p) -> Example``);
``SPECS[op].rows`` lists them and ``SPECS[op].example_inputs(draw, row)`` builds one.

Kinds: ``accuracy`` and ``edge`` rows are conformance's cases (judged against the oracle);
``bench`` rows are ``dshal bench``'s shapes (timed). Tiers: ``ci`` (small: seconds on 2 CPU
cores, also under the Triton interpreter) and ``full`` (DeepSeek-V3's real dimensions); a
``ci`` row also belongs to ``full`` (full is a superset).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

TIERS = ("ci", "full")
KINDS = ("accuracy", "edge", "bench")
#: Keys of a table row that describe the row rather than the inputs.
_ROW_KEYS = ("name", "tier", "kind")


@dataclass(frozen=True)
class ShapeRow:
    """One example of one op: ``params`` say what to build (see the op's builder)."""

    op: str
    name: str
    params: Mapping[str, Any]
    tiers: frozenset[str] = frozenset(TIERS)
    kind: str = "accuracy"

    @property
    def id(self) -> str:
        """``op/name``: conformance's case id, bench's row id."""
        return f"{self.op}/{self.name}"


def shape_rows(op: str, table: Iterable[Mapping[str, Any]]) -> tuple[ShapeRow, ...]:
    """Rows from a table of dicts: ``name`` (required), ``tier`` (``ci``, the default, or
    ``full``), ``kind`` (default ``accuracy``) and the parameters."""
    out = []
    for row in table:
        tier, kind = row.get("tier", "ci"), row.get("kind", "accuracy")
        if tier not in TIERS or kind not in KINDS:
            raise ValueError(f"row {op}/{row.get('name')}: tier {tier!r} / kind {kind!r}, expected {TIERS} / {KINDS}")
        params = {k: v for k, v in row.items() if k not in _ROW_KEYS}
        tiers = frozenset(TIERS) if tier == "ci" else frozenset({tier})
        out.append(ShapeRow(op, row["name"], params, tiers, kind))
    return tuple(out)


def plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """A row's parameters as JSON values (dtype names, lists for tuples), as reports show them."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if callable(v) and not isinstance(v, torch.dtype):
            continue
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


@dataclass
class Example:
    """One call's arguments (CPU tensors unless built elsewhere) plus what a judge needs."""

    kwargs: dict[str, Any]
    #: Arguments for the float64 oracle when they differ (e.g. ``fmt="e4m3"`` resolved).
    oracle_kwargs: dict[str, Any] | None = None
    #: Anything else a judge uses (e.g. FP8 GEMM's pre-quantization inputs).
    extras: dict[str, Any] = field(default_factory=dict)


class Draw:
    """Where an example's random values come from: a seeded generator on ``device``, and the
    backend's native E4M3 format (what ``fmt="e4m3"`` means)."""

    def __init__(self, generator: torch.Generator, device: torch.device | str = "cpu", native_e4m3: str = "e4m3fn"):
        self.generator = generator
        self.device = torch.device(device)
        self.native_e4m3 = native_e4m3

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        # Drawn in float32: full-tier weights are large, and every dtype used is at most that precise.
        t = torch.randn(shape, generator=self.generator, dtype=torch.float32, device=self.device)
        return (t * scale).to(dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def randint(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.generator, dtype=dtype, device=self.device)

    def fp8(self, fmt: str) -> str:
        """A concrete FP8 format name (``"e4m3"`` -> the backend's native E4M3)."""
        return self.native_e4m3 if fmt == "e4m3" else fmt


def fill_pattern(t: torch.Tensor, pattern: str | None) -> torch.Tensor:
    """Edge-case values: ``nan_inf`` (NaN, +Inf, -Inf at fixed spots), ``subnormal``
    (float32 subnormals), ``zero_rows`` (every other row zero), ``small`` (rms ~ 1e-3),
    ``large`` (rms ~ 1e3: products past float16's 65504)."""
    if pattern is None or t.numel() == 0:
        return t
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
    if pattern == "nan_inf":
        n = flat.numel()
        flat[0] = float("nan")
        flat[n // 3] = float("inf")
        flat[(2 * n) // 3] = float("-inf")
        return flat.view(t.shape)
    if pattern == "subnormal":
        # 1e-39 .. 1e-41: below float32's smallest normal (1.18e-38).
        return (t.to(torch.float64) * 1e-40).to(t.dtype)
    if pattern == "small":
        return (t.to(torch.float64) * 1e-3).to(t.dtype)
    if pattern == "large":
        return (t.to(torch.float64) * 1e3).to(t.dtype)
    if pattern == "zero_rows":
        t[..., ::2, :] = 0
        return t
    raise ValueError(f"unknown value pattern {pattern!r}")


__all__ = ["Draw", "Example", "KINDS", "ShapeRow", "TIERS", "fill_pattern", "plain", "shape_rows"]
