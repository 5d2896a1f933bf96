"""The AMD backend: ROCm builds of torch on AMD Instinct GPUs (MI300X first).

- Arch from this rank's device's ``torch.cuda.get_device_properties(device).gcnArchName``
  (MI300X also reports compute capability (9, 4), which is *not* an NVIDIA sm_90: we never
  look at it).
- FP8: gfx942 (MI300X/MI325X) computes in e4m3fnuz (max 240, no negative zero), so
  ``fmt="e4m3"`` means e4m3fnuz there; gfx950 (MI350/MI355X) uses the OCP e4m3fn/e5m2.
  An e4m3fn checkpoint converts with :func:`dshal_amd.e4m3fn_to_e4m3fnuz`.
- fp8_gemm: tensorwise and rowwise (bf16 output only, as hipBLASLt's rowwise path) through
  ``torch._scaled_mm``; block scales through dshal's Triton kernel (``tl.float8e4b8`` dots,
  wavefront 64).
- Collectives: torch.distributed's ``nccl`` process group, which is RCCL on ROCm.
  Topology: Infinity Fabric from ``amdsmi`` (optional); ``dshal.parallel`` places TP/EP
  groups on its fully xGMI-connected islands (:func:`dshal.parallel.plan_groups`).
- ``emulate=True``: the same code on CPU tensors (Triton interpreter), standing for gfx942.
"""

from __future__ import annotations

import dataclasses

import torch

from dshal import Availability, Capabilities, Topology
from dshal.plugin import GemmPlan, KernelTarget, PeakFigures, TorchGpuBackend, shipped_target, triton_installed
from dshal_amd.topology import amdsmi_topology

#: Dense peaks (matrix cores, no sparsity), with the whole part's CUs (a CPX/DPX partition
#: shows fewer under the same name). Most specific name first.
AMD_PEAKS: tuple[PeakFigures, ...] = (
    PeakFigures.datasheet("MI355X", 2516.6, 5033.2, 8.0,
                "derived: 256 CUs x 2.4 GHz peak clock (AMD, Hot Chips 2025) x 8192 dense FP8 FLOP/clock/CU "
                "(AMD, ISSCC 2026), FP16/BF16 half; HBM3E 8 TB/s (AMD)", compute_units=256),
    PeakFigures.datasheet("MI350X", 2306.9, 4613.7, 8.0,
                "derived: 256 CUs x 2.2 GHz peak clock (AMD, Hot Chips 2025) x 8192 dense FP8 FLOP/clock/CU "
                "(AMD, ISSCC 2026), FP16/BF16 half; HBM3E 8 TB/s (AMD)", compute_units=256),
    PeakFigures.datasheet("MI325X", 1307.4, 2614.9, 6.0,
                "AMD Instinct MI325X datasheet: FP16/BF16 1307.4 / FP8 2614.9 TFLOPS dense, HBM3E 6.0 TB/s",
                compute_units=304),
    PeakFigures.datasheet("MI300X", 1307.4, 2614.9, 5.3,
                "AMD Instinct MI300X datasheet: FP16/BF16 1307.4 / FP8 2614.9 TFLOPS dense, HBM3 5.3 TB/s",
                compute_units=304),
)

#: What each known arch computes FP8 in: (formats, native E4M3, description).
ARCH_FP8 = {
    "gfx942": (("e4m3fnuz",), "e4m3fnuz", "FP8 matrix cores in FNUZ formats (e4m3fnuz max 240, no negative zero)"),
    "gfx950": (("e4m3fn", "e5m2"), "e4m3fn", "FP8 matrix cores in OCP formats (e4m3fn max 448)"),
}
#: The shipped Triton tile table per arch (others: "generic" with 64-wide wavefronts).
TARGET_OF_ARCH = {"gfx942": "amd-gfx942", "gfx950": "amd-gfx950"}
#: What emulated mode stands for.
EMULATED_ARCH = "gfx942"


def arch_from_gcn(gcn_arch_name: str) -> str:
    """``"gfx942:sramecc+:xnack-"`` -> ``"gfx942"``."""
    return gcn_arch_name.split(":", 1)[0].strip()


class AmdBackend(TorchGpuBackend):
    """AMD Instinct GPUs through torch's ROCm build, dshal's Triton kernels and hipBLASLt."""

    @property
    def name(self) -> str:
        return "amd"

    # ------------------------------------------------------------ availability
    def availability(self) -> Availability:
        if self.emulate:
            return self.emulation_availability(f"AMD {EMULATED_ARCH} (MI300X) code paths, e4m3 = e4m3fnuz,")
        version = torch.__version__
        if torch.version.hip is None:
            build = f"a CUDA build (CUDA {torch.version.cuda})" if torch.version.cuda else "a CPU-only build"
            return Availability(
                False, f"torch {version} is {build}, not ROCm (torch.version.hip is None): install a ROCm build of torch "
                "for AMD GPUs, or set DSHAL_EMULATE=1 to run this plugin's kernels on the CPU"
            )
        return self.device_availability(
            f"HIP {torch.version.hip}", ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
        )

    # ------------------------------------------------------------ declared facts
    def arch(self) -> str:
        if self.emulate:
            return EMULATED_ARCH
        return self.memo("arch", lambda: arch_from_gcn(torch.cuda.get_device_properties(self.device()).gcnArchName))

    def read_hardware(self) -> Capabilities:
        arch = self.arch()
        formats, native, fp8_note = ARCH_FP8.get(arch, ((), "e4m3fn", f"no FP8 matrix cores known for {arch}: FP8 ops dequantize"))
        if self.emulate:
            return self.emulated_hardware(f"AMD {arch}", arch, formats, native, fp8_note)
        notes = {"fp8": fp8_note, "hip": str(torch.version.hip), "collectives": "RCCL (process group 'nccl')"}
        return self.device_hardware(arch, formats, native, AMD_PEAKS, notes)

    def kernel_target(self) -> KernelTarget:
        arch = self.arch()
        if self.emulate:  # the interpreter, with the FP8 rules of the part it stands for
            return KernelTarget.emulating(shipped_target(TARGET_OF_ARCH[arch]))
        if arch in TARGET_OF_ARCH:
            return shipped_target(TARGET_OF_ARCH[arch])
        # Unknown CDNA part: conservative tiles, no FP8 dots, 64-wide wavefronts.
        return dataclasses.replace(shipped_target("generic"), name=f"amd-{arch}", warp_size=64)

    def plan_gemm(self) -> GemmPlan:
        hw = self.hardware()
        if not hw.fp8_formats:
            return GemmPlan(block_path="dequant", why=f"{hw.arch} has no FP8")
        scaled = frozenset({torch.float8_e4m3fnuz} if hw.native_e4m3 == "e4m3fnuz" else {torch.float8_e4m3fn, torch.float8_e5m2})
        return GemmPlan(
            block_path="triton" if triton_installed() else "dequant",
            scaled_mm_dtypes=scaled,
            rowwise_out_dtypes=(torch.bfloat16,),  # hipBLASLt rowwise scaling writes bf16 only
            why="blockwise scaled_mm is CUDA-only; ROCm uses the Triton kernel",
        )

    # ------------------------------------------------------------ topology
    def topology(self) -> Topology | None:
        """Infinity Fabric links between this process's visible GPUs, from amdsmi; None when
        emulated or when amdsmi is not installed."""
        if self.emulate:
            return None
        return amdsmi_topology()
