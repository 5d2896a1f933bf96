"""TP/EP placement on Infinity Fabric islands, from topology matrices given as data: the
topology the amd plugin builds from amdsmi's answers, placed by dshal's own placement
(``place_groups`` on the xGMI link, and ``dshal.parallel.plan_groups`` on the node's fastest link)."""

from __future__ import annotations

import pytest

from dshal.errors import ConfigError, ShapeError
from dshal.parallel import plan_groups
from dshal.parallel.placement import islands, place_groups, topology_from_matrix
from dshal_amd.topology import XgmiTopology, link_matrix, link_name


def xgmi_groups(topology, group_size):
    return place_groups(topology, group_size, "xgmi")


def _topology(n: int, linked) -> object:
    """n GPUs; pairs for which linked(i, j) is true are one xGMI hop apart, others PCIe."""
    names = [["self" if i == j else ("XGMI" if linked(i, j) else "PCIEXPRESS") for j in range(n)] for i in range(n)]
    hops = [[0 if i == j else (1 if linked(i, j) else 2) for j in range(n)] for i in range(n)]
    weights = [[0 if i == j else (15 if linked(i, j) else 40) for j in range(n)] for i in range(n)]
    return link_matrix(names, hops, weights, source="test")


FULL_8 = _topology(8, lambda i, j: True)  # 8x MI300X OAM board: every pair linked
TWO_ISLANDS = _topology(8, lambda i, j: i // 4 == j // 4)  # two fully linked groups of 4
RING_8 = _topology(8, lambda i, j: (i - j) % 8 in (1, 7))  # each GPU linked to its neighbours


def test_amd_link_matrix_names_links_and_keeps_hops():
    assert isinstance(TWO_ISLANDS, XgmiTopology)
    assert TWO_ISLANDS.links[0][1] == "xgmi" and TWO_ISLANDS.links[0][4] == "pcie"
    assert TWO_ISLANDS.links[3][3] == "self"
    assert TWO_ISLANDS.hops[0][4] == 2 and TWO_ISLANDS.weights[0][1] == 15.0
    assert TWO_ISLANDS.source == "test"


@pytest.mark.parametrize(
    "type_name, hops, expected",
    [
        ("XGMI", 1, "xgmi"),
        ("AMDSMI_LINK_TYPE_XGMI", 1, "xgmi"),
        ("AMDSMI_IOLINK_TYPE_XGMI", 2, "xgmi-2hop"),  # not a direct link
        ("PCIEXPRESS", 2, "pcie"),
        ("AMDSMI_LINK_TYPE_PCIE", 3, "pcie"),
        ("AMDSMI_LINK_TYPE_INTERNAL", 0, "internal"),
    ],
)
def test_amd_link_name(type_name, hops, expected):
    assert link_name(type_name, hops) == expected


def test_amd_fully_connected_node_splits_in_device_order():
    assert xgmi_groups(FULL_8, 8) == [list(range(8))]
    assert xgmi_groups(FULL_8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert xgmi_groups(FULL_8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert xgmi_groups(FULL_8, 1) == [[i] for i in range(8)]


def test_amd_two_islands_keep_groups_inside_an_island():
    assert xgmi_groups(TWO_ISLANDS, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert xgmi_groups(TWO_ISLANDS, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ConfigError, match=r"groups of 8 .*largest fully xgmi-connected set is \[0, 1, 2, 3\]"):
        xgmi_groups(TWO_ISLANDS, 8)


def test_amd_topology_places_tp_groups_through_dshal_parallel():
    # TP=4 on two islands of 4 (plus the interleaved case): dshal.parallel finds xGMI, the fastest link.
    plan = plan_groups(8, tp=4, ep=2, topology=TWO_ISLANDS)
    assert plan.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7)) and "'xgmi'" in plan.reason
    interleaved = plan_groups(8, tp=4, ep=2, topology=_topology(8, lambda i, j: i % 2 == j % 2))
    assert interleaved.tp_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert interleaved.ep_groups == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_amd_interleaved_islands_are_found():
    # Islands {0,2,4,6} and {1,3,5,7}: the naive [0,1,2,3] split would cross PCIe.
    topo = _topology(8, lambda i, j: i % 2 == j % 2)
    assert xgmi_groups(topo, 4) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_amd_ring_allows_pairs_only():
    assert xgmi_groups(RING_8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert islands(RING_8, "xgmi") == [list(range(8))]  # connected, yet not fully connected
    with pytest.raises(ConfigError, match="largest fully xgmi-connected set"):
        xgmi_groups(RING_8, 4)


def test_amd_pairs_that_need_backtracking():
    # Links 0-1, 0-2, 1-3: pairing 0 with its lowest neighbour 1 strands 2 and 3 (not
    # linked), so the search must undo that choice.
    edges = {(0, 1), (0, 2), (1, 3)}
    topo = _topology(4, lambda i, j: (min(i, j), max(i, j)) in edges)
    assert xgmi_groups(topo, 2) == [[0, 2], [1, 3]]


def test_amd_bad_group_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="expected a divisor of the 8 devices"):
        xgmi_groups(FULL_8, 3)
    with pytest.raises(ConfigError, match="'group_size' is 0"):
        place_groups(FULL_8, 0, "xgmi")


def test_amd_topology_matrix_is_validated():
    with pytest.raises(ShapeError, match="not symmetric"):
        topology_from_matrix([["self", "xgmi"], ["pcie", "self"]])
    with pytest.raises(ShapeError, match=r"\[1\]\[1\] is 'xgmi', expected 'self'"):
        topology_from_matrix([["self", "xgmi"], ["xgmi", "xgmi"]])
    with pytest.raises(ShapeError, match="square matrix"):
        topology_from_matrix([["self", "xgmi"], ["xgmi"]])


def test_amd_link_type_codes_read_as_io_link_types():
    """``amdsmi_topo_get_link_type`` answers an ``amdsmi_io_link_type_t`` code (PCIEXPRESS 1,
    XGMI 2). ``AmdSmiLinkType`` numbers its members otherwise in ROCm 6's amdsmi (INTERNAL 0,
    XGMI 1, PCIE 2; ROCm 7 reordered it to PCIE 1, XGMI 2, amdsmi's changelog: "AMDSMI_LINK_TYPE_XGMI
    and AMDSMI_LINK_TYPE_PCIE is reordered"): read first, it would name an XGMI pair PCIe. The
    stand-ins below hold only those enums, with those releases' values (not amdsmi, and never
    reported as a device)."""
    import enum
    import types

    from dshal_amd.topology import _type_name, link_name

    io = enum.IntEnum("AmdSmiIoLinkType", {"UNDEFINED": 0, "PCIEXPRESS": 1, "XGMI": 2})
    names = ("AMDSMI_LINK_TYPE_INTERNAL", "AMDSMI_LINK_TYPE_XGMI", "AMDSMI_LINK_TYPE_PCIE",
             "AMDSMI_LINK_TYPE_NOT_APPLICABLE", "AMDSMI_LINK_TYPE_UNKNOWN")
    rocm6 = enum.IntEnum("AmdSmiLinkType", dict(zip(names, range(5), strict=True)))
    rocm7 = enum.IntEnum("AmdSmiLinkType", dict(zip((names[0], names[2], names[1], *names[3:]), range(5), strict=True)))
    for link in (rocm6, rocm7):
        both = types.SimpleNamespace(AmdSmiIoLinkType=io, AmdSmiLinkType=link)
        assert link_name(_type_name(both, 2), 1) == "xgmi" and link_name(_type_name(both, 1), 1) == "pcie"
    assert _type_name(types.SimpleNamespace(AmdSmiIoLinkType=io), io.XGMI) == "XGMI"  # an enum member names itself
    assert link_name(_type_name(types.SimpleNamespace(AmdSmiLinkType=rocm7), 2), 1) == "xgmi"  # only the other enum: used
