"""A container's CPU and memory limits, read from its cgroup (v2, or v1 and the v1+v2 hybrid).

Inside a container ``/proc/meminfo``, ``os.cpu_count()`` and the affinity mask describe the
host; the limits the kernel enforces (``docker run --cpus 2 --memory 8g``, a Kubernetes pod's
``resources.limits``) live in the cgroup files: v2 ``cpu.max`` / ``memory.max`` /
``memory.high``, v1 ``cpu.cfs_quota_us`` / ``memory.limit_in_bytes``. Past the memory limit
the kernel kills the process (SIGKILL, no Python error); past the CPU quota it stalls every
thread until the next period.

Each reader takes the cgroup mount (``root``, default ``/sys/fs/cgroup``, or
``DSHAL_CGROUP_ROOT``) and the text of ``/proc/self/cgroup``, so tests point them at fixture
folders. The process's cgroup is looked for under the mount; where it is not there (a
container sees its own cgroup as the mount itself), the mount is taken as it. Limits are read
from that cgroup up to the mount, and the tightest one wins: a parent's limit binds its
children too. Only the standard library: ``dshal``'s CLI reads them before importing torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from dshal.errors import ConfigError

#: Where cgroup filesystems are mounted.
CGROUP_ROOT = "/sys/fs/cgroup"
#: The process's cgroup per hierarchy.
PROC_SELF_CGROUP = "/proc/self/cgroup"
#: Test / operations knob: read the cgroup files under this folder instead of CGROUP_ROOT.
CGROUP_ROOT_ENV = "DSHAL_CGROUP_ROOT"
#: v1 writes "no limit" as the largest page-aligned counter (0x7FFFFFFFFFFFF000 with 4 KiB
#: pages); anything from here on is that.
V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest memory limit of this process's cgroup and its parents."""

    limit: int  # bytes
    used: int  # bytes the cgroup holds, less the page cache the kernel drops first (inactive_file)
    file: str  # the file that set it (its name says which limit: memory.max, memory.high, ...)

    @property
    def headroom(self) -> int:
        """Bytes still allocatable before the limit."""
        return max(self.limit - self.used, 0)

    def describe(self) -> str:
        """``the container's memory limit (memory.max = 8.00 GiB, 3.00 GiB in use; /sys/fs/cgroup/memory.max)``."""
        return (f"the container's memory limit ({os.path.basename(self.file)} = {self.limit / 2**30:,.2f} GiB, "
                f"{self.used / 2**30:,.2f} GiB in use; {self.file})")


@dataclass(frozen=True)
class CpuQuota:
    """The tightest CPU quota of this process's cgroup and its parents."""

    cpus: float  # quota / period: 1.5 is 150 ms of CPU time per 100 ms
    file: str

    @property
    def whole(self) -> int:
        """The CPUs that quota can keep busy at once, rounded up; at least 1."""
        return max(1, math.ceil(self.cpus - 1e-9))


def cgroup_root(root: str | None = None) -> str:
    """``root``, else ``DSHAL_CGROUP_ROOT`` (a ConfigError when it is not a folder), else the real mount."""
    if root is not None:
        return root
    override = os.environ.get(CGROUP_ROOT_ENV, "").strip()
    if not override:
        return CGROUP_ROOT
    if not os.path.isdir(override):
        raise ConfigError(f"environment variable {CGROUP_ROOT_ENV} is {override!r}, expected a folder of cgroup files "
                          f"(as {CGROUP_ROOT})")
    return override


def _proc_text(proc_cgroup: str | None) -> str:
    if proc_cgroup is not None:
        return proc_cgroup
    try:
        with open(PROC_SELF_CGROUP) as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def cgroup_paths(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` text -> {controller: path}; the v2 hierarchy's path under ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
                paths.setdefault(controllers, path)  # "cpu,cpuacct": the name a v1 mount folder has
    return paths


def _chain(mount: str, path: str | None) -> list[str]:
    """Folders from this process's cgroup under ``mount`` up to ``mount``; only ``mount`` where
    the cgroup is not found under it (a container's own cgroup mounted as the root)."""
    mount = os.path.normpath(mount)
    if path:
        leaf = os.path.normpath(os.path.join(mount, path.lstrip("/")))
        if (leaf == mount or leaf.startswith(mount + os.sep)) and os.path.isdir(leaf):
            chain = []
            while leaf != mount:
                chain.append(leaf)
                leaf = os.path.dirname(leaf)
            return [*chain, mount]
    return [mount]


def _hierarchies(root: str, controller: str, paths: dict[str, str]) -> list[list[str]]:
    """The folder chains where ``controller``'s files may be: its v1 mount (``root/memory``,
    ``root/cpu,cpuacct``), the v2 root, and the hybrid layout's v2 mount (``root/unified``).
    Folders without the files yield nothing, so looking in all of them is safe."""
    chains = []
    v1_names = [name for name in paths if controller in name.split(",") and name] or [controller]
    for name in dict.fromkeys([*v1_names, controller]):
        mount = os.path.join(root, name)
        if os.path.isdir(mount):
            chains.append(_chain(mount, paths.get(controller)))
    for mount in (root, os.path.join(root, "unified")):
        if os.path.isdir(mount):
            chains.append(_chain(mount, paths.get("")))
    return chains


def _read(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _inactive_file(folder: str) -> int:
    """Page cache the kernel reclaims before hitting the limit (kubelet's working set leaves it out)."""
    stat = _read(folder, "memory.stat") or ""
    values = dict(line.split(None, 1) for line in stat.splitlines() if " " in line)
    return _int(values.get("total_inactive_file") or values.get("inactive_file")) or 0


def memory_limit(root: str | None = None, proc_cgroup: str | None = None) -> MemoryLimit | None:
    """The memory limit with the least headroom along this process's cgroup path (v2
    ``memory.max`` and ``memory.high``, v1 ``memory.limit_in_bytes``); None where no cgroup
    sets one. ``root``: the cgroup mount (default :func:`cgroup_root`); ``proc_cgroup``: the
    text of ``/proc/self/cgroup`` (default: read it). What is free now; for the most the
    process may ever hold, the smallest limit of :func:`memory_limits`."""
    return min(memory_limits(root, proc_cgroup), key=lambda m: m.headroom, default=None)


def memory_limits(root: str | None = None, proc_cgroup: str | None = None) -> list[MemoryLimit]:
    """Every memory limit along this process's cgroup path (arguments as for :func:`memory_limit`)."""
    root = cgroup_root(root)
    paths = cgroup_paths(_proc_text(proc_cgroup))
    found: list[MemoryLimit] = []
    for chain in _hierarchies(root, "memory", paths):
        for folder in chain:
            limits = [("memory.max", "memory.current"), ("memory.high", "memory.current"),
                      ("memory.limit_in_bytes", "memory.usage_in_bytes")]
            for limit_file, used_file in limits:
                limit = _int(_read(folder, limit_file))
                if limit is None or limit >= V1_UNLIMITED:  # v2's "max" reads as None
                    continue
                used = _int(_read(folder, used_file))
                if used is None:
                    continue
                used = max(used - _inactive_file(folder), 0)
                found.append(MemoryLimit(limit, used, os.path.join(folder, limit_file)))
    return found


def cpu_quota(root: str | None = None, proc_cgroup: str | None = None) -> CpuQuota | None:
    """The smallest CPU quota along this process's cgroup path (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) in CPUs; None where none is set.
    ``root`` and ``proc_cgroup`` as for :func:`memory_limit`."""
    root = cgroup_root(root)
    paths = cgroup_paths(_proc_text(proc_cgroup))
    found: list[CpuQuota] = []
    for chain in _hierarchies(root, "cpu", paths):
        for folder in chain:
            v2 = (_read(folder, "cpu.max") or "").split()
            if len(v2) == 2:
                quota, period = _int(v2[0]), _int(v2[1])  # "max 100000": no quota
                file = os.path.join(folder, "cpu.max")
            else:
                quota, period = _int(_read(folder, "cpu.cfs_quota_us")), _int(_read(folder, "cpu.cfs_period_us"))
                file = os.path.join(folder, "cpu.cfs_quota_us")
            if quota is not None and period and quota > 0:  # v1 writes -1 for none
                found.append(CpuQuota(quota / period, file))
    return min(found, key=lambda q: q.cpus, default=None)


__all__ = ["CGROUP_ROOT", "CGROUP_ROOT_ENV", "CpuQuota", "MemoryLimit", "cgroup_paths", "cgroup_root", "cpu_quota",
           "memory_limit", "memory_limits"]
