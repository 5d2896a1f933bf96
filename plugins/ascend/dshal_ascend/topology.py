"""Node topology from ``npu-smi info -t topo``.

The command prints a device x device matrix of link types, followed by a legend::

               NPU0   NPU1   ...   CPU Affinity
    NPU0       X      HCCS   ...   144-167
    ...
    Legend:
      X    = Self
      HCCS = Connection traversing HCCS.
      ...

Only the matrix is parsed; extra columns (CPU affinity) and the legend are ignored.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence

from dshal.plugin import Topology

#: npu-smi link code -> (dshal link name, cost; lower is closer).
LINKS = {
    "X": ("self", 0.0),
    "HCCS": ("hccs", 1.0),
    "HCCS_SW": ("hccs", 1.0),  # A3 super-node switch fabric: still HCCS
    "PIX": ("pcie", 2.0),
    "PXB": ("pcie", 3.0),
    "PHB": ("pcie", 4.0),
    "SYS": ("sys", 5.0),
    "SIO": ("sio", 1.0),  # die-to-die link inside one A3 package
    "NA": ("unknown", 10.0),
}
_DEVICE = re.compile(r"^NPU(\d+)$")


def _is_header(line: str) -> bool:
    """The column header names devices and is indented (rows start with their device name)."""
    tokens = line.split()
    if not tokens or _DEVICE.match(tokens[0]) is None:
        return False
    return line[:1].isspace() or (len(tokens) > 1 and _DEVICE.match(tokens[1]) is not None)


class TopologyParseError(ValueError):
    """The text is not an ``npu-smi info -t topo`` matrix."""


def parse_npu_smi_topo(text: str, visible: Sequence[int] | None = None) -> Topology:
    """Parse the link matrix. ``visible`` (physical ids, e.g. from ``ASCEND_RT_VISIBLE_DEVICES``)
    keeps only those devices, in that order, so row ``i`` is logical device ``npu:i``."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    header_at = next((i for i, ln in enumerate(lines) if _is_header(ln)), None)
    if header_at is None:
        raise TopologyParseError("no header row naming NPU0, NPU1, ... found")
    columns = [int(m.group(1)) for tok in lines[header_at].split() if (m := _DEVICE.match(tok))]
    rows: dict[int, list[str]] = {}
    for ln in lines[header_at + 1:]:
        tokens = ln.split()
        if not tokens:
            continue
        m = _DEVICE.match(tokens[0])
        if m is None:
            if tokens[0].lower().startswith("legend"):
                break
            continue
        cells = tokens[1:1 + len(columns)]
        if len(cells) < len(columns):
            raise TopologyParseError(f"row NPU{m.group(1)} has {len(cells)} link cells, expected {len(columns)}")
        unknown = [c for c in cells if c not in LINKS]
        if unknown:
            raise TopologyParseError(f"row NPU{m.group(1)}: unknown link code(s) {unknown} (known: {sorted(LINKS)})")
        rows[int(m.group(1))] = cells
    if sorted(rows) != sorted(columns):
        raise TopologyParseError(f"rows {sorted(rows)} do not match the header's devices {columns}")
    order = list(columns) if visible is None else list(visible)
    missing = [d for d in order if d not in rows]
    if missing:
        raise TopologyParseError(f"visible device(s) {missing} not in the npu-smi matrix (devices {columns})")
    index = {d: columns.index(d) for d in order}
    links = tuple(tuple(LINKS[rows[a][index[b]]][0] for b in order) for a in order)
    weights = tuple(tuple(LINKS[rows[a][index[b]]][1] for b in order) for a in order)
    return Topology(links=links, weights=weights, source="npu-smi info -t topo")


def query_topology(visible: Sequence[int] | None = None, timeout_s: float = 30.0) -> Topology | None:
    """Run ``npu-smi info -t topo`` when the tool exists; None when it is absent or fails."""
    exe = shutil.which("npu-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "info", "-t", "topo"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        return parse_npu_smi_topo(done.stdout, visible)
    except TopologyParseError:
        return None
