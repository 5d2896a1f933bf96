"""The case model: declarative rows expanded into :class:`Case` objects the runner executes.

A family module (one per op family) declares *tables*: a list of rows, each a dict of
shapes, dtypes, op parameters and the tiers it belongs to. :func:`accuracy_cases` turns a
table plus a ``build`` function (row -> inputs) and a ``judge`` function (outputs ->
checks) into cases; :func:`bad_input_cases` does the same for inputs that must be
rejected with a given error class.

Every case is deterministic: its inputs come from a ``torch.Generator`` seeded with
:func:`case_seed` (the run's seed and the case id), so a case id reproduces one case.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError, UnsupportedOpError
from dshal_conformance.judge import Check, Verdict, verdict

TIERS = ("ci", "full")
KINDS = ("accuracy", "edge", "bad_input", "capability", "collective", "model", "determinism", "graph")


def case_seed(seed: int, case_id: str) -> int:
    """The seed of one case: the run's seed mixed with a stable hash of the case id."""
    return (seed * 1_000_003 + zlib.crc32(case_id.encode())) % (2**31 - 1)


@dataclass
class Inputs:
    """One call's arguments (CPU tensors) plus what the judge needs besides them."""

    kwargs: dict[str, Any]
    #: Arguments for the float64 oracle when they differ (e.g. ``fmt="e4m3"`` resolved).
    oracle_kwargs: dict[str, Any] | None = None
    #: Anything else the judge uses (e.g. FP8 GEMM's pre-quantization inputs).
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What one case (or one of its judgements) concluded."""

    suffix: str
    verdict: Verdict


class Context:
    """What a case sees of the backend under test: its checked ops, device and formats."""

    def __init__(
        self,
        *,
        table: Mapping[str, Callable[..., Any]],
        provided: frozenset[str],
        device: torch.device,
        native_e4m3: str,
        fp8_formats: Sequence[str],
        seed: int,
    ):
        self.table = table
        self.provided = provided
        self.device = device
        self.native_e4m3 = native_e4m3
        self.fp8_formats = tuple(fp8_formats)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: metric -> loosened threshold, from the waivers that match this case.
        self.overrides: dict[str, float] = {}

    # ---------------------------------------------------------------- inputs
    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        # Drawn in float32: full-tier weights are large, and every dtype used is at most that precise.
        return (torch.randn(shape, generator=self.generator, dtype=torch.float32) * scale).to(dtype)

    def randint(self, low: int, high: int, *shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.generator, dtype=dtype)

    def fp8(self, fmt: str) -> str:
        """A concrete FP8 format name (``"e4m3"`` -> the backend's native E4M3)."""
        return self.native_e4m3 if fmt == "e4m3" else fmt

    # ---------------------------------------------------------------- calls
    def place(self, value: Any, noncontiguous: bool = False) -> Any:
        """``value`` on the backend's device; non-contiguous (every other column of a wider
        buffer) when asked, with the same values."""
        if not isinstance(value, torch.Tensor):
            return value
        if not noncontiguous or value.dim() == 0:
            return value.to(self.device)
        wide = torch.zeros((*value.shape[:-1], 2 * value.shape[-1]), dtype=value.dtype, device=self.device)
        view = wide[..., ::2]
        view.copy_(value.to(self.device))
        return view

    def call(self, op: str, kwargs: Mapping[str, Any], noncontiguous: Iterable[str] = ()) -> Any:
        """Run the backend's checked ``op`` on device copies of ``kwargs``; the result comes back on the CPU."""
        strided = set(noncontiguous)
        placed = {k: self.place(v, k in strided) for k, v in kwargs.items()}
        return to_cpu(self.table[op](**placed))


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


#: A case body: context -> one outcome per judgement (most cases have one, suffix "").
CaseBody = Callable[[Context], list[Outcome]]


@dataclass(frozen=True)
class Case:
    """One reproducible check of one op (or collective) on the backend under test."""

    id: str
    op: str
    kind: str
    dtype: str
    params: Mapping[str, Any]
    tiers: frozenset[str]
    #: None for collectives (the runner runs those across processes).
    body: CaseBody | None = None
    #: Judgement suffixes this case reports (``""``: one, named by the id).
    suffixes: tuple[str, ...] = ("",)
    world_size: int = 0

    def result_ids(self) -> list[str]:
        return [self.id + s for s in self.suffixes]


def dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return ""
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def _tiers(row: Mapping[str, Any]) -> frozenset[str]:
    tier = row.get("tier", "ci")
    # Edge cases and the ci rows also run in the full tier: full is a superset.
    return frozenset(TIERS) if tier in ("ci", "both") else frozenset({tier})


def _params(row: Mapping[str, Any]) -> dict[str, Any]:
    skip = {"tier", "name", "kind", "dtype"}
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in skip or callable(v):
            continue
        if isinstance(v, torch.dtype):
            v = dtype_name(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


# ---------------------------------------------------------------- accuracy cases
Build = Callable[[Context, Mapping[str, Any]], Inputs]
Judge = Callable[[Context, Mapping[str, Any], Any, Any, Inputs], "list[Check] | dict[str, list[Check]]"]


def unsupported_outcomes(suffixes: Sequence[str], reason: str) -> list[Outcome]:
    return [Outcome(s, Verdict("unsupported", None, None, None, reason)) for s in suffixes]


def fail_all(suffixes: Sequence[str], status: str, reason: str) -> list[Outcome]:
    return [Outcome(s, Verdict(status, None, None, None, reason)) for s in suffixes]


def run_accuracy(
    ctx: Context,
    op: str,
    row: Mapping[str, Any],
    build: Build,
    judge: Judge,
    suffixes: Sequence[str],
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
) -> list[Outcome]:
    """Build inputs, call the backend, compute the float64 oracle, judge."""
    from dshal.ops.catalogue import SPECS

    inputs = build(ctx, row)
    declared = op in ctx.provided
    unsupported_variant = variant_supported(ctx, row) if variant_supported else None
    try:
        out = ctx.call(op, inputs.kwargs, row.get("noncontiguous", ()))
    except UnsupportedOpError as err:
        if not declared:
            return unsupported_outcomes(suffixes, f"backend does not provide {op!r} and raised UnsupportedOpError as required: {err}")
        if unsupported_variant:
            return unsupported_outcomes(suffixes, f"{unsupported_variant}; raised UnsupportedOpError: {err}")
        return fail_all(suffixes, "fail", f"the backend declares {op!r} supported but raised UnsupportedOpError: {err}")
    except DshalError as err:
        return fail_all(suffixes, "fail", f"valid input rejected with {type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - a crash is a finding, not a suite error
        return fail_all(suffixes, "error", f"crashed with {type(err).__name__}: {err}")
    if not declared:
        return fail_all(
            suffixes, "fail", f"the backend does not declare {op!r} but the call returned instead of raising UnsupportedOpError"
        )
    ref = SPECS[op].run_oracle(**(inputs.oracle_kwargs or inputs.kwargs))
    judged = judge(ctx, row, out, ref, inputs)
    if isinstance(judged, list):
        judged = {"": judged}
    return [Outcome(s, verdict(judged[s], ctx.overrides)) for s in suffixes]


def accuracy_cases(
    op: str,
    table: Iterable[Mapping[str, Any]],
    build: Build,
    judge: Judge,
    *,
    suffixes: Sequence[str] = ("",),
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
) -> list[Case]:
    """One case per table row; ``row["name"]`` names it, ``row["kind"]`` says accuracy or edge."""
    cases = []
    for row in table:
        row = dict(row)
        kind = row.get("kind", "accuracy")
        case_id = f"{op}/{row['name']}"

        def body(ctx: Context, row: Mapping[str, Any] = row) -> list[Outcome]:
            return run_accuracy(ctx, op, row, build, judge, suffixes, variant_supported)

        cases.append(
            Case(case_id, op, kind, dtype_name(row.get("dtype")), _params(row), _tiers(row), body, tuple(suffixes))
        )
    return cases


# ---------------------------------------------------------------- inputs that must be rejected
@dataclass(frozen=True)
class BadInput:
    """A valid call (``base`` row built by ``build``) spoiled by ``spoil``; must raise ``error``."""

    name: str
    spoil: Callable[[dict[str, Any]], dict[str, Any]]
    error: type[DshalError]
    what: str


def on_meta(arg: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Spoiler: move one argument to the ``meta`` device (a device the backend cannot be using)."""

    def spoil(kw: dict[str, Any]) -> dict[str, Any]:
        return {**kw, arg: kw[arg].to("meta")}

    return spoil


def replace_arg(arg: str, make: Callable[[Any], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def spoil(kw: dict[str, Any]) -> dict[str, Any]:
        return {**kw, arg: make(kw[arg])}

    return spoil


def standard_bad_inputs(
    *,
    dtype: tuple[str, torch.dtype],
    shape: tuple[str, Callable[[Any], Any], str],
    device: str,
    extra: Iterable[BadInput] = (),
) -> list[BadInput]:
    """The trio every op gets -- ``dtype=(arg, wrong dtype)``, ``shape=(arg, spoil, what)``,
    ``device=arg`` (moved to ``meta``) -- plus any ``extra`` spoilers."""
    arg, wrong = dtype
    name = dtype_name(wrong)
    return [
        BadInput("dtype", replace_arg(arg, lambda t: t.to(wrong)), DTypeError, f"{name} {arg!r}"),
        BadInput("shape", replace_arg(shape[0], shape[1]), ShapeError, shape[2]),
        BadInput("device", on_meta(device), DeviceError, f"{device!r} on another device"),
        *extra,
    ]


def op_cases(
    op: str,
    table: Sequence[Mapping[str, Any]],
    build: Build,
    judge: Judge,
    bad: Iterable[BadInput],
    *,
    suffixes: Sequence[str] = ("",),
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
    bad_base: Mapping[str, Any] | None = None,
) -> list[Case]:
    """An op's accuracy/edge cases from ``table`` and its bad-input cases (spoiling
    ``bad_base``, default the table's first row)."""
    return accuracy_cases(op, table, build, judge, suffixes=suffixes, variant_supported=variant_supported) + bad_input_cases(
        op, table[0] if bad_base is None else bad_base, build, bad
    )


def run_rejection(ctx: Context, op: str, kwargs: dict[str, Any], error: type[DshalError], what: str, suffixes: Sequence[str] = ("",)) -> list[Outcome]:
    """Call ``op`` with inputs that must be rejected with ``error``."""
    try:
        result = ctx.table[op](**kwargs)
    except UnsupportedOpError as err:
        if op not in ctx.provided:
            return unsupported_outcomes(suffixes, f"backend does not provide {op!r}: {err}")
        status, reason = ("pass", f"raised {type(err).__name__}: {err}") if issubclass(UnsupportedOpError, error) else (
            "fail", f"{what}: raised UnsupportedOpError, expected {error.__name__}: {err}")
    except error as err:
        status, reason = "pass", f"raised {type(err).__name__} as required: {err}"
    except DshalError as err:
        status, reason = "fail", f"{what}: raised {type(err).__name__}, expected {error.__name__}: {err}"
    except Exception as err:  # noqa: BLE001
        status, reason = "fail", f"{what}: crashed with {type(err).__name__} instead of raising {error.__name__}: {err}"
    else:
        shape = list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        status, reason = "fail", f"{what}: accepted the bad input and returned {shape} instead of raising {error.__name__}"
    if op not in ctx.provided and status == "fail":
        reason += f" (and the backend does not declare {op!r}: it should raise UnsupportedOpError)"
    return [Outcome(s, Verdict(status, "raises", None, None, reason)) for s in suffixes]


def bad_input_cases(op: str, base: Mapping[str, Any], build: Build, bad: Iterable[BadInput]) -> list[Case]:
    """One ``bad_input`` case per spoiler, all derived from the valid ``base`` row."""
    cases = []
    for spoiler in bad:

        def body(ctx: Context, spoiler: BadInput = spoiler) -> list[Outcome]:
            inputs = build(ctx, base)
            placed = {k: ctx.place(v) for k, v in inputs.kwargs.items()}
            return run_rejection(ctx, op, spoiler.spoil(placed), spoiler.error, spoiler.what)

        params = {"spoil": spoiler.what, "expects": spoiler.error.__name__, "base": _params(base)}
        cases.append(
            Case(f"{op}/bad_input/{spoiler.name}", op, "bad_input", dtype_name(base.get("dtype")), params, frozenset(TIERS), body)
        )
    return cases


def rejection_case(op: str, name: str, row: Mapping[str, Any], build: Build, error: type[DshalError], what: str) -> Case:
    """An ``edge`` case whose valid-looking input the op's contract rejects (e.g. K % 128 with a floor-sized scale)."""

    def body(ctx: Context) -> list[Outcome]:
        inputs = build(ctx, row)
        placed = {k: ctx.place(v) for k, v in inputs.kwargs.items()}
        return run_rejection(ctx, op, placed, error, what)

    params = {**_params(row), "expects": error.__name__}
    return Case(f"{op}/{name}", op, "edge", dtype_name(row.get("dtype")), params, _tiers(row), body)


# ---------------------------------------------------------------- value patterns
def fill_pattern(t: torch.Tensor, pattern: str | None, ctx: Context) -> torch.Tensor:
    """Edge-case values: ``nan_inf`` (NaN, +Inf, -Inf at fixed spots), ``subnormal``
    (float32 subnormals), ``zero_rows`` (every other row zero), ``small`` (rms ~ 1e-3)."""
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
    if pattern == "zero_rows":
        t[..., ::2, :] = 0
        return t
    raise ValueError(f"unknown value pattern {pattern!r}")
