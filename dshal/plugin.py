"""The plugin toolkit: the one module of dshal's internals a backend plugin may import.

A plugin imports ``dshal`` (the public API: ``Backend``, ``Capabilities``, the errors...),
this module, and its own package -- nothing else of dshal. Everything here is a re-export
(no logic lives in this file), so that what a plugin depends on is listed in one place and
the modules behind it can move without breaking plugins.

What is here, and why a plugin needs it:

* **The device interface** -- :class:`~dshal.Backend`, :class:`~dshal.Availability`,
  :class:`~dshal.Capabilities` (the facts the core decides from), :class:`~dshal.Topology`,
  :class:`~dshal.Timer`, ``OpKind``, ``OpPath`` (an op's path for one weight format),
  ``WEIGHT_FORMATS``, ``API_VERSION``: what every backend implements and returns.
* **The errors** -- :class:`~dshal.DshalError` and its subclasses: what a plugin raises on
  bad input or an unusable device.
* **The op catalogue** -- ``SPECS`` (op name -> spec; ``SPECS[op].reference_impl`` is the
  op's reference math, what a plugin serves an input with when its own path does not take
  it), ``dequantize_fp8`` / ``quantize_int8`` (the references behind their input checks),
  and the format facts the ops share: ``FP8_DTYPES``, ``FP8_DTYPE_LIST``, ``FP8_FORMAT_OF``,
  ``FLOAT_DTYPES``, ``dequantize_to``, ``GRANULARITY_BLOCKS``, ``gemm_granularity``;
  ``fp8_block_to_int8_rows`` (a 128x128-block FP8 weight to int8 rows on the host, the
  references' bits: for a checkpoint converter); ``check_ids_in_range``, the value check
  every ``moe_experts`` provider runs on its ``ids`` before indexing with them (a host read
  in checked mode, a device-side assert inside ``dshal.ops.trusted()``: the input checker
  cannot do it without a host sync on every call; ``NO_EXPERT``, the id -1 that marks a
  slot no expert serves, and ``moe_experts_on_kept_slots``, which serves such ``ids``
  through a provider's own path on the kept slots, for a provider whose kernel cannot skip
  them itself: a host read); ``guarded_attention``, how an ``attention``
  provider meets the op's NaN / Inf rule around a kernel that does not (``nonfinite_guard``
  is its one-call guard: the inputs to run and the outputs to poison), and
  ``values_are_key_columns`` (absorbed MLA's values are its keys' first columns: one read serves both).
* **The GPU base** (``dshal.backends.triton_gpu``) -- :class:`TorchGpuBackend`, the class
  the torch-CUDA-API plugins (NVIDIA, AMD) subclass: it routes each op to a portable Triton
  kernel or a torch call from the facts the subclass declares (:class:`GemmPlan`,
  :class:`PeakFigures` rows, the kernel target), with CUDA/HIP events and graphs; plus
  ``triton_installed``, ``pci_bus_id``, ``lookup_peaks``, ``scaled_mm_rowwise_or_tensorwise``
  and ``BLOCK`` (the 128-wide FP8 scale block).
* **The Triton kernel targets** (``dshal.kernels.triton.target``) -- :class:`KernelTarget`,
  :class:`TileConfig`, ``SHIPPED_TARGETS`` / ``shipped_target`` (the tile tables dshal
  ships, keyed by target name: a plugin maps its arch to one), ``triton_arch_refusal`` (why the
  installed Triton cannot build, or builds slower, a ``sm_XYa``/``gfxNNN`` arch; facts in
  ``dshal.versions``), ``installed_version`` (a distribution's version without importing it), and
  ``ensure_interpreter_if_cpu`` (emulated mode: run the kernels on CPU tensors).
* **Placement** (``dshal.parallel.placement``) -- ``topology_from_matrix`` (build a
  :class:`~dshal.Topology` from a management library's answers), ``place_groups`` and
  ``islands`` (what ``dshal.parallel`` does with it).
* **Checkpoint paths** (``dshal.hub``) -- ``resolve_checkpoint``: a checkpoint argument given
  as a Hugging Face model id (``org/name[@revision]``) to its snapshot folder in the local
  cache, as every dshal command reads one (for a plugin's checkpoint converter).
"""

from __future__ import annotations

from dshal.backend import (
    API_VERSION,
    WEIGHT_FORMATS,
    Availability,
    Backend,
    Capabilities,
    OpKind,
    OpPath,
    Timer,
    Topology,
    host_available_memory,
)
from dshal.backends.triton_gpu import (
    BLOCK,
    DeviceEventTimer,
    DeviceGraph,
    GemmPlan,
    PeakFigures,
    TorchGpuBackend,
    lookup_peaks,
    pci_bus_id,
    scaled_mm_rowwise_or_tensorwise,
    triton_installed,
)
from dshal.errors import (
    ArgumentError,
    BackendUnavailableError,
    CommError,
    ConfigError,
    DeviceError,
    DshalError,
    DTypeError,
    ShapeError,
    UnsupportedOpError,
)
from dshal.hub import resolve_checkpoint
from dshal.kernels.triton import ensure_interpreter_if_cpu
from dshal.kernels.triton.target import SHIPPED_TARGETS, KernelTarget, TileConfig, shipped_target
from dshal.ops.attention import guarded_attention, nonfinite_guard, values_are_key_columns
from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import GRANULARITY_BLOCKS, gemm_granularity
from dshal.ops.moe import NO_EXPERT, moe_experts_on_kept_slots
from dshal.ops.quant import FP8_DTYPE_LIST, dequantize_to, e4m3fn_bits_as_e4m3fnuz, fp8_block_to_int8_rows
from dshal.ops.reference import dequantize_fp8, quantize_int8
from dshal.ops.spec import FLOAT_DTYPES, FP8_DTYPES, FP8_FORMAT_OF, check_ids_in_range
from dshal.parallel.placement import islands, place_groups, topology_from_matrix
from dshal.versions import installed as installed_version, triton_arch_refusal

__all__ = [
    # the device interface
    "API_VERSION",
    "Availability",
    "Backend",
    "Capabilities",
    "OpKind",
    "OpPath",
    "Timer",
    "Topology",
    "WEIGHT_FORMATS",
    "host_available_memory",
    # errors
    "ArgumentError",
    "BackendUnavailableError",
    "CommError",
    "ConfigError",
    "DTypeError",
    "DeviceError",
    "DshalError",
    "ShapeError",
    "UnsupportedOpError",
    # the op catalogue and format facts
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "FP8_DTYPE_LIST",
    "FP8_FORMAT_OF",
    "GRANULARITY_BLOCKS",
    "NO_EXPERT",
    "SPECS",
    "check_ids_in_range",
    "dequantize_fp8",
    "dequantize_to",
    "e4m3fn_bits_as_e4m3fnuz",
    "fp8_block_to_int8_rows",
    "gemm_granularity",
    "guarded_attention",
    "moe_experts_on_kept_slots",
    "nonfinite_guard",
    "quantize_int8",
    "values_are_key_columns",
    # the GPU base
    "BLOCK",
    "DeviceEventTimer",
    "DeviceGraph",
    "GemmPlan",
    "PeakFigures",
    "TorchGpuBackend",
    "lookup_peaks",
    "pci_bus_id",
    "scaled_mm_rowwise_or_tensorwise",
    "triton_installed",
    # Triton kernel targets
    "KernelTarget",
    "SHIPPED_TARGETS",
    "TileConfig",
    "ensure_interpreter_if_cpu",
    "installed_version",
    "shipped_target",
    "triton_arch_refusal",
    # placement
    "islands",
    "place_groups",
    "topology_from_matrix",
    # checkpoint paths
    "resolve_checkpoint",
]
