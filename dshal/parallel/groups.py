"""Which ranks form the tensor-parallel and expert-parallel groups.

Tensor parallelism all-reduces every layer, so its groups belong on the fastest links:
when the backend's :meth:`~dshal.Backend.topology` describes the node (NVLink / xGMI /
HCCS islands), each TP group is a set of devices pairwise joined by the node's fastest
link (:func:`dshal.parallel.placement.place_groups`). Without a topology, TP groups
are contiguous ranks (torchrun numbers the ranks of a node contiguously, so a TP group of
at most one node's size stays on one node). EP group ``i`` gathers the ``i``-th member of
every TP group.

:func:`plan_groups` is a pure function of the sizes and the topology; :func:`setup_groups`
creates the process groups on a running job.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dshal import comm
from dshal.backend import Topology
from dshal.errors import CommError, ConfigError
from dshal.parallel.placement import place_groups
from dshal.runtime import current

#: Cost of a link by name when a topology gives no weights (lower is closer); it only
#: picks the node's fastest link. Links not listed cost as much as PCIe.
LINK_COST: Mapping[str, float] = {
    "self": 0.0,
    "nvswitch": 1.0,
    "nvlink": 1.0,
    "xgmi": 1.0,
    "hccs": 1.0,
    "pcie": 2.0,
    "pix": 2.0,
    "pxb": 2.0,
    "phb": 2.0,
    "node": 3.0,
    "sys": 3.0,
}


@dataclass(frozen=True)
class GroupPlan:
    """Global ranks of every TP group and every EP group, and why they were chosen."""

    tp_groups: tuple[tuple[int, ...], ...]
    ep_groups: tuple[tuple[int, ...], ...]
    reason: str

    def tp_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.tp_groups if rank in g)

    def ep_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.ep_groups if rank in g)


def fastest_link(topology: Topology) -> str | None:
    """The name of the node's closest link between two different devices (lowest weight,
    or lowest :data:`LINK_COST` when the topology has no weights); None for one device."""
    n = topology.num_devices
    best: tuple[float, str] | None = None
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            link = str(topology.links[i][j])
            cost = topology.weights[i][j] if topology.weights is not None else LINK_COST.get(link.lower(), LINK_COST["pcie"])
            if best is None or cost < best[0]:
                best = (cost, link)
    return None if best is None else best[1]


def _first_devices(topology: Topology, count: int) -> Topology:
    """``topology`` restricted to devices ``0..count-1`` (the ones this job's ranks drive)."""
    links = tuple(tuple(row[:count]) for row in topology.links[:count])
    weights = None if topology.weights is None else tuple(tuple(row[:count]) for row in topology.weights[:count])
    return Topology(links=links, weights=weights, source=topology.source)


def _node_order(local_world_size: int, tp: int, topology: Topology | None) -> tuple[list[list[int]], str]:
    """TP groups of local device indices for one node, and the reason for that layout."""
    contiguous = [list(range(s, s + tp)) for s in range(0, local_world_size, tp)]
    if topology is None:
        return contiguous, "contiguous ranks (the backend reports no topology)"
    if topology.num_devices < local_world_size:
        return contiguous, (
            f"contiguous ranks (the topology describes {topology.num_devices} devices, "
            f"fewer than the {local_world_size} local ranks)"
        )
    node = _first_devices(topology, local_world_size)
    link = fastest_link(node)
    if link is None or tp == 1:
        return contiguous, "contiguous ranks (no tensor-parallel group to place)"
    source = f" ({topology.source})" if topology.source else ""
    try:
        groups = place_groups(node, tp, link)
    except ConfigError as err:
        return contiguous, f"contiguous ranks: no TP groups pairwise linked by {link!r}{source}: {err}"
    return groups, f"TP groups pairwise linked by {link!r}{source}"


def plan_groups(
    world_size: int, tp: int, ep: int, *, local_world_size: int | None = None, topology: Topology | None = None
) -> GroupPlan:
    """Place ``world_size = tp * ep`` ranks into TP groups and EP groups.

    Ranks of node ``k`` are ``k * local_world_size + local_rank`` and rank ``r`` drives
    local device ``r % local_world_size``, as under torchrun. TP groups stay within a node
    whenever ``tp`` divides the node size; with a ``topology`` they are carved from its
    islands of fastest links.
    """
    for name, value in (("tp", tp), ("ep", ep), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise CommError(f"plan_groups: argument {name!r} is {value!r}, expected a positive integer")
    if tp * ep != world_size:
        raise CommError(f"plan_groups: tp ({tp}) x ep ({ep}) = {tp * ep}, expected the world size {world_size}")
    local = world_size if local_world_size is None else local_world_size
    if local < 1 or world_size % local:
        raise CommError(f"plan_groups: local_world_size is {local!r}, expected a positive divisor of the world size {world_size}")
    if local % tp:
        tp_groups = [tuple(range(s, s + tp)) for s in range(0, world_size, tp)]
        reason = f"contiguous ranks (tp={tp} does not divide the {local} ranks of a node, so TP groups span nodes)"
    else:
        per_node, reason = _node_order(local, tp, topology)
        tp_groups = [tuple(node * local + d for d in group) for node in range(world_size // local) for group in per_node]
    ep_groups = [tuple(sorted(group[i] for group in tp_groups)) for i in range(tp)]
    return GroupPlan(tuple(tp_groups), tuple(ep_groups), reason)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups (None when that dimension has size 1) and the plan."""

    tp: Any
    ep: Any
    tp_size: int
    ep_size: int
    plan: GroupPlan


def _check_same_plan(plan: GroupPlan) -> None:
    """Every rank must create the same groups: each plans from its own node's topology (a node
    without NVML answers, a degraded link, mixed node types would plan others), and ranks
    calling ``new_group`` with different rank lists hang or build wrong groups. One all_gather
    of each rank's plan digest, before any group exists; CommError naming the ranks that differ."""
    digest = zlib.crc32(repr((plan.tp_groups, plan.ep_groups)).encode())
    seen = comm.all_gather(torch.tensor([digest], dtype=torch.int64, device=current().device)).tolist()
    differ = [rank for rank, theirs in enumerate(seen) if theirs != seen[0]]
    if differ:
        raise CommError(
            f"setup_groups: ranks {differ} planned other TP/EP groups than rank 0 (each node plans from its own "
            f"topology; this rank's plan: TP {list(plan.tp_groups)}, EP {list(plan.ep_groups)}: {plan.reason}); "
            "give every node the same topology (the same GPUs and links, NVML / amdsmi installed on each)"
        )


def setup_groups(tp: int = 1, ep: int = 1) -> ParallelGroups:
    """Create the TP and EP process groups of the running job (every rank must call it).

    The world size must equal ``tp * ep``; the layout comes from :func:`plan_groups` with
    the active backend's topology.
    """
    if not comm.is_initialized():
        raise CommError("setup_groups: the job is not initialized; call dshal.comm.init() first (or launch with torchrun)")
    env = comm.launch_env()
    plan = plan_groups(
        comm.get_world_size(), tp, ep, local_world_size=env.local_world_size, topology=current().backend.topology()
    )
    _check_same_plan(plan)
    tp_group = comm.new_groups(plan.tp_groups, "tp") if tp > 1 else None
    ep_group = comm.new_groups(plan.ep_groups, "ep") if ep > 1 else None
    return ParallelGroups(tp=tp_group, ep=ep_group, tp_size=tp, ep_size=ep, plan=plan)
