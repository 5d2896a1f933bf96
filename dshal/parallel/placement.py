"""Place tensor-/expert-parallel groups on a node's fast-link islands.

A GPU node's devices are not all equally close: on an 8x MI300X (or an 8x H200 HGX)
board every pair shares an xGMI (NVLink) link, but a board of two 4-GPU islands, or a
ring, has pairs that only talk over PCIe or through another GPU. A tensor-parallel group
all-reduces on every layer, so it belongs on devices that are *pairwise* connected by the
fast link. :func:`place_groups` splits a node's devices into such groups.

Everything here is plain data in, plain data out (no vendor import): the plugins turn
their management library's answer (``amdsmi``, NVML) into a :class:`~dshal.backend.Topology`
first.
"""

from __future__ import annotations

from collections.abc import Sequence

from dshal.backend import Topology
from dshal.errors import ConfigError, ShapeError


def topology_from_matrix(
    links: Sequence[Sequence[str]],
    weights: Sequence[Sequence[float]] | None = None,
    source: str = "",
) -> Topology:
    """A :class:`Topology` from a square matrix of link names (and optional weights).

    ``links[i][i]`` must be ``"self"`` and the matrix symmetric (a link is one cable);
    otherwise :class:`~dshal.ShapeError` names the first bad entry.
    """
    n = len(links)
    for i, row in enumerate(links):
        if len(row) != n:
            raise ShapeError(f"topology: argument 'links' row {i} has {len(row)} entries, expected {n} (a square matrix)")
        if row[i] != "self":
            raise ShapeError(f"topology: argument 'links'[{i}][{i}] is {row[i]!r}, expected 'self'")
        for j in range(i):
            if row[j] != links[j][i]:
                raise ShapeError(
                    f"topology: argument 'links' is not symmetric: [{i}][{j}] is {row[j]!r} but [{j}][{i}] is {links[j][i]!r}"
                )
    if weights is not None:
        if len(weights) != n or any(len(r) != n for r in weights):
            raise ShapeError(f"topology: argument 'weights' must be {n}x{n} like 'links'")
        weights = tuple(tuple(float(w) for w in r) for r in weights)
    return Topology(links=tuple(tuple(r) for r in links), weights=weights, source=source)


def _adjacency(topology: Topology, link: str) -> list[set[int]]:
    n = topology.num_devices
    return [{j for j in range(n) if j != i and topology.links[i][j] == link} for i in range(n)]


def islands(topology: Topology, link: str) -> list[list[int]]:
    """Devices reachable from each other over ``link`` hops (connected components), in
    device order. An island need not be fully connected (a ring is one island)."""
    adj = _adjacency(topology, link)
    seen: set[int] = set()
    found = []
    for start in range(topology.num_devices):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            d = stack.pop()
            if d in comp:
                continue
            comp.add(d)
            stack.extend(adj[d] - comp)
        seen |= comp
        found.append(sorted(comp))
    return found


def place_groups(topology: Topology, group_size: int, link: str) -> list[list[int]]:
    """Split the node's devices into groups of ``group_size`` whose members are pairwise
    connected by ``link`` (``"xgmi"``, ``"nvlink"``...).

    Use it for tensor-parallel groups (group_size = TP) and for expert-parallel groups
    (group_size = EP) within a node. Every device lands in exactly one group; groups are
    listed by their lowest device, members ascending, and the search prefers low device
    ids, so a fully connected node gives ``[[0..g-1], [g..2g-1], ...]``.

    Raises :class:`~dshal.ConfigError` when ``group_size`` does not divide the device
    count, or when no such split exists (e.g. TP=8 on two islands of 4, TP=4 on a ring),
    naming the fully connected islands that do exist.
    """
    n = topology.num_devices
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError(f"place_groups: argument 'group_size' is {group_size!r}, expected an int >= 1")
    if n % group_size:
        raise ConfigError(
            f"place_groups: argument 'group_size' is {group_size}, expected a divisor of the {n} devices of this node"
        )
    adj = _adjacency(topology, link)
    groups = _partition(tuple(range(n)), group_size, adj)
    if groups is None:
        largest = _largest_clique(adj)
        raise ConfigError(
            f"place_groups: cannot split {n} devices into groups of {group_size} pairwise connected by {link!r}; "
            f"the largest fully {link}-connected set is {largest} ({len(largest)} devices); "
            f"{link} islands: {islands(topology, link)}"
        )
    return groups


def _partition(free: tuple[int, ...], size: int, adj: list[set[int]]) -> list[list[int]] | None:
    """Cover ``free`` with disjoint cliques of ``size`` (backtracking; nodes have <= 16 devices)."""
    if not free:
        return []
    first, rest = free[0], free[1:]

    def grow(group: list[int], candidates: tuple[int, ...]) -> list[list[int]] | None:
        if len(group) == size:
            left = tuple(d for d in rest if d not in group)
            tail = _partition(left, size, adj)
            return None if tail is None else [group, *tail]
        for k, d in enumerate(candidates):
            if all(d in adj[g] for g in group):
                found = grow([*group, d], candidates[k + 1 :])
                if found is not None:
                    return found
        return None

    return grow([first], rest)


def _largest_clique(adj: list[set[int]]) -> list[int]:
    best: list[int] = []

    def extend(clique: list[int], candidates: list[int]) -> None:
        nonlocal best
        if len(clique) > len(best):
            best = clique
        for k, d in enumerate(candidates):
            extend([*clique, d], [c for c in candidates[k + 1 :] if c in adj[d]])

    extend([], list(range(len(adj))))
    return best


__all__ = ["islands", "place_groups", "topology_from_matrix"]
