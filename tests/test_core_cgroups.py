"""A container's limits from its cgroup files (``dshal.cgroups``) and what follows from them:
host memory facts held to the memory limit, the KV cache check naming it, and the CLI's torch
threads capped at the CPU quota. Real cgroups cannot be made in a test, so the readers are
pointed at fixture folders laid out as the kernel's (v2, v1, the v1+v2 hybrid)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dshal
from dshal.backend import (
    host_available_memory,
    host_cpus,
    host_cpus_text,
    host_memory_note,
    host_physical_memory,
    host_usable_cpus,
)
from dshal.cgroups import CGROUP_ROOT_ENV, cgroup_paths, cpu_quota, memory_limit
from dshal.cli import threads_within_cpu_quota

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def write(folder: Path, **files: str) -> Path:
    """``folder`` with each ``name=text`` as a file (``memory_max`` -> ``memory.max``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(f"{text}\n")
    return folder


def meminfo(tmp_path: Path, available_kib: int = 20_000_000) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available_kib} kB\n")
    return str(path)


def v2_pod(tmp_path: Path, pod_max: str = "max", pod_current: int = 0, ctr_max: str = "max",
           ctr_current: int = 0, ctr_cpu: str = "max 100000", pod_cpu: str = "max 100000") -> tuple[str, str]:
    """A v2 mount (the root cgroup holds no limit files, as the kernel's) with a pod and its
    container below it; returns (root, /proc/self/cgroup text)."""
    root = write(tmp_path / "v2", cgroup_controllers="cpu memory pids")
    write(root / "kubepods" / "pod1", memory_max=pod_max, memory_current=str(pod_current), cpu_max=pod_cpu)
    write(root / "kubepods" / "pod1" / "ctr", memory_max=ctr_max, memory_current=str(ctr_current), cpu_max=ctr_cpu,
          memory_stat="anon 1\ninactive_file 0\n")
    return str(root), "0::/kubepods/pod1/ctr\n"


def test_proc_self_cgroup_lines_give_each_controller_its_path():
    text = "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/init.scope\n0::/user.slice\n"
    paths = cgroup_paths(text)
    assert paths["memory"] == "/docker/abc" and paths["cpu"] == paths["cpu,cpuacct"] == "/docker/abc"
    assert paths[""] == "/user.slice" and cgroup_paths("") == {}


def test_v2_limits_are_read_from_this_process_cgroup_not_the_mount_root(tmp_path):
    """The reader looked at the mount root's memory.max only: v2 has none there, so a pod's
    limit was never seen."""
    root, proc = v2_pod(tmp_path, ctr_max=str(8 * GIB), ctr_current=3 * GIB, ctr_cpu="200000 100000")
    limit = memory_limit(root, proc)
    assert limit is not None and (limit.limit, limit.used, limit.headroom) == (8 * GIB, 3 * GIB, 5 * GIB)
    assert limit.file == os.path.join(root, "kubepods", "pod1", "ctr", "memory.max")
    assert limit.describe() == f"the container's memory limit (memory.max = 8.00 GiB, 3.00 GiB in use; {limit.file})"
    quota = cpu_quota(root, proc)
    assert quota is not None and (quota.cpus, quota.whole) == (2.0, 2) and quota.file.endswith("ctr/cpu.max")
    assert host_available_memory(meminfo(tmp_path), root, proc) == 5 * GIB  # below the host's 19 GiB available


def test_v2_max_is_no_limit(tmp_path):
    root, proc = v2_pod(tmp_path)
    assert memory_limit(root, proc) is None and cpu_quota(root, proc) is None
    assert host_available_memory(meminfo(tmp_path), root, proc) == 20_000_000 * 1024
    assert host_memory_note(meminfo(tmp_path), root, proc) == ""


def test_the_tightest_limit_along_the_path_wins(tmp_path):
    """A pod's limit binds its container too, and siblings' use counts against it: the parent's
    smaller headroom (4 GiB limit, 3.5 in use) wins over the container's own 8 GiB."""
    root, proc = v2_pod(tmp_path, pod_max=str(4 * GIB), pod_current=int(3.5 * GIB), ctr_max=str(8 * GIB),
                        ctr_current=GIB, pod_cpu="50000 100000", ctr_cpu="400000 100000")
    limit = memory_limit(root, proc)
    assert limit is not None and limit.headroom == GIB // 2 and limit.file.endswith("pod1/memory.max")
    quota = cpu_quota(root, proc)
    assert quota is not None and quota.cpus == 0.5 and quota.whole == 1 and quota.file.endswith("pod1/cpu.max")


def test_memory_high_and_reclaimable_page_cache(tmp_path):
    """memory.high (the kernel throttles and reclaims past it) binds when below memory.max; the
    page cache the kernel drops first (inactive_file) does not count as used."""
    root, proc = v2_pod(tmp_path, ctr_max=str(8 * GIB), ctr_current=3 * GIB)
    ctr = Path(root) / "kubepods" / "pod1" / "ctr"
    write(ctr, memory_high=str(6 * GIB), memory_stat=f"anon {GIB}\ninactive_file {2 * GIB}\n")
    limit = memory_limit(root, proc)
    assert limit is not None and (limit.limit, limit.used) == (6 * GIB, GIB) and limit.file.endswith("memory.high")


def test_v1_limits_per_controller_mount(tmp_path):
    """cgroup v1 (and the hybrid layout): each controller has its own mount, cpu's named by its
    co-mounted list; -1 and the huge page-aligned number are v1's "no limit"."""
    root = tmp_path / "v1"
    write(root / "unified", cgroup_controllers="")  # the hybrid layout's empty v2 mount
    write(root / "memory", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(50 * GIB))
    ctr = write(root / "memory" / "docker" / "abc", memory_limit_in_bytes=str(4 * GIB),
                memory_usage_in_bytes=str(GIB), memory_stat=f"cache 0\ntotal_inactive_file {GIB // 2}\n")
    write(root / "cpu,cpuacct", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write(root / "cpu,cpuacct" / "docker" / "abc", cpu_cfs_quota_us="150000", cpu_cfs_period_us="100000")
    proc = "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    limit = memory_limit(str(root), proc)
    assert limit is not None and limit.headroom == int(3.5 * GIB)
    assert limit.file == str(ctr / "memory.limit_in_bytes")
    quota = cpu_quota(str(root), proc)
    assert quota is not None and (quota.cpus, quota.whole) == (1.5, 2) and quota.file.endswith("abc/cpu.cfs_quota_us")
    # The same files at the mounts' roots, as a container sees its own cgroup (not found under them).
    assert memory_limit(str(root), "5:memory:/\n3:cpu,cpuacct:/\n") is None
    assert cpu_quota(str(root), "3:cpu,cpuacct:/\n") is None


def test_a_container_cgroup_mounted_as_the_root_is_read_there(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/<id>, but the mount
    shows that cgroup itself; the path escaping the mount (a namespace's "/../..") is the same."""
    root = tmp_path / "v1"
    write(root / "memory", memory_limit_in_bytes=str(2 * GIB), memory_usage_in_bytes=str(GIB))
    write(root / "cpu", cpu_cfs_quota_us="200000", cpu_cfs_period_us="100000")
    for proc in ("4:memory:/docker/0123\n2:cpu:/docker/0123\n", "4:memory:/../../x\n2:cpu:/../..\n", ""):
        limit, quota = memory_limit(str(root), proc), cpu_quota(str(root), proc)
        assert limit is not None and limit.headroom == GIB and quota is not None and quota.cpus == 2.0, proc


def test_no_cgroup_files_leave_the_host_values(tmp_path):
    missing = str(tmp_path / "no-cgroup")
    assert memory_limit(missing, "0::/\n") is None and cpu_quota(missing, "0::/\n") is None
    empty = write(tmp_path / "empty", cgroup_controllers="")  # a mount without the controllers' files
    assert memory_limit(str(empty), "0::/\n") is None and cpu_quota(str(empty), "0::/\n") is None
    assert host_available_memory(meminfo(tmp_path), missing, "") == 20_000_000 * 1024
    assert host_physical_memory(missing, "") == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert host_usable_cpus(missing, "") == host_cpus() and cpu_quota(missing, "") is None
    assert host_available_memory(str(tmp_path / "none"), missing, "") is None  # neither: not Linux


def test_host_memory_facts_are_held_to_the_limit(tmp_path):
    """Physical memory is the limit where lower (the cpu backend's dequantized-weight cache takes a
    quarter of it: of a 512 GB host in an 8 GiB container, it overflowed the container), and the
    note for messages names the limit only where it is what binds."""
    root, proc = v2_pod(tmp_path, ctr_max=str(GIB), ctr_current=GIB // 4)
    assert host_physical_memory(root, proc) == GIB
    note = host_memory_note(meminfo(tmp_path), root, proc)
    assert note.startswith("the container's memory limit (memory.max = 1.00 GiB, 0.25 GiB in use;")
    assert host_memory_note(meminfo(tmp_path, available_kib=100), root, proc) == ""  # the host has less: not the limit


def test_physical_memory_is_the_smallest_limit_not_the_one_with_least_headroom(tmp_path):
    """A nearly full parent (a busy kubepods slice: 64 GiB, 60 in use) has less headroom than the
    pod (8 GiB, 1 in use): free memory is the parent's 4 GiB, but the most the process may ever
    hold is the pod's 8 GiB (physical memory was the parent's 64 GiB: the dequantized-weight
    cache's quarter of it could overflow the pod)."""
    root, proc = v2_pod(tmp_path, pod_max=str(64 * GIB), pod_current=60 * GIB, ctr_max=str(8 * GIB), ctr_current=GIB)
    assert memory_limit(root, proc).limit == 64 * GIB  # least headroom: the parent's
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert host_physical_memory(root, proc) == min(physical, 8 * GIB)


def test_cpus_text_says_the_quota(tmp_path):
    cpus = host_cpus()
    if cpus < 2:
        pytest.skip("one CPU here: no quota below it to say")
    root, proc = v2_pod(tmp_path, ctr_cpu="100000 100000")
    assert host_cpus_text(root, proc) == f"1 CPU by the container's quota (of {cpus})"
    assert host_usable_cpus(root, proc) == 1
    root, proc = v2_pod(tmp_path / "half", ctr_cpu="50000 100000")
    assert host_cpus_text(root, proc) == f"0.5 CPUs by the container's quota (of {cpus})"
    root, proc = v2_pod(tmp_path / "wide", ctr_cpu=f"{(cpus + 4) * 100000} 100000")
    assert host_cpus_text(root, proc).endswith("cores")  # a quota above the CPUs it may run on changes nothing


def test_a_cgroup_root_override_that_is_no_folder_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(tmp_path / "nope"))
    with pytest.raises(dshal.ConfigError, match=rf"environment variable DSHAL_CGROUP_ROOT is '{tmp_path / 'nope'}', "
                       r"expected a folder of cgroup files"):
        memory_limit()
    with pytest.raises(dshal.ConfigError, match="DSHAL_CGROUP_ROOT"):
        dshal.use()  # said when the runtime starts, as the other variables


@pytest.fixture
def one_cpu_quota(tmp_path, monkeypatch):
    """DSHAL_CGROUP_ROOT at a mount whose cgroup allows 1 CPU; torch at 2+ threads; no thread variable."""
    if host_cpus() < 2:
        pytest.skip("one CPU here: torch starts no more threads than a 1-CPU quota")
    root = write(tmp_path / "cg", cgroup_controllers="cpu memory", cpu_max="100000 100000")
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(host_cpus())  # torch's own default (the conftest fixture restores the count)
    return root


def test_cli_caps_torch_threads_at_the_quota_and_restores_them(one_cpu_quota, monkeypatch):
    before = torch.get_num_threads()
    with threads_within_cpu_quota("run") as cap:
        assert cap == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before  # in-process callers get their count back
    with threads_within_cpu_quota("info") as cap:  # a command that runs no model: untouched
        assert cap is None and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's choice wins
    with threads_within_cpu_quota("bench") as cap:
        assert cap is None and torch.get_num_threads() == before


def test_a_pytest_xdist_worker_runs_torch_on_its_share_of_the_cpus():
    """The root conftest.py: under ``-n N`` each worker's torch runs host_usable_cpus() // N
    threads (at least 1). At torch's default, N workers started N threads per CPU, and the
    model tests' small ops waited on descheduled threads (3-4x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        pytest.skip("not one of 2+ pytest-xdist workers, or OMP_NUM_THREADS chose: torch keeps its own count")
    assert torch.get_num_threads() == max(1, host_usable_cpus() // workers)


def _bench(tmp_path: Path, name: str, env: dict[str, str], *extra: str) -> dict:
    shapes = tmp_path / "s.yaml"
    shapes.write_text("cases:\n  - {op: rms_norm, shape: [4, 128]}\n")
    out = tmp_path / f"{name}.html"
    done = subprocess.run(
        [sys.executable, "-m", "dshal", "bench", "--backend", "cpu", "--shapes", str(shapes), "--output", str(out),
         "--warmup", "1", "--runs", "3", "--min-runs", "3", "--time-per-case", "0", "--no-progress", "--no-reference",
         "--no-torch", *extra],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.with_suffix(".json").read_text())


def test_dshal_bench_runs_within_the_quota_unless_told_otherwise(one_cpu_quota, tmp_path):
    """End to end, a real `dshal bench` under DSHAL_CGROUP_ROOT: torch's default (one thread per
    CPU it may run on) is capped at the 1-CPU quota and the report says the quota; --threads and
    OMP_NUM_THREADS still choose."""
    cpus = host_cpus()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env[CGROUP_ROOT_ENV] = str(one_cpu_quota)
    capped = _bench(tmp_path, "capped", env)
    said = f"1 CPU by the container's quota (of {cpus})"
    assert capped["torch_threads"] == 1 and capped["platform"]["cpu_quota"] == 1.0 and capped["platform"]["cpus"] == said
    assert said.replace("'", "&#x27;") in (tmp_path / "capped.html").read_text()  # the report's machine line
    assert _bench(tmp_path, "flag", env, "--threads", "2")["torch_threads"] == 2
    assert _bench(tmp_path, "omp", {**env, "OMP_NUM_THREADS": "2"})["torch_threads"] == 2


def test_dshal_run_refuses_a_kv_cache_past_the_containers_memory_limit(tmp_path):
    """End to end, a real `dshal run` under DSHAL_CGROUP_ROOT at a cgroup allowing 8 MiB: its
    ~30 MiB KV cache fits the host's free memory, so the run went on (in a real container, to
    the kernel's SIGKILL); it is refused first, naming the limit."""
    root = write(tmp_path / "cg", cgroup_controllers="memory", memory_max=str(8 * 2**20), memory_current="0")
    env = {**os.environ, CGROUP_ROOT_ENV: str(root), "OMP_NUM_THREADS": "1", "DSHAL_BACKEND": "cpu"}
    done = subprocess.run([sys.executable, "-m", "dshal", "run", "--batch", "500", "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--batch 500 x (--prompt-len 32 + --new-tokens 32) tokens needs a KV cache of" in done.stderr
    assert (f"GiB free on cpu, held to the container's memory limit (memory.max = 0.01 GiB, 0.00 GiB in use; "
            f"{root / 'memory.max'}): lower --batch, --prompt-len or --new-tokens") in done.stderr, done.stderr
