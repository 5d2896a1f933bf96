"""NVLink / PCIe topology from NVML (``pynvml``, from the ``nvidia-ml-py`` package; optional).

The link between two GPUs is ``"nvlink"`` when NVML reports NVLink peer-to-peer between
them (direct or through NVSwitch), else ``"pcie"``. Weights (lower is closer): 1 for
NVLink; for PCIe, 2 plus the PCIe distance level NVML reports (0 same board .. 5 across
CPU sockets), so a PCIe switch beats a host bridge beats a socket hop.
"""

from __future__ import annotations

import logging

import torch

from dshal import Topology
from dshal.plugin import pci_bus_id, topology_from_matrix

log = logging.getLogger("dshal")

#: NVML_TOPOLOGY_* levels (common ancestor of two devices) -> distance rank 0..5.
PCIE_LEVELS = {0: 0, 10: 1, 20: 2, 30: 3, 40: 4, 50: 5}


def link_matrix(nvlink: list[list[bool]], pcie_level: list[list[int]]) -> tuple[list[list[str]], list[list[float]]]:
    """Link names and weights from NVML's answers: ``nvlink[i][j]`` (P2P over NVLink) and
    ``pcie_level[i][j]`` (an NVML_TOPOLOGY_* value)."""
    n = len(nvlink)
    links = [["self"] * n for _ in range(n)]
    weights = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if nvlink[i][j] or nvlink[j][i]:
                links[i][j], weights[i][j] = "nvlink", 1.0
            else:
                level = max(pcie_level[i][j], pcie_level[j][i])
                links[i][j], weights[i][j] = "pcie", 2.0 + PCIE_LEVELS.get(level, 5)
    return links, weights


def nvml_topology() -> Topology | None:
    """The topology of the GPUs torch sees (CUDA order), or None when NVML is unavailable."""
    try:
        import pynvml  # lazy: the vendor runtime (optional), never at discovery
    except ImportError:
        log.info("dshal nvidia: pynvml not installed; topology unknown (pip install 'dshal-nvidia[nvml]')")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        log.warning("dshal nvidia: NVML init failed (%s); topology unknown", err)
        return None
    try:
        count = torch.cuda.device_count()
        handles = []
        for i in range(count):  # CUDA and NVML may number devices differently: match by PCI bus id
            bus = pci_bus_id(i, domain_digits=8)
            handles.append(
                pynvml.nvmlDeviceGetHandleByPciBusId(bus) if bus is not None else pynvml.nvmlDeviceGetHandleByIndex(i)
            )
        nvlink = [[False] * count for _ in range(count)]
        level = [[0] * count for _ in range(count)]
        for i in range(count):
            for j in range(count):
                if i == j:
                    continue
                status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                nvlink[i][j] = status == pynvml.NVML_P2P_STATUS_OK
                level[i][j] = int(pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
        links, weights = link_matrix(nvlink, level)
        return topology_from_matrix(links, weights, source="nvml")
    except pynvml.NVMLError as err:
        log.warning("dshal nvidia: NVML topology query failed (%s); topology unknown", err)
        return None
    finally:
        pynvml.nvmlShutdown()
