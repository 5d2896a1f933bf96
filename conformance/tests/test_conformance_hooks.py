"""The ``hooks`` family: memory_stats(), topology() and timer(), judged as the model core, placement and bench rely on them."""

from __future__ import annotations

import pytest

from dshal_conformance.cases.hooks import PROBE_BYTES, judge_consistent, judge_tracking

MIB = 1 << 20
#: What a GPU plugin reports (dshal.backends.triton_gpu's keys), made up but consistent.
GPU = {"allocated": 100 * MIB, "peak_allocated": 300 * MIB, "reserved": 200 * MIB, "total": 80_000 * MIB, "free": 70_000 * MIB}


def test_consistent_accepts_what_the_shipped_backends_report() -> None:
    assert judge_consistent(GPU).status == "pass"
    host = judge_consistent({"free": 20_000 * MIB, "peak_rss": 500 * MIB})  # cpu, emulated GPU plugins
    assert host.status == "pass" and "free" in host.reason
    unsupported = judge_consistent({})  # the hook's default
    assert unsupported.status == "unsupported" and "not checked against free memory" in unsupported.reason
    no_free = judge_consistent({"allocated": 1})
    assert no_free.status == "pass" and "no 'free' key" in no_free.reason


def test_consistent_fails_wrong_units_types_and_relations() -> None:
    cases = [
        ([1, 2], "returned list, expected a dict of byte counts"),
        ({**GPU, "free": 1.5e9}, "memory_stats()['free'] is 1500000000.0, expected a non-negative int"),
        ({**GPU, "free": -1}, "memory_stats()['free'] is -1"),
        ({**GPU, "reserved": True}, "memory_stats()['reserved'] is True"),
        ({**GPU, "free": GPU["total"] + 1}, "free (83886080001) > total (83886080000)"),
        ({**GPU, "allocated": GPU["peak_allocated"] + 1, "reserved": GPU["total"]}, "allocated (314572801) > peak_allocated"),
        ({**GPU, "peak_allocated": GPU["allocated"] * 10, "reserved": GPU["allocated"] - 1}, "allocated (104857600) > reserved"),
    ]
    for stats, said in cases:
        got = judge_consistent(stats)
        assert got.status == "fail" and said in got.reason, (stats, got.reason)


def test_tracking_passes_a_device_allocator_and_fails_what_would_mislead_the_kv_check() -> None:
    n = PROBE_BYTES
    held = {"allocated": GPU["allocated"] + n, "free": GPU["free"] - n}
    good = judge_tracking(GPU, held, GPU, n)
    assert good.status == "pass" and good.value == 1.0
    # another process freed memory meanwhile: 0.6x still passes
    assert judge_tracking(GPU, {**held, "free": GPU["free"] - int(0.6 * n)}, GPU, n).status == "pass"
    in_mib = judge_tracking(GPU, {**held, "free": GPU["free"] - n // MIB}, GPU, n)  # 'free' reported in MiB
    assert in_mib.status == "fail" and "is 'free' in bytes, and of this device?" in in_mib.reason
    host_figure = judge_tracking(GPU, {**held, "free": GPU["free"]}, GPU, n)  # 'free' of the host, not the device
    assert host_figure.status == "fail" and host_figure.metric == "free_drop_ratio" and host_figure.value == 0.0
    not_counted = judge_tracking(GPU, {**held, "allocated": GPU["allocated"]}, GPU, n)
    assert not_counted.status == "fail" and "raised 'allocated' by 0" in not_counted.reason
    leaked = judge_tracking(GPU, held, {**GPU, "allocated": GPU["allocated"] + n}, n)
    assert leaked.status == "fail" and "after releasing" in leaked.reason


def test_cpu_report_has_the_hooks_case(cpu_report: dict) -> None:
    by = {c["id"]: c for c in cpu_report["cases"] if c["kind"] == "hooks"}
    assert by["hooks/memory_stats/consistent"]["status"] == "pass"
    tracking = by["hooks/memory_stats/tracks-allocation"]
    assert tracking["status"] == "unsupported" and "the host's memory" in tracking["reason"]


def test_topology_is_judged_as_placement_reads_it() -> None:
    from dshal.backend import Topology
    from dshal_conformance.cases.hooks import judge_topology

    two = (("self", "nvlink"), ("nvlink", "self"))
    good = judge_topology(Topology(links=two, weights=((0, 1), (1, 0)), source="nvml"), 2)
    assert good.status == "pass" and "2 devices, links ['nvlink'] (nvml)" in good.reason
    assert judge_topology(Topology(links=two), None).status == "pass"  # device count unknown: not compared
    none = judge_topology(None, 2)
    assert none.status == "unsupported" and "contiguous ranks" in none.reason
    for topology, visible, said in [
        (Topology(links=(("self", "nvlink"), ("pcie", "self"))), 2, "not symmetric: [1][0] is 'pcie' but [0][1] is 'nvlink'"),
        (Topology(links=(("nvlink", "nvlink"), ("nvlink", "self"))), 2, "'links'[0][0] is 'nvlink', expected 'self'"),
        (Topology(links=two, weights=((0, 1),)), 2, "'weights' must be 2x2 like 'links'"),
        (Topology(links=two), 8, "covers 2 devices, expected the 8 this process sees"),
        ({"links": two}, 2, "returned dict, expected a dshal.Topology or None"),
    ]:
        got = judge_topology(topology, visible)
        assert got.status == "fail" and said in got.reason, (topology, got.reason)


def test_cpu_report_topology_case(cpu_report: dict) -> None:
    case = next(c for c in cpu_report["cases"] if c["id"] == "hooks/topology/consistent")
    assert case["status"] == "unsupported" and "reports none" in case["reason"]


def test_timer_is_judged_in_seconds() -> None:
    from dshal_conformance.cases.hooks import judge_timer

    assert judge_timer(0.051, 0.05).status == "pass"
    assert judge_timer(0.4, 0.05).status == "pass"  # a loaded host oversleeps
    in_ms = judge_timer(51.0, 0.05)
    assert in_ms.status == "fail" and "is it in seconds?" in in_ms.reason and in_ms.value == pytest.approx(1020)
    assert judge_timer(5.1e-5, 0.05).status == "fail"  # microseconds read as ms
    assert judge_timer(float("nan"), 0.05).status == "fail" and judge_timer(None, 0.05).status == "fail"


def test_cpu_report_timer_case(cpu_report: dict) -> None:
    case = next(c for c in cpu_report["cases"] if c["id"] == "hooks/timer/consistent")
    assert case["status"] == "pass" and 0.6 <= case["value"] <= 20
