"""``AscendBackend``: Huawei Ascend NPUs (910B and later) through torch_npu and CANN."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dshal.backend import Availability, Backend, Capabilities, Topology
from dshal_ascend.probe import CannInstall, NpuProbe, diagnose, visible_devices
from dshal_ascend.releases import MINIMUM_RELEASE, KernelFeatures, kernel_features, plan_ops
from dshal_ascend.schema import signatures_from_texts
from dshal_ascend.topology import query_topology


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
        release the torch_npu version belongs to; without a probe, the minimum release's."""
        probe, _ = self.diagnosis()
        release = probe.release or MINIMUM_RELEASE
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
        from dshal_ascend.npu_ops import OP_KINDS

        probe, cann = self.diagnosis()
        name = probe.name or "Ascend NPU"
        features = self.features()
        routes = plan_ops(features)
        int8_experts = features.w8a8_experts
        return Capabilities(
            device_name=name,
            arch=name.replace(" ", ""),
            # 910B (Atlas A2) and 910C (A3) have no FP8 units: FP8 ops decode to bf16.
            fp8_formats=(),
            native_e4m3="e4m3fn",  # what fmt="e4m3" decodes as in the emulated path
            op_kinds={op: kind for op, kind in OP_KINDS.items() if routes[op.split("[")[0]].kind != "reference"},
            dist_backend="hccl",
            memory_bytes=probe.memory_bytes,
            compute_units=probe.cube_cores,
            fp8_gemm_native=False,
            fp8_checkpoint_gemm="int8" if int8_experts else "bf16",
            notes={
                "cann": probe.cann_version or (cann.version if cann else None) or "unknown",
                "torch_npu": f"{probe.torch_npu_version or 'unknown'} (op-plugin release {features.release}, "
                             f"minimum {MINIMUM_RELEASE})",
                "fp8": "emulated on every path (fp8_gemm, dequantize_fp8, linear and moe_experts with FP8 weights): "
                       "FP8 bytes decoded with integer ops, bf16 matmul; linear weights decoded once, experts "
                       "only the ones a batch routes to",
                "gemm auto for an FP8 checkpoint": (
                    "int8 (W8A8: per-channel int8 weights, per-token int8 activations; no FP8 units)" if int8_experts
                    else f"bf16 (no FP8 units; op-plugin {features.release} has no grouped W8A8 experts)"
                ),
                **{f"op {op}": route.describe() for op, route in routes.items()},
            },
        )

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        """The ops the installed release serves natively or emulated; the rest fall to the reference."""
        from dshal_ascend.npu_ops import AscendOps

        with self._lock:
            if self._ops is None:
                self._ops = AscendOps(self.features())
        routes = plan_ops(self._ops.features)
        return {op: fn for op, fn in self._ops.ops().items() if routes[op].kind != "reference"}

    # ---------------------------------------------------------------- hooks
    def _npu(self) -> Any:
        """torch.npu, after importing torch_npu (which registers the ``npu`` device and ``hccl``)."""
        import torch_npu  # noqa: F401, PLC0415 - NPU only, lazy on purpose

        return torch.npu  # type: ignore[attr-defined]

    def device(self, index: int | None = None) -> torch.device:
        """``npu:N``: logical index N among ``ASCEND_RT_VISIBLE_DEVICES`` (default: current)."""
        npu = self._npu()
        return torch.device("npu", npu.current_device() if index is None else index)

    def communicator(self, group: Any = None):  # noqa: ANN201 - dshal.comm.Communicator
        self._npu()  # the hccl process-group backend is registered by importing torch_npu
        return super().communicator(group)

    def topology(self) -> Topology | None:
        return query_topology(visible_devices())

    def synchronize(self) -> None:
        self._npu().synchronize()

    def memory_stats(self) -> dict[str, int]:
        npu = self._npu()
        return {
            "allocated": int(npu.memory_allocated()),
            "peak_allocated": int(npu.max_memory_allocated()),
            "reserved": int(npu.memory_reserved()),
        }

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self._npu()
        return torch.empty(shape, dtype=dtype, pin_memory=True)
