"""The case model: the ops' example rows expanded into :class:`Case` objects the runner executes.

Every op declares its rows and their input builder next to its spec (``SPECS[op].rows``,
``SPECS[op].example_inputs``: see :mod:`dshal.ops.examples`). A family module here adds
only the judging: :func:`op_cases` turns the op's ``accuracy`` and ``edge`` rows plus a
``judge`` function (outputs -> checks) into cases, and :func:`bad_input_cases` adds the
inputs that must be rejected with a given error class.

Every case is deterministic: its inputs come from a ``torch.Generator`` seeded with
:func:`case_seed` (the run's seed and the case id), so a case id reproduces one case.
"""

from __future__ import annotations

import logging
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dshal.errors import DeviceError, DshalError, DTypeError, ProviderError, ShapeError, UnsupportedOpError
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import TIERS, Draw, Example, ShapeRow, plain
from dshal.ops.spec import FP8_DTYPES
from dshal.redact import code_path
from dshal_conformance.judge import Check, Verdict, verdict

KINDS = ("accuracy", "edge", "bad_input", "capability", "collective", "model", "determinism", "graph")


def case_seed(seed: int, case_id: str) -> int:
    """The seed of one case: the run's seed mixed with a stable hash of the case id."""
    return (seed * 1_000_003 + zlib.crc32(case_id.encode())) % (2**31 - 1)


@dataclass
class Outcome:
    """What one case (or one of its judgements) concluded."""

    suffix: str
    verdict: Verdict


class NotPlaceable(Exception):
    """An input the backend's device cannot hold: a float8 tensor where the backend declares
    ``Capabilities.fp8_storage`` False. The runner reports the case ``unsupported`` with this
    reason (a declared capability, not a failure of the backend)."""


class Context:
    """What a case sees of the backend under test: its checked ops, device and formats.
    Its random draws (``draw``, a :class:`~dshal.ops.examples.Draw`) stay on the CPU: inputs
    are built there, the oracle runs there, and :meth:`call` places them on the device."""

    def __init__(
        self,
        *,
        table: Mapping[str, Callable[..., Any]],
        provided: frozenset[str],
        device: torch.device,
        native_e4m3: str,
        fp8_formats: Sequence[str],
        seed: int,
        fp8_storage: bool = True,
        served: Mapping[str, Mapping[str, Any]] | None = None,
        emulated: bool = False,
        capabilities: Any = None,
    ):
        self.draw = Draw(torch.Generator().manual_seed(seed), "cpu", native_e4m3)
        self.table = table
        self.provided = provided
        #: The backend's device (where :meth:`call` runs the op).
        self.device = device
        self.fp8_formats = tuple(fp8_formats)
        #: False: the device cannot hold float8 tensors, so :meth:`place` refuses FP8 inputs.
        self.fp8_storage = fp8_storage
        self.seed = seed
        #: op -> how the backend serves it (``Runtime.provider_entry``: kind, and paths per weight format).
        self.served = dict(served or {})
        #: The backend runs its device code on CPU tensors (``Runtime.emulated``).
        self.emulated = emulated
        #: The backend's ``Capabilities`` (None: every optional one taken as declared), for rows
        #: that need one (an example row's ``capability`` key).
        self.capabilities = capabilities
        #: result suffix -> (metric -> loosened threshold), from the waivers that match that
        #: result id: a waiver of one result leaves its siblings alone.
        self.waived: dict[str, dict[str, float]] = {}

    def overrides(self, suffix: str) -> dict[str, float]:
        """The loosened thresholds of the result ``case id + suffix``."""
        return self.waived.get(suffix, {})

    # ---------------------------------------------------------------- calls
    def place(self, value: Any, noncontiguous: bool = False) -> Any:
        """``value`` on the backend's device; non-contiguous (every other column of a wider
        buffer) when asked, with the same values. A float8 ``value`` on a backend without
        ``fp8_storage`` raises :class:`NotPlaceable` (the case is unsupported there)."""
        if not isinstance(value, torch.Tensor):
            return value
        if not self.fp8_storage and value.dtype in FP8_DTYPES.values():
            raise NotPlaceable(
                f"FP8 input ({str(value.dtype).replace('torch.', '')}): the backend declares Capabilities.fp8_storage "
                "False (it cannot hold float8 tensors on its device), so FP8-input cases are not run on it"
            )
        if not noncontiguous or value.dim() == 0:
            return value.to(self.device)
        wide = torch.zeros((*value.shape[:-1], 2 * value.shape[-1]), dtype=value.dtype, device=self.device)
        view = wide[..., ::2]
        view.copy_(value.to(self.device))
        return view

    def call(self, op: str, kwargs: Mapping[str, Any], noncontiguous: Iterable[str] = ()) -> Any:
        """Run the backend's checked ``op`` on device copies of ``kwargs``; the result comes back on
        the CPU. A provider that wrote into an argument raises :class:`InputWritten` (the
        oracle, computed afterwards from the same inputs, would blame its numbers instead)."""
        strided = set(noncontiguous)
        before = {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        placed = {k: self.place(v, k in strided) for k, v in kwargs.items()}
        out = to_cpu(self.table[op](**placed))
        for name, was in before.items():
            changed = changed_bytes(placed[name].detach().to("cpu"), was)
            if changed:
                raise InputWritten(f"{op}: the provider wrote into its argument {name!r} ({changed} bytes changed); "
                                   "an op must leave its inputs as they were")
        return out


class InputWritten(ProviderError):
    """A provider modified one of its input tensors in place."""


#: Where each crash's whole traceback goes (``dshal conformance --traceback`` shows it on stderr);
#: the report keeps one line per crash, with :func:`crash_site`.
CRASH_LOG = logging.getLogger("dshal_conformance.crashes")
CRASH_LOG.addHandler(logging.NullHandler())  # silent unless asked (logging's last resort would print them)


def crashed(suffixes: Sequence[str], what: str, err: BaseException) -> list[Outcome]:
    """Every result of a case an error: ``{what} crashed with Type: message (at file:line in fn)``;
    the traceback goes to :data:`CRASH_LOG`."""
    return fail_all(suffixes, "error", logged_crash(f"{what} crashed with {type(err).__name__}: {err}", err))


def logged_crash(reason: str, err: BaseException) -> str:
    """``reason`` with where ``err`` was raised (:func:`crash_site`); its traceback goes to :data:`CRASH_LOG`."""
    reason += crash_site(err)
    CRASH_LOG.error("%s", reason, exc_info=(type(err), err, err.__traceback__))
    return reason


def crash_site(err: BaseException) -> str:
    """`` (at file:line in function)``: where ``err`` was raised, for a vendor to find it; the
    file as its module is imported (``dshal_nvidia/backend.py``), not this machine's folders."""
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {code_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def changed_bytes(now: torch.Tensor, was: torch.Tensor) -> int:
    """How many bytes of ``now`` differ from ``was`` (NaN payloads and signed zeros included);
    all of them when the shape or dtype changed."""
    if now.shape != was.shape or now.dtype != was.dtype:
        return max(now.numel() * now.element_size(), was.numel() * was.element_size(), 1)
    return int((now.contiguous().view(-1).view(torch.uint8) != was.contiguous().view(-1).view(torch.uint8)).sum())


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


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A row's parameters as the report shows them (its dtype has a field of its own)."""
    return {k: v for k, v in plain(params).items() if k != "dtype"}


# ---------------------------------------------------------------- accuracy cases
#: Inputs of a case: context, row parameters -> the op's arguments (default: the op's own
#: example builder, ``SPECS[op].example_inputs``).
Build = Callable[[Context, Mapping[str, Any]], Example]
Judge = Callable[[Context, Mapping[str, Any], Any, Any, Example], "list[Check] | dict[str, list[Check]]"]


def example_of(op: str) -> Build:
    """The op's example builder, drawing from the case's generator."""
    spec = SPECS[op]
    return lambda ctx, params: spec.example_inputs(ctx.draw, params)


def conformance_rows(op: str) -> list[ShapeRow]:
    """The op's ``accuracy`` and ``edge`` rows (its ``bench`` rows are for timing)."""
    return [row for row in SPECS[op].rows if row.kind in ("accuracy", "edge")]


def unsupported_outcomes(suffixes: Sequence[str], reason: str) -> list[Outcome]:
    return [Outcome(s, Verdict("unsupported", None, None, None, reason)) for s in suffixes]


def fail_all(suffixes: Sequence[str], status: str, reason: str) -> list[Outcome]:
    return [Outcome(s, Verdict(status, None, None, None, reason)) for s in suffixes]


def run_accuracy(
    ctx: Context,
    op: str,
    params: Mapping[str, Any],
    judge: Judge,
    suffixes: Sequence[str],
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
) -> list[Outcome]:
    """Build inputs, call the backend, compute the float64 oracle, judge."""
    needs = params.get("capability")  # an optional contract feature the row exercises
    if needs and ctx.capabilities is not None and not getattr(ctx.capabilities, needs):
        return unsupported_outcomes(suffixes, f"the backend does not declare Capabilities.{needs}: the row is not run")
    inputs = SPECS[op].example_inputs(ctx.draw, params)
    declared = op in ctx.provided
    unsupported_variant = variant_supported(ctx, params) if variant_supported else None
    try:
        out = ctx.call(op, inputs.kwargs, params.get("noncontiguous", ()))
    except NotPlaceable:
        raise  # the runner reports the case unsupported (a declared capability, not a crash)
    except UnsupportedOpError as err:
        if not declared:
            return unsupported_outcomes(suffixes, f"backend does not provide {op!r} and raised UnsupportedOpError as required: {err}")
        if unsupported_variant:
            return unsupported_outcomes(suffixes, f"{unsupported_variant}; raised UnsupportedOpError: {err}")
        return fail_all(suffixes, "fail", f"the backend declares {op!r} supported but raised UnsupportedOpError: {err}")
    except ProviderError as err:  # its result against the op's declared outputs, or its inputs written
        return fail_all(suffixes, "fail", f"the provider breaks the op's contract: {err}")
    except DshalError as err:
        return fail_all(suffixes, "fail", f"valid input rejected with {type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - a crash is a finding, not a suite error
        return crashed(suffixes, "the provider", err)
    if not declared:
        return fail_all(
            suffixes, "fail", f"the backend does not declare {op!r} but the call returned instead of raising UnsupportedOpError"
        )
    ref = SPECS[op].run_oracle(**(inputs.oracle_kwargs or inputs.kwargs))
    judged = judge(ctx, params, out, ref, inputs)
    if isinstance(judged, list):
        judged = {"": judged}
    return [Outcome(s, verdict(judged[s], ctx.overrides(s))) for s in suffixes]


def accuracy_cases(
    op: str,
    rows: Iterable[ShapeRow],
    judge: Judge,
    *,
    suffixes: Sequence[str] = ("",),
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
) -> list[Case]:
    """One case per row, with the row's id, kind (accuracy or edge) and tiers."""
    cases = []
    for row in rows:

        def body(ctx: Context, params: Mapping[str, Any] = row.params) -> list[Outcome]:
            return run_accuracy(ctx, op, params, judge, suffixes, variant_supported)

        cases.append(
            Case(row.id, op, row.kind, dtype_name(row.params.get("dtype")), _params(row.params), row.tiers, body, tuple(suffixes))
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
    judge: Judge,
    bad: Iterable[BadInput],
    *,
    suffixes: Sequence[str] = ("",),
    variant_supported: Callable[[Context, Mapping[str, Any]], str | None] | None = None,
    bad_base: str | None = None,
) -> list[Case]:
    """An op's accuracy/edge cases from its example rows and its bad-input cases (spoiling
    the row named ``bad_base``, default the first)."""
    rows = conformance_rows(op)
    base = rows[0] if bad_base is None else next(r for r in rows if r.name == bad_base)
    return accuracy_cases(op, rows, judge, suffixes=suffixes, variant_supported=variant_supported) + bad_input_cases(
        op, base.params, example_of(op), bad
    )


def run_rejection(ctx: Context, op: str, kwargs: dict[str, Any], error: type[DshalError], what: str) -> list[Outcome]:
    """Call ``op`` with inputs that must be rejected with ``error``: the case's one outcome."""
    try:
        result = ctx.table[op](**kwargs)
    except UnsupportedOpError as err:
        if op not in ctx.provided:
            return unsupported_outcomes(("",), f"backend does not provide {op!r}: {err}")
        status, reason = ("pass", f"raised {type(err).__name__}: {err}") if issubclass(UnsupportedOpError, error) else (
            "fail", f"{what}: raised UnsupportedOpError, expected {error.__name__}: {err}")
    except error as err:
        status, reason = "pass", f"raised {type(err).__name__} as required: {err}"
    except DshalError as err:
        status, reason = "fail", f"{what}: raised {type(err).__name__}, expected {error.__name__}: {err}"
    except Exception as err:  # noqa: BLE001
        status, reason = "fail", logged_crash(
            f"{what}: crashed with {type(err).__name__} instead of raising {error.__name__}: {err}", err)
    else:
        shape = list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        status, reason = "fail", f"{what}: accepted the bad input and returned {shape} instead of raising {error.__name__}"
    if op not in ctx.provided and status == "fail":
        reason += f" (and the backend does not declare {op!r}: it should raise UnsupportedOpError)"
    return [Outcome("", Verdict(status, "raises", None, None, reason))]


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
    """An ``edge`` case (both tiers) whose valid-looking input the op's contract rejects
    (e.g. K % 128 with a floor-sized scale)."""

    def body(ctx: Context) -> list[Outcome]:
        inputs = build(ctx, row)
        placed = {k: ctx.place(v) for k, v in inputs.kwargs.items()}
        return run_rejection(ctx, op, placed, error, what)

    params = {**_params(row), "expects": error.__name__}
    return Case(f"{op}/{name}", op, "edge", dtype_name(row.get("dtype")), params, frozenset(TIERS), body)
