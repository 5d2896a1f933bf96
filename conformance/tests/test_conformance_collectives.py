"""Collective cases on a machine with fewer devices than ranks: skipped with the reason."""

from __future__ import annotations

import pytest

from dshal_conformance import collectives
from dshal_conformance.judge import Verdict


def test_device_shortfall_rules():
    assert collectives.device_shortfall("cpu", 0, 4) is None  # host tensors: any number of ranks
    assert collectives.device_shortfall("cuda", 4, 4) is None
    reason = collectives.device_shortfall("cuda", 1, 2)
    assert reason is not None and "needs 2 cuda devices" in reason and "shows 1" in reason


def test_collectives_skip_when_the_machine_has_fewer_gpus_than_ranks():
    """The real nvidia backend (not emulated) on this GPU-less machine: torch sees 0 CUDA
    devices, so every 2-rank case is skipped with that reason and no rank process starts."""
    pytest.importorskip("dshal_nvidia")
    device_type, visible = collectives.visible_devices("nvidia", emulate=False)
    assert device_type == "cuda"
    if visible >= 2:
        pytest.skip(f"this machine shows {visible} CUDA devices: nothing to skip")
    selected = [c for c in collectives.cases() if c.world_size == 2]
    seen: list[tuple[str, Verdict]] = []
    collectives.run_group("nvidia", False, 2, selected, 5.0, lambda case, v: seen.append((case.id, v)))
    assert [cid for cid, _ in seen] == [c.id for c in selected]
    for _, verdict in seen:
        assert verdict.status == "skip" and f"shows {visible}" in verdict.reason


def _ranks_of(parent: int) -> list[int]:
    """Pids of the collective rank processes whose parent is ``parent``."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "dshal_conformance.collectives" in cmd and ppid == parent:
            found.append(int(pid))
    return found


def _running(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (not gone, not a zombie)."""

    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads /proc to find the rank processes")
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_collective_ranks_end_with_an_interrupted_or_killed_run(tmp_path, signal_name, sigint_deliverable):
    """Ctrl-C, SIGTERM or SIGKILL to ``dshal conformance`` left its rank processes running
    (holding their port and device) for 10-25 s more."""
    import os
    import signal
    import subprocess
    import time

    from dshal.lifetime import child_env, child_python

    proc = subprocess.Popen(
        child_python("-m", "dshal", "conformance", "--backend", "cpu", "--ops", "all_reduce", "--report-dir", str(tmp_path)),
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=sigint_deliverable,
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not ranks:
            assert proc.poll() is None and time.monotonic() < deadline, "no rank process started"
            time.sleep(0.2)
            ranks = _ranks_of(proc.pid)
        time.sleep(2.0)  # every rank started, its collectives under way
        ranks = _ranks_of(proc.pid)
        os.kill(proc.pid, getattr(signal, signal_name))
        proc.wait(timeout=60)
        deadline = time.monotonic() + 1.5  # the ranks watch their parent every 0.5 s
        while _running(ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(ranks) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _running(ranks):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_removes_the_collectives_temporary_folder(tmp_path, sigterm_once_made):
    """SIGTERM (`timeout`, `kill`) ends Python without its cleanup: each such run left a
    dshal-collectives-* folder in /tmp. It now exits 143 and removes it."""
    err = sigterm_once_made(["conformance", "--backend", "cpu", "--ops", "all_reduce", "--report-dir",
                             str(tmp_path / "reports")], "dshal-collectives-")
    assert "dshal conformance: terminated; no report written for 'cpu'" in err
    assert not (tmp_path / "reports" / "cpu.json").exists()


def test_a_group_run_closes_what_it_read_the_ranks_stderr_from():
    """The ranks' stderr was a pipe read once they ended and never closed: a ResourceWarning
    per rank and run (and a rank writing past the pipe's buffer would have stalled until the
    timeout); the reason of a missing result still quotes a rank's last stderr line."""
    import gc
    import warnings

    case = next(c for c in collectives.cases() if c.world_size == 2 and c.params.get("collective") == "broadcast")
    seen: list[Verdict] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        collectives.run_group("cpu", False, 2, [case], 120.0, lambda _case, verdict: seen.append(verdict),
                              devices=("cpu", 0))
        gc.collect()
    assert [v.status for v in seen] == ["pass"], seen
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
