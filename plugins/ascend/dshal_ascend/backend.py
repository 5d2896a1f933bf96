"""``AscendBackend``: Huawei Ascend NPUs (910B and later) through torch_npu and CANN."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from dshal.plugin import SPECS, ArgumentError, Availability, Backend, Capabilities, DeviceError, OpPath, Topology
from dshal_ascend.hccl import abort_hccl_communicators, hccl_environment
from dshal_ascend.probe import CannInstall, NpuProbe, diagnose, float_overflow_mode, visible_devices
from dshal_ascend.releases import (
    MINIMUM_RELEASE,
    RELEASE_BY_NAME,
    WHY_MINIMUM,
    KernelFeatures,
    kernel_features,
    plan_ops,
)
from dshal_ascend.schema import recorded_releases, recorded_signatures, signatures_from_texts
from dshal_ascend.topology import query_topology

if TYPE_CHECKING:  # pragma: no cover
    from dshal_ascend.npu_ops import AscendOps

log = logging.getLogger("dshal")


def weight_format_paths(routes: Mapping[str, Any], int8_experts: bool) -> dict[str, dict[str, OpPath]]:
    """``Capabilities.op_paths``: linear and moe_experts per weight format, as the op code routes
    them (``op_kinds`` has one kind per op: the float/int8 path)."""
    decoded = OpPath("emulated", "FP8 weight decoded to bf16 once (integer ops), activations rounded as the "
                     "weight's FP8 scheme, bf16 matmul")
    paths: dict[str, dict[str, OpPath]] = {}
    if routes["linear"].kind != "reference":
        paths["linear"] = {
            "bf16": OpPath("native", "CANN matmul (torch.nn.functional.linear on the NPU)"),
            "int8": OpPath("native", "npu_dynamic_quant + npu_quant_matmul (weight transposed, cast to NZ once)"),
            **dict.fromkeys(("fp8-block", "fp8-row", "fp8-tensor"), decoded),
        }
    if routes["moe_experts"].kind != "reference":
        paths["moe_experts"] = {
            "bf16": OpPath("native", "npu_grouped_matmul x2 + npu_swiglu"),
            "int8": OpPath("native", "npu_grouped_matmul W8A8 with per_token_scale from npu_dynamic_quant")
            if int8_experts else OpPath("reference", "reference math (no grouped W8A8 on this release)"),
            "fp8-block": OpPath("emulated", "the experts a batch routes to decoded to bf16, then the bf16 path"),
        }
    return paths


def release_capabilities(
    features: KernelFeatures, *, device_name: str, arch: str, notes: Mapping[str, str],
    memory_bytes: int | None = None, compute_units: int | None = None,
) -> Capabilities:
    """The capabilities of the plugin on ``features.release``: op kinds and the path of every op
    (``op <name>`` notes, :func:`~dshal_ascend.releases.plan_ops`), FP8 emulated, W8A8 for FP8
    checkpoints where the release has grouped int8 experts, no float8 tensors on the device
    (``fp8_storage`` False); ``notes`` first."""
    from dshal_ascend.npu_ops import OP_KINDS  # lazy: start-up time of discovery (npu_ops loads the op hub)

    # a dshal without DeepSeek Sparse Attention's ops: their routes are left out (no op to route)
    routes = {op: route for op, route in plan_ops(features).items() if op in SPECS}
    int8_experts = features.w8a8_experts
    return Capabilities(
        device_name=device_name,
        arch=arch,
        # 910B (Atlas A2) and 910C (A3) have no FP8 units: FP8 ops decode to bf16.
        fp8_formats=(),
        moe_no_expert_ids=True,  # sorted past every group, no host read (FP8: the kept slots; it reads ids anyway)
        native_e4m3="e4m3fn",  # what fmt="e4m3" decodes as in the emulated path
        op_kinds={op: kind for op, kind in OP_KINDS.items() if op in routes and routes[op].kind != "reference"},
        op_paths=weight_format_paths(routes, int8_experts),
        dist_backend="hccl",
        memory_bytes=memory_bytes,
        compute_units=compute_units,
        fp8_gemm_native=False,
        fp8_checkpoint_gemm="int8" if int8_experts else "bf16",
        # torch_npu reportedly cannot hold float8 tensors on the NPU: the core loader keeps an
        # FP8 checkpoint's payloads on the host, converts them there and moves only the result.
        fp8_storage=False,
        notes={
            **notes,
            "fp8": "emulated on every path (fp8_gemm, dequantize_fp8, linear and moe_experts with FP8 weights): "
                   "FP8 bytes decoded with integer ops, bf16 matmul; linear weights decoded once, experts "
                   "only the ones a batch routes to",
            "fp8 storage": "no float8 tensors on the NPU: an FP8 checkpoint is converted on the host (gemm auto: "
                           "int8 or bf16) and only the converted weights move; gemm fp8-* is refused (ConfigError)",
            "gemm auto for an FP8 checkpoint": (
                "int8 (W8A8: per-channel int8 weights, per-token int8 activations; no FP8 units)" if int8_experts
                else f"bf16 (no FP8 units; op-plugin {features.release} has no grouped W8A8 experts)"
            ),
            **{f"op {op}": route.describe() for op, route in routes.items()},
        },
    )


class AscendBackend(Backend):
    """Fused CANN kernels via torch_npu, W8A8 int8 GEMMs, FP8 emulated in bf16, HCCL.

    torch_npu is imported only inside methods that need the device (``device()``,
    ``synchronize()``, the ops...), never at import or discovery; ``availability()``
    decides without importing it here (see :mod:`dshal_ascend.probe`).
    """

    def __init__(self, *, emulate: bool = False) -> None:
        super().__init__(emulate=emulate)
        self._lock = threading.RLock()
        self._diagnosis: tuple[NpuProbe, CannInstall | None] | None = None
        self._ops: Any = None

    # ---------------------------------------------------------------- required
    @property
    def name(self) -> str:
        return "ascend"

    @property
    def device_type(self) -> str:
        return "npu"

    def diagnosis(self) -> tuple[NpuProbe, CannInstall | None]:
        """The (cached) probe result: torch_npu, CANN libraries and version, NPU count."""
        with self._lock:
            if self._diagnosis is None:
                self._diagnosis = diagnose()
            return self._diagnosis

    def features(self) -> KernelFeatures:
        """What the installed release's kernels accept: the probed schemas (NPU host) of the
        release the torch_npu version belongs to; without a probe, or when the installed release is
        not supported (too old: the backend is unavailable), the minimum release's."""
        probe, _ = self.diagnosis()
        release = probe.release if probe.ok and probe.release in recorded_releases() else MINIMUM_RELEASE
        if not probe.schemas:
            return kernel_features(release)
        return kernel_features(release, signatures_from_texts(release, {k: list(v) for k, v in probe.schemas.items()}))

    def availability(self) -> Availability:
        probe, _ = self.diagnosis()
        reason = probe.reason
        if self.emulate and not probe.ok:
            reason += "; no CPU emulation: the Ascend ops are torch_npu kernels, which run only on NPUs"
        return Availability(probe.ok, reason)

    def capabilities(self) -> Capabilities:
        probe, cann = self.diagnosis()
        name = probe.name or "Ascend NPU"
        return release_capabilities(
            self.features(), device_name=name, arch=name.replace(" ", ""), memory_bytes=probe.memory_bytes,
            compute_units=probe.cube_cores,
            notes={
                "cann": probe.cann_version or (cann.version if cann else None) or "unknown",
                "torch_npu": f"{probe.torch_npu_version or 'unknown'} (op-plugin release {self.features().release}, "
                             f"minimum {MINIMUM_RELEASE})",
                "float overflow mode": float_overflow_mode(),
            },
        )

    def standin_capabilities(self, release: str) -> Capabilities:
        """The capabilities the plugin would declare on op-plugin ``release``, from its recorded
        signatures, with the torch_npu kernels its own op code calls per op (``calls ...``
        notes), found by running it on CPU tensors through :class:`SignatureCheckingStandIn`.
        The device name says it is a stand-in, not an NPU; no NPU is probed or needed."""
        from dshal_ascend.standin import SignatureCheckingStandIn, standin_trace  # lazy: start-up time of discovery

        known = recorded_releases()
        if release not in known:
            older = release in RELEASE_BY_NAME and RELEASE_BY_NAME[release].key < RELEASE_BY_NAME[MINIMUM_RELEASE].key
            why = f"older than the minimum {MINIMUM_RELEASE}: " + WHY_MINIMUM if older else "no recorded signatures"
            raise ArgumentError(f"--standin: op-plugin release {release!r} ({why}); expected one of {', '.join(known)}")
        info = RELEASE_BY_NAME[release]
        stand_in = SignatureCheckingStandIn(recorded_signatures(release))
        caps = release_capabilities(
            kernel_features(release), device_name=stand_in.describe(), arch="none (stand-in)",
            notes={
                "cann": f"{info.cann} (recorded, not installed)",
                "torch_npu": f"{', '.join(info.torch_npu)} (op-plugin release {release}, minimum {MINIMUM_RELEASE}; "
                             "recorded signatures, not installed)",
            },
        )
        calls = {f"calls {case}": text for case, text in standin_trace(release).items()}
        return replace(caps, notes={**caps.notes, **calls})

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        """The ops the installed release serves natively or emulated; the rest fall to the reference."""
        impl = self._impl()
        routes = plan_ops(impl.features)
        return {op: fn for op, fn in impl.ops().items() if routes[op].kind != "reference"}

    def _impl(self) -> AscendOps:
        """The op implementations for the installed release (torch_npu imported at the first kernel call)."""
        from dshal_ascend.npu_ops import AscendOps  # lazy: start-up time of discovery (npu_ops loads the op hub)

        with self._lock:
            if self._ops is None:
                self._ops = AscendOps(self.features())
            return self._ops

    def reference_calls(self) -> Mapping[str, int]:
        """Calls the ops served with dshal's reference inside the plugin (float32 attention,
        shapes past a kernel's limits: the ``op`` notes list them); none before the first op."""
        with self._lock:
            ops = self._ops
        return {} if ops is None else ops.reference_counts()

    def prepare_weight(self, name: str, weight: torch.Tensor, role: str) -> torch.Tensor:
        """int8 linear weights: transposed and cast to FRACTAL_NZ once, at load, held once
        (:meth:`AscendOps.prepare_weight`); every other weight unchanged."""
        return self._impl().prepare_weight(name, weight, role)

    # ---------------------------------------------------------------- hooks
    def _npu(self) -> Any:
        """torch.npu, after importing torch_npu (which registers the ``npu`` device and ``hccl``);
        a :class:`~dshal.DeviceError` with the probe's reason where it cannot be imported."""
        try:
            import torch_npu  # lazy: vendor runtime, NPU hosts only  # noqa: F401
        except ImportError as err:
            raise DeviceError(f"ascend: no NPU device here ({self.availability().reason}): {err}") from err

        return torch.npu  # type: ignore[attr-defined]

    def device(self, index: int | None = None) -> torch.device:
        """``npu:N``: logical index N among ``ASCEND_RT_VISIBLE_DEVICES``; default this process's,
        :meth:`local_device_index` (``LOCAL_RANK`` under torchrun, as on the GPU backends).
        torch_npu is imported first, so ``torch.npu`` counts the visible NPUs."""
        self._npu()
        return super().device(index)

    def communicator(self, group: Any = None):  # noqa: ANN201 - dshal.comm.Communicator
        self._npu()  # the hccl process-group backend is registered by importing torch_npu
        return super().communicator(group)

    def topology(self) -> Topology | None:
        return query_topology(visible_devices())

    def process_group_environment(self, timeout_s: float) -> dict[str, str]:
        return hccl_environment(timeout_s)

    def abort_communicators(self, groups: Sequence[Any]) -> None:
        """torch's process-group abort does not reach HCCL's communicators: abort them here."""
        missed = abort_hccl_communicators(groups, self.device())
        if missed:
            log.warning("dshal_ascend: not aborted: %s", "; ".join(missed))

    def synchronize(self) -> None:
        self._npu().synchronize()

    def memory_stats(self) -> dict[str, int]:
        npu = self._npu()
        device_free, total = npu.mem_get_info()
        allocated, reserved = int(npu.memory_allocated()), int(npu.memory_reserved())
        return {
            "allocated": allocated,
            "peak_allocated": int(npu.max_memory_allocated()),
            "reserved": reserved,
            "total": int(total),
            "free": int(device_free) + reserved - allocated,  # the caching allocator reuses what it holds
        }

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._npu()
        return torch.empty(shape, dtype=dtype, pin_memory=True)
