"""The base class the GPU plugins share: :class:`TorchGpuBackend`, a backend on torch's CUDA
API (CUDA or ROCm/HIP builds of torch alike) whose ops are served by dshal's portable Triton
kernels, ``torch._scaled_mm`` and ``scaled_dot_product_attention``. This module decides *which*
kernel or torch call serves which inputs; it holds no vendor probe and never asks which vendor
it runs on.

A subclass declares facts, and the base dispatches on them:

* :meth:`TorchGpuBackend.read_hardware` -- the device's :class:`~dshal.Capabilities` (name,
  arch, FP8 formats, memory, peaks); the base adds how each op is served;
* :meth:`TorchGpuBackend.kernel_target` -- the Triton kernels'
  :class:`~dshal.kernels.triton.target.KernelTarget` (tile tables, warp size, FP8 dots);
* :meth:`TorchGpuBackend.plan_gemm` -- a :class:`GemmPlan`: which FP8 dtypes / output dtypes
  ``torch._scaled_mm`` takes here, and which path serves block-scaled FP8 GEMMs;
* :meth:`TorchGpuBackend.native_block_gemm` (optional) -- the plugin's own block-scaled FP8
  GEMM (a vendor library call), used where its :class:`GemmPlan` says so.

Device events, graphs, ``synchronize`` and memory statistics use ``torch.cuda``, which a ROCm
build of torch serves through HIP under the same names: they are shared, not vendor code.

**Emulated mode** (``emulate=True``): ``device_type`` is ``"cpu"``; the same op code runs
on CPU tensors, the Triton kernels under ``TRITON_INTERPRET=1`` (set before the kernel
modules are first imported) and ``torch._scaled_mm`` on the CPU.

Nothing here imports triton (or any vendor library) at import time or at discovery.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from dshal.backend import Availability, Backend, Capabilities, OpKind, OpPath, Timer, host_available_memory
from dshal.errors import ArgumentError, BackendUnavailableError, DeviceError
from dshal.kernels import triton as triton_kernels
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.attention import guarded_attention, sdpa, visible_keys
from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import GRANULARITY_BLOCKS, gemm_granularity, weight_quant_mode
from dshal.ops.moe import NO_EXPERT
from dshal.ops.spec import FLOAT_DTYPES, FP8_DTYPES, FP8_FORMAT_OF, check_ids_in_range
from dshal.perf.measure import same_part
from dshal.versions import installed, interpreter_refusal

log = logging.getLogger(__name__)

#: Ops served by a Triton kernel (the rest: fp8_gemm, linear, attention go through torch).
TRITON_OPS = (
    "quantize_fp8", "rms_norm", "silu_and_mul", "rotary_embedding", "moe_experts", "sparse_mla_attention", "indexer_topk",
)
#: Ops served by their reference implementation on the device's tensors (plain torch math).
REFERENCE_OPS = ("dequantize_fp8", "moe_gate")
#: Block shapes the Triton quantization kernel takes (others use the torch reference math).
TRITON_QUANT_BLOCKS = ((1, 128), (128, 128))
#: Dtypes the Triton elementwise kernels take (float64 is an oracle dtype: torch math serves it).
TRITON_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 128
#: CUDA's (and HIP's) limit on a launch grid's y and z sizes.
MAX_GRID_Y = 65535


def triton_installed() -> bool:
    """Whether ``import triton`` would find a package (without importing it)."""
    return importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------- declared facts
@dataclass(frozen=True)
class PeakFigures:
    """One row of a plugin's datasheet table: dense (non-sparse) peak throughput and memory
    bandwidth of one part, with the source. Not a second facts type: :meth:`TorchGpuBackend.
    device_hardware` turns the row naming this device into ``Capabilities.peak_flops`` /
    ``peak_bandwidth`` (and ``notes["peaks"]``)."""

    match: str  #: the part, matched exactly against the device name (:func:`dshal.perf.measure.same_part`)
    bf16_flops: float
    fp8_flops: float
    bandwidth: float  #: bytes/s
    source: str
    #: The whole part's compute units (0: not given). A device showing fewer under the same
    #: name is a partition of it (an MI300X in CPX mode: 38 of 304 CUs): its FLOP/s scale.
    compute_units: int = 0

    @classmethod
    def datasheet(cls, match: str, bf16_tflops: float, fp8_tflops: float, tb_per_s: float, source: str,
                  compute_units: int = 0) -> PeakFigures:
        """A row in a datasheet's units: dense TFLOP/s and TB/s."""
        return cls(match, bf16_tflops * 1e12, fp8_tflops * 1e12, tb_per_s * 1e12, source, compute_units)

    def for_units(self, units: int) -> PeakFigures:
        """This row for a device showing ``units`` compute units: the FLOP/s of that share of
        the part where it shows fewer than the whole (a partition), else the row itself. The
        bandwidth stays the part's (a partition's share depends on its memory mode), and the
        source says so."""
        if not self.compute_units or units >= self.compute_units or units <= 0:
            return self
        share = units / self.compute_units
        return dataclasses.replace(
            self, bf16_flops=self.bf16_flops * share, fp8_flops=self.fp8_flops * share,
            source=f"{self.source}; FLOP/s scaled to this partition's {units} of {self.compute_units} CUs "
                   "(bandwidth: the whole part's)",
        )


def lookup_peaks(device_name: str, table: tuple[PeakFigures, ...]) -> PeakFigures | None:
    """The row of ``table`` whose part is exactly ``device_name``'s (vendor prefix, memory
    size and type aside), or None: an unknown part gets no datasheet figures."""
    for row in table:
        if same_part(device_name, row.match):
            return row
    return None


@dataclass(frozen=True)
class GemmPlan:
    """How fp8_gemm runs here: the routing of the torch calls, decided once per device.

    Why a type of its own (not a :class:`~dshal.Capabilities` field, not part of the
    :class:`~dshal.kernels.triton.target.KernelTarget`): it holds torch dtypes and a probe's
    outcome on *this* torch build and runtime library, which the core never reads (it reads
    ``Capabilities.op_kinds``, derived from this) and which the Triton kernels and their
    cross-compilation, keyed by target alone, must not depend on.

    ``block_path``: ``"native"`` (the plugin's :meth:`TorchGpuBackend.native_block_gemm`, a
    vendor library, for the output dtypes in ``native_out_dtypes``; the Triton kernel for the
    rest), ``"triton"`` (dshal's block-FP8 kernel) or ``"dequant"`` (dequantize + matmul: no
    FP8 hardware or no triton).
    """

    block_path: str
    #: FP8 dtypes ``torch._scaled_mm`` takes on this device (empty: do not use it).
    scaled_mm_dtypes: frozenset[torch.dtype] = frozenset()
    tensorwise_out_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    rowwise_out_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)
    #: output dtypes the native block GEMM was found to serve (``block_path == "native"``)
    native_out_dtypes: tuple[torch.dtype, ...] = ()
    #: what the native block GEMM is, for ``dshal info`` (e.g. the library call)
    native_name: str = ""
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
            "native": f"{self.native_name or 'the plugin native block GEMM'} for outputs "
            f"{names(self.native_out_dtypes)}; Triton kernel otherwise",
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
    keep them). Other arguments must be plain values (:attr:`PLAIN_VALUES`), each value
    captured apart; anything else is an ArgumentError. ``fn`` must be capturable: no host
    syncs, no data-dependent shapes.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Any], dict[str, Any], Any]] = {}

    #: Non-tensor arguments a capture may take (also in tuples: a shape): their values are baked
    #: into the graph, so each value gets its own capture. A container could hold tensors, which
    #: a replay would not refresh (it copies top-level tensor arguments only), and an object's
    #: repr may not tell two states apart: both are refused.
    PLAIN_VALUES = (bool, int, float, str, type(None), torch.dtype)

    @classmethod
    def _plain(cls, v: Any) -> bool:
        """A value whose repr tells it apart: a plain value, or a tuple of them (a shape)."""
        return isinstance(v, cls.PLAIN_VALUES) or (type(v) is tuple and all(cls._plain(x) for x in v))

    @classmethod
    def _key(cls, args: tuple, kwargs: dict[str, Any]) -> tuple:
        def sig(where: str, v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return ("tensor", tuple(v.shape), v.dtype, str(v.device), tuple(v.stride()))
            if not cls._plain(v):
                raise ArgumentError(
                    f"DeviceGraph: argument {where} is of type {type(v).__name__}, expected a tensor or a plain value "
                    "(bool, int, float, str, None, torch.dtype, or a tuple of them): a replay refreshes top-level "
                    "tensors only, and other values are baked into the capture")
            return ("value", type(v), repr(v))

        return (tuple(sig(str(i), a) for i, a in enumerate(args))
                + tuple((k, sig(repr(k), v)) for k, v in sorted(kwargs.items())))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        # On the tensors' device, whichever is current: the capture's streams, the kernels'
        # launches (which follow their tensors) and the replay's stream must be that one.
        with triton_kernels.on_tensor_device([*args, *kwargs.values()]):
            return self._replay(key, args, kwargs)

    def _replay(self, key: tuple, args: tuple, kwargs: dict[str, Any]) -> Any:
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


def pci_bus_id(index: int, domain_digits: int) -> str | None:
    """``DOMAIN:BUS:DEVICE.0`` of torch's device ``index`` (how NVML and amdsmi name a GPU;
    NVML writes 8 domain digits, amdsmi 4), or None when torch does not report it.

    Shared: both plugins match torch's device order to their management library's by this
    id, and ``torch.cuda.get_device_properties`` reports it on CUDA and ROCm builds alike."""
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):0{domain_digits}x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


# ---------------------------------------------------------------- the base backend
class TorchGpuBackend(Backend):
    """Base of the GPU plugins; see the module docstring. Subclasses implement ``name``,
    :meth:`availability`, :meth:`read_hardware`, :meth:`kernel_target`, :meth:`plan_gemm`
    (and :meth:`~dshal.Backend.topology`, :meth:`native_block_gemm` where they have one)."""

    def __init__(self, *, emulate: bool = False) -> None:
        super().__init__(emulate=emulate)
        self._cache: dict[str, Any] = {}  # per-instance memo of device facts and loaded kernels
        self._cache_lock = threading.RLock()  # ops may be called from several threads at once
        self._reference_calls: Counter[str] = Counter()  # ops served with the reference math inside a provider

    # ------------------------------------------------------------ declared by subclasses
    @abc.abstractmethod
    def read_hardware(self) -> Capabilities:
        """The device's facts (or, emulated, those of the device the emulation stands for) as
        :class:`~dshal.Capabilities` without ``op_kinds`` (the base adds how each op is served,
        see :meth:`capabilities`); called once, see :meth:`hardware`. Build it with
        :meth:`device_hardware` or :meth:`emulated_hardware`."""

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

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per backend instance under ``key`` (thread-safe): device
        facts that need a device query or a probe."""
        if key not in self._cache:
            with self._cache_lock:  # re-entrant: one fact's factory may read another
                if key not in self._cache:
                    self._cache[key] = make()
        return self._cache[key]

    def hardware(self) -> Capabilities:
        return self.memo("hardware", self.read_hardware)

    def gemm_plan(self) -> GemmPlan:
        return self.memo("gemm_plan", self.plan_gemm)

    def target(self) -> KernelTarget:
        """:meth:`kernel_target`, built once (the ops read it on every call)."""
        return self.memo("kernel_target", self.kernel_target)

    def emulated_hardware(self, vendor_arch: str, arch: str, formats: tuple[str, ...], native: str, fp8_note: str) -> Capabilities:
        """What emulated mode declares: the emulated part's FP8 facts, no memory or peaks."""
        return Capabilities(
            device_name=f"CPU emulating {vendor_arch} (Triton interpreter)",
            arch=arch,
            fp8_formats=formats,
            native_e4m3=native,
            dist_backend="gloo",  # CPU tensors: NCCL/RCCL cannot carry them
            emulated=True,
            notes={"fp8": fp8_note, "emulated": "kernels run on CPU tensors; collectives on gloo"},
        )

    def device_hardware(
        self, arch: str, formats: tuple[str, ...], native: str, peaks: tuple[PeakFigures, ...], notes: Mapping[str, str]
    ) -> Capabilities:
        """This rank's device's name, memory and compute units from torch, with the plugin's
        FP8 facts and the datasheet row of ``peaks`` that names this part (if any)."""
        props = torch.cuda.get_device_properties(self.device())
        row = lookup_peaks(props.name, peaks)
        row = row.for_units(int(props.multi_processor_count)) if row else None
        return Capabilities(
            device_name=props.name,
            arch=arch,
            fp8_formats=formats,
            native_e4m3=native,
            dist_backend="nccl",  # RCCL behind the same name on ROCm
            memory_bytes=int(props.total_memory),
            compute_units=int(props.multi_processor_count),
            peak_flops={"bf16": row.bf16_flops, "fp8": row.fp8_flops} if row else {},
            peak_bandwidth=row.bandwidth if row else None,
            notes={**notes, **({"peaks": row.source} if row else {})},
        )

    def device_availability(self, runtime: str, visible_env: Sequence[str]) -> Availability:
        """Availability once the torch build is right: a device must be visible."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
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
        refusal = interpreter_refusal(installed("triton"))
        if refusal:
            return Availability(False, f"emulate: true, but {refusal}")
        try:
            triton_kernels.ensure_interpreter_if_cpu("cpu")
        except BackendUnavailableError as err:
            return Availability(False, f"emulate: true, but {err}")
        return Availability(True, f"emulated: {what} on CPU tensors (Triton interpreter, torch._scaled_mm on CPU)", emulated=True)

    def kernels(self) -> SimpleNamespace:
        """The Triton kernel modules, imported on first use (interpreter first when emulated)."""

        def load() -> SimpleNamespace:
            return SimpleNamespace(**triton_kernels.load_kernel_modules(self.device_type))

        return self.memo("kernels", load)

    def _triton_ok(self) -> bool:
        return self.memo("triton_ok", triton_installed)

    def capabilities(self) -> Capabilities:
        return self.memo("capabilities", self._build_capabilities)

    def _build_capabilities(self) -> Capabilities:
        hw = self.hardware()
        plan = self.gemm_plan()
        paths = self._op_paths(plan)
        kinds: dict[str, OpKind] = {}
        for op in self.ops():
            if op in paths:  # the main path: an FP8 checkpoint's format (fp8_checkpoint_gemm)
                kinds[op] = paths[op][hw.fp8_checkpoint_gemm].kind
            elif op in TRITON_OPS:
                kinds[op] = "triton"
            elif op in REFERENCE_OPS:
                kinds[op] = "reference"
            else:
                kinds[op] = "native"
        notes = dict(hw.notes)
        notes.update(plan.describe())
        notes["moe_experts"] = (
            "Triton grouped kernel (tokens sorted into expert tiles) for float and FP8 weights (1x128 activation "
            "quant, 128x128 weight scales, in-kernel); int8 weights and float64: reference math"
        )
        notes["attention"] = (
            "torch scaled_dot_product_attention (explicit mask for end-aligned causal, window, global tokens); "
            "non-finite guard built on the device: where every key is seen (decode), products by zeros on the "
            "inputs as given, else zeroed copies"
        )
        notes["indexer_topk"] = (
            "Triton scores kernel (one program per query and block of keys, every head, float32 accumulation), then "
            "torch.topk; float64, over 128 heads or a head over 512: reference math"
        )
        notes["sparse_mla_attention"] = (
            "Triton kernel (one program per query and block of heads: the kept latent rows gathered, online softmax, "
            "float32 accumulation); float64 and value rows over 1024: reference math"
        )
        if self._triton_ok():
            notes["kernels"] = f"Triton, target {self.target().name}"
        else:
            notes["kernels"] = f"triton not installed: {', '.join(TRITON_OPS)} use the reference (pip install 'dshal-{self.name}[triton]')"
        # moe_experts: the grouped kernel skips NO_EXPERT slots on the device; the reference drops them
        return dataclasses.replace(hw, op_kinds=kinds, op_paths=paths, emulated=self.emulate, notes=notes,
                                   moe_no_expert_ids=True)

    def _op_paths(self, plan: GemmPlan) -> dict[str, dict[str, OpPath]]:
        """What serves ``fp8_gemm``, ``linear`` and ``moe_experts`` per weight format, as the op
        code below routes them (a float linear is a torch matmul whatever the FP8 path is)."""
        block_kind: OpKind = {"native": "native", "triton": "triton", "dequant": "emulated"}[plan.block_path]
        block = OpPath(block_kind, plan.describe()["fp8_gemm block path"])
        if plan.scaled_mm_dtypes:
            fits = "where it takes the dtypes/shapes; else the block path"
            row = OpPath("native", f"torch._scaled_mm rowwise {fits}")
            tensor = OpPath("native", f"torch._scaled_mm tensorwise {fits}")
        else:
            row = tensor = OpPath(block_kind, "the block path with broadcast scales: " + block.via)
        # FP8 kernels run only for formats this hardware has (see quantize_fp8 / moe_experts).
        fp8_kernels = self._triton_ok() and bool(self.hardware().fp8_formats) and bool(self.target().fp8_dtypes)
        act_quant = "activations quantized per 1x128 by " + ("the Triton kernel" if fp8_kernels else "torch math")
        linear = {
            "bf16": OpPath("native", "torch matmul (torch.nn.functional.linear) in the activation dtype"),
            "fp8-block": OpPath(block_kind, f"{act_quant}; fp8_gemm: {block.via}"),
            "fp8-row": OpPath(row.kind, f"activations quantized per row (torch math); fp8_gemm: {row.via}"),
            "fp8-tensor": OpPath(tensor.kind, f"activations quantized per tensor (torch math); fp8_gemm: {tensor.via}"),
            "int8": OpPath("reference", "reference math (W8A8 is not a GPU-plugin path)"),
        }
        paths = {"fp8_gemm": {"fp8-block": block, "fp8-row": row, "fp8-tensor": tensor}, "linear": linear}
        if self._triton_ok():
            grouped = "Triton grouped kernel (tokens sorted into expert tiles)"
            moe_fp8 = OpPath("triton", f"{grouped}, 1x128 activation quant and 128x128 weight scales in-kernel")
            paths["moe_experts"] = {
                "bf16": OpPath("triton", grouped),
                "fp8-block": moe_fp8 if fp8_kernels else OpPath("reference", "reference math (no FP8 kernels here)"),
                "int8": OpPath("reference", "reference math (int8 experts are not a GPU-plugin path)"),
            }
        return paths

    def _reference(self, op: str) -> Callable[..., Any]:
        """dshal's reference math for an input this backend's kernel does not take, counted."""
        with self._cache_lock:  # requests on several threads: no lost counts
            self._reference_calls[op] += 1
        return SPECS[op].reference_impl

    def reference_calls(self) -> Mapping[str, int]:
        with self._cache_lock:
            return dict(self._reference_calls)

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        table: dict[str, Callable[..., Any]] = {
            "fp8_gemm": self.fp8_gemm,
            "linear": self.linear,
            "attention": self.attention,
            # Vectorized torch math that runs as well on the device: served as is (kind "reference").
            "dequantize_fp8": SPECS["dequantize_fp8"].reference_impl,
            "moe_gate": SPECS["moe_gate"].reference_impl,
        }
        if self._triton_ok():
            table.update(
                quantize_fp8=self.quantize_fp8,
                rms_norm=self.rms_norm,
                silu_and_mul=self.silu_and_mul,
                rotary_embedding=self.rotary_embedding,
                moe_experts=self.moe_experts,
                sparse_mla_attention=self.sparse_mla_attention,
                indexer_topk=self.indexer_topk,
            )
        return table

    # ------------------------------------------------------------ hooks (CUDA API: CUDA and ROCm)
    def synchronize(self) -> None:
        if not self.emulate:
            torch.cuda.synchronize(self.device())  # this backend's device, should another be current

    def memory_stats(self) -> dict[str, int]:
        if self.emulate:  # the tensors live in host memory
            free = host_available_memory()
            return {} if free is None else {"free": free}
        device = self.device()  # this backend's, should another be current
        device_free, total = torch.cuda.mem_get_info(device)
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        return {
            "allocated": allocated,
            "peak_allocated": torch.cuda.max_memory_allocated(device),
            "reserved": reserved,
            "total": total,
            "free": device_free + reserved - allocated,  # the caching allocator reuses what it holds
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
            bool(self.hardware().fp8_formats)
            and block_key in TRITON_QUANT_BLOCKS
            and x.dtype in TRITON_FLOAT_DTYPES
            and dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
            and dtype in self.target().fp8_dtypes  # e.g. no FNUZ on NVIDIA: the reference serves it
            and (x.dim() == 2 or (block_key == (1, 128) and x.dim() >= 1))
            and x.numel() > 0
            and (-(-x.shape[-1] // BLOCK) <= MAX_GRID_Y or (block_key == (1, BLOCK) and x.shape[-1] % BLOCK == 0))
        )
        if not fits:
            # rowwise/tensorwise/e5m2/batched blocks, FP8 formats the hardware lacks: torch math on
            # the device, same numerics.
            return self._reference("quantize_fp8")(x, block, FP8_FORMAT_OF[dtype], scale_fmt)
        quant = self.kernels().quant
        rows = x.reshape(-1, x.shape[-1])
        if block_key == (1, BLOCK) and x.shape[-1] % BLOCK == 0 and x.shape[-1] // BLOCK > MAX_GRID_Y:
            # The kernel's grid puts a row's blocks in grid.y (at most 65535 on CUDA and HIP): a
            # longer row (a 1-D x past 8.4M elements) goes as rows of one block, the same blocks.
            rows = x.reshape(-1, BLOCK)
        q, scale = quant.fp8_quantize_blocks(
            rows, block_key, dtype, scale_fmt == "ue8m0", target=self.target()
        )
        if x.dim() == 2 and rows.shape == x.shape:
            return q, scale
        lead = x.shape[:-1] if x.dim() > 1 else ()
        return q.reshape(x.shape), scale.reshape(*lead, -1)

    def fp8_gemm(self, a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
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

    def native_block_gemm(
        self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Optional hook: the plugin's own block-scaled FP8 GEMM (a vendor library call),
        tried first when :meth:`gemm_plan` says ``block_path == "native"``. Returns None for
        inputs it does not serve (or that its library refused): the Triton kernel serves them.
        Default: None."""
        return None

    def _block_gemm(self, a, a_scale, b, b_scale, out_dtype, plan: GemmPlan):
        if plan.block_path == "native" and out_dtype in plan.native_out_dtypes:
            out = self.native_block_gemm(a, a_scale, b, b_scale, out_dtype)
            if out is not None:
                return out
        fp8_ok = self.target().fp8_dtypes
        if (
            plan.block_path == "dequant" or not self._triton_ok() or a.shape[0] == 0 or b.shape[0] == 0
            or a.dtype not in fp8_ok or b.dtype not in fp8_ok  # an FP8 format this hardware lacks
        ):  # fmt: skip
            return self._reference("fp8_gemm")(a, a_scale, b, b_scale, out_dtype)
        kernel_out = out_dtype if out_dtype in TRITON_FLOAT_DTYPES else torch.float32
        out = self.kernels().gemm.fp8_block_gemm(
            a.contiguous(), a_scale.float().contiguous(), b.contiguous(), b_scale.float().contiguous(),
            kernel_out, target=self.target(),
        )
        return out if kernel_out == out_dtype else out.to(out_dtype)

    def _broadcast_block_gemm(self, a, a_scale, b, b_scale, granularity: str, out_dtype, plan: GemmPlan):
        """Row/tensor scales through the block path: ``a``'s scale, divided by its largest
        magnitude, broadcast to 1x128 blocks; ``b``'s times that magnitude applied to the
        float32 result (exact: it is constant along K). The split keeps the partial product
        from overflowing where the result does not (a scale near 1e34 with a tiny one)."""
        m, k = a.shape
        n = b.shape[0]
        kb, nb = math.ceil(k / BLOCK), math.ceil(n / BLOCK)
        sa = a_scale.float().reshape(-1, 1) if granularity == "row" else a_scale.float().reshape(1, 1)
        # the largest finite magnitude, a device scalar (no host read): a NaN / Inf scale stays its own row's
        peak = torch.where(sa.isfinite(), sa.abs(), 0.0).amax().clamp_min(torch.finfo(torch.float32).tiny)
        sa = (sa / peak).expand(m, kb).contiguous()
        ones = torch.ones(nb, kb, dtype=torch.float32, device=a.device)
        acc = self._block_gemm(a, sa, b, ones, torch.float32, plan)
        sb = b_scale.float().reshape(1, -1) if granularity == "row" else b_scale.float().reshape(())
        return (acc * (sb * peak)).to(out_dtype)

    def linear(self, x, weight, bias=None, weight_scale=None):
        if weight.dtype in FLOAT_DTYPES:
            w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
            b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
            return torch.nn.functional.linear(x, w, b)
        if weight.dtype == torch.int8:  # W8A8 is not a GPU-plugin path here: reference math
            return self._reference("linear")(x, weight, bias, weight_scale)
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
        # Rows wider than the kernel's one-block reach: the reference (valid op input).
        if x.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0 or x.shape[-1] > self.kernels().norm.MAX_HIDDEN:
            return self._reference("rms_norm")(x, weight, eps, residual)
        return self.kernels().norm.rms_norm(x, weight, eps, residual, target=self.target())

    def silu_and_mul(self, x):
        if x.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0:
            return self._reference("silu_and_mul")(x)
        return self.kernels().activation.silu_and_mul(x, target=self.target())

    def rotary_embedding(self, x, cos, sin, interleaved=True):
        rotary = self.kernels().rotary
        if (x.dtype not in TRITON_FLOAT_DTYPES or cos.dtype not in TRITON_FLOAT_DTYPES or x.numel() == 0
                or x.dim() > rotary.MAX_LEADING + 1):  # more leading dims than the kernel indexes: the reference
            return self._reference("rotary_embedding")(x, cos, sin, interleaved)
        return rotary.rotary_embedding(x, cos, sin, interleaved, target=self.target())

    def moe_experts(self, x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
        # One grouped Triton kernel per projection, FP8 weights included (activations quantized
        # per 1x128 inside it, 128x128 weight scales, as the contract's W8A8 math). Int8 weights,
        # float64 and FP8 formats this hardware lacks: the reference.
        fp8_ok = self.target().fp8_dtypes if self.hardware().fp8_formats else ()  # a part without FP8: the reference
        served = all(w.dtype == x.dtype or w.dtype in fp8_ok for w in (w13, w2))
        if x.dtype not in TRITON_FLOAT_DTYPES or ids.numel() == 0 or not served:
            return self._reference("moe_experts")(x, weights, ids, w13, w2, w13_scale, w2_scale)
        # The contract takes float64 routing weights and scales; the kernel reads float32.
        weights = weights.float() if weights.dtype == torch.float64 else weights
        w13_scale, w2_scale = (s.float() if s is not None and s.dtype == torch.float64 else s for s in (w13_scale, w2_scale))
        experts = w13.shape[0]  # the op's own words for a bad id (host read checked, device assert trusted)
        check_ids_in_range("moe_experts", "ids", ids, experts, "expert id", f"w13 has {experts} experts", low=NO_EXPERT)
        return self.kernels().moe.grouped_moe_experts(
            x, weights, ids, w13, w2, w13_scale, w2_scale, target=self.target(), check_ids=False
        )

    def sparse_mla_attention(self, q, kv, indices, scale, v_dim):
        kernels = self.kernels().sparse_attention
        if q.dtype not in TRITON_FLOAT_DTYPES or v_dim > kernels.MAX_V_DIM:
            return self._reference("sparse_mla_attention")(q, kv, indices, scale, v_dim)
        # the wrapper checks the indices' range (host read checked, device assert trusted)
        return kernels.sparse_mla_attention(q, kv, indices, scale, v_dim, target=self.target())

    def indexer_topk(self, q, weights, k, topk, visible=None):
        kernels = self.kernels().sparse_attention
        if q.dtype not in TRITON_FLOAT_DTYPES or q.shape[2] > kernels.MAX_INDEX_HEADS or q.shape[3] > kernels.MAX_INDEX_DIM:
            return self._reference("indexer_topk")(q, weights, k, topk, visible)
        return kernels.indexer_topk(q, weights, k, topk, visible, target=self.target())

    def attention(self, q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        # The contract's NaN rule, without reading a value on the host (also when emulated on
        # CPU tensors: the path a device runs, which graph capture needs).
        # SDPA alone lets a NaN key the mask hides leak, and may drop one the query sees.
        return guarded_attention(_sdpa_attention, q, k, v, causal, scale, window, global_tokens, may_read_host=False)


def _sdpa_attention(q, k, v, causal, scale, window, global_tokens):  # noqa: ANN001
    """The attention op on finite inputs through torch's SDPA (with the op's mask)."""
    tq, tk = q.shape[2], k.shape[2]
    if tq == 0 or tk == 0:
        return SPECS["attention"].reference_impl(q, k, v, causal, scale, window, global_tokens)
    if causal and window is None and tq == tk:
        # SDPA's is_causal is top-left aligned, which is end-aligned when Tq == Tk.
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if causal and window is None and 1 < tq < tk:
        # A prefill chunk after cached tokens: torch's lower-right causal bias runs the
        # flash / memory-efficient kernels with end alignment, skipping the masked blocks,
        # where a boolean mask would be materialized and every block computed. Elsewhere
        # (CPU tensors: emulated) torch materializes the same mask itself.
        # lazy: importing it imports triton, which an emulated backend must import only after
        # TRITON_INTERPRET is set (dshal.kernels.triton.ensure_interpreter_if_cpu)
        from torch.nn.attention.bias import causal_lower_right

        return sdpa(q, k, v, attn_mask=causal_lower_right(tq, tk), scale=scale)
    seen = None if (causal and window is None and tq == 1) else visible_keys(tq, tk, causal, window, global_tokens, q.device)
    if seen is None:
        return sdpa(q, k, v, scale=scale)
    out = sdpa(q, k, v, attn_mask=seen, scale=scale)
    if tq > tk:
        # Only then can a query see no key (its position is < 0); the contract says it
        # outputs zeros, SDPA gives NaN. Checked by shape, so no host sync.
        out = out.masked_fill(~seen.any(dim=-1)[:, None], 0.0)
    return out


__all__ = [
    "BLOCK",
    "DeviceEventTimer",
    "DeviceGraph",
    "GemmPlan",
    "PeakFigures",
    "REFERENCE_OPS",
    "TRITON_OPS",
    "TorchGpuBackend",
    "lookup_peaks",
    "pci_bus_id",
    "scaled_mm_rowwise_or_tensorwise",
    "triton_installed",
]
