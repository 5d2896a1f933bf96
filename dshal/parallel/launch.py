"""Start a job of N local processes the way ``torchrun`` does, without leaving any behind.

``dshal run --tp N`` (outside torchrun) and the distributed tests use it: every rank gets
RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, a free port is
picked on 127.0.0.1, and when one rank fails the others get a grace period to fail on their
own (they raise CommError) before they are killed. Every child is reaped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Self

from dshal.lifetime import child_env, child_python


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                deadline = min(deadline, time.monotonic() + grace_s)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self.kill()
        return [p.returncode for p in self.procs]

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
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reused the pid
        return True
    return True


#: Set in each rank :func:`relaunch_self` starts: the launcher's pid, which the rank watches
#: (:func:`dshal.lifetime.exit_with_parent`), so a launcher killed outright leaves no rank running.
LAUNCHER_PID_ENV = "DSHAL_LAUNCHER_PID"


def relaunch_self(module_argv: Sequence[str], world_size: int, timeout_s: float | None = None) -> int:
    """Run ``python -m <module_argv>`` as ``world_size`` local ranks; output goes to this
    terminal. Returns 0 when every rank succeeded, else the first non-zero exit code.
    SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal) end the ranks with this
    process; each rank also ends itself if this process disappears (:data:`LAUNCHER_PID_ENV`)."""
    launcher = {LAUNCHER_PID_ENV: str(os.getpid())}
    job = LocalJob(child_python("-m", *module_argv), world_size, env=child_env(),
                   overrides={r: launcher for r in range(world_size)})
    with _signals_end_the_job():
        with job:
            codes = job.wait(timeout_s if timeout_s is not None else 10**9)
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return failed[0] if isinstance(failed[0], int) and failed[0] > 0 else 1


@contextlib.contextmanager
def _signals_end_the_job() -> Iterator[None]:
    """SIGTERM / SIGHUP raise SystemExit(128 + signal) in the block, so the job's cleanup (its
    ``with``: kill and reap every rank) runs; Python's default would end the process with the
    ranks left running. Only the main thread may set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
