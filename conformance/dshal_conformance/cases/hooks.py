"""The ``hooks`` family: the optional Backend hooks the model core and placement rely on.

Case ``hooks/memory_stats`` judges ``Backend.memory_stats()``, whose ``free`` key is what the
model core checks a KV cache against before allocating it (``model.new_cache``,
``dshal run``): a plugin that reports it in the wrong unit or from the wrong device lets a
cache through that cannot fit, or refuses one that would. Two judgements:

- ``/consistent``: a dict of non-negative integer byte counts, whose documented keys hold
  together: ``allocated <= peak_allocated``, ``allocated <= reserved <= total``,
  ``free <= total``. An empty dict is ``unsupported`` (the hook's default: no KV check).
- ``/tracks-allocation``: where the backend reports ``allocated`` (memory of its own, as a
  GPU's allocator accounts it), a :data:`PROBE_BYTES` tensor allocated on its device must
  raise ``allocated`` by at least its size and lower ``free`` by about its size (between
  half and twice: another process may share the device), and releasing it must give
  ``allocated`` back. Without ``allocated`` (the host's memory, which every process on the
  machine moves) it is ``unsupported``, with that reason.

Case ``hooks/topology`` (``/consistent``) judges ``Backend.topology()``, from which
``dshal.parallel`` places TP groups on the best-connected devices: a square, symmetric link
matrix with ``"self"`` on the diagonal (weights, if any, of the same shape), over as many
devices as this process sees. None is ``unsupported`` (TP groups are then contiguous ranks).

Case ``hooks/timer`` (``/consistent``) judges ``Backend.timer()``, which ``dshal bench`` and
``dshal profile`` time with: around a :data:`SLEEP_S` host wait (an idle device's clock
advances with it), ``stop()`` must return about that many seconds (0.6x to 20x: a loaded host
oversleeps; a timer in milliseconds is 1000x off).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from dshal.backend import Topology
from dshal.errors import DshalError
from dshal.parallel.placement import topology_from_matrix
from dshal.runtime import current
from dshal_conformance.cases.base import Case, Context, Outcome
from dshal_conformance.judge import Verdict

SUFFIXES = ("/consistent", "/tracks-allocation")
#: The probe tensor of ``/tracks-allocation``.
PROBE_BYTES = 64 << 20
#: Rounding the allocator may add (block sizes) when ``allocated`` is compared before and after.
SLACK_BYTES = 2 << 20
#: ``(smaller, larger)`` pairs of documented keys that must be ordered so, where both are reported.
ORDER = (("allocated", "peak_allocated"), ("allocated", "reserved"), ("reserved", "total"), ("free", "total"))


def judge_consistent(stats: Any) -> Verdict:
    """``/consistent`` on what ``memory_stats()`` returned."""
    if not isinstance(stats, Mapping):
        return Verdict("fail", None, None, None, f"memory_stats() returned {type(stats).__name__}, expected a dict of byte counts")
    if not stats:
        return Verdict("unsupported", None, None, None,
                       "memory_stats() reports nothing (the hook's default): KV caches are not checked against free memory")
    for key, value in stats.items():
        if not isinstance(key, str) or not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return Verdict("fail", None, None, None,
                           f"memory_stats()[{key!r}] is {value!r}, expected a non-negative int number of bytes")
    for small, large in ORDER:
        if small in stats and large in stats and stats[small] > stats[large]:
            return Verdict("fail", small, float(stats[small]), float(stats[large]),
                           f"memory_stats(): {small} ({stats[small]}) > {large} ({stats[large]}), expected {small} <= {large}")
    note = "" if "free" in stats else "; no 'free' key: KV caches are not checked against free memory"
    return Verdict("pass", None, None, None, f"keys {sorted(stats)}: non-negative byte counts, relations hold{note}")


def judge_tracking(before: Mapping[str, int], held: Mapping[str, int], after: Mapping[str, int], nbytes: int) -> Verdict:
    """``/tracks-allocation`` from the stats read before a ``nbytes`` allocation, while it is
    held, and after it is released."""
    rise = held["allocated"] - before["allocated"]
    if rise < nbytes:
        return Verdict("fail", "allocated_rise", float(rise), float(nbytes),
                       f"allocating {nbytes} bytes raised 'allocated' by {rise}, expected at least {nbytes}")
    if after["allocated"] > before["allocated"] + SLACK_BYTES:
        return Verdict("fail", "allocated_after_release", float(after["allocated"]), float(before["allocated"]),
                       f"after releasing the {nbytes} bytes 'allocated' is {after['allocated']}, expected about "
                       f"{before['allocated']} (what it was before)")
    if "free" not in before or "free" not in held:
        return Verdict("pass", "allocated_rise", float(rise), float(nbytes),
                       f"'allocated' rose by {rise} for {nbytes} bytes and fell back; no 'free' key to judge")
    drop = before["free"] - held["free"]
    ratio = drop / nbytes
    if not 0.5 <= ratio <= 2.0:
        return Verdict("fail", "free_drop_ratio", ratio, 1.0,
                       f"allocating {nbytes} bytes lowered 'free' by {drop} ({ratio:.2f}x), expected about {nbytes} "
                       "(0.5x to 2x): is 'free' in bytes, and of this device?")
    return Verdict("pass", "free_drop_ratio", ratio, 1.0,
                   f"'free' fell by {drop} ({ratio:.2f}x) for {nbytes} bytes; 'allocated' rose by {rise} and fell back")


def _tracks_allocation(runtime: Any, device: torch.device, before: Mapping[str, Any]) -> Verdict:
    if "allocated" not in before:
        return Verdict("unsupported", None, None, None,
                       "no 'allocated' key: the backend reports the host's memory, which other processes move; not judged")
    if "free" in before and before["free"] < 4 * PROBE_BYTES:
        return Verdict("unsupported", None, None, None,
                       f"{before['free']} bytes free, fewer than 4 x the {PROBE_BYTES}-byte probe: not judged")
    backend = runtime.backend
    backend.synchronize()
    before = backend.memory_stats()
    probe = torch.ones(PROBE_BYTES, dtype=torch.uint8, device=device)  # touched: really allocated
    backend.synchronize()
    held = backend.memory_stats()
    del probe
    backend.synchronize()
    return judge_tracking(before, held, backend.memory_stats(), PROBE_BYTES)


def run(ctx: Context) -> list[Outcome]:
    runtime = current()
    try:
        stats = runtime.backend.memory_stats()
    except Exception as err:  # noqa: BLE001 - the hook crashing is what the case reports
        reason = f"memory_stats() raised {type(err).__name__}: {err}"
        return [Outcome(s, Verdict("error", None, None, None, reason)) for s in SUFFIXES]
    consistent = judge_consistent(stats)
    if consistent.status != "pass":
        skipped = Verdict("unsupported", None, None, None, f"not judged: /consistent is {consistent.status}")
        return [Outcome("/consistent", consistent), Outcome("/tracks-allocation", skipped)]
    try:
        tracking = _tracks_allocation(runtime, ctx.device, stats)
    except Exception as err:  # noqa: BLE001
        tracking = Verdict("error", None, None, None, f"memory_stats() while probing raised {type(err).__name__}: {err}")
    return [Outcome("/consistent", consistent), Outcome("/tracks-allocation", tracking)]


def judge_topology(topology: Any, visible_devices: int | None) -> Verdict:
    """``hooks/topology/consistent`` on what ``topology()`` returned; ``visible_devices``: how
    many devices of the backend's type this process sees (None: unknown, not compared)."""
    if topology is None:
        return Verdict("unsupported", None, None, None,
                       "topology() reports none: TP groups are placed as contiguous ranks")
    if not isinstance(topology, Topology):
        return Verdict("fail", None, None, None, f"topology() returned {type(topology).__name__}, expected a dshal.Topology or None")
    try:
        topology_from_matrix(topology.links, topology.weights, topology.source)
    except (DshalError, TypeError, ValueError) as err:
        return Verdict("fail", None, None, None, f"topology() is not a valid link matrix: {err}")
    n = topology.num_devices
    if visible_devices is not None and n != visible_devices:
        return Verdict("fail", "devices", float(n), float(visible_devices),
                       f"topology() covers {n} devices, expected the {visible_devices} this process sees")
    kinds = sorted({link for row in topology.links for link in row if link != "self"})
    return Verdict("pass", "devices", float(n), float(n), f"{n} devices, links {kinds or ['none']} ({topology.source or 'no source'})")


def _visible_devices(device_type: str) -> int | None:
    """Devices of ``device_type`` this process sees, from torch's module of that name
    (``torch.cuda``, ``torch.npu`` once torch_npu is imported); None where there is none."""
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if callable(count) and device_type != "cpu" else None


def run_topology(ctx: Context) -> list[Outcome]:
    backend = current().backend
    try:
        topology = backend.topology()
    except Exception as err:  # noqa: BLE001 - the hook crashing is what the case reports
        return [Outcome("/consistent", Verdict("error", None, None, None, f"topology() raised {type(err).__name__}: {err}"))]
    return [Outcome("/consistent", judge_topology(topology, _visible_devices(backend.device_type)))]


#: The host wait ``hooks/timer`` times.
SLEEP_S = 0.05


def judge_timer(elapsed: Any, slept: float) -> Verdict:
    """``hooks/timer/consistent``: ``elapsed`` (what ``stop()`` returned) around a ``slept``-second wait."""
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not math.isfinite(elapsed):
        return Verdict("fail", None, None, None, f"timer().stop() returned {elapsed!r}, expected a finite number of seconds")
    ratio = elapsed / slept
    if not 0.6 <= ratio <= 20:
        return Verdict("fail", "elapsed_ratio", ratio, 1.0,
                       f"timer() measured {elapsed:.6g} s around a {slept} s wait ({ratio:.3g}x), expected about "
                       f"{slept} s (0.6x to 20x): is it in seconds?")
    return Verdict("pass", "elapsed_ratio", ratio, 1.0, f"timer() measured {elapsed:.4f} s around a {slept} s wait")


def run_timer(ctx: Context) -> list[Outcome]:
    backend = current().backend
    try:
        backend.synchronize()
        timer = backend.timer()
        timer.start()
        time.sleep(SLEEP_S)
        elapsed = timer.stop()
    except Exception as err:  # noqa: BLE001 - the hook crashing is what the case reports
        return [Outcome("/consistent", Verdict("error", None, None, None, f"timer() raised {type(err).__name__}: {err}"))]
    return [Outcome("/consistent", judge_timer(elapsed, SLEEP_S))]


def cases() -> list[Case]:
    return [
        Case("hooks/memory_stats", "memory_stats", "hooks", "uint8", {"probe_bytes": PROBE_BYTES},
             frozenset({"ci", "full"}), run, SUFFIXES),
        Case("hooks/topology", "topology", "hooks", "-", {}, frozenset({"ci", "full"}), run_topology, ("/consistent",)),
        Case("hooks/timer", "timer", "hooks", "-", {"sleep_s": SLEEP_S}, frozenset({"ci", "full"}), run_timer, ("/consistent",)),
    ]


__all__ = ["PROBE_BYTES", "SLEEP_S", "SUFFIXES", "cases", "judge_consistent", "judge_timer", "judge_topology", "judge_tracking"]
