"""The peaks tables match device names exactly (issue #18 item 2.11)."""

from __future__ import annotations

import pytest

from dshal.perf.measure import part_words, same_part
from dshal.plugin import lookup_peaks


@pytest.mark.parametrize(
    "device_name, part, same",
    [
        ("NVIDIA H200", "H200", True),
        ("NVIDIA GH200 480GB", "H200", False),  # Grace Hopper: another part, other figures
        ("NVIDIA H100 80GB HBM3", "H100", True),  # how torch names the H100 SXM5
        ("NVIDIA H100 PCIe", "H100", False),
        ("NVIDIA H100 PCIe", "H100 PCIe", True),
        ("NVIDIA H200 NVL", "H200", False),
        ("NVIDIA H800", "H100", False),
        ("AMD Instinct MI300X", "MI300X", True),
        ("AMD Instinct MI300X VF", "MI300X", True),  # SR-IOV function of the same GPU
        ("AMD Instinct MI300A", "MI300X", False),
        ("AMD Instinct MI325X", "MI300X", False),
    ],
)
def test_same_part_is_exact(device_name, part, same):
    assert same_part(device_name, part) is same


def test_part_words_drop_only_vendor_memory_and_form_factor():
    assert part_words("NVIDIA A100-SXM4-80GB") == ("A100",)
    assert part_words("NVIDIA GH200 480GB") == ("GH200",)


def test_plugin_tables_give_no_figures_to_a_lookalike_part():
    nvidia = pytest.importorskip("dshal_nvidia")
    amd = pytest.importorskip("dshal_amd")
    assert lookup_peaks("NVIDIA GH200 480GB", nvidia.NVIDIA_PEAKS) is None
    assert lookup_peaks("NVIDIA H200", nvidia.NVIDIA_PEAKS).match == "H200"
    assert lookup_peaks("NVIDIA H200 NVL", nvidia.NVIDIA_PEAKS).match == "H200 NVL"
    assert lookup_peaks("NVIDIA H100 PCIe", nvidia.NVIDIA_PEAKS).match == "H100 PCIe"
    assert lookup_peaks("AMD Instinct MI300A", amd.AMD_PEAKS) is None
    # Every row is reachable: no row's part hides another's.
    for table in (nvidia.NVIDIA_PEAKS, amd.AMD_PEAKS):
        for row in table:
            assert lookup_peaks(row.match, table) is row
