"""The device interface every backend implements.

A backend is a small class in three tiers:

* **required** -- ``name``, ``device_type``, :meth:`Backend.availability`,
  :meth:`Backend.capabilities`, :meth:`Backend.ops`;
* **optional hooks** with safe defaults -- :meth:`Backend.communicator`,
  :meth:`Backend.topology`, :meth:`Backend.synchronize`, :meth:`Backend.memory_stats`,
  :meth:`Backend.process_group_environment`, :meth:`Backend.abort_communicators`,
  :meth:`Backend.reference_calls`,
  :meth:`Backend.pinned_empty`, :meth:`Backend.graph`, :meth:`Backend.timer`,
  :meth:`Backend.batch_invariant_ops`,
  :meth:`Backend.prepare_weight` (a weight's device layout, once at load),
  :meth:`Backend.standin_capabilities` (a dry view for a vendor release, no device),
  :meth:`Backend.device` / :meth:`Backend.local_device_index` / :meth:`Backend.bind_device`
  (this rank's device: ``LOCAL_RANK``);
* **capability queries** derived from :class:`Capabilities` -- :meth:`Backend.fp8_formats`,
  :meth:`Backend.native_e4m3`, :meth:`Backend.op_kind`.

The core dispatches on what a backend *declares* (its ops mapping and capabilities),
never on its name.
"""

from __future__ import annotations

import abc
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from dshal.cgroups import cpu_quota, memory_limit, memory_limits
from dshal.errors import ArgumentError, DeviceError

if TYPE_CHECKING:  # pragma: no cover
    from dshal.comm import Communicator

#: The interface version this build of dshal implements. A plugin declares the version
#: it was built for in ``Backend.api_version``; a mismatch refuses to load.
API_VERSION = "1"

OpKind = Literal["native", "triton", "emulated", "reference"]

#: The weight formats an op's path may depend on (keys of ``Capabilities.op_paths``), named as
#: the ``precision.gemm`` modes: ``bf16`` stands for every high-precision float weight.
WEIGHT_FORMATS = ("bf16", "fp8-block", "fp8-row", "fp8-tensor", "int8")


@dataclass(frozen=True)
class OpPath:
    """How one op is served for one weight format: its :data:`OpKind` and what runs, in words
    (e.g. ``OpPath("native", "torch matmul (torch.nn.functional.linear)")``)."""

    kind: OpKind
    via: str

    def as_dict(self) -> dict[str, str]:
        """``{"kind", "via"}``, as reports write it."""
        return {"kind": self.kind, "via": self.via}


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run in this process, and why (not)."""

    ok: bool
    reason: str = ""
    #: True when the backend runs its own code paths on CPU tensors (``emulate`` mode).
    emulated: bool = False

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Capabilities:
    """What a backend's device can do. Everything the core decides, it decides from this.

    The one facts type of a device that the core and users see (``dshal info``, the runtime,
    the roofline). A GPU plugin declares its device's facts as a ``Capabilities`` too
    (:meth:`dshal.plugin.TorchGpuBackend.read_hardware`); the two other types a GPU plugin
    returns are inputs of narrower consumers, derived from the same arch, and say why in
    their docstrings: :class:`dshal.plugin.KernelTarget` (the Triton kernels' tiles and FP8
    rules, needed with no device for cross-compilation) and :class:`dshal.plugin.GemmPlan`
    (which torch call serves an FP8 GEMM on this torch build, from a probe).
    """

    #: Human-readable device name, e.g. ``"NVIDIA H200"`` or ``"cpu"``.
    device_name: str = "cpu"
    #: Architecture string, e.g. ``"sm_90"``, ``"gfx942"``, ``"Ascend910B"``, ``"x86_64"``.
    arch: str = ""
    #: FP8 formats the backend computes with (``"e4m3fn"``, ``"e4m3fnuz"``, ``"e5m2"``).
    fp8_formats: tuple[str, ...] = ("e4m3fn", "e4m3fnuz", "e5m2")
    #: What ``fmt="e4m3"`` means on this backend.
    native_e4m3: str = "e4m3fn"
    #: How each op is served: ``native`` (vendor library), ``triton``, ``emulated`` or ``reference``.
    #: For an op whose path depends on its weight format (see ``op_paths``) this is the path of
    #: its main format: the one an FP8 checkpoint runs in under ``precision.gemm: auto``
    #: (``fp8_checkpoint_gemm``), e.g. ``fp8-block`` on a GPU, ``int8`` on Ascend.
    op_kinds: Mapping[str, OpKind] = field(default_factory=dict)
    #: Per weight format, for ops whose path depends on it (``linear``, ``fp8_gemm``,
    #: ``moe_experts``): op -> format (:data:`WEIGHT_FORMATS`) -> :class:`OpPath`. A bf16 linear
    #: on a GPU is a torch matmul even where the FP8-block one is a Triton kernel; ``dshal info``,
    #: ``Runtime.provider_paths`` and run reports show every format. Empty: one path for all.
    op_paths: Mapping[str, Mapping[str, OpPath]] = field(default_factory=dict)
    #: torch.distributed process-group backend: ``gloo``, ``nccl``, ``hccl``.
    dist_backend: str = "gloo"
    #: Device memory in bytes, when known.
    memory_bytes: int | None = None
    #: Streaming multiprocessors / compute units / AI cores, when known.
    compute_units: int | None = None
    #: Peak dense throughput per dtype name (``"bf16"``, ``"fp8"``, ``"fp32"``) in FLOP/s.
    peak_flops: Mapping[str, float] = field(default_factory=dict)
    #: Peak memory bandwidth in bytes/s.
    peak_bandwidth: float | None = None
    #: True when the backend's kernels run on CPU tensors (Triton interpreter, ``_scaled_mm`` on CPU).
    emulated: bool = False
    #: Free-form facts worth showing in ``dshal info`` (e.g. which FP8 GEMM path is used).
    notes: Mapping[str, str] = field(default_factory=dict)
    #: False when the device has no FP8 GEMM units and every FP8 path is emulated (Ascend 910B).
    fp8_gemm_native: bool = True
    #: What ``precision.gemm: auto`` should run an FP8 checkpoint as here: ``fp8-block`` (keep
    #: it), ``int8`` (W8A8) or ``bf16``; a backend without FP8 units names its better choice.
    fp8_checkpoint_gemm: str = "fp8-block"
    #: The device can hold float8 tensors. False (torch_npu on Ascend 910B, reportedly): FP8
    #: payloads never go to the device as float8 -- the loader keeps a checkpoint's FP8 weights
    #: and their scales on the host, the precision policy converts them there (``auto``: to
    #: ``fp8_checkpoint_gemm``, or high precision when that names an FP8 mode), only the
    #: converted tensors move to the device, and an explicit ``fp8-*`` gemm mode is a ConfigError.
    fp8_storage: bool = True
    #: ``moe_experts`` serves ``NO_EXPERT`` (-1) ids itself (a slot that adds nothing: a
    #: tensor- or expert-parallel rank's share of the experts), without a host read. False (the
    #: default, what a plugin written before the id existed declares): split experts keep
    #: their own slots before calling it (``torch.nonzero``, a host read per MoE layer; under
    #: EP the all_to_all dispatch), their decode steps are not captured as device graphs, and
    #: the conformance rows with such ids are unsupported, not run.
    moe_no_expert_ids: bool = False


@dataclass(frozen=True)
class Topology:
    """How the devices of one node are connected.

    ``links[i][j]`` names the link between devices i and j (``"self"``, ``"nvlink"``,
    ``"xgmi"``, ``"hccs"``, ``"pcie"``...); ``weights[i][j]`` is a cost, lower is closer.
    """

    links: tuple[tuple[str, ...], ...]
    weights: tuple[tuple[float, ...], ...] | None = None
    source: str = ""

    @property
    def num_devices(self) -> int:
        return len(self.links)


class Timer:
    """Wall-clock timer used by ``dshal bench``/``profile``; devices override with events."""

    def __init__(self, synchronize: Callable[[], None] = lambda: None):
        self._synchronize = synchronize
        self._start = 0

    def start(self) -> None:
        self._synchronize()
        self._start = time.perf_counter_ns()

    def stop(self) -> float:
        """Stops the timer and returns the elapsed time in seconds."""
        self._synchronize()
        return (time.perf_counter_ns() - self._start) * 1e-9


def host_available_memory(
    meminfo: str = "/proc/meminfo", cgroup: str | None = None, proc_cgroup: str | None = None
) -> int | None:
    """Bytes a new host allocation can still get: the kernel's ``MemAvailable`` (free pages
    plus the page cache it can drop), capped by the headroom of the tightest memory cgroup
    this process runs under (a container's limit: :func:`dshal.cgroups.memory_limit`); None where
    none of them can be read (not Linux). ``cgroup``: the cgroup mount (default
    ``/sys/fs/cgroup`` or ``DSHAL_CGROUP_ROOT``); ``proc_cgroup``: ``/proc/self/cgroup``'s text."""
    limits = []
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)  # kB
                    break
    except (OSError, ValueError, IndexError):
        pass
    limit = memory_limit(cgroup, proc_cgroup)
    if limit is not None:
        limits.append(limit.headroom)
    return min(limits) if limits else None


def host_memory_note(meminfo: str = "/proc/meminfo", cgroup: str | None = None, proc_cgroup: str | None = None) -> str:
    """Which limit :func:`host_available_memory` is held to, for messages: the cgroup limit's
    words where its headroom is below ``MemAvailable``, else "" (the host's own memory)."""
    limit = memory_limit(cgroup, proc_cgroup)
    if limit is None:
        return ""
    available = host_available_memory(meminfo, cgroup, proc_cgroup)
    return limit.describe() if available is not None and available >= limit.headroom else ""


def host_peak_rss() -> int | None:
    """This process's peak resident memory in bytes (``getrusage``: kB on Linux, bytes on
    macOS); None where the ``resource`` module does not exist (Windows)."""
    try:
        import resource  # lazy: POSIX only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def host_physical_memory(cgroup: str | None = None, proc_cgroup: str | None = None) -> int | None:
    """Bytes of memory this process may ever hold: the machine's physical memory, or its
    memory cgroup's limit where lower (a container's); None where ``os.sysconf`` cannot say
    (Windows). Arguments as for :func:`host_available_memory`."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    # The smallest limit, not the one with the least headroom: a nearly full parent (a busy
    # kubepods slice) has less headroom than the pod, and a larger limit.
    return min([physical, *(limit.limit for limit in memory_limits(cgroup, proc_cgroup))])


def host_cpus() -> int:
    """CPUs this process may run on: its affinity (``taskset``, a container's cpuset), which
    ``os.cpu_count()`` ignores (it counts the machine's); at least 1. A container's CPU
    quota is not in it (see :func:`dshal.cgroups.cpu_quota`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call here (macOS)
        return max(1, os.cpu_count() or 1)


def host_usable_cpus(cgroup: str | None = None, proc_cgroup: str | None = None) -> int:
    """The CPUs this process can keep busy at once: :func:`host_cpus`, or its cgroup's CPU
    quota rounded up where that is fewer; at least 1."""
    quota = cpu_quota(cgroup, proc_cgroup)
    return host_cpus() if quota is None else min(host_cpus(), quota.whole)


def host_cpus_text(cgroup: str | None = None, proc_cgroup: str | None = None) -> str:
    """The CPUs as a report says them: ``2 cores``, ``1 of 2 cores`` (an affinity narrower
    than the machine) or ``2 CPUs by the container's quota (of 64)``."""
    usable, machine = host_cpus(), os.cpu_count() or 1
    quota = cpu_quota(cgroup, proc_cgroup)
    if quota is not None and quota.cpus < usable:
        return f"{quota.cpus:g} CPU{'' if quota.cpus == 1 else 's'} by the container's quota (of {usable})"
    return f"{usable} cores" if usable >= machine else f"{usable} of {machine} cores"


def local_device_index(device_type: str, environ: Mapping[str, str] | None = None) -> int:
    """The device index of this process for ``device_type``; see :meth:`Backend.local_device_index`."""
    environ = os.environ if environ is None else environ
    module = getattr(torch, device_type, None) if device_type != "cpu" else None
    available = module is not None and module.is_available()
    count = module.device_count() if available else 0
    raw = environ.get("LOCAL_RANK", "")
    if raw == "":
        return int(module.current_device()) if available else 0
    try:
        index = int(raw)
    except ValueError:
        raise DeviceError(f"device: environment variable LOCAL_RANK is {raw!r}, expected a non-negative integer") from None
    if index < 0:
        raise DeviceError(f"device: environment variable LOCAL_RANK is {index}, expected a non-negative integer")
    if count == 1:
        return 0
    if count and index >= count:
        raise DeviceError(
            f"device: LOCAL_RANK is {index} but this process sees {count} {device_type} devices "
            f"(indices 0..{count - 1}); launch at most {count} ranks per node (torchrun --nproc-per-node {count})"
        )
    return index


class Backend(abc.ABC):
    """Base class of every dshal backend. Subclass it and register the class under the
    ``dshal.backends`` entry-point group."""

    #: The device-interface version this plugin was written for.
    api_version: ClassVar[str] = API_VERSION

    def __init__(self, *, emulate: bool = False) -> None:
        #: When True, run this backend's own code paths on CPU tensors.
        self.emulate = emulate

    # ---------------------------------------------------------------- required
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short name used in configs and reports, e.g. ``"nvidia"``."""

    @property
    @abc.abstractmethod
    def device_type(self) -> str:
        """torch device type of the tensors this backend computes on (``"cpu"`` when emulated)."""

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run here. Must not raise; report the reason instead."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What the device can do. Called only when :meth:`availability` is ok."""

    @abc.abstractmethod
    def ops(self) -> Mapping[str, Callable[..., Any]]:
        """Op name -> implementation. Each implementation has exactly the op spec's
        signature. The core validates inputs before calling it, except inside
        :func:`dshal.ops.trusted` (decode steps after the first, graph capture): a check that
        a provider needs there and that reads the device (``moe_experts`` ids:
        :func:`dshal.plugin.check_ids_in_range`) is the provider's own."""

    # ---------------------------------------------------------------- optional hooks
    def device(self, index: int | None = None) -> torch.device:
        """The torch device for local device ``index`` (default: this process's, see
        :meth:`local_device_index`)."""
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, self.local_device_index() if index is None else index)

    def local_device_index(self) -> int:
        """This process's device index on its node: ``LOCAL_RANK`` when a launcher (torchrun)
        set it, else the device module's current device (0 where there is none).

        With one device visible (a launcher that gives each rank its own
        ``CUDA_VISIBLE_DEVICES``) that device is this rank's whatever ``LOCAL_RANK`` says;
        with several, a ``LOCAL_RANK`` past the last one is a :class:`~dshal.DeviceError`
        rather than two ranks silently sharing a device.
        """
        return local_device_index(self.device_type)

    def bind_device(self) -> torch.device:
        """Make :meth:`device` the current device of this process (before anything allocates
        on the device: runtime, probes, process group) and return it. No-op on the CPU."""
        device = self.device()
        if device.type != "cpu":
            torch.get_device_module(device.type).set_device(device)
        return device

    def communicator(self, group: Any = None) -> Communicator:
        """Collectives over ``group``; default: torch.distributed with ``capabilities().dist_backend``."""
        from dshal.comm import ProcessGroupCommunicator  # lazy: start-up time (torch.distributed, op catalogue)

        return ProcessGroupCommunicator(group)

    def topology(self) -> Topology | None:
        """Device interconnect of this node, or None when unknown."""
        return None

    def reference_calls(self) -> Mapping[str, int]:
        """Calls so far in this process (every thread's), per op, that the backend's own
        providers served with dshal's reference math rather than a kernel (an input its kernels
        do not take, e.g. float32 attention on a bf16-only kernel). A run report shows those
        made while it recorded, so a provider listed as native does not hide them. Safe to call
        from any thread. Default: none counted."""
        return {}

    def process_group_environment(self, timeout_s: float) -> dict[str, str]:
        """Environment variables the collective library reads when the job's process group is
        built, derived from ``distributed.timeout_s`` (e.g. its own execution and connect
        timeouts). :func:`dshal.comm.init` sets each one the user has not set. Default: none."""
        return {}

    def abort_communicators(self, groups: Sequence[Any]) -> None:  # noqa: B027 - optional hook
        """Abort the device communicators of ``groups`` (this rank's process groups) after a
        collective failed, so work still queued on the dead peer holds neither the process nor
        its exit. torch's process-group abort covers NCCL/RCCL; a library it does not reach
        (its backend class does not override torch's) aborts here. Default: nothing."""

    def synchronize(self) -> None:  # noqa: B027 - optional hook: a no-op is right for synchronous (host) backends
        """Wait for queued device work to finish."""

    def memory_stats(self) -> dict[str, int]:
        """Allocator statistics in bytes, each key only where known: ``allocated``,
        ``peak_allocated``, ``reserved``, ``total``, and ``free``: what a new allocation can still
        get (the device's free memory plus what its caching allocator holds unused). The model
        core checks a KV cache against ``free`` before allocating it; a backend may add keys of
        its own (cpu: ``peak_rss``). Conformance judges it (``hooks/memory_stats``). Default: empty."""
        return {}

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host tensor suited to fast copies to the device (pinned where the device supports it)."""
        return torch.empty(shape, dtype=dtype)

    def graph(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Capture ``fn`` into a replayable device graph when supported; default: ``fn`` itself."""
        return fn

    def timer(self) -> Timer:
        """A timer for benchmarking ops on this device (device events where available)."""
        return Timer(self.synchronize)

    def batch_invariant_ops(self) -> Mapping[str, Callable[..., Any]]:
        """Op name -> a provider whose result for one row (token, sequence) does not depend
        on the other rows of the batch, used under ``determinism: strict``; default: none.
        It computes the op's contract: a call the contract makes batch-dependent (``linear``
        with a tensorwise-FP8 weight, whose activations share one scale:
        :data:`dshal.backends.invariant.CONTRACT_BATCH_VARIANT`) runs on the whole batch, and
        the runtime reports it in ``Runtime.determinism_gaps``."""
        return {}

    def prepare_weight(self, name: str, weight: torch.Tensor, role: str) -> torch.Tensor:
        """Called once per weight when the model core has loaded it (after the precision policy
        and any TP/EP sharding), for the ops this backend serves; returns the tensor the model
        keeps and later hands to the op. ``name`` is the module path plus attribute
        (``layers.3.mlp.down_proj.weight``); ``role`` is ``"<op>.<argument>"``
        (``linear.weight``, ``linear.weight_scale``, ``moe_experts.w13``, ...).

        The result must have the same shape, dtype, device and values; only its layout or
        storage format may differ (e.g. a transposed copy in the device's preferred weight
        format, viewed back to the op's shape), so the model holds each weight once instead of
        the original plus a per-call or cached device copy. Default: ``weight`` unchanged."""
        return weight

    def standin_capabilities(self, release: str) -> Capabilities | None:
        """What :meth:`capabilities` would declare on ``release`` of the backend's vendor
        runtime, worked out without the device (e.g. by driving the plugin's own op code through
        a signature-checking stand-in of that release), for ``dshal info --backend NAME
        --standin RELEASE``. It is a view, labelled as such: never selected as a runtime, never
        a device and never part of a conformance report. Default: None (no such view)."""
        return None

    # ---------------------------------------------------------------- capability queries
    def fp8_formats(self) -> tuple[str, ...]:
        """FP8 formats this backend computes with."""
        return tuple(self.capabilities().fp8_formats)

    def native_e4m3(self) -> str:
        """The concrete format ``fmt="e4m3"`` means here (``e4m3fn`` or ``e4m3fnuz``)."""
        return self.capabilities().native_e4m3

    def op_kind(self, op: str, weight_format: str | None = None) -> OpKind | None:
        """How ``op`` is served by this backend (for ``weight_format``, one of
        :data:`WEIGHT_FORMATS`, where its path depends on it; else its one kind), or None when it does
        not provide it. An unknown ``weight_format`` is an :class:`~dshal.ArgumentError`."""
        if weight_format is not None and weight_format not in WEIGHT_FORMATS:
            expected = ", ".join(WEIGHT_FORMATS)
            raise ArgumentError(f"op_kind: weight_format is {weight_format!r}, expected one of {expected}")
        if op not in self.ops():
            return None
        caps = self.capabilities()
        path = caps.op_paths.get(op, {}).get(weight_format) if weight_format is not None else None
        return path.kind if path is not None else caps.op_kinds.get(op, "native")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_type={self.device_type!r}>"
