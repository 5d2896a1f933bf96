"""What a Triton release cannot build for a GPU arch (``dshal.versions.ARCH_FLOORS``), as data
checked with version strings: the facts come from compiling with Triton 3.6.0 - 3.9.0
(benchmarks/RESULTS.md, 2026-12-07), so these tests run under any installed Triton."""

from __future__ import annotations

import pytest

from dshal.errors import BackendUnavailableError
from dshal.kernels.triton.crosscompile import COMPILE_TARGETS, refuse_unbuildable
from dshal.versions import ARCH_FLOORS, SUPPORTED, minor, triton_arch_refusal, triton_arch_shortfall


@pytest.mark.parametrize(
    "version, arch, minimum, compiles",
    [("3.5.1", "sm_121a", "3.6", False), ("3.5.0", "sm_103a", "3.6", False),  # no ptxas-blackwell: nothing assembles
     ("3.6.0", "sm_121a", "3.8", True), ("3.7.0", "sm_121a", "3.8", True),  # FP8 operands widened to f16
     ("3.6.0", "sm_103a", None, None), ("3.8.0", "sm_121a", None, None), ("3.9.0+git1234", "sm_121a", None, None),
     ("3.4.0", "sm_90a", None, None), (None, "sm_121a", None, None)],
)
def test_triton_arch_shortfall_by_version(version, arch, minimum, compiles):
    floor = triton_arch_shortfall(version, arch)
    if minimum is None:
        assert floor is None and triton_arch_refusal(version, arch) is None
        return
    assert (floor.minimum, floor.compiles) == (minimum, compiles)  # the blocking fact first, for 3.5 on sm_121a
    message = triton_arch_refusal(version, arch)
    assert f"Triton {version}" in message and arch in message and f"triton>={minimum}" in message


def test_every_supported_triton_builds_every_dshal_kernels_target():
    """The targets `dshal kernels` compiles have no floor above dshal's own (Triton 3.6.0 built
    all of their configs); a fact added for one must come with its refusal."""
    assert {f.arch for f in ARCH_FLOORS}.isdisjoint(COMPILE_TARGETS)
    oldest = SUPPORTED["triton"][0]
    assert all(minor(f.minimum) >= minor(oldest) for f in ARCH_FLOORS)  # below the floor: refused by require_triton
    assert all(f.source and f.below for f in ARCH_FLOORS)


def test_dshal_kernels_refuses_an_arch_its_triton_cannot_assemble():
    with pytest.raises(BackendUnavailableError) as err:
        refuse_unbuildable(["sm_90a", "sm_121a"], "3.5.1")
    message = str(err.value)
    assert message.startswith("dshal kernels: --target sm_121a: Triton 3.5.1") and "triton>=3.6" in message
    refuse_unbuildable(["sm_90a", "sm_121a"], "3.6.0")  # slower FP8 on 3.6 / 3.7 is not a refusal: the rows say it
    refuse_unbuildable(list(COMPILE_TARGETS), "3.6.0")
