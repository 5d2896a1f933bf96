"""The CPU default where Linux's process APIs are missing (macOS, Windows).

CI runs on Linux only, so each case runs a child Python with the API removed before dshal
is imported: a simulation of the missing call, not of the platform. What it shows is that
dshal's own code takes its fallback there instead of raising AttributeError/ImportError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dshal.backend import host_peak_rss, host_physical_memory
from dshal.lifetime import child_env, child_python


def run_without(removed: str, body: str, tmp_path: Path) -> str:
    """Run ``body`` in a child whose ``os`` / ``signal`` lack the names in ``removed`` (and
    where ``import resource`` fails when ``removed`` names it); returns its stdout."""
    prelude = textwrap.dedent(f"""
        import os, signal, sys
        for qualified in {removed.split()!r}:
            module, _, name = qualified.partition(".")
            if not name:
                sys.modules[module] = None  # import raises ImportError, as where it does not exist
            else:
                delattr({{"os": os, "signal": signal}}[module], name)
    """)
    done = subprocess.run(
        child_python("-c", prelude + textwrap.dedent(body)), env=child_env(), cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, f"child failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_peak_rss_is_the_kernels_high_water_mark_in_bytes() -> None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        pytest.skip("no /proc/self/status to compare with")
    hwm_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    peak = host_peak_rss()
    # ru_maxrss may carry a bigger parent's peak across fork + exec: bound it from below, and
    # from above loosely enough for that, tightly enough to catch bytes read as kB (x1024)
    assert peak is not None and hwm_kib * 1024 * 0.95 <= peak < hwm_kib * 1024 * 100, (peak, hwm_kib)


def test_physical_memory_is_the_machines() -> None:
    try:
        total_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:"))
    except OSError:
        pytest.skip("no /proc/meminfo to compare with")
    physical = host_physical_memory()
    assert physical is not None and abs(physical - total_kib * 1024) <= 0.02 * total_kib * 1024


def test_cpu_memory_stats_and_profile_without_the_resource_module(tmp_path: Path) -> None:
    """Windows has no ``resource``: memory_stats() left peak_rss out (it raised ImportError,
    which took `dshal run` down) and the profile's peak says it is unknown."""
    out = run_without("resource", """
        import dshal
        from dshal.perf.profile import peak_memory
        backend = dshal.use(backend="cpu").backend
        stats = backend.memory_stats()
        print("peak_rss" in stats, peak_memory(backend)["bytes"])
    """, tmp_path)
    assert out.split() == ["False", "None"]


def test_reports_are_written_without_fchmod(tmp_path: Path) -> None:
    """Windows gained os.fchmod in Python 3.13 only: every report write raised after the work."""
    out = run_without("os.fchmod", f"""
        from dshal.outputs import atomic_write
        old = os.umask(0o022); os.umask(old)
        path = atomic_write({str(tmp_path / "report.json")!r}, "{{}}")
        print(oct(path.stat().st_mode & 0o777), oct(0o666 & ~old), sorted(p.name for p in path.parent.iterdir()))
    """, tmp_path)
    mode, wanted, names = out.split(" ", 2)
    assert mode == wanted
    assert "report.json" in names and ".tmp" not in names


def test_termination_cleanup_without_sighup(tmp_path: Path) -> None:
    """Windows has no SIGHUP: `dshal run --tp 2`, `dshal kernels` and the conformance collectives
    raised AttributeError before starting anything. SIGTERM is still turned into the cleanup."""
    out = run_without("signal.SIGHUP", """
        from dshal.lifetime import Terminated, cleanup_on_termination
        try:
            with cleanup_on_termination():
                os.kill(os.getpid(), signal.SIGTERM)
                import time; time.sleep(10)
                print("not stopped")
        except Terminated as stop:
            print("cleanup ran", stop.code)
    """, tmp_path)
    assert out.strip() == f"cleanup ran {128 + 15}"


def test_ranks_are_killed_without_process_groups(tmp_path: Path) -> None:
    """Windows has no os.killpg: a rank still running at exit is killed through its handle."""
    out = run_without("os.killpg", """
        import time
        from dshal.parallel.launch import LocalJob
        job = LocalJob([sys.executable, "-c", "import time; time.sleep(60)"], 1)
        with job:
            time.sleep(0.2)
        print([p.returncode for p in job.procs])
    """, tmp_path)
    assert out.strip() == f"[{-9}]"  # killed, reaped


def test_dequantized_copy_budget_without_sysconf(tmp_path: Path) -> None:
    """Windows has no os.sysconf: every FP8 GEMM on the cpu backend raised reading the memory size."""
    out = run_without("os.sysconf", """
        os.environ.pop("DSHAL_CPU_DEQUANT_CACHE_GIB", None)
        from dshal.backends.cpu_native import UNKNOWN_MEMORY_DEQUANT_GIB, DequantizedWeights
        print(DequantizedWeights().limit() == int(UNKNOWN_MEMORY_DEQUANT_GIB * 2**30))
    """, tmp_path)
    assert out.strip() == "True"


def test_child_python_is_this_interpreter_off_windows() -> None:
    if sys.platform == "win32":
        pytest.skip("the Windows case starts the base interpreter (a venv's python.exe is a launcher)")
    assert child_python("-c", "pass")[:2] == [sys.executable, "-P"]
    assert os.pathsep.join(p for p in sys.path if p) == child_env()["PYTHONPATH"]


def test_the_triton_of_rocm_torch_wheels_is_found_under_its_own_name(tmp_path: Path) -> None:
    """ROCm's torch wheels install Triton through the distribution pytorch-triton-rocm: dshal
    looked for one named triton, left Triton out of `dshal info`'s stack line and skipped its
    minimum-version check. The child sees a site with only that distribution's metadata."""
    site = tmp_path / "site"
    info = site / "pytorch_triton_rocm-3.5.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-triton-rocm\nVersion: 3.5.1\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path[:] = [{str(site)!r}] + [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        from dshal.versions import installed, stack_report
        print(installed("triton"), stack_report()["triton"]["in_range"])
    """)
    import dshal  # lazy: only for where this checkout is

    env = {**child_env(), "PYTHONPATH": str(Path(dshal.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3.5.1", "False"]  # found, and below the supported 3.6
