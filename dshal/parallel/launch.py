"""Start a job of N local processes the way ``torchrun`` does, without leaving any behind.

``dshal run --tp N`` (outside torchrun) and the distributed tests use it: every rank gets
RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, a free port is
picked on 127.0.0.1, and when one rank fails the others get a grace period to fail on their
own (they raise CommError) before they are killed. Every child is reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Self

from dshal.lifetime import child_env, child_python, cleanup_on_termination, free_port, signal_name


def rank_env(rank: int, world_size: int, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """torchrun's environment for ``rank`` of a single-node job."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
    }


class LocalJob:
    """``world_size`` processes running ``argv`` on this machine; a context manager that
    kills and reaps whatever is still running when it exits."""

    def __init__(
        self,
        argv: Sequence[str],
        world_size: int,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: str | os.PathLike | None = None,
        capture: bool = False,
        ranks: Sequence[int] | None = None,
        overrides: Mapping[int, Mapping[str, str]] | None = None,
    ):
        """``ranks``: which ranks to start (default all); ``overrides``: extra environment
        per rank (tests use both to build jobs whose ranks disagree)."""
        if world_size < 1:
            raise ValueError(f"LocalJob: world_size is {world_size}, expected >= 1")
        self.argv = list(argv)
        self.world_size = world_size
        self.port = port if port is not None else free_port()
        self.base_env = dict(os.environ if env is None else env)
        # as torchrun does: one OpenMP thread per rank unless told otherwise, so ranks
        # sharing cores do not spin against each other while one waits in a collective
        self.base_env.setdefault("OMP_NUM_THREADS", "1")
        self.cwd = cwd
        self.capture = capture
        self.ranks = list(range(world_size)) if ranks is None else list(ranks)
        self.overrides = dict(overrides or {})
        self.procs: list[subprocess.Popen[str]] = []
        #: Set by :meth:`wait`: the ranks seen failed at the first poll that saw any, and the
        #: ranks still running at its deadline (killed).
        self.first_failed: list[int] = []
        self.killed: list[int] = []

    def start(self) -> Self:
        for rank in self.ranks:
            env = {**self.base_env, **rank_env(rank, self.world_size, self.port), **self.overrides.get(rank, {})}
            out = subprocess.PIPE if self.capture else None
            self.procs.append(
                subprocess.Popen(self.argv, env=env, cwd=self.cwd, stdout=out, stderr=out, text=True, start_new_session=True)
            )
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait(self, timeout_s: float, grace_s: float = 30.0) -> list[int | None]:
        """Wait for every rank; once one fails, the rest get ``grace_s`` more. Ranks still
        running at the deadline are killed. Returns the exit codes (negative = signal)."""
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [self.ranks[i] for i, c in enumerate(codes) if c not in (None, 0)]
            speaking = [self.ranks[i] for i, c in enumerate(codes) if c not in (None, 0, SAID_BY_ANOTHER_RANK)]
            if speaking and not self.first_failed:
                self.first_failed = speaking  # its peers fail after it, naming only a lost connection
            if all(c is not None for c in codes):
                break
            if failed:
                deadline = min(deadline, time.monotonic() + grace_s)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.killed = [self.ranks[i] for i, c in enumerate(codes) if c is None]
        self.kill()
        if not self.first_failed:  # only ranks that left silently (the speaker was killed, or never ran)
            self.first_failed = [r for r, p in zip(self.ranks, self.procs, strict=True) if p.returncode not in (None, 0)]
        return [p.returncode for p in self.procs]

    def failure_summary(self, codes: Sequence[int | None]) -> str | None:
        """After :meth:`wait` returned ``codes``: which rank failed first, with its exit code or
        signal, and which ones this job killed; None when every rank exited 0. A dead rank's
        peers fail after it with errors about a lost connection; this names the one to read."""
        by_rank = dict(zip(self.ranks, codes, strict=True))
        if not self.first_failed:
            return None if all(c == 0 for c in codes) else f"ranks {_listed(self.killed)} did not finish in time"
        first = self.first_failed
        if len(first) == 1:
            line = f"first failure: rank {first[0]} ({exit_status(by_rank[first[0]])})"
        else:
            line = f"first failure: ranks {_listed(first)} ({'; '.join(f'rank {r}: {exit_status(by_rank[r])}' for r in first)})"
        later = [r for r, c in by_rank.items() if c not in (0, SAID_BY_ANOTHER_RANK) and r not in first and r not in self.killed]
        agreed = [r for r, c in by_rank.items() if c == SAID_BY_ANOTHER_RANK and r not in first]
        if agreed:
            line += f"; rank{'s' if len(agreed) > 1 else ''} {_listed(agreed)} met the same error (said once)"
        spoke = [r for r in later if by_rank[r] > 0]  # a rank a signal ended printed no error to read
        if spoke:
            line += (f"; then rank {spoke[0]} (its error names a lost peer)" if len(spoke) == 1 else
                     f"; then ranks {_listed(spoke)} (their errors name a lost peer)")
        line += "".join(f"; then rank {r} ({exit_status(by_rank[r])})" for r in later if by_rank[r] < 0)
        if self.killed:
            line += f"; rank{'s' if len(self.killed) > 1 else ''} {_listed(self.killed)} still running, killed"
        return line

    def communicate(self, timeout_s: float, grace_s: float = 30.0) -> list[tuple[int | None, str, str]]:
        """Like :meth:`wait`, collecting each rank's (exit code, stdout, stderr); needs ``capture=True``."""
        if not self.capture:
            raise ValueError("LocalJob.communicate: the job was started without capture=True")
        import threading

        outputs: list[tuple[str, str]] = [("", "")] * len(self.procs)

        def drain(i: int, proc: subprocess.Popen[str]) -> None:
            outputs[i] = proc.communicate()

        threads = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(self.procs)]
        for t in threads:
            t.start()
        codes = self.wait(timeout_s, grace_s)
        for t in threads:
            t.join(timeout=10)
        return [(code, out, err) for code, (out, err) in zip(codes, outputs, strict=True)]

    def leaked(self) -> list[int]:
        """Pids of this job's ranks that still exist (running, or exited but not reaped)."""
        return [pid for pid in self.pids if _exists(pid)]

    def kill(self) -> None:
        """SIGKILL every rank still running (and its own children), then reap them all."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    if hasattr(os, "killpg"):
                        os.killpg(p.pid, signal.SIGKILL)  # the rank's own children too (its session)
                    else:  # Windows: no process groups
                        p.kill()
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass


def exit_status(code: int | None) -> str:
    """A rank's exit code in words: ``exit code 1``, ``killed by SIGKILL (...)``."""
    if code is None or code >= 0:
        return f"exit code {code}"
    name = signal_name(-code)
    why = {"SIGKILL": " (the out-of-memory killer sends it: see `dmesg`)",
           "SIGSEGV": " (a crash in native code)", "SIGABRT": " (an abort in native code)"}.get(name, "")
    return f"killed by {name}{why}"


def _listed(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reused the pid
        return True
    return True


#: The exit status of a rank that met an error another rank of the job says (``agree`` in
#: dshal/parallel/run.py: an error the ranks share is said once). It is not the failure to read:
#: a silent rank may exit before the one that speaks, and the summary must name the speaker.
SAID_BY_ANOTHER_RANK = 68

#: Set in each rank :func:`relaunch_self` starts: the launcher's pid, which the rank watches
#: (:func:`dshal.lifetime.exit_with_parent`), so a launcher killed outright leaves no rank running.
LAUNCHER_PID_ENV = "DSHAL_LAUNCHER_PID"


def relaunch_self(module_argv: Sequence[str], world_size: int, timeout_s: float | None = None) -> int:
    """Run ``python -m <module_argv>`` as ``world_size`` local ranks; output goes to this
    terminal. Returns 0 when every rank succeeded, else the exit code of the rank that failed
    first (1 for a signal), and says on stderr which rank that was (:meth:`LocalJob.failure_summary`).
    SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal) end the ranks with this
    process; each rank also ends itself if this process disappears (:data:`LAUNCHER_PID_ENV`)."""
    launcher = {LAUNCHER_PID_ENV: str(os.getpid())}
    job = LocalJob(child_python("-m", *module_argv), world_size, env=child_env(),
                   overrides={r: launcher for r in range(world_size)})
    with cleanup_on_termination():  # kill and reap every rank on SIGTERM / SIGHUP too
        with job:
            codes = job.wait(timeout_s if timeout_s is not None else 10**9)
    summary = job.failure_summary(codes)
    if summary is None:
        return 0
    if world_size > 1:
        print(f"dshal: {summary}", file=sys.stderr, flush=True)
    first = dict(zip(job.ranks, codes, strict=True))[job.first_failed[0]] if job.first_failed else 1
    return first if isinstance(first, int) and first > 0 else 1
