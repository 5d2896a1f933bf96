"""Child Python processes that import what their parent imports and end with it, and a
parent whose cleanup runs when it is told to end.

Shared by the ranks ``dshal run --tp N`` starts (:mod:`dshal.parallel.launch`), the
conformance suite's collective ranks and the ``dshal kernels`` compile workers: stdlib only,
so importing it costs a worker nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dshal.error_file import record_failure

log = logging.getLogger(__name__)


def child_python(*args: str) -> list[str]:
    """``python -P <args>``: this interpreter without the working directory first on the import
    path (``-m`` and ``-c`` put it there: a ``dshal/`` folder in it, such as a checkout, shadowed
    the installed package, "module 'dshal' has no attribute 'use'"). Give the child
    :func:`child_env`'s PYTHONPATH so it imports what this process imports. On Windows a
    virtual environment's python.exe is a launcher that runs the real interpreter as its own
    child: that interpreter is started directly, so killing the child kills the work."""
    base = getattr(sys, "_base_executable", None) if sys.platform == "win32" else None
    return [base or sys.executable, "-P", *args]


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default this process's environment) with PYTHONPATH set to this process's import
    path, in its order: a package found here (dshal, a plugin, the suite) is found there."""
    return {**(os.environ if env is None else env), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def exit_with_parent(parent: int, period_s: float = 0.5) -> None:
    """End this process when ``parent``, the process that started it, is gone (killed by a
    signal that skips its cleanup, e.g. SIGKILL): an orphan would keep working. Not on
    Windows, whose ``os.getppid()`` does not change when the parent dies."""

    if sys.platform == "win32":  # os.getppid() keeps a dead parent's pid there (and a venv's launcher is the parent)
        return

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent:
                os._exit(1)

    if os.getppid() != parent:  # gone while this process was starting
        os._exit(1)
    threading.Thread(target=watch, name="dshal-parent-watch", daemon=True).start()


def dies_with_parent(parent: int) -> str:
    """Python source for the start of a ``-c`` child of process ``parent``, before any heavy
    import: on Linux the kernel kills the child the moment its parent dies
    (``PR_SET_PDEATHSIG``), even while it still imports torch or holds the GIL compiling,
    where :func:`exit_with_parent`'s watcher is not running yet or waits for its turn; it
    exits at once when the parent is gone already. Standard library only."""
    return (
        "import ctypes, os, signal, sys\n"
        "if sys.platform.startswith('linux'):\n"
        "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
        f"if sys.platform != 'win32' and os.getppid() != {int(parent)}:\n"
        "    os._exit(1)\n"
    )


class Terminated(SystemExit):
    """Raised by :func:`cleanup_on_termination` for SIGTERM / SIGHUP: a SystemExit whose code
    is 128 + the signal's number (what a shell reports for a process the signal ended)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number where this platform has no name for it."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


#: After SIGTERM / SIGHUP, the seconds the signal may wait for the main thread to come back into
#: the interpreter (where Python runs its handler) before the process ends anyway. torchrun and
#: Slurm send SIGKILL 30 s after SIGTERM; a rank blocked in a collective on a dead peer would
#: otherwise hold the signal for up to distributed.timeout_s (300 s).
TERMINATION_GRACE_S = 10.0


class _TerminationWatchdog:
    """Ends the process with 128 + the signal when SIGTERM / SIGHUP has not reached its Python
    handler ``grace_s`` after it came. The handler runs only once the main thread is back in the
    interpreter, and one blocked in C (a collective waiting for a dead peer, a store's wait) is
    not; the C-level handler writes the signal's number to the wakeup fd at once, and this thread
    reads it there. Once the handler ran, the cleanup it starts (in Python) is not timed.

    Armed by :func:`arm_termination_watchdog` where such a wait may come (joining a job), not
    by every block: a thread costs ~72 MiB of address space (its stack and a malloc arena),
    which a process capped by ``ulimit -v`` may not have. One per process (:attr:`current`),
    closed when the outermost :func:`cleanup_on_termination` block ends (:attr:`armable`: its
    signals and grace while it runs). A forked child drops it (:meth:`forget_in_child`): the
    pipe and the wakeup fd would survive the fork without the thread, and a signal to the
    child would write into the parent's pipe."""

    current: _TerminationWatchdog | None = None
    armable: tuple[frozenset[int], float] | None = None

    def __init__(self, signals: Iterable[int], grace_s: float):
        self._signals = frozenset(int(sig) for sig in signals)
        self._grace_s = grace_s
        self.handled = 0  # signals whose Python handler ran (main thread: an int under the GIL)
        self._done = threading.Event()
        self._read_fd, self._write_fd = os.pipe()
        try:
            os.set_blocking(self._write_fd, False)  # the C handler must never block on it
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
            try:
                threading.Thread(target=self._watch, daemon=True, name="dshal-termination-watchdog").start()
            except BaseException:
                signal.set_wakeup_fd(self._previous_fd)
                raise
        except BaseException:
            os.close(self._read_fd)
            os.close(self._write_fd)
            raise

    def _watch(self) -> None:
        seen = 0
        try:
            while True:
                data = os.read(self._read_fd, 64)
                if not data:  # closed: the block ended
                    return
                for sig in data:
                    if sig not in self._signals:  # SIGINT's byte comes here too
                        continue
                    seen += 1
                    deadline = time.monotonic() + self._grace_s
                    while self.handled < seen:
                        if self._done.wait(0.05):
                            return
                        if time.monotonic() > deadline:
                            line = (f"dshal: still running {self._grace_s:g} s after {signal_name(sig)} (blocked "
                                    "outside Python: a collective or a call into a library); ending now, without cleanup")
                            os.write(2, f"{line}\n".encode())
                            record_failure(line, consequence=True)  # under torchrun: its summary says why
                            os._exit(128 + sig)
        finally:
            os.close(self._read_fd)

    def close(self) -> None:
        self._done.set()
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write_fd)  # the thread reads EOF
        _TerminationWatchdog.current = None

    @classmethod
    def forget_in_child(cls) -> None:
        watchdog, cls.armable = cls.current, None
        if watchdog is None:
            return
        cls.current = None
        try:
            signal.set_wakeup_fd(watchdog._previous_fd)
        except ValueError:  # forked from a thread other than the main one: no wakeup fd to undo there
            pass
        for fd in (watchdog._read_fd, watchdog._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_TerminationWatchdog.forget_in_child)


def arm_termination_watchdog() -> bool:
    """Inside a :func:`cleanup_on_termination` block, before code that may block in C for long
    (a collective, a store's wait): SIGTERM / SIGHUP then end the process the block's grace
    after they came, if the main thread has not taken them by then. True where a watchdog
    guards the block now (False: no block, another thread, Windows)."""
    if _TerminationWatchdog.current is not None:
        return True
    armable = _TerminationWatchdog.armable
    if armable is None or threading.current_thread() is not threading.main_thread():
        return False
    try:
        _TerminationWatchdog.current = _TerminationWatchdog(*armable)
    except (OSError, RuntimeError) as err:  # no fd or no thread to spare (ulimit -n, ulimit -v): unguarded
        log.debug("dshal: no termination watchdog: %s", err)
        return False
    return True


@contextlib.contextmanager
def cleanup_on_termination(grace_s: float = TERMINATION_GRACE_S) -> Iterator[None]:
    """SIGTERM / SIGHUP (``timeout``, ``kill``, a closed terminal) raise :class:`Terminated`
    in the block, so its ``finally`` / ``with`` cleanup runs (child processes killed, temporary
    folders removed); Python's default ends the process at once and skips it. Where the main
    thread is blocked outside Python when the signal comes, so that the handler cannot run, the
    process ends ``grace_s`` later without the cleanup (:data:`TERMINATION_GRACE_S`), once
    :func:`arm_termination_watchdog` was called in the block. Only the main thread may set
    handlers; elsewhere nothing changes. A signal the process ignores stays ignored (``nohup``
    ignores SIGHUP so that a run outlives the terminal). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        if _TerminationWatchdog.current is not None:
            _TerminationWatchdog.current.handled += 1
        raise Terminated(signum)

    present = [sig for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if sig is not None]
    previous: dict[int, Any] = {}
    outermost = _TerminationWatchdog.armable is None
    try:  # handlers set inside: a signal between two of them still restores the first
        for sig in present:  # Windows has no SIGHUP
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop)
        if outermost and previous and sys.platform != "win32":  # Windows' wakeup fd must be a socket
            _TerminationWatchdog.armable = (frozenset(previous), grace_s)
        yield
    finally:
        # A second signal while the handlers are put back (systemd sends SIGTERM, then SIGHUP)
        # waits until they are: it then meets the handler it finds, never a half-restored state.
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, present) if hasattr(signal, "pthread_sigmask") else None
        try:
            try:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            finally:  # a handler still pending from before the mask may raise above: the watchdog ends anyway
                if outermost:
                    _TerminationWatchdog.armable = None
                    if _TerminationWatchdog.current is not None:
                        _TerminationWatchdog.current.close()
        finally:
            if masked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)


#: Where :func:`free_port` looks first: from PORT_FLOOR up to the OS's range of ports for outgoing
#: connections (Linux: /proc/sys/net/ipv4/ip_local_port_range), and below PORT_CEILING (Kubernetes
#: NodePorts start at 30000, on hosts whose pods share the host's network).
PORT_FLOOR, PORT_CEILING = 10000, 30000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now. The job's rank 0 binds it seconds later (after
    importing torch), and a port of the OS's ephemeral range may meanwhile be handed to any
    outgoing connection (another job's gloo pairs make many) or to another ``bind(0)``: a
    random free port below that range is taken where the range is known, else the OS's pick."""
    low = _ephemeral_low()
    top = min(low, PORT_CEILING) if low is not None else None
    if top is not None and top > PORT_FLOOR + 1000:
        pick = random.SystemRandom()
        for _ in range(64):
            port = pick.randrange(PORT_FLOOR, top)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:  # in use
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int | None:
    """The first port of the OS's range for outgoing connections, or None where it is not known."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


__all__ = [
    "Terminated", "arm_termination_watchdog", "child_env", "child_python", "cleanup_on_termination", "dies_with_parent",
    "exit_with_parent", "free_port", "signal_name",
]
