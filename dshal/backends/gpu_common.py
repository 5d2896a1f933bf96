"""What the NVIDIA and AMD plugins share: a base class for backends on torch's CUDA API
(CUDA or ROCm/HIP) that serve ops with dshal's portable Triton kernels, ``torch._scaled_mm``
and ``scaled_dot_product_attention``.

A subclass declares facts, never branches on a vendor:

* :meth:`TorchGpuBackend.hardware` -- device name, arch, FP8 formats, memory, peaks...;
* :meth:`TorchGpuBackend.kernel_target` -- the :class:`~dshal.kernels.triton.target.KernelTarget`;
* :meth:`TorchGpuBackend.gemm_plan` -- which FP8 dtypes / output dtypes ``_scaled_mm`` takes
  here, and which path serves block-scaled FP8 GEMMs.

**Emulated mode** (``emulate=True``): ``device_type`` is ``"cpu"``; the same op code runs
on CPU tensors, the Triton kernels under ``TRITON_INTERPRET=1`` (set before the kernel
modules are first imported) and ``torch._scaled_mm`` on the CPU.

Nothing here imports triton (or any vendor library) at import time or at discovery.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from dshal.backend import Availability, Backend, Capabilities, OpKind, Timer
from dshal.ops.spec import FLOAT_DTYPES, FP8_DTYPES, FP8_FORMAT_OF

if TYPE_CHECKING:  # pragma: no cover
    from dshal.kernels.triton.target import KernelTarget

log = logging.getLogger("dshal")

#: Ops served by a Triton kernel (the rest: fp8_gemm, linear, attention go through torch).
TRITON_OPS = ("quantize_fp8", "rms_norm", "silu_and_mul", "rotary_embedding", "moe_experts")
#: Ops served by their reference implementation on the device's tensors (plain torch math).
REFERENCE_OPS = ("dequantize_fp8", "moe_gate")
#: Block shapes the Triton quantization kernel takes (others use the torch reference math).
TRITON_QUANT_BLOCKS = ((1, 128), (128, 128))
#: Dtypes the Triton elementwise kernels take (float64 is an oracle dtype: torch math serves it).
TRITON_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 128


def triton_installed() -> bool:
    """Whether ``import triton`` would find a package (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _reference(op: str) -> Callable[..., Any]:
    from dshal.ops.catalogue import SPECS

    return SPECS[op].reference_impl


# ---------------------------------------------------------------- declared facts
@dataclass(frozen=True)
class PeakFigures:
    """Dense (non-sparse) peak throughput and memory bandwidth of one part, with the source."""

    match: str  #: the part, matched exactly against the device name (:func:`dshal.perf.roofline.same_part`)
    bf16_flops: float
    fp8_flops: float
    bandwidth: float  #: bytes/s
    source: str


def lookup_peaks(device_name: str, table: tuple[PeakFigures, ...]) -> PeakFigures | None:
    """The row of ``table`` whose part is exactly ``device_name``'s (vendor prefix, memory
    size and type aside), or None: an unknown part gets no datasheet figures."""
    from dshal.perf.roofline import same_part

    for row in table:
        if same_part(device_name, row.match):
            return row
    return None


@dataclass(frozen=True)
class GpuHardware:
    """What a plugin learned about its device (or what its emulated mode stands for)."""

    device_name: str
    arch: str
    fp8_formats: tuple[str, ...]
    native_e4m3: str
    dist_backend: str
    memory_bytes: int | None = None
    compute_units: int | None = None
    peaks: PeakFigures | None = None
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_fp8(self) -> bool:
        return bool(self.fp8_formats)


@dataclass(frozen=True)
class GemmPlan:
    """How fp8_gemm runs here.

    ``block_path``: ``"torch-blockwise"`` (``torch.nn.functional.scaled_mm`` with 1x128 /
    128x128 scales, cuBLASLt), ``"triton"`` (dshal's block-FP8 kernel) or ``"dequant"``
    (dequantize + matmul: no FP8 hardware or no triton).
    """

    block_path: str
    #: FP8 dtypes ``torch._scaled_mm`` takes on this device (empty: do not use it).
    scaled_mm_dtypes: frozenset[torch.dtype] = frozenset()
    tensorwise_out_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    rowwise_out_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
    #: output dtypes the blockwise probe ran correctly (``block_path == "torch-blockwise"``)
    blockwise_out_dtypes: tuple[torch.dtype, ...] = ()
    why: str = ""

    def describe(self) -> dict[str, str]:
        names = lambda ds: ",".join(sorted(str(d).replace("torch.", "") for d in ds)) or "none"  # noqa: E731
        scaled = (
            f"torch._scaled_mm for {names(self.scaled_mm_dtypes)} with K, N multiples of 16 "
            f"(tensorwise -> {names(self.tensorwise_out_dtypes)}; rowwise -> {names(self.rowwise_out_dtypes)}); "
            "other shapes/dtypes -> the block path with broadcast scales"
            if self.scaled_mm_dtypes
            else "the block path with broadcast scales (torch._scaled_mm unused here)"
        )
        block = {
            "torch-blockwise": "torch.nn.functional.scaled_mm blockwise 1x128/128x128 (cuBLASLt) for outputs "
            f"{names(self.blockwise_out_dtypes)}; Triton kernel otherwise",
            "triton": "dshal Triton block-FP8 kernel (FP32 accumulation, scales applied per 128 K)",
            "dequant": "dequantize to float32 + matmul",
        }[self.block_path]
        out = {"fp8_gemm block path": block + (f" ({self.why})" if self.why else ""), "fp8_gemm row/tensor path": scaled}
        return out


# ---------------------------------------------------------------- timing, graphs
class DeviceEventTimer(Timer):
    """Times device work with CUDA/HIP events (no host-side sync until :meth:`stop`)."""

    def __init__(self) -> None:
        super().__init__(torch.cuda.synchronize)
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def start(self) -> None:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        self._events = (begin, end)

    def stop(self) -> float:
        if self._events is None:
            raise RuntimeError("DeviceEventTimer.stop() called before start()")
        begin, end = self._events
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e-3


class DeviceGraph:
    """``fn`` captured into a CUDA/HIP graph per input signature, then replayed.

    Tensor arguments are copied into static buffers before each replay; the returned
    tensors are the graph's static outputs, overwritten by the next call (clone them to
    keep them). ``fn`` must be capturable: no host syncs, no data-dependent shapes.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Any], dict[str, Any], Any]] = {}

    @staticmethod
    def _key(args: tuple, kwargs: dict[str, Any]) -> tuple:
        def sig(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape), v.dtype, str(v.device), tuple(v.stride()))
            return ("value", repr(v))

        return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        entry = self._captured.get(key)
        if entry is None:
            entry = self._capture(args, kwargs)
            self._captured[key] = entry
        graph, static_args, static_kwargs, out = entry
        for dst, src in zip(static_args, args):
            if isinstance(src, torch.Tensor):
                dst.copy_(src)
        for name, src in kwargs.items():
            if isinstance(src, torch.Tensor):
                static_kwargs[name].copy_(src)
        graph.replay()
        return out

    def _capture(self, args: tuple, kwargs: dict[str, Any]):
        clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        static_args = [clone(a) for a in args]
        static_kwargs = {k: clone(v) for k, v in kwargs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocations, autotuning) outside the capture
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static_args, **static_kwargs)
        return graph, static_args, static_kwargs, out


# ---------------------------------------------------------------- FP8 GEMM building blocks
def scaled_mm_rowwise_or_tensorwise(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, granularity: str, out_dtype: torch.dtype
) -> torch.Tensor:
    """``torch._scaled_mm`` for NT operands: ``a`` row-major, ``b`` passed column-major
    (``b.t()`` of a contiguous ``[N, K]``); float32 scales ``[M, 1]`` / ``[1, N]`` or scalars."""
    if granularity == "tensor":
        sa, sb = a_scale.reshape(()).float(), b_scale.reshape(()).float()
    else:
        sa, sb = a_scale.float().reshape(-1, 1).contiguous(), b_scale.float().reshape(1, -1).contiguous()
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def torch_blockwise_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """DeepSeek-style block FP8 GEMM through ``torch.nn.functional.scaled_mm`` (cuBLASLt
    1x128 x 128x128 scaling; CUDA SM90 with cuBLASLt >= 12.9).

    torch checks ``a``'s 1x128 scales as ``[M, K/128]`` with strides ``(1, M)`` (M-major),
    and ``b_scale.t()`` against ``b.t()`` as a row-major ``[N/128, K/128]``, so ``b``'s
    scales go in transposed. cuBLASLt wants M a multiple of 4: ``a`` is zero-padded
    (scales 1) and the result sliced back. Callers keep K a multiple of 512.
    """
    F = torch.nn.functional
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, a_scale.shape[1])])
    sa = a_scale.float().t().contiguous().t()
    out = F.scaled_mm(
        a.contiguous(),
        b.contiguous().t(),
        sa,
        F.ScalingType.BlockWise1x128,
        b_scale.float().contiguous().t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=out_dtype,
    )
    return out[:m]


def pci_bus_id(index: int, domain_digits: int) -> str | None:
    """``DOMAIN:BUS:DEVICE.0`` of torch's device ``index`` (how NVML and amdsmi name a GPU;
    NVML writes 8 domain digits, amdsmi 4), or None when torch does not report it."""
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):0{domain_digits}x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def version_tuple(text: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (text or "").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def probe_torch_blockwise(
    device: torch.device, out_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32)
) -> tuple[tuple[torch.dtype, ...], str]:
    """For which of ``out_dtypes`` this torch + cuBLASLt runs DeepSeek-style blockwise
    ``scaled_mm`` correctly on ``device``. Checks the prerequisites, then runs one small GEMM
    per output dtype against the dequantized float32 product (DeepGEMM's similarity < 1e-3):
    cuBLASLt may take one output dtype and refuse another. Returns (usable dtypes, reason)."""
    F = torch.nn.functional
    if not (hasattr(F, "scaled_mm") and hasattr(getattr(F, "ScalingType", None), "BlockWise1x128")):
        return (), f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with BlockWise1x128 scaling"
    if torch.version.hip is not None or torch.version.cuda is None:
        return (), "blockwise scaled_mm is a cuBLASLt (CUDA) feature"
    if version_tuple(torch.version.cuda) < (12, 9):
        return (), f"CUDA {torch.version.cuda} < 12.9 (cuBLASLt blockwise FP8 scaling needs 12.9)"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return (), "cuBLASLt blockwise FP8 scaling is used on SM90 only"
    gen = torch.Generator(device=device).manual_seed(0)
    m, n, k = 96, 256, 512
    a = (torch.randn(m, k, device=device, generator=gen)).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, device=device, generator=gen)).to(torch.float8_e4m3fn)
    sa = torch.rand(m, k // BLOCK, device=device, generator=gen) + 0.5
    sb = torch.rand(n // BLOCK, k // BLOCK, device=device, generator=gen) + 0.5
    want = _reference("fp8_gemm")(a, sa, b, sb, torch.float32)
    usable, notes = [], []
    for out_dtype in out_dtypes:
        name = str(out_dtype).replace("torch.", "")
        try:
            got = torch_blockwise_gemm(a, sa, b, sb, out_dtype).float()
            sim = float(1 - 2 * (got * want).sum() / (got * got + want * want).sum())
            torch.cuda.synchronize(device)
        except (RuntimeError, TypeError, ValueError) as err:
            notes.append(f"{name}: refused ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        if sim < 1e-3:
            usable.append(out_dtype)
            notes.append(f"{name}: OK")
        else:
            notes.append(f"{name}: differs from the dequantized product (1 - similarity = {sim:.2e})")
    return tuple(usable), f"probed (torch {torch.__version__}, CUDA {torch.version.cuda}): " + "; ".join(notes)


# ---------------------------------------------------------------- the base backend
class TorchGpuBackend(Backend):
    """Base of the GPU plugins; see the module docstring. Subclasses implement ``name``,
    :meth:`availability`, :meth:`hardware`, :meth:`kernel_target`, :meth:`gemm_plan`
    (and :meth:`~dshal.Backend.topology`)."""

    def __init__(self, *, emulate: bool = False) -> None:
        super().__init__(emulate=emulate)
        self._cache: dict[str, Any] = {}  # per-instance memo of device facts and loaded kernels
        self._cache_lock = threading.RLock()  # ops may be called from several threads at once

    # ------------------------------------------------------------ declared by subclasses
    @abc.abstractmethod
    def read_hardware(self) -> GpuHardware:
        """Facts about the device (or, emulated, the device the emulation stands for);
        called once, see :meth:`hardware`."""

    @abc.abstractmethod
    def kernel_target(self) -> KernelTarget:
        """The Triton kernels' target for this device (the interpreter's when emulated)."""

    @abc.abstractmethod
    def plan_gemm(self) -> GemmPlan:
        """How fp8_gemm runs on this device; called once, see :meth:`gemm_plan`."""

    # ------------------------------------------------------------ shared
    @property
    def device_type(self) -> str:
        return "cpu" if self.emulate else "cuda"

    def _memo(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            with self._cache_lock:  # re-entrant: one fact's factory may read another
                if key not in self._cache:
                    self._cache[key] = make()
        return self._cache[key]

    def hardware(self) -> GpuHardware:
        return self._memo("hardware", self.read_hardware)

    def gemm_plan(self) -> GemmPlan:
        return self._memo("gemm_plan", self.plan_gemm)

    def target(self) -> KernelTarget:
        """:meth:`kernel_target`, built once (the ops read it on every call)."""
        return self._memo("kernel_target", self.kernel_target)

    def emulated_hardware(self, vendor_arch: str, arch: str, formats: tuple[str, ...], native: str, fp8_note: str) -> GpuHardware:
        """What emulated mode declares: the emulated part's FP8 facts, no memory or peaks."""
        return GpuHardware(
            device_name=f"CPU emulating {vendor_arch} (Triton interpreter)",
            arch=arch,
            fp8_formats=formats,
            native_e4m3=native,
            dist_backend="gloo",  # CPU tensors: NCCL/RCCL cannot carry them
            notes={"fp8": fp8_note, "emulated": "kernels run on CPU tensors; collectives on gloo"},
        )

    def device_hardware(
        self, arch: str, formats: tuple[str, ...], native: str, peaks: tuple[PeakFigures, ...], notes: Mapping[str, str]
    ) -> GpuHardware:
        """This rank's device's name, memory and compute units from torch, with the plugin's FP8 facts."""
        props = torch.cuda.get_device_properties(self.device())
        return GpuHardware(
            device_name=props.name,
            arch=arch,
            fp8_formats=formats,
            native_e4m3=native,
            dist_backend="nccl",  # RCCL behind the same name on ROCm
            memory_bytes=int(props.total_memory),
            compute_units=int(props.multi_processor_count),
            peaks=lookup_peaks(props.name, peaks),
            notes=dict(notes),
        )

    def device_availability(self, runtime: str, visible_env: Sequence[str]) -> Availability:
        """Availability once the torch build is right: a device must be visible."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
            from dshal.errors import DeviceError

            try:  # this rank's device (LOCAL_RANK) before any query or probe touches one
                self.bind_device()
            except DeviceError as err:
                return Availability(False, str(err))
        if count == 0:
            shown = ", ".join(f"{k}={os.environ[k]!r}" for k in visible_env if k in os.environ) or "none set"
            return Availability(
                False, f"torch {torch.__version__} ({runtime}) sees no GPU "
                f"(torch.cuda.is_available() is False; {'/'.join(visible_env)}: {shown})"
            )
        hw = self.hardware()
        extra = "" if triton_installed() else "; triton not installed: Triton ops fall back to the reference"
        return Availability(True, f"{hw.device_name} ({hw.arch}), {count} device(s), {runtime}{extra}")

    def emulation_availability(self, what: str) -> Availability:
        """Availability of emulated mode. Triton must be installed, and the interpreter must
        still be able to take effect: this sets ``TRITON_INTERPRET=1`` now, at discovery,
        because anything that imports triton later (torch's own dynamo does) decorates its
        functions for the mode set at that moment."""
        if not triton_installed():
            return Availability(False, f"emulate: true needs triton (pip install 'dshal-{self.name}[triton]') to run the kernels on CPU")
        from dshal.errors import BackendUnavailableError
        from dshal.kernels import triton as kernels

        try:
            kernels.ensure_interpreter_if_cpu("cpu")
        except BackendUnavailableError as err:
            return Availability(False, f"emulate: true, but {err}")
        return Availability(True, f"emulated: {what} on CPU tensors (Triton interpreter, torch._scaled_mm on CPU)", emulated=True)

    def kernels(self) -> SimpleNamespace:
        """The Triton kernel modules, imported on first use (interpreter first when emulated)."""

        def load() -> SimpleNamespace:
            from dshal.kernels.triton import load_kernel_modules

            return SimpleNamespace(**load_kernel_modules(self.device_type))

        return self._memo("kernels", load)

    def _triton_ok(self) -> bool:
        return self._memo("triton_ok", triton_installed)

    def capabilities(self) -> Capabilities:
        return self._memo("capabilities", self._build_capabilities)

    def _build_capabilities(self) -> Capabilities:
        hw = self.hardware()
        plan = self.gemm_plan()
        kinds: dict[str, OpKind] = {}
        for op in self.ops():
            if op in TRITON_OPS:
                kinds[op] = "triton"
            elif op in REFERENCE_OPS:
                kinds[op] = "reference"
            elif op in ("fp8_gemm", "linear"):
                kinds[op] = {"torch-blockwise": "native", "triton": "triton", "dequant": "emulated"}[plan.block_path]
            else:
                kinds[op] = "native"
        notes = dict(hw.notes)
        notes.update(plan.describe())
        notes["moe_experts"] = (
            "Triton grouped kernel (tokens sorted into expert tiles) for float and FP8 weights (1x128 activation "
            "quant, 128x128 weight scales, in-kernel); int8 weights and float64: reference math"
        )
        notes["attention"] = "torch scaled_dot_product_attention (explicit mask for end-aligned causal, window, global tokens)"
        if self._triton_ok():
            notes["kernels"] = f"Triton, target {self.target().name}"
        else:
            notes["kernels"] = f"triton not installed: {', '.join(TRITON_OPS)} use the reference (pip install 'dshal-{self.name}[triton]')"
        if hw.peaks is not None:
            notes["peaks"] = hw.peaks.source
        peaks = {"bf16": hw.peaks.bf16_flops, "fp8": hw.peaks.fp8_flops} if hw.peaks else {}
        return Capabilities(
            device_name=hw.device_name,
            arch=hw.arch,
            fp8_formats=hw.fp8_formats,
            native_e4m3=hw.native_e4m3,
            op_kinds=kinds,
            dist_backend=hw.dist_backend,
            memory_bytes=hw.memory_bytes,
            compute_units=hw.compute_units,
            peak_flops=peaks,
            peak_bandwidth=hw.peaks.bandwidth if hw.peaks else None,
            emulated=self.emulate,
            notes=notes,
        )

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        table: dict[str, Callable[..., Any]] = {
            "fp8_gemm": self.fp8_gemm,
            "linear": self.linear,
            "attention": self.attention,
            # Vectorized torch math that runs as well on the device: served as is (kind "reference").
            "dequantize_fp8": _reference("dequantize_fp8"),
            "moe_gate": _reference("moe_gate"),
        }
        if self._triton_ok():
            table.update(
                quantize_fp8=self.quantize_fp8,
                rms_norm=self.rms_norm,
                silu_and_mul=self.silu_and_mul,
                rotary_embedding=self.rotary_embedding,
                moe_experts=self.moe_experts,
            )
        return table

    # ------------------------------------------------------------ hooks (CUDA API: CUDA and ROCm)
    def synchronize(self) -> None:
        if not self.emulate:
            torch.cuda.synchronize()

    def memory_stats(self) -> dict[str, int]:
        if self.emulate:
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "total": torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
        }

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=not self.emulate)

    def graph(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A CUDA/HIP graph of ``fn`` (see :class:`DeviceGraph`); emulated: ``fn`` itself."""
        return fn if self.emulate else DeviceGraph(fn)

    def timer(self) -> Timer:
        return Timer(self.synchronize) if self.emulate else DeviceEventTimer()

    # ------------------------------------------------------------ ops (exact spec signatures)
    def _native_fp8_dtype(self, fmt: str) -> torch.dtype:
        return FP8_DTYPES[self.hardware().native_e4m3 if fmt == "e4m3" else fmt]

    def quantize_fp8(self, x, block=(1, 128), fmt="e4m3", scale_fmt=None):
        dtype = self._native_fp8_dtype(fmt)
        block_key = tuple(block) if block is not None else None
        fits = (
            self.hardware().has_fp8
            and block_key in TRITON_QUANT_BLOCKS
            and x.dtype in TRITON_FLOAT_DTYPES
            and dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
            and dtype in self.target().fp8_dtypes  # e.g. no FNUZ on NVIDIA: the reference serves it
            and (x.dim() == 2 or (block_key == (1, 128) and x.dim() >= 1))
            and x.numel() > 0
        )
        if not fits:
            # rowwise/tensorwise/e5m2/batched blocks, FP8 formats the hardware lacks: torch math on
            # the device, same numerics.
            return _reference("quantize_fp8")(x, block, FP8_FORMAT_OF[dtype], scale_fmt)
        quant = self.kernels().quant
        rows = x.reshape(-1, x.shape[-1])
        q, scale = quant.fp8_quantize_blocks(
            rows, block_key, dtype, scale_fmt == "ue8m0", target=self.target()
        )
        if x.dim() == 2:
            return q, scale
        lead = x.shape[:-1] if x.dim() > 1 else ()
        return q.reshape(x.shape), scale.reshape(*lead, scale.shape[-1])

    def fp8_gemm(self, a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        from dshal.ops.gemm import gemm_granularity

        granularity = gemm_granularity("fp8_gemm", a, a_scale, b, b_scale)
        plan = self.gemm_plan()
        if granularity == "block":
            return self._block_gemm(a, a_scale, b, b_scale, out_dtype, plan)
        if self._scaled_mm_fits(a, b, granularity, out_dtype, plan):
            try:
                return scaled_mm_rowwise_or_tensorwise(a, a_scale, b, b_scale, granularity, out_dtype)
            except (RuntimeError, ValueError) as err:  # a case this torch build rejects: remember it, use the block path
                self._cache.setdefault("scaled_mm_refused", set()).add((granularity, a.dtype, b.dtype, out_dtype))
                log.warning("dshal %s: torch._scaled_mm refused %s %s x %s -> %s (%s); using the block path",
                            self.name, granularity, a.dtype, b.dtype, out_dtype, str(err).splitlines()[0][:120])
        return self._broadcast_block_gemm(a, a_scale, b, b_scale, granularity, out_dtype, plan)

    def _scaled_mm_fits(self, a, b, granularity: str, out_dtype, plan: GemmPlan) -> bool:
        allowed_out = plan.tensorwise_out_dtypes if granularity == "tensor" else plan.rowwise_out_dtypes
        return (
            a.dtype in plan.scaled_mm_dtypes
            and b.dtype in plan.scaled_mm_dtypes
            and not (a.dtype == b.dtype == torch.float8_e5m2)  # at least one operand must be E4M3
            and out_dtype in allowed_out
            and a.shape[1] % 16 == 0
            and b.shape[0] % 16 == 0
            and a.shape[0] > 0
            and (granularity, a.dtype, b.dtype, out_dtype) not in self._cache.get("scaled_mm_refused", ())
        )

    def _block_gemm(self, a, a_scale, b, b_scale, out_dtype, plan: GemmPlan):
        if plan.block_path == "torch-blockwise" and self._torch_blockwise_fits(a, b, out_dtype):
            try:
                return torch_blockwise_gemm(a, a_scale, b, b_scale, out_dtype)
            except (RuntimeError, ValueError) as err:
                with self._cache_lock:
                    self._cache.setdefault("blockwise_refused", set()).add(out_dtype)
                log.warning("dshal %s: blockwise scaled_mm refused output %s (%s); using the Triton kernel for it "
                            "from now on", self.name, out_dtype, str(err).splitlines()[0][:120])
        fp8_ok = self.target().fp8_dtypes
        if (
            plan.block_path == "dequant" or not self._triton_ok() or a.shape[0] == 0 or b.shape[0] == 0
            or a.dtype not in fp8_ok or b.dtype not in fp8_ok  # an FP8 format this hardware lacks
        ):  # fmt: skip
            return _reference("fp8_gemm")(a, a_scale, b, b_scale, out_dtype)
        kernel_out = out_dtype if out_dtype in TRITON_FLOAT_DTYPES else torch.float32
        out = self.kernels().gemm.fp8_block_gemm(
            a.contiguous(), a_scale.float().contiguous(), b.contiguous(), b_scale.float().contiguous(),
            kernel_out, target=self.target(),
        )
        return out if kernel_out == out_dtype else out.to(out_dtype)

    def blockwise_refused(self) -> frozenset[torch.dtype]:
        """Output dtypes for which cuBLASLt blockwise ``scaled_mm`` failed at run time (they use
        the Triton kernel from then on)."""
        return frozenset(self._cache.get("blockwise_refused", ()))

    def _torch_blockwise_fits(self, a, b, out_dtype) -> bool:
        return (
            out_dtype in self.gemm_plan().blockwise_out_dtypes
            and out_dtype not in self.blockwise_refused()
            and a.dtype == b.dtype == torch.float8_e4m3fn
            # K blocks a multiple of 4: torch versions differ on the padding of the 128x128
            # scales' row stride otherwise (DeepSeek-V3's K are all multiples of 512).
            and a.shape[1] % (4 * BLOCK) == 0
            and b.shape[0] % BLOCK == 0
            and a.shape[0] > 0
        )

    def _broadcast_block_gemm(self, a, a_scale, b, b_scale, granularity: str, out_dtype, plan: GemmPlan):
        """Row/tensor scales through the block path: ``a``'s scale broadcast to 1x128 blocks,
        ``b``'s applied to the float32 result (exact: it is constant along K)."""
        m, k = a.shape
        n = b.shape[0]
        kb, nb = math.ceil(k / BLOCK), math.ceil(n / BLOCK)
        sa = a_scale.float().reshape(-1, 1).expand(m, kb).contiguous() if granularity == "row" else \
            a_scale.float().reshape(1, 1).expand(m, kb).contiguous()
        ones = torch.ones(nb, kb, dtype=torch.float32, device=a.device)
        acc = self._block_gemm(a, sa, b, ones, torch.float32, plan)
        sb = b_scale.float().reshape(1, -1) if granularity == "row" else b_scale.float().reshape(())
        return (acc * sb).to(out_dtype)

    def linear(self, x, weight, bias=None, weight_scale=None):
        if weight.dtype in FLOAT_DTYPES:
            w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
            b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
            return torch.nn.functional.linear(x, w, b)
        if weight.dtype == torch.int8:  # W8A8 is not a GPU-plugin path here: reference math
            return _reference("linear")(x, weight, bias, weight_scale)
        from dshal.ops.gemm import GRANULARITY_BLOCKS, weight_quant_mode

        mode = weight_quant_mode("linear", weight, weight_scale)
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = self.quantize_fp8(x2, GRANULARITY_BLOCKS[mode][0], FP8_FORMAT_OF[weight.dtype], None)
        ws = weight_scale.reshape(()) if mode == "tensor" else weight_scale
        # One rounding from the float32 accumulator, as the reference does.
        gemm_out = x.dtype if bias is None and x.dtype in TRITON_FLOAT_DTYPES else torch.float32
        y = self.fp8_gemm(xq, xs, weight, ws, gemm_out)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    def rms_norm(self, x, weight, eps=1e-6, residual=None):
        if x.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0:
            return _reference("rms_norm")(x, weight, eps, residual)
        return self.kernels().norm.rms_norm(x, weight, eps, residual, target=self.target())

    def silu_and_mul(self, x):
        if x.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0:
            return _reference("silu_and_mul")(x)
        return self.kernels().activation.silu_and_mul(x, target=self.target())

    def rotary_embedding(self, x, cos, sin, interleaved=True):
        if x.dtype not in TRITON_FLOAT_DTYPES or cos.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0:
            return _reference("rotary_embedding")(x, cos, sin, interleaved)
        return self.kernels().rotary.rotary_embedding(x, cos, sin, interleaved, target=self.target())

    def moe_experts(self, x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
        # One grouped Triton kernel per projection, FP8 weights included (activations quantized
        # per 1x128 inside it, 128x128 weight scales, as the contract's W8A8 math). Int8 weights,
        # float64 and FP8 formats this hardware lacks: the reference.
        fp8_ok = self.target().fp8_dtypes
        served = all(w.dtype == x.dtype or w.dtype in fp8_ok for w in (w13, w2))
        if x.dtype not in TRITON_FLOAT_DTYPES or ids.numel() == 0 or not served:
            return _reference("moe_experts")(x, weights, ids, w13, w2, w13_scale, w2_scale)
        return self.kernels().moe.grouped_moe_experts(
            x, weights, ids, w13, w2, w13_scale, w2_scale, target=self.target()
        )

    def attention(self, q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        from dshal.ops.attention import nonfinite_guard

        # The contract's NaN rule, without reading a value on the host (also when emulated on
        # CPU tensors: the path a device runs, which graph capture needs).
        guard = nonfinite_guard(q, k, v, causal, window, global_tokens, may_read_host=False)
        if guard is None:
            return _sdpa_attention(q, k, v, causal, scale, window, global_tokens)
        # SDPA alone lets a NaN key the mask hides leak, and may drop one the query sees.
        return guard.apply(_sdpa_attention(guard.q, guard.k, guard.v, causal, scale, window, global_tokens))


def _sdpa_attention(q, k, v, causal, scale, window, global_tokens):  # noqa: ANN001
    """The attention op on finite inputs through torch's SDPA (with the op's mask)."""
    from dshal.ops.attention import visible_keys

    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if tq == 0 or tk == 0:
        return _reference("attention")(q, k, v, causal, scale, window, global_tokens)
    if causal and window is None and tq == tk:
        # SDPA's is_causal is top-left aligned, which is end-aligned when Tq == Tk.
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    seen = None if (causal and window is None and tq == 1) else visible_keys(tq, tk, causal, window, global_tokens, q.device)
    if seen is None:
        return sdpa(q, k, v, scale=scale, enable_gqa=gqa)
    out = sdpa(q, k, v, attn_mask=seen, scale=scale, enable_gqa=gqa)
    if tq > tk:
        # Only then can a query see no key (its position is < 0); the contract says it
        # outputs zeros, SDPA gives NaN. Checked by shape, so no host sync.
        out = out.masked_fill(~seen.any(dim=-1)[:, None], 0.0)
    return out


__all__ = [
    "DeviceEventTimer",
    "DeviceGraph",
    "GemmPlan",
    "GpuHardware",
    "PeakFigures",
    "TRITON_OPS",
    "TorchGpuBackend",
    "lookup_peaks",
    "probe_torch_blockwise",
    "scaled_mm_rowwise_or_tensorwise",
    "torch_blockwise_gemm",
    "triton_installed",
]
