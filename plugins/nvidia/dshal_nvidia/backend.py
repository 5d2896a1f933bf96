"""The NVIDIA backend: CUDA builds of torch on NVIDIA GPUs (Hopper first).

- FP8: sm_90 (Hopper) has FP8 tensor cores and the Hopper-only paths (wgmma tilings,
  cuBLASLt blockwise scaling); sm_100 / sm_103 (B200, GB200, B300) FP8 on tcgen05 tilings;
  sm_120 / sm_121 (RTX PRO 6000 Blackwell, RTX 50, DGX Spark) and sm_89 (Ada) FP8 on mma.sync
  tilings; older parts have no FP8 (FP8 ops then dequantize, declared ``emulated``). Each
  compute capability maps to its Triton tile table exactly (:data:`TARGET_OF_CAPABILITY`); one
  not listed gets the conservative ``generic`` table.
- fp8_gemm: tensorwise/rowwise through ``torch._scaled_mm``; block scales through
  ``torch.nn.functional.scaled_mm`` blockwise when a probe shows this torch + cuBLASLt run
  it correctly on SM90 (torch refuses it elsewhere), else dshal's Triton kernel. ``dshal info``
  shows which.
- Collectives: torch.distributed on ``nccl``. Topology: NVML (``pynvml``, optional).
- ``emulate=True``: the same code on CPU tensors (Triton interpreter), standing for sm_90.
"""

from __future__ import annotations

import logging
import threading

import torch

from dshal import Availability, Capabilities, Topology
from dshal.plugin import (
    GemmPlan,
    KernelTarget,
    PeakFigures,
    TorchGpuBackend,
    installed_version,
    shipped_target,
    triton_arch_refusal,
    triton_installed,
)
from dshal_nvidia.cublaslt import MIN_CUDA, blockwise_fits, probe_torch_blockwise, torch_blockwise_gemm, version_tuple
from dshal_nvidia.topology import nvml_topology

log = logging.getLogger("dshal")

#: Dense peaks (datasheets list FP8/BF16 "with sparsity"; dense is half). Most specific name first.
NVIDIA_PEAKS: tuple[PeakFigures, ...] = (
    # Blackwell: NVIDIA gives the platform's figures; per GPU = platform / GPUs. torch names a B300
    # "NVIDIA B300 SXM6 AC" (the words B300 AC: a plain "B300" row would match no device).
    PeakFigures.datasheet("B300 SXM6 AC", 2250, 4500, 8.0,
                "NVIDIA HGX B300 specifications, 8 GPUs: BF16 36 / FP8 72 PFLOPS with sparsity, HBM3e 64 TB/s "
                "(per GPU: BF16 4,500 / FP8 9,000 TFLOPS sparse, dense = half; 8 TB/s)"),
    PeakFigures.datasheet("B200", 2250, 4500, 8.0,
                "NVIDIA HGX B200 specifications, 8 GPUs: BF16 36 / FP8 72 PFLOPS with sparsity, HBM3e 64 TB/s "
                "(per GPU: BF16 4,500 / FP8 9,000 TFLOPS sparse, dense = half; 8 TB/s)"),
    PeakFigures.datasheet("GB200", 2500, 5000, 8.0,
                "NVIDIA GB200 NVL72 specifications, 72 GPUs: BF16 360 / FP8 720 PFLOPS with sparsity, HBM3e 576 TB/s "
                "(per GPU: BF16 5,000 / FP8 10,000 TFLOPS sparse, dense = half; 8 TB/s)"),
    PeakFigures.datasheet("H200 NVL", 835.5, 1670.5, 4.8,
                "NVIDIA H200 NVL datasheet: BF16 1,671 / FP8 3,341 TFLOPS with sparsity (dense = half), HBM3e 4.8 TB/s"),
    PeakFigures.datasheet("H200", 989.5, 1979, 4.8,
                "NVIDIA H200 SXM datasheet: BF16 1,979 / FP8 3,958 TFLOPS with sparsity (dense = half), HBM3e 4.8 TB/s"),
    PeakFigures.datasheet("H100 NVL", 835.5, 1670.5, 3.9,
                "NVIDIA H100 NVL datasheet: BF16 1,671 / FP8 3,341 TFLOPS with sparsity (dense = half), HBM3 3.9 TB/s"),
    PeakFigures.datasheet("H100 PCIe", 756.5, 1513, 2.0,
                "NVIDIA H100 PCIe datasheet: BF16 1,513 / FP8 3,026 TFLOPS with sparsity (dense = half), HBM2e 2.0 TB/s"),
    PeakFigures.datasheet("H100", 989.5, 1979, 3.35,
                "NVIDIA H100 SXM5 datasheet: BF16 1,979 / FP8 3,958 TFLOPS with sparsity (dense = half), HBM3 3.35 TB/s"),
)

_E4M3_E5M2 = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
#: What emulated mode stands for.
EMULATED_CAPABILITY = (9, 0)


#: The shipped Triton tile table of each compute capability, exactly: a part not listed gets the
#: conservative "generic" table (no FP8 dots, small tiles). Minors share a table where NVIDIA gives
#: them the same shared memory and tensor cores (CUDA C Programming Guide's compute capability
#: tables; CCCL cuda/__device/arch_traits.h builds sm_103 from sm_100 and sm_121 from sm_120).
TARGET_OF_CAPABILITY: dict[tuple[int, int], str] = {
    (8, 9): "nvidia-sm89",  # L4, L40S, RTX 40: mma.sync FP8, 99 KB shared per block
    (9, 0): "nvidia-sm90",  # H100, H200, GH200: wgmma, 227 KB
    (10, 0): "nvidia-sm100",  # B200, GB200: tcgen05, 227 KB
    (10, 3): "nvidia-sm100",  # B300, GB300: as 10.0
    (12, 0): "nvidia-sm120",  # RTX PRO 6000 Blackwell, RTX 50: mma.sync FP8 only, 99 KB
    (12, 1): "nvidia-sm120",  # DGX Spark (GB10): as 12.0
}
#: What each table's FP8 dots run on, for ``dshal info``.
_FP8_PATHS = {
    "nvidia-sm89": "FP8 tensor cores (Ada: mma.sync tilings; no Hopper-only paths)",
    "nvidia-sm90": "FP8 tensor cores (Hopper paths: wgmma tilings, cuBLASLt blockwise scaling)",
    "nvidia-sm100": "FP8 tensor cores (datacenter Blackwell: tcgen05 tilings; block scales on the Triton kernel, "
                    "torch's cuBLASLt blockwise scaled_mm is SM90-only)",
    "nvidia-sm120": "FP8 tensor cores (consumer Blackwell: mma.sync tilings for 99 KB shared memory; block scales "
                    "on the Triton kernel, torch's cuBLASLt blockwise scaled_mm is SM90-only)",
}


def triton_shortfall(capability: tuple[int, int], triton_version: str | None = None) -> str | None:
    """Why the installed Triton (or ``triton_version``) cannot build this part's table as it is
    meant (:func:`dshal.versions.triton_arch_refusal` for its ``sm_XYa``), or None."""
    version = installed_version("triton") if triton_version is None else triton_version
    return triton_arch_refusal(version, f"sm_{capability[0]}{capability[1]}a")


def kernel_target_name(capability: tuple[int, int]) -> str:
    """The shipped tile table for ``capability``: its own, else "generic" (said at -v for a part
    with FP8 tensor cores, whose FP8 dots then run widened to f16 on small tiles)."""
    name = TARGET_OF_CAPABILITY.get(capability)
    if name is None:
        if capability >= (8, 9):
            log.info("dshal nvidia: no Triton tile table for sm_%d%d (known: %s); using the generic table "
                     "(FP8 widened to f16, small tiles)", capability[0], capability[1],
                     ", ".join(f"sm_{a}{b}" for a, b in TARGET_OF_CAPABILITY))
        return "generic"
    return name


def fp8_facts(capability: tuple[int, int], triton_version: str | None = None) -> tuple[tuple[str, ...], str]:
    """(FP8 formats, description) for an NVIDIA compute capability (and what the installed
    Triton, or ``triton_version``, falls short of on it)."""
    path = _FP8_PATHS.get(TARGET_OF_CAPABILITY.get(capability, ""))
    if path:
        why = triton_shortfall(capability, triton_version)
        return ("e4m3fn", "e5m2"), f"{path}; but {why}" if why else path
    arch = f"sm_{capability[0]}{capability[1]}"
    if capability > (8, 9):  # a part newer than the tables (or between them)
        return ("e4m3fn", "e5m2"), f"FP8 tensor cores assumed on {arch}, which dshal has no tile table for: " \
                                   "the generic one (FP8 widened to f16 before the dot, small tiles)"
    return (), f"no FP8 tensor cores on {arch}: FP8 ops dequantize"
#: What cuBLASLt's blockwise path is, for ``dshal info``.
BLOCKWISE_NAME = "torch.nn.functional.scaled_mm blockwise 1x128/128x128 (cuBLASLt)"


class NvidiaBackend(TorchGpuBackend):
    """NVIDIA GPUs through torch's CUDA API, dshal's Triton kernels and cuBLASLt."""

    def __init__(self, *, emulate: bool = False) -> None:
        super().__init__(emulate=emulate)
        self._blockwise_refused: set[torch.dtype] = set()
        self._refused_lock = threading.Lock()  # ops may be called from several threads at once

    @property
    def name(self) -> str:
        return "nvidia"

    # ------------------------------------------------------------ availability
    def availability(self) -> Availability:
        if self.emulate:
            return self.emulation_availability("NVIDIA sm_90 code paths")
        version = torch.__version__
        if torch.version.hip is not None:
            return Availability(
                False, f"torch {version} is a ROCm build (torch.version.hip = {torch.version.hip}); "
                "the nvidia backend needs a CUDA build (use the 'amd' backend on ROCm)"
            )
        if torch.version.cuda is None:
            return Availability(
                False, f"torch {version} is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch "
                "for NVIDIA GPUs, or set DSHAL_EMULATE=1 to run this plugin's kernels on the CPU"
            )
        return self.device_availability(f"CUDA {torch.version.cuda}", ("CUDA_VISIBLE_DEVICES",))

    # ------------------------------------------------------------ declared facts
    def _capability(self) -> tuple[int, int]:
        if self.emulate:
            return EMULATED_CAPABILITY
        return self.memo("capability", lambda: tuple(torch.cuda.get_device_capability(self.device())))

    def read_hardware(self) -> Capabilities:
        cap = self._capability()
        formats, fp8_note = fp8_facts(cap)
        arch = f"sm_{cap[0]}{cap[1]}"
        if self.emulate:
            return self.emulated_hardware(f"NVIDIA {arch}", arch, formats, "e4m3fn", fp8_note)
        return self.device_hardware(arch, formats, "e4m3fn", NVIDIA_PEAKS, {"fp8": fp8_note, "cuda": str(torch.version.cuda)})

    def kernel_target(self) -> KernelTarget:
        cap = self._capability()
        name = kernel_target_name(cap)
        why = None if self.emulate else triton_shortfall(cap)
        if why:  # the part's table all the same (no other builds better: the arch is the limit); said once
            self.memo("triton_shortfall", lambda: log.warning("dshal nvidia: %s (tile table %s)", why, name))
        if self.emulate:  # the interpreter, with the FP8 rules of the part it stands for
            return KernelTarget.emulating(shipped_target(name))
        return shipped_target(name)

    def plan_gemm(self) -> GemmPlan:
        cap = self._capability()
        if not fp8_facts(cap)[0]:
            return GemmPlan(block_path="dequant", why=f"sm_{cap[0]}{cap[1]} has no FP8")
        # cuBLASLt >= 12.9 on SM90 also takes float32 outputs for rowwise scaling. On SM100+ torch sends
        # rowwise scaling to its CUTLASS kernel, whose float32 output depends on the torch version
        # (ScaledBlas.cpp: bf16/fp16 only at 2bec3bd): float32 stays off there.
        new_cublas = self.emulate or (version_tuple(torch.version.cuda) >= MIN_CUDA and cap == (9, 0))
        rowwise = (torch.bfloat16, torch.float16) + ((torch.float32,) if new_cublas else ())
        triton = "triton" if triton_installed() else "dequant"
        if self.emulate:
            usable, why = (), "torch blockwise scaled_mm needs CUDA SM90 + cuBLASLt >= 12.9; emulated on CPU"
        else:  # probed per output dtype: cuBLASLt may take bf16 and refuse float32
            usable, why = probe_torch_blockwise(self.device())  # this rank's device (LOCAL_RANK)
        return GemmPlan(
            block_path="native" if usable else triton,
            scaled_mm_dtypes=_E4M3_E5M2,
            rowwise_out_dtypes=rowwise,
            native_out_dtypes=usable,
            native_name=BLOCKWISE_NAME,
            why=why,
        )

    def native_block_gemm(self, a, a_scale, b, b_scale, out_dtype) -> torch.Tensor | None:
        """cuBLASLt's blockwise ``scaled_mm`` for the operands it takes and an output dtype it
        has not refused; a refusal at run time is logged and remembered per output dtype (the
        Triton kernel serves that dtype from then on)."""
        if out_dtype in self._blockwise_refused or not blockwise_fits(a, b):
            return None
        try:
            return torch_blockwise_gemm(a, a_scale, b, b_scale, out_dtype)
        except (RuntimeError, ValueError) as err:
            with self._refused_lock:
                self._blockwise_refused.add(out_dtype)
            log.warning("dshal %s: blockwise scaled_mm refused output %s (%s); using the Triton kernel for it "
                        "from now on", self.name, out_dtype, str(err).splitlines()[0][:120])
            return None

    def blockwise_refused(self) -> frozenset[torch.dtype]:
        """Output dtypes for which cuBLASLt blockwise ``scaled_mm`` failed at run time (they use
        the Triton kernel from then on)."""
        return frozenset(self._blockwise_refused)

    # ------------------------------------------------------------ topology
    def topology(self) -> Topology | None:
        """NVLink vs PCIe between this process's visible GPUs, from NVML; None when emulated
        or when pynvml is not installed (``pip install 'dshal-nvidia[nvml]'``)."""
        if self.emulate:
            return None
        return nvml_topology()
