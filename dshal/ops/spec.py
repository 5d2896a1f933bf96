"""What an op *is*: a spec (signature, input checks, cost model) plus a reference implementation.

An op is declared by decorating its *checker* -- a function with exactly the op's public
signature whose body validates the inputs and raises typed :class:`~dshal.DshalError`\\ s::

    @op_spec
    def rms_norm(x, weight, eps=1e-6, residual=None):
        \"\"\"Contract text.\"\"\"
        t = check_tensor("rms_norm", "x", x, floating=True, min_ndim=1)
        ...

    @rms_norm.reference
    def _rms_norm_ref(x, weight, eps=1e-6, residual=None): ...

    @rms_norm.cost
    def _rms_norm_cost(x, weight, eps=1e-6, residual=None) -> Cost: ...

    @rms_norm.examples(RMS_NORM_ROWS)
    def _rms_norm_example(draw, p) -> Example: ...

The examples (shape rows and their input builder, see :mod:`dshal.ops.examples`) are what
bench, conformance and tests draw their inputs from.

Because the checker has the op's signature, Python's own argument binding does the
work at call time (no ``inspect`` on the hot path), and a plugin's implementation is
checked against the same signature when it loads.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from dshal.errors import ArgumentError, DeviceError, DTypeError, ProviderError, ShapeError, UnsupportedOpError
from dshal.ops.examples import Draw, Example, ShapeRow, shape_rows
from dshal.ops.mode import checking

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

FP8_DTYPES = {
    "e4m3fn": torch.float8_e4m3fn,
    "e4m3fnuz": torch.float8_e4m3fnuz,
    "e5m2": torch.float8_e5m2,
}
FP8_FORMAT_OF = {v: k for k, v in FP8_DTYPES.items()}
#: Largest finite value of each FP8 format (torch.finfo agrees; written out for readers).
FP8_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0, "e5m2": 57344.0}


@dataclass(frozen=True)
class Cost:
    """Work of one op call: floating-point operations and bytes moved to/from memory."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP/byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


class OpSpec:
    """One op: its name, signature, input checks, cost model, reference implementation and
    example inputs."""

    def __init__(self, checker: Callable[..., Any]):
        self.name: str = checker.__name__
        self.check: Callable[..., Any] = checker
        self.signature = inspect.signature(checker)
        self.__doc__ = checker.__doc__
        self._reference: Callable[..., Any] | None = None
        self._cost: Callable[..., Cost] | None = None
        self._oracle: Callable[..., Any] | None = None
        self._example: Callable[[Draw, Mapping[str, Any]], Example] | None = None
        self._outputs: Callable[..., tuple[Output, ...]] | None = None
        #: The op's shape rows (conformance's examples and bench's shapes), in declared order.
        self.rows: tuple[ShapeRow, ...] = ()

    # ------------------------------------------------------------ declaration
    def reference(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: register the unchecked reference math (same signature as the op)."""
        self._require_same_signature(fn, "reference")
        self._reference = fn
        return fn

    def cost(self, fn: Callable[..., Cost]) -> Callable[..., Cost]:
        """Decorator: register the FLOPs/bytes model (same signature as the op)."""
        self._require_same_signature(fn, "cost")
        self._cost = fn
        return fn

    def outputs(self, fn: Callable[..., tuple[Output, ...]]) -> Callable[..., tuple[Output, ...]]:
        """Decorator: register what the contract says a call returns, one :class:`Output`
        (shape, and dtype where the contract fixes it) per returned tensor, from the
        arguments alone (same signature as the op). Dispatch checks every provider's result
        against it, so a plugin's wrong shape is named at the op that made it."""
        self._require_same_signature(fn, "outputs")
        self._outputs = fn
        return fn

    def oracle(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: register a float64 oracle when upcasting the inputs is not enough
        (e.g. FP8 GEMM dequantizes to float64 first). Same signature as the op."""
        self._require_same_signature(fn, "oracle")
        self._oracle = fn
        return fn

    def examples(
        self, table: Iterable[Mapping[str, Any]]
    ) -> Callable[[Callable[[Draw, Mapping[str, Any]], Example]], Callable[[Draw, Mapping[str, Any]], Example]]:
        """Decorator factory: ``table`` (dicts, see :func:`~dshal.ops.examples.shape_rows`) and
        the builder ``(draw, params) -> Example`` that turns one row into the op's arguments."""

        def register(fn: Callable[[Draw, Mapping[str, Any]], Example]) -> Callable[[Draw, Mapping[str, Any]], Example]:
            self.rows = shape_rows(self.name, table)
            self._example = fn
            return fn

        return register

    def example_inputs(self, draw: Draw, row: ShapeRow | Mapping[str, Any]) -> Example:
        """The op's arguments for one row (or a row's parameters), drawn from ``draw``."""
        if self._example is None:
            raise UnsupportedOpError(f"op {self.name!r} declares no example inputs")
        return self._example(draw, row.params if isinstance(row, ShapeRow) else row)

    def _require_same_signature(self, fn: Callable[..., Any], role: str) -> None:
        mismatch = self.signature_mismatch(fn)
        if mismatch:
            raise TypeError(f"{role} of op {self.name!r}: {mismatch}")

    # ------------------------------------------------------------ use
    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    @property
    def reference_impl(self) -> Callable[..., Any]:
        """The unchecked reference math."""
        if self._reference is None:
            raise UnsupportedOpError(f"op {self.name!r} has no reference implementation")
        return self._reference

    def cost_of(self, *args: Any, **kwargs: Any) -> Cost:
        """FLOPs and bytes of one call with these arguments."""
        if self._cost is None:
            raise UnsupportedOpError(f"op {self.name!r} has no cost model")
        return self._cost(*args, **kwargs)

    def outputs_of(self, *args: Any, **kwargs: Any) -> tuple[Output, ...]:
        """What a call with these arguments returns, as the contract says (:meth:`outputs`)."""
        if self._outputs is None:
            raise UnsupportedOpError(f"op {self.name!r} declares no outputs")
        return self._outputs(*args, **kwargs)

    def run_oracle(self, *args: Any, **kwargs: Any) -> Any:
        """The reference computed in float64: the registered oracle, or the reference
        implementation on float64 copies of every floating-point tensor argument."""
        if self._oracle is not None:
            return self._oracle(*args, **kwargs)
        up = lambda v: v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.dtype in FLOAT_DTYPES else v  # noqa: E731
        return self.reference_impl(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    def checked(self, impl: Callable[..., Any], device_type: str | None = None, provider: str | None = None) -> Callable[..., Any]:
        """``impl`` behind this op's input checks (and, when given, a device-type check of the
        first tensor argument). This is what dispatch calls. With ``provider`` (its name, for
        messages) the result is checked against the op's :meth:`outputs` too: a
        :class:`~dshal.errors.ProviderError` names a wrong shape, dtype or device."""
        check = self.check
        name = self.name
        first = next(iter(self.signature.parameters))
        outputs = self._outputs if provider is not None else None
        params = list(self.signature.parameters)

        def call(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            x = args[0] if args else kwargs[first]
            if device_type is not None and x.device.type != device_type:
                raise DeviceError(
                    f"{name}: argument {first!r} is on device {x.device}, "
                    f"expected a {device_type!r} tensor (the active backend's device)"
                )
            if torch.is_grad_enabled():
                refuse_autograd(name, params, args, kwargs)
            if autocast_on(x.device.type):  # the op's dtypes are its contract, not autocast's
                with torch.autocast(x.device.type, enabled=False):
                    out = impl(*args, **kwargs)
            else:  # no context manager to enter where autocast is off (~0.5 us a call)
                out = impl(*args, **kwargs)
            if outputs is not None:
                check_outputs(name, provider, out, outputs(*args, **kwargs), x.device)
            return out

        call.__name__ = call.__qualname__ = name
        call.__doc__ = self.__doc__
        call.__wrapped__ = impl  # type: ignore[attr-defined]
        return call

    def signature_mismatch(self, fn: Callable[..., Any]) -> str | None:
        """A readable description of how ``fn``'s signature differs from the spec, or None."""
        try:
            got = inspect.signature(fn)
        except (TypeError, ValueError) as err:
            return f"signature cannot be read ({err})"
        want = list(self.signature.parameters.values())
        have = list(got.parameters.values())
        if [(p.name, p.kind) for p in want] == [(p.name, p.kind) for p in have] and all(
            _same_default(w.default, h.default) for w, h in zip(want, have)
        ):
            return None
        return f"expected ({_fmt(want)}), got ({_fmt(have)})"

    def __repr__(self) -> str:
        return f"<op {self.name}{self.signature}>"


class Output(NamedTuple):
    """One tensor an op returns: its shape (a tuple or ``torch.Size``), and its dtype where the
    contract fixes it. A NamedTuple: the rules run on every checked call."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


def check_outputs(op: str, provider: str, out: Any, expected: tuple[Output, ...], device: torch.device) -> None:
    """ProviderError unless ``out`` is the tensors ``expected`` says (one tensor, or a tuple
    or list of them), on ``device`` (the first argument's). The passing path is a few attribute
    compares (about 1 µs); the message is built only on failure."""
    got = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if len(got) == len(expected):
        for t, want in zip(got, expected):
            if (not isinstance(t, torch.Tensor) or t.shape != want.shape
                    or (want.dtype is not None and t.dtype != want.dtype) or t.device != device):
                break
        else:
            return
    _output_error(op, provider, got, expected, device)


def _output_error(op: str, provider: str, got: tuple[Any, ...], expected: tuple[Output, ...], device: torch.device) -> None:
    if len(got) != len(expected) or not all(isinstance(t, torch.Tensor) for t in got):
        seen = ", ".join(type(t).__name__ for t in got)
        raise ProviderError(f"{op}: provider {provider!r} returned ({seen}), expected {len(expected)} tensor(s)")
    for i, (t, want) in enumerate(zip(got, expected)):
        which = f"output {i}" if len(expected) > 1 else "its output"
        if tuple(t.shape) != tuple(want.shape):
            raise ProviderError(f"{op}: provider {provider!r} returned {which} with shape {list(t.shape)}, expected {list(want.shape)}")
        if want.dtype is not None and t.dtype != want.dtype:
            raise ProviderError(f"{op}: provider {provider!r} returned {which} as {t.dtype}, expected {want.dtype}")
        if t.device != device:
            raise ProviderError(f"{op}: provider {provider!r} returned {which} on {t.device}, expected {device} (its inputs' device)")


def _same_default(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors etc. compare ambiguously
        return False


def _fmt(params: Iterable[inspect.Parameter]) -> str:
    return ", ".join(str(p) for p in params)


def op_spec(checker: Callable[..., Any]) -> OpSpec:
    """Declare an op from its checker function (see the module docstring)."""
    return OpSpec(checker)


# ---------------------------------------------------------------- input-check helpers
# Small, fast helpers shared by every op's checker. Each raises the documented error
# class with the op, the argument, what was seen and what was expected.


class _NoAutocast:
    """Device types autocast has no state for (it raises for meta: 12 us a call, and `dshal plan`
    checks every op on meta). A plain set, not ``functools.cache``: dynamo traces
    :func:`autocast_on` under ``torch.compile`` and warns about any functools cache it meets."""

    types: set[str] = set()


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is active for ``device_type`` in this thread (False for a type
    autocast has no state for)."""
    if device_type in _NoAutocast.types:
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        _NoAutocast.types.add(device_type)
        return False


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A block where ``torch.autocast`` is off for ``device``'s type (nothing to do where it is off)."""
    if autocast_on(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def refuse_autograd(op: str, params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """ArgumentError when grad mode is on and a tensor argument requires grad: no op has a
    backward (providers are kernels, some in C), so autograd would be dropped for some shapes
    and dtypes and kept for others, and gradients come out wrong without a word."""
    tensor = torch.Tensor
    for value in args:  # the common case (none requires grad) without building (name, value) pairs
        if isinstance(value, tensor) and value.requires_grad:
            break
    else:
        for value in kwargs.values():
            if isinstance(value, tensor) and value.requires_grad:
                break
        else:
            return
    for param, value in (*zip(params, args), *kwargs.items()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ArgumentError(
                f"{op}: argument {param!r} requires grad, expected a tensor that does not: dshal ops are "
                "inference-only (no backward); call them under torch.inference_mode() or torch.no_grad(), "
                "or pass a detached tensor"
            )


def write_count(t: torch.Tensor | None) -> int | None:
    """``t``'s in-place write counter (``Tensor._version``: a cache keyed on a tensor sees
    ``copy_`` / ``load_state_dict`` into it); None for no tensor, or one made under inference
    mode, which keeps none. Writes a cache keyed on it cannot see: into such a tensor (inside
    inference mode), and through ``t.data`` (which has a counter of its own)."""
    return None if t is None or t.is_inference() else t._version


def check_tensor(
    op: str,
    arg: str,
    t: Any,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int | None = None,
    dtype_of: str | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with an allowed dtype and rank; return it. ``dtype_of``:
    the argument ``dtypes`` (one dtype) comes from, which the message then names."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{op}: argument {arg!r} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = f"{dtypes[0]} (the dtype of {dtype_of!r})" if dtype_of else f"one of {_dtypes(dtypes)}"
        raise DTypeError(f"{op}: argument {arg!r} has dtype {t.dtype}, expected {expected}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ShapeError(f"{op}: argument {arg!r} must be {want}, got shape {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ShapeError(f"{op}: argument {arg!r} must have at least {min_ndim} dims, got shape {list(t.shape)}")
    return t


def check_broadcasts_to(op: str, arg: str, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """ShapeError naming ``arg`` unless ``t``'s shape broadcasts *to* ``shape`` (right-aligned,
    each dim 1 or equal; plain ints: fast); ``what`` says what ``shape`` is."""
    if t.dim() > len(shape) or any(c != 1 and c != h for c, h in zip(reversed(t.shape), reversed(shape))):
        raise ShapeError(f"{op}: argument '{arg}' has shape {list(t.shape)}, expected a shape broadcastable to "
                         f"{list(shape)} ({what})")


def check_same_device(op: str, first: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must live on ``x``'s device."""
    dev = x.device
    for arg, t in others.items():
        if t is not None and t.device != dev:
            raise DeviceError(f"{op}: argument {arg!r} is on {t.device}, expected {dev} (the device of {first!r})")


def check_ids_in_range(op: str, arg: str, ids: torch.Tensor, size: int, what: str, why: str, low: int = 0) -> None:
    """Every value of ``ids`` must be in ``[low, size)``; ``what`` names one value ("expert
    id"), ``why`` says where ``size`` comes from. A value check, run with the math, not in an
    op's input checker. In checked mode it reads the values on the host (a host sync on an
    accelerator) and raises ShapeError; inside :func:`dshal.ops.trusted` (decode steps, graph
    capture) it is a device-side assertion (``torch._assert_async``): no host sync, and a
    bad id still stops the program (a device assert on GPUs, a RuntimeError on the CPU). On
    a device torch has no async assert for, a host read instead: right, not sync-free.
    Under ``torch.compile`` it is the assertion too (a host read would break the graph).
    Meta tensors hold no values: nothing to check."""
    if ids.is_meta:
        return
    if ids.numel() and (not checking() or torch.compiler.is_compiling()):
        article = "an" if what[:1] in "aeiou" else "a"
        message = f"{op}: argument {arg!r} holds {article} {what} outside [{low}, {size}) ({why})"
        in_range = ((ids >= low) & (ids < size)).all()
        try:
            torch._assert_async(in_range, message)
            return
        except NotImplementedError:  # a device torch has no async assert for (an out-of-tree one): read it
            if bool(in_range):
                return
            raise ShapeError(message) from None
    if ids.numel():
        least, most = (int(v) for v in torch.aminmax(ids))
        if least < low or most >= size:
            raise ShapeError(
                f"{op}: argument {arg!r} holds {what} {least if least < low else most}, expected ids in [{low}, {size}) ({why})"
            )


def check_dim(op: str, arg: str, t: torch.Tensor, dim: int, expected: int, what: str = "") -> None:
    """``t.shape[dim]`` must equal ``expected``."""
    if t.shape[dim] != expected:
        extra = f" ({what})" if what else ""
        raise ShapeError(
            f"{op}: argument {arg!r} has size {t.shape[dim]} in dim {dim} (shape {list(t.shape)}), expected {expected}{extra}"
        )


#: The largest int a tensor index or size can be (torch's int64).
INT64_MAX = 2**63 - 1


def check_int(
    op: str, arg: str, value: Any, low: int, high: int | None = None, *, optional: bool = False, why: str = ""
) -> None:
    """``value`` must be an int (not a bool) in ``[low, high]`` (no ``high``: at most
    ``INT64_MAX``); None too where ``optional``. ``why`` follows the expected range in the message."""
    if value is None and optional:
        return
    top = INT64_MAX if high is None else high
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        past = " (at most 2**63 - 1)" if high is None and isinstance(value, int) and value > INT64_MAX else ""
        raise ArgumentError(f"{op}: argument {arg!r} is {value!r}, expected {'None or ' if optional else ''}an int {bound}{past}{why}")


def check_real(op: str, arg: str, value: Any, *, positive: bool, optional: bool = False) -> None:
    """``value`` must be a finite real number (not a bool): > 0 where ``positive``, else >= 0;
    None too where ``optional``. NaN and inf are refused: they would reach every output."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (  # torch takes a Python int as an int64
        isinstance(value, int) and value > INT64_MAX  # first: math.isfinite(10**400) raises OverflowError
    ) or not math.isfinite(value) or not (value > 0 if positive else value >= 0):
        expected = f"{'None or ' if optional else ''}a finite {'positive' if positive else 'non-negative'} float"
        raise ArgumentError(f"{op}: argument {arg!r} is {value!r}, expected {expected}")


def fp8_dtype(op: str, arg: str, fmt: str) -> torch.dtype:
    """Resolve an FP8 format name; ``"e4m3"`` (the backend's native E4M3) is ``e4m3fn`` here,
    the reference's (a backend resolves it to its own before calling its kernels)."""
    name = "e4m3fn" if fmt == "e4m3" else fmt
    try:
        return FP8_DTYPES[name]
    except (KeyError, TypeError):
        raise DTypeError(
            f"{op}: argument {arg!r} is {fmt!r}, expected one of 'e4m3', {', '.join(map(repr, FP8_DTYPES))}"
        ) from None


def _dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)
