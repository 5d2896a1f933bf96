"""Portable Triton kernels shared by the GPU plugins (NVIDIA, AMD).

Each kernel module (``quant``, ``gemm``, ``norm``, ``activation``, ``rotary``, ``moe``,
``sparse_attention``)
imports ``triton`` and defines ``@triton.jit`` kernels with a checked Python wrapper
beside each one (its input checks are skipped inside :func:`dshal.ops.trusted`, as the ops'
own are). Hardware-specific tuning comes from a :class:`~.target.KernelTarget`
(``target.py``, importable without triton): the plugin picks one of the tile tables shipped
as data (``tiles/<target name>.json``) from its device's arch; the kernels never branch on
the vendor.

This package's ``__init__`` does **not** import triton or any kernel module.

Running on CPU tensors (emulated mode, tests): Triton reads ``TRITON_INTERPRET`` when a
kernel is *decorated* -- its own library functions (``tl.max``, ``tl.sum``...) when
``triton`` is first imported, dshal's kernels when their module is first imported. So
:func:`ensure_interpreter_if_cpu` must run **before** ``triton`` or any kernel module is
imported in the process (or set ``TRITON_INTERPRET=1`` in the environment)::

    from dshal.kernels.triton import ensure_interpreter_if_cpu
    ensure_interpreter_if_cpu("cpu")          # emulated: kernels run on CPU tensors
    from dshal.kernels.triton import gemm      # now decorated for the interpreter
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Any

import torch

from dshal.errors import BackendUnavailableError
from dshal.versions import SUPPORTED, installed, minor

#: The modules that define ``@triton.jit`` kernels (decorated at import time).
KERNEL_MODULES = ("quant", "gemm", "norm", "activation", "rotary", "moe", "sparse_attention")
#: Held while the interpreter switch is decided and the kernel modules are imported, so that
#: threads using the kernels for the first time at once see one consistent outcome.
_FIRST_USE = threading.RLock()


def on_tensor_device(args: tuple | list) -> contextlib.AbstractContextManager[Any]:
    """A context in which torch's current device is the GPU of the first tensor of ``args`` (a
    no-op for host tensors, none, or one on the current device already: a launch's hot path).
    Triton launches, and ``triton.testing.do_bench`` times, on the *current* device's current
    stream whatever device the tensors are on: a kernel given ``cuda:1`` tensors while
    ``cuda:0`` is current would run on GPU 0 with GPU 1's pointers."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or not tensor.is_cuda or tensor.get_device() == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device_of(tensor)


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value in this process's environment."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def compiled_mode_reason(gpu_present: bool | None = None) -> str | None:
    """Why Triton runs compiled (for a GPU) rather than under the interpreter in a process
    that has not chosen yet, or None when the interpreter is the choice.

    ``TRITON_INTERPRET`` set to a false value in the environment is an explicit choice of
    compiled mode; unset, a CUDA/ROCm device (``gpu_present``; None: ask torch) chooses
    compiled mode too. A test session decides this once, before anything imports triton:
    kernels decorated in one mode cannot run in the other (see the module docstring)."""
    chosen = os.environ.get("TRITON_INTERPRET", "").strip()
    if chosen and not interpreter_requested():
        return f"TRITON_INTERPRET={chosen} in the environment: Triton runs compiled"
    if interpreter_requested():
        return None
    if torch.cuda.is_available() if gpu_present is None else gpu_present:
        return (
            "a GPU is present, so Triton runs compiled for it in this process; "
            "TRITON_INTERPRET=1 runs the kernels on CPU tensors (emulated) instead"
        )
    return None


def imported_kernel_modules() -> list[str]:
    """Names of the kernel modules already imported (and so already decorated)."""
    return [m for m in KERNEL_MODULES if f"{__name__}.{m}" in sys.modules]


def _decorated_for_interpreter(fn: object) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def interpreter_blocked_reason() -> str | None:
    """Why the interpreter can no longer take effect in this process, or None if it can.

    It cannot once ``triton`` itself or one of the kernel modules was imported while
    ``TRITON_INTERPRET`` was unset: their ``@triton.jit`` functions are already compiled-mode
    objects, which fail on CPU tensors. Reads ``sys.modules`` only (imports nothing)."""
    # A module still being imported (by another thread) lacks these attributes: that is no
    # evidence either way, so only finished modules count.
    standard = sys.modules.get("triton.language.standard")
    std_max = getattr(standard, "max", None)
    if std_max is not None and not _decorated_for_interpreter(std_max):
        return "triton was imported before TRITON_INTERPRET=1 was set"
    compiled = [
        m for m in imported_kernel_modules() if getattr(sys.modules[f"{__name__}.{m}"], "INTERPRETED", None) is False
    ]
    if compiled:
        return f"the kernel modules {compiled} were imported before TRITON_INTERPRET=1 was set"
    return None


def ensure_interpreter_if_cpu(device: torch.device | str | None = None) -> bool:
    """Make the Triton kernels run under the interpreter when they will see CPU tensors.

    Must run **before** ``triton`` or any kernel module of this package is imported:
    Triton reads ``TRITON_INTERPRET`` when a function is decorated. ``device`` is where the
    kernels' tensors will live; ``None`` means "CPU unless a CUDA/ROCm device is present".
    Sets ``TRITON_INTERPRET=1`` in ``os.environ`` when needed.

    Returns True when the interpreter is (now) in effect for CPU tensors, False for a GPU
    device. Raises :class:`~dshal.errors.BackendUnavailableError` when the kernels are
    needed on CPU but it is too late (see :func:`interpreter_blocked_reason`): start the
    process with ``TRITON_INTERPRET=1``, or call this function earlier.
    """
    if device is None:
        on_cpu = not torch.cuda.is_available()
    else:
        on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        return False
    with _FIRST_USE:
        if not interpreter_requested():
            os.environ["TRITON_INTERPRET"] = "1"
        blocked = interpreter_blocked_reason()
    if blocked:
        raise BackendUnavailableError(
            f"dshal's Triton kernels must run under the interpreter on CPU tensors, but {blocked}; set "
            "TRITON_INTERPRET=1 in the environment, or call dshal.kernels.triton.ensure_interpreter_if_cpu() "
            "before anything imports triton or the kernel modules"
        )
    return True


def require_triton(command: str) -> None:
    """BackendUnavailableError naming the install line when the triton package is absent (a
    command that compiles or times kernels, run from an install without the extra) or older
    than :data:`dshal.versions.SUPPORTED` (``triton.knobs``, the ptxas log: Triton 3.5 and
    earlier failed deep in a compile worker)."""
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailableError(f"{command}: needs the triton package (pip install 'dshal[triton]')")
    found, oldest = installed("triton"), SUPPORTED["triton"][0]
    if found is not None and minor(found) < minor(oldest):
        raise BackendUnavailableError(
            f"{command}: needs triton>={oldest}, found {found} (pip install 'triton>={oldest}'; with a ROCm or "
            "nightly torch, whose Triton comes with it as pytorch-triton-rocm / pytorch-triton, a newer torch)")


def load_kernel_modules(device: torch.device | str | None = None) -> dict[str, ModuleType]:
    """:func:`ensure_interpreter_if_cpu` for ``device``, then every kernel module, imported
    once under one lock (safe when several threads call it first at the same time)."""
    with _FIRST_USE:
        ensure_interpreter_if_cpu(device)
        return {m: importlib.import_module(f"{__name__}.{m}") for m in KERNEL_MODULES}


__all__ = [
    "KERNEL_MODULES",
    "compiled_mode_reason",
    "ensure_interpreter_if_cpu",
    "imported_kernel_modules",
    "interpreter_blocked_reason",
    "interpreter_requested",
    "load_kernel_modules",
    "require_triton",
]
