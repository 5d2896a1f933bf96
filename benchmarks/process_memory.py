"""This process's resident memory (Linux ``/proc/self``), for the benchmarks that measure peaks."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (resident now), ``VmHWM`` (its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Reset the peak (``VmHWM``) to the current resident set (writing 5 to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
