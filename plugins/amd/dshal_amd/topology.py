"""Infinity Fabric (xGMI) topology from ``amdsmi`` (optional).

``amdsmi_topo_get_link_type`` gives, per GPU pair, a link type (XGMI, PCIE...) and a hop
count; ``amdsmi_topo_get_link_weight`` a weight (lower is closer). A pair is ``"xgmi"``
only when it is one xGMI hop apart (a direct link); longer xGMI paths are named
``"xgmi-<n>hop"`` so that TP/EP placement (:func:`dshal.parallel.plan_groups`, on the node's
fastest link) never puts them in one group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dshal import Topology
from dshal.plugin import pci_bus_id, topology_from_matrix

log = logging.getLogger("dshal")


@dataclass(frozen=True)
class XgmiTopology(Topology):
    """A :class:`~dshal.Topology` that also keeps amdsmi's hop counts."""

    hops: tuple[tuple[int, ...], ...] | None = None


def link_name(type_name: str, hops: int) -> str:
    """dshal's link name for an amdsmi link-type name (``XGMI``, ``PCIEXPRESS``,
    ``AMDSMI_LINK_TYPE_PCIE``...) and hop count."""
    upper = type_name.upper()
    if "XGMI" in upper:
        return "xgmi" if hops <= 1 else f"xgmi-{hops}hop"
    if "PCI" in upper:
        return "pcie"
    return upper.rsplit("_", 1)[-1].lower() or "unknown"


def link_matrix(
    type_names: Sequence[Sequence[str]], hops: Sequence[Sequence[int]], weights: Sequence[Sequence[float]], source: str = ""
) -> XgmiTopology:
    """An :class:`XgmiTopology` from per-pair amdsmi answers (the diagonal is ignored)."""
    n = len(type_names)
    links = [["self" if i == j else link_name(type_names[i][j], int(hops[i][j])) for j in range(n)] for i in range(n)]
    base = topology_from_matrix(links, [[0.0 if i == j else float(weights[i][j]) for j in range(n)] for i in range(n)], source)
    return XgmiTopology(
        links=base.links, weights=base.weights, source=source,
        hops=tuple(tuple(0 if i == j else int(hops[i][j]) for j in range(n)) for i in range(n)),
    )


def _type_name(amdsmi, value) -> str:
    """amdsmi returns the link type as an enum member or an int, depending on its version. An
    int is ``amdsmi_topo_get_link_type``'s I/O-link code (``amdsmi_io_link_type_t``: PCIEXPRESS
    1, XGMI 2), so that enum is read first: ``AmdSmiLinkType`` numbers its members otherwise in
    ROCm 6 (INTERNAL 0, XGMI 1, PCIE 2), which would name an XGMI pair PCIe and a PCIe pair
    XGMI (ROCm 7 reordered it to PCIE 1, XGMI 2: amdsmi's changelog)."""
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    for enum_name in ("AmdSmiIoLinkType", "AmdSmiLinkType"):
        enum = getattr(amdsmi, enum_name, None)
        if enum is None:
            continue
        try:
            return enum(int(value)).name
        except (ValueError, TypeError):
            continue
    return f"TYPE_{value}"


def amdsmi_topology() -> XgmiTopology | None:
    """The topology of the GPUs torch sees (HIP order), or None when amdsmi is unavailable."""
    try:
        import amdsmi  # lazy: the vendor runtime (optional), never at discovery
    except ImportError:
        log.info("dshal amd: amdsmi not installed; topology unknown (install the amdsmi matching your ROCm)")
        return None
    try:
        amdsmi.amdsmi_init()
    except Exception as err:  # noqa: BLE001 - AmdSmiException and driver errors alike
        log.warning("dshal amd: amdsmi_init failed (%s); topology unknown", err)
        return None
    try:
        count = torch.cuda.device_count()
        handles = []
        all_handles = amdsmi.amdsmi_get_processor_handles()
        for i in range(count):  # HIP and amdsmi may number devices differently: match by PCI BDF
            bdf = pci_bus_id(i, domain_digits=4)
            handles.append(amdsmi.amdsmi_get_processor_handle_from_bdf(bdf) if bdf else all_handles[i])
        types = [["self"] * count for _ in range(count)]
        hops = [[0] * count for _ in range(count)]
        weights = [[0.0] * count for _ in range(count)]
        for i in range(count):
            for j in range(count):
                if i == j:
                    continue
                info = amdsmi.amdsmi_topo_get_link_type(handles[i], handles[j])
                types[i][j] = _type_name(amdsmi, info["type"])
                hops[i][j] = int(info["hops"])
                weights[i][j] = float(amdsmi.amdsmi_topo_get_link_weight(handles[i], handles[j]))
        return link_matrix(types, hops, weights, source="amdsmi")
    except Exception as err:  # noqa: BLE001
        log.warning("dshal amd: amdsmi topology query failed (%s); topology unknown", err)
        return None
    finally:
        try:
            amdsmi.amdsmi_shut_down()
        except Exception:  # noqa: BLE001
            pass
