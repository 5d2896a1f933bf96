"""Input checks and format facts shared by the kernel wrappers (no triton import here)."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dshal.errors import ArgumentError, BackendUnavailableError, DeviceError, DTypeError
from dshal.kernels.triton import interpreter_blocked_reason, interpreter_requested, on_tensor_device
from dshal.kernels.triton.target import KernelTarget, default_target
from dshal.ops.mode import checking


@dataclass(frozen=True)
class Fp8Format:
    """What the quantization kernels need to round onto an FP8 grid exactly.

    ``min_exp`` is the exponent of the smallest normal number; below it the grid spacing
    is constant (subnormals). FNUZ formats have no negative zero (0x80 is NaN there).
    ``nan_code`` is the byte a NaN is stored as (what torch's cast writes for +NaN)."""

    max: float
    mantissa_bits: int
    min_exp: int
    no_negative_zero: bool
    nan_code: int

    def kernel_meta(self) -> dict[str, object]:
        """The constexpr arguments the quantizing kernels take for this format."""
        return dict(
            FP8_MAX=self.max,
            MANT_BITS=self.mantissa_bits,
            MIN_EXP=self.min_exp,
            NO_NEG_ZERO=self.no_negative_zero,
            NAN_CODE=self.nan_code,
        )


FP8_FORMATS: dict[torch.dtype, Fp8Format] = {
    torch.float8_e4m3fn: Fp8Format(448.0, 3, -6, False, 0x7F),
    torch.float8_e4m3fnuz: Fp8Format(240.0, 3, -7, True, 0x80),
    torch.float8_e5m2: Fp8Format(57344.0, 2, -14, False, 0x7F),
    torch.float8_e5m2fnuz: Fp8Format(57344.0, 2, -15, True, 0x80),
}


def check_kernel_device(fn: str, arg: str, t: torch.Tensor, interpreted: bool) -> None:
    """``t`` must live where the kernels can run: a GPU, or the CPU under the interpreter.

    ``interpreted`` is whether the calling kernel module was decorated with
    ``TRITON_INTERPRET=1`` (Triton reads it once, when the module is imported)."""
    kind = t.device.type
    if not torch.compiler.is_compiling() and _CAPTURED.get() is not None:  # cross-compiling: CPU tensors only stand in for device ones
        return
    if kind == "cpu" and not interpreted:
        raise DeviceError(
            f"{fn}: argument {arg!r} is on cpu, expected a GPU tensor; CPU tensors need the Triton "
            "interpreter (TRITON_INTERPRET=1 set before triton and the kernel modules are imported, see "
            "dshal.kernels.triton.ensure_interpreter_if_cpu)"
        )
    if kind == "cpu":
        blocked = interpreter_blocked_reason()
        if blocked:
            raise BackendUnavailableError(f"{fn}: the Triton interpreter cannot run here: {blocked}")
    if kind not in ("cpu", "cuda"):
        raise DeviceError(f"{fn}: argument {arg!r} is on {t.device}, expected a cuda (CUDA or ROCm) or cpu tensor")


def check_fp8_dtype(fn: str, arg: str, dtype: object) -> Fp8Format:
    """``dtype`` must be an FP8 dtype the kernels can produce; return its format facts."""
    fmt = FP8_FORMATS.get(dtype) if isinstance(dtype, torch.dtype) else None
    if fmt is None:
        raise DTypeError(
            f"{fn}: argument {arg!r} is {dtype!r}, expected one of "
            + ", ".join(str(d) for d in FP8_FORMATS)
        )
    return fmt


def check_flag(fn: str, arg: str, value: object) -> bool:
    """``value`` must be a plain bool (a tensor or string here is a caller's mistake)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{fn}: argument {arg!r} is {value!r}, expected True or False")
    return value


def resolve_target(fn: str, target: object, device: torch.device) -> KernelTarget:
    """The caller's target, or the default for ``device``."""
    if target is None:
        return default_target(device)
    if not isinstance(target, KernelTarget):
        raise ArgumentError(f"{fn}: argument 'target' is a {type(target).__name__}, expected a KernelTarget or None")
    return target


def checked_target(
    fn: str, target: object, device: torch.device, check_inputs: Callable[[], KernelTarget]
) -> KernelTarget:
    """A kernel wrapper's target: ``check_inputs()`` (its input checks, which resolve the
    target), or inside :func:`dshal.ops.trusted` (the caller vouches for the inputs, as the
    ops' own checks are skipped there) ``target`` resolved alone."""
    return check_inputs() if checking() else resolve_target(fn, target, device)


def module_interpreted() -> bool:
    """Called once at a kernel module's import: was it decorated for the interpreter?"""
    return interpreter_requested()


def fp8_nan_rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows]`` bool: which rows of a 2-D (or, per expert, 3-D: ``[E, rows]``) FP8 or float
    tensor hold a NaN. For :func:`hardware_nan_gemm` / :func:`hardware_nan_moe`."""
    return t.float().isnan().any(dim=-1)


def hardware_nan_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b.T`` with NaN where a GPU's tensor cores put it: every output of a row of
    ``a`` or ``b`` holding an FP8 NaN code. The Triton interpreter decodes those codes as
    numbers (e4m3fn's 0x7F as 480, fnuz's 0x80 as -0), so an emulated FP8 GEMM hid NaN that
    the device propagates. Interpreter only; no host read (graph capture and the host-sync
    count see none)."""
    return out.masked_fill_(fp8_nan_rows(a)[:, None] | fp8_nan_rows(b)[None, :], float("nan"))


def hardware_nan_moe(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`hardware_nan_gemm` for the grouped MoE with FP8 weights (whose activations are
    quantized to FP8 in the kernel): a token's row is NaN when its ``x`` row or a routed
    expert's ``w13`` holds a NaN (each reaches every output through the activation), and
    ``out[t, h]`` when a routed expert's ``w2[h]`` row does. Skipped slots (id -1) reach
    nothing; a token whose slots are all skipped is 0 whatever its ``x``."""
    served = ids >= 0  # [T, k]
    routed = ids.clamp(min=0)
    w13_bad = fp8_nan_rows(w13).any(dim=-1)  # [E]
    rows = (x.isnan().any(dim=-1) & served.any(dim=-1)) | (w13_bad[routed] & served).any(dim=-1)  # [T]
    cols = (fp8_nan_rows(w2)[routed] & served[..., None]).any(dim=1)  # [T, H]
    return out.masked_fill_(rows[:, None] | cols, float("nan"))


# ---------------------------------------------------------------- launches
@dataclass(frozen=True)
class Launch:
    """One kernel launch as a wrapper made it: the ``@triton.jit`` function (or autotuner),
    its grid, positional arguments and keyword arguments (constexprs and compile options)."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict[str, Any]


#: Serializes launches under the Triton interpreter, which patches ``triton.language``
#: globally while a kernel runs and so crashes when two threads run kernels at once.
INTERPRETER_LOCK = threading.RLock()

_CAPTURED: contextvars.ContextVar[list[Launch] | None] = contextvars.ContextVar("dshal_triton_capture", default=None)


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or, inside :func:`capture_launches`, only record it.

    Every wrapper launches through here so that ``dshal kernels`` compiles exactly the
    arguments a real launch passes (the JIT specializes on them)."""
    compiling = torch.compiler.is_compiling()
    captured = None if compiling else _CAPTURED.get()  # dynamo cannot read a ContextVar
    if captured is not None:
        captured.append(Launch(kernel, grid, args, kwargs))
    elif type(kernel).__name__ == "InterpretedFunction":
        # Under torch.compile outside the graph: dynamo would trace into the interpreter's numpy code.
        (torch.compiler.disable(_interpret) if compiling else _interpret)(kernel, grid, args, kwargs)
    else:
        with on_tensor_device(args):
            kernel[grid](*args, **kwargs)


def _interpret(kernel: Any, grid: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    with INTERPRETER_LOCK:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block, wrappers record their launches instead of running them (their
    CPU tensors stand in for device tensors; outputs stay uninitialized)."""
    captured: list[Launch] = []
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)
