"""``npu-smi info -t topo`` parsing, on sample text written out here (no npu-smi needed)."""

from __future__ import annotations

import pytest

from dshal_ascend.topology import TopologyParseError, parse_npu_smi_topo, query_topology

# What an 8-NPU Atlas 800T A2 (910B) node prints: a full HCCS mesh, CPU affinity per NPU.
ATLAS_A2_TOPO = """\
           NPU0       NPU1       NPU2       NPU3       NPU4       NPU5       NPU6       NPU7       CPU Affinity
NPU0       X          HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       144-167
NPU1       HCCS       X          HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       144-167
NPU2       HCCS       HCCS       X          HCCS       HCCS       HCCS       HCCS       HCCS       96-119
NPU3       HCCS       HCCS       HCCS       X          HCCS       HCCS       HCCS       HCCS       96-119
NPU4       HCCS       HCCS       HCCS       HCCS       X          HCCS       HCCS       HCCS       0-23
NPU5       HCCS       HCCS       HCCS       HCCS       HCCS       X          HCCS       HCCS       0-23
NPU6       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       X          HCCS       48-71
NPU7       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       HCCS       X          48-71

Legend:

  X    = Self
  SYS  = Path traversing PCIe and NUMA nodes. Nodes are connected through SMP, such as QPI, UPI.
  PHB  = Path traversing PCIe and the PCIe host bridge of a CPU.
  PIX  = Path traversing a single PCIe switch
  PXB  = Path traversing multiple PCIe switches
  HCCS = Connection traversing HCCS.
  NA   = Unknown relationship.
"""

# A PCIe-only 4-card inference box (two switches, two sockets).
PCIE_TOPO = """\
           NPU0       NPU1       NPU2       NPU3       CPU Affinity
NPU0       X          PIX        SYS        SYS        0-31
NPU1       PIX        X          SYS        SYS        0-31
NPU2       SYS        SYS        X          PXB        32-63
NPU3       SYS        SYS        PXB        X          32-63

Legend:
  X    = Self
  SYS  = Path traversing PCIe and NUMA nodes.
"""


def test_ascend_topology_parses_hccs_mesh():
    topo = parse_npu_smi_topo(ATLAS_A2_TOPO)
    assert topo.num_devices == 8
    assert topo.source == "npu-smi info -t topo"
    for i in range(8):
        for j in range(8):
            assert topo.links[i][j] == ("self" if i == j else "hccs")
            assert topo.weights[i][j] == (0.0 if i == j else 1.0)


def test_ascend_topology_pcie_costs_order_links():
    topo = parse_npu_smi_topo(PCIE_TOPO)
    assert topo.links[0] == ("self", "pcie", "sys", "sys")
    assert topo.weights[0][1] < topo.weights[2][3] < topo.weights[0][2]  # PIX < PXB < SYS


def test_ascend_topology_follows_visible_devices():
    # ASCEND_RT_VISIBLE_DEVICES=2,0 -> npu:0 is physical 2, npu:1 is physical 0.
    topo = parse_npu_smi_topo(PCIE_TOPO, visible=[2, 0])
    assert topo.links == (("self", "sys"), ("sys", "self"))
    with pytest.raises(TopologyParseError, match=r"\[9\]"):
        parse_npu_smi_topo(PCIE_TOPO, visible=[9])


@pytest.mark.parametrize(
    "text,match",
    [
        ("npu-smi: command failed\n", "no header"),
        (ATLAS_A2_TOPO.replace("NPU3       HCCS       HCCS       HCCS       X", "NPU3       HCCS       FOO        HCCS       X"), "FOO"),
        ("\n".join(ATLAS_A2_TOPO.splitlines()[:5]), "do not match"),
    ],
)
def test_ascend_topology_rejects_malformed_text(text, match):
    with pytest.raises(TopologyParseError, match=match):
        parse_npu_smi_topo(text)


def test_ascend_topology_absent_tool_gives_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npu-smi on PATH
    assert query_topology() is None
