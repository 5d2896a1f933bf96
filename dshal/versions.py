"""The torch and Triton releases dshal supports, and a check of the running stack.

``SUPPORTED`` is inclusive by minor release. Its lower ends are the stack of the prepared
GPU machine (torch 2.11 with CUDA 13, Triton 3.6; see ``benchmarks/gpu_check.py``); its upper
ends the stack CI runs (``constraints.txt``). pyproject's torch requirement is a looser floor
(``torch>=2.4``: the torch_npu 6.0.0 / 7.0.0 lines ship for it; SDPA's ``enable_gqa``, 2.5+,
is worked around by :func:`dshal.ops.attention.sdpa`): a release outside ``SUPPORTED`` may
work, but it is not what dshal was checked on, and :func:`stack_report` (``dshal info``'s
``stack:`` line) says so. Triton's floor is ``SUPPORTED``'s (``dshal kernels`` reads
``triton.knobs``, 3.4+, and the ptxas log, 3.5+; :func:`dshal.kernels.triton.require_triton`).
torch's CUDA builds pin their own Triton (torch 2.11's is 3.6), so the ``triton`` extra, which
only the GPU plugins need, goes with a torch of that age; the Ascend plugin needs neither.

What dshal needs from each, and where it copes with either end:
- torch: ``dist.all_gather_single`` / ``reduce_scatter_single`` (renamed in 2.10; the old
  names are the fallback), ``torch.nn.functional.scaled_mm`` with ``ScalingType`` (probed,
  with ``torch._scaled_mm`` and the Triton kernel behind it), ``torch.get_device_module``,
  ``torch.distributed.distributed_c10d._abort_process_group`` (looked up, destroy otherwise);
- Triton: ``triton.compile(ASTSource(...), target=GPUTarget(...))`` for ``dshal kernels``, and
  the interpreter (``TRITON_INTERPRET=1``) for emulated plugins.

Checked on 2026-12-05 (no GPU), with the GPU machine's own torch 2.11.0+cu130 (PyPI's CUDA
build runs on the CPU) and Triton 3.6.0: ``dshal kernels`` compiles every shipped config for
sm_90a, gfx942 and gfx950, with the same resources and tensor-core instructions as 3.9 (the
Blackwell targets sm_100a and sm_120a too, checked on 2026-12-07; what older Tritons lack on
Blackwell's later minors is :data:`ARCH_FLOORS`), and
the test suite passes (its interpreter tests skipped, see below). torch 2.11's CPU
``torch._scaled_mm`` takes per-tensor scales only; dshal's FP8 GEMM then uses its block path
(the refusal is remembered), and tests using it as a rowwise rival skip. Emulated mode (the Triton *interpreter*
on CPU tensors) needs more: running the kernel tests under each interpreter here,
- 3.6.0 with numpy >= 2.4 fails in the GEMM kernel's K loop, whose bounds are kernel values
  (``range(k_first, k_last)``: its interpreter calls ``int()`` on a one-element array,
  which numpy 2.4 refuses); with numpy 2.3 it runs that loop but cannot convert ``fp8e4b8``
  (e4m3fnuz): 17 of 90 tests fail;
- 3.7.0 runs those loops but still cannot convert ``fp8e4b8``: 19 of 111 kernel tests fail;
- 3.8.0 and 3.9.0 pass all 111.
So an emulated plugin needs :data:`INTERPRETER_MINIMUM`, and says so when it is not there.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

#: package -> (oldest, newest) supported release, inclusive by minor version.
SUPPORTED: dict[str, tuple[str, str]] = {"torch": ("2.11", "2.13"), "triton": ("3.6", "3.9")}
#: The oldest Triton whose interpreter runs every dshal kernel on CPU tensors (emulated mode).
INTERPRETER_MINIMUM = "3.8"


def minor(version: str) -> tuple[int, int]:
    """``"2.11.0+cu130"`` -> ``(2, 11)``."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def in_range(package: str, version: str) -> bool:
    """Whether ``version`` of ``package`` lies in :data:`SUPPORTED` (by minor release)."""
    low, high = SUPPORTED[package]
    return minor(low) <= minor(version) <= minor(high)


#: The distributions that install a package under other names: ROCm's torch wheels depend on
#: ``pytorch-triton-rocm`` (and CUDA nightlies on ``pytorch-triton``), which install ``triton``.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {"triton": ("triton", "pytorch-triton-rocm", "pytorch-triton")}


def installed(package: str) -> str | None:
    """The installed version of ``package`` (read from its distribution's metadata, without
    importing it; any of the distributions :data:`DISTRIBUTIONS` lists for it)."""
    for distribution in DISTRIBUTIONS.get(package, (package,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def interpreter_refusal(triton_version: str | None) -> str | None:
    """Why the Triton interpreter of ``triton_version`` cannot run dshal's kernels on CPU
    tensors (emulated mode), or None when it can (or when Triton is absent: that is said
    elsewhere)."""
    if triton_version is None or minor(triton_version) >= minor(INTERPRETER_MINIMUM):
        return None
    return (
        f"the Triton {triton_version} interpreter cannot run dshal's kernels on CPU tensors (it cannot "
        f"convert e4m3fnuz, and 3.6 with numpy >= 2.4 fails on loop bounds); emulation needs "
        f"triton>={INTERPRETER_MINIMUM}. A GPU build compiles the kernels and is not affected"
    )


@dataclass(frozen=True)
class ArchFloor:
    """The oldest Triton that builds dshal's kernels for a GPU arch as its tile table intends."""

    arch: str  #: Triton's name of the arch, as ``ptxas -arch`` takes it: "sm_121a"
    minimum: str  #: the oldest Triton release (minor) that meets it
    below: str  #: what an older Triton does for the arch
    compiles: bool  #: whether an older Triton still builds working kernels (only slower ones)
    source: str


#: What the Triton releases in :data:`SUPPORTED` (and older ones) cannot do for an arch a plugin
#: maps to a shipped tile table. Every compile target of ``dshal kernels`` (sm_90a, sm_100a,
#: sm_120a, gfx942, gfx950) built every shipped config with Triton 3.6.0 as with 3.9.0
#: (benchmarks/RESULTS.md, 2026-12-07): they have no entry. Blackwell's later minors do.
ARCH_FLOORS: tuple[ArchFloor, ...] = tuple(
    ArchFloor(arch, "3.6", "its only ptxas (CUDA 12.8) does not know the arch, so no kernel assembles", False,
              "triton-lang/triton#10331: the 3.5.0 wheel ships ptxas 12.8.93 alone, which refuses sm_121a; 3.6.0 adds "
              "ptxas-blackwell 12.9.86 for arch >= 100 (#8485: Triton 3.5 matmuls fail on GB300); 3.6.0 compiled "
              "every shipped fp8_block_gemm config for sm_103a and sm_121a here on 2026-12-07")
    for arch in ("sm_103a", "sm_121a")
) + (
    ArchFloor("sm_121a", "3.8", "it widens FP8 dot operands to f16 before mma.sync (its FP8 mma.sync path takes "
              "capability 12.0 only), so FP8 GEMMs run at the f16 tensor-core rate", True,
              "compiled here on 2026-12-07: 3.6.0 and 3.7.0 emit mma.sync m16n8k16 f16 for sm_121a, 3.8.0 and 3.9.0 "
              "m16n8k32 e4m3 (as for sm_120a); triton-lang/triton#10010 lifted exact capability checks for SM121"),
)


def triton_arch_shortfall(triton_version: str | None, arch: str) -> ArchFloor | None:
    """The :data:`ARCH_FLOORS` fact for ``arch`` that ``triton_version`` falls short of (one
    that stops it compiling before one that only slows it), or None when it meets them all
    (or Triton is absent: that is said elsewhere)."""
    if triton_version is None:
        return None
    short = [f for f in ARCH_FLOORS if f.arch == arch and minor(triton_version) < minor(f.minimum)]
    return min(short, key=lambda f: (f.compiles, minor(f.minimum)), default=None)


def triton_arch_refusal(triton_version: str | None, arch: str) -> str | None:
    """Why Triton ``triton_version`` falls short on ``arch`` (see :func:`triton_arch_shortfall`),
    naming the arch, the release and the minimum; None when it does not."""
    floor = triton_arch_shortfall(triton_version, arch)
    if floor is None:
        return None
    return (f"Triton {triton_version} cannot build dshal's kernels for {arch} as intended: {floor.below}; "
            f"{arch} needs triton>={floor.minimum} (with a CUDA torch, whose Triton comes with it, a newer torch)")


def stack_report() -> dict[str, dict[str, object]]:
    """For each supported package: the installed version (None when absent), the range, and
    whether it is in range."""
    out: dict[str, dict[str, object]] = {}
    for package, (low, high) in SUPPORTED.items():
        version = installed(package)
        out[package] = {
            "installed": version,
            "supported": f"{low} - {high}",
            "in_range": None if version is None else in_range(package, version),
        }
    return out


__all__ = [
    "ARCH_FLOORS",
    "DISTRIBUTIONS",
    "INTERPRETER_MINIMUM",
    "SUPPORTED",
    "ArchFloor",
    "in_range",
    "installed",
    "interpreter_refusal",
    "minor",
    "stack_report",
    "triton_arch_refusal",
    "triton_arch_shortfall",
]
