"""The NVIDIA backend: CUDA builds of torch on NVIDIA GPUs (Hopper first).

- FP8: sm_90 (Hopper) has FP8 tensor cores and the Hopper-only paths (wgmma tilings,
  cuBLASLt blockwise scaling); sm_89 (Ada) has FP8 without them; older parts have no FP8
  (FP8 ops then dequantize, declared ``emulated``).
- fp8_gemm: tensorwise/rowwise through ``torch._scaled_mm``; block scales through
  ``torch.nn.functional.scaled_mm`` blockwise when a probe shows this torch + cuBLASLt run
  it correctly on SM90, else dshal's Triton kernel. ``dshal info`` shows which.
- Collectives: torch.distributed on ``nccl``. Topology: NVML (``pynvml``, optional).
- ``emulate=True``: the same code on CPU tensors (Triton interpreter), standing for sm_90.
"""

from __future__ import annotations

import logging
import threading

import torch

from dshal import Availability, Capabilities, Topology
from dshal.plugin import GemmPlan, KernelTarget, PeakFigures, TorchGpuBackend, shipped_target, triton_installed
from dshal_nvidia.cublaslt import MIN_CUDA, blockwise_fits, probe_torch_blockwise, torch_blockwise_gemm, version_tuple
from dshal_nvidia.topology import nvml_topology

log = logging.getLogger("dshal")

#: Dense peaks (datasheets list FP8/BF16 "with sparsity"; dense is half). Most specific name first.
NVIDIA_PEAKS: tuple[PeakFigures, ...] = (
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


def fp8_facts(capability: tuple[int, int]) -> tuple[tuple[str, ...], str]:
    """(FP8 formats, description) for an NVIDIA compute capability."""
    if capability >= (9, 0):
        return ("e4m3fn", "e5m2"), "FP8 tensor cores (Hopper paths: wgmma tilings, cuBLASLt blockwise scaling)"
    if capability >= (8, 9):
        return ("e4m3fn", "e5m2"), "FP8 tensor cores (Ada: no Hopper-only paths)"
    return (), f"no FP8 tensor cores on sm_{capability[0]}{capability[1]}: FP8 ops dequantize"


#: The shipped Triton tile table per compute capability, newest first (older: "generic").
TARGET_OF_CAPABILITY = (((9, 0), "nvidia-sm90"), ((8, 9), "nvidia-sm89"))
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
        name = next((target for least, target in TARGET_OF_CAPABILITY if cap >= least), "generic")
        if self.emulate:  # the interpreter, with the FP8 rules of the part it stands for
            return KernelTarget.emulating(shipped_target(name))
        return shipped_target(name)

    def plan_gemm(self) -> GemmPlan:
        cap = self._capability()
        if not fp8_facts(cap)[0]:
            return GemmPlan(block_path="dequant", why=f"sm_{cap[0]}{cap[1]} has no FP8")
        # cuBLASLt >= 12.9 on SM90 also takes float32 outputs for rowwise scaling.
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
