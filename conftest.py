"""Repository-wide pytest setup.

* The session's Triton mode is decided here, once, before any test module can import
  triton (Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so test order must
  never decide it): the interpreter without a CUDA/ROCm device, compiled with one or with
  ``TRITON_INTERPRET=0`` (``dshal.kernels.triton.compiled_mode_reason``). Test modules
  never switch it themselves.
* Every test starts without an active dshal runtime.
* Tests marked ``needs_interpreter`` run dshal's Triton kernels on CPU tensors: in a
  compiled-mode session (a GPU machine: ``TRITON_INTERPRET=1 pytest`` runs them there),
  without Triton (an optional extra), or where the installed Triton's interpreter cannot
  (``dshal.versions.interpreter_refusal``: 3.6 and 3.7 lack e4m3fnuz), they are skipped with
  that reason instead of failing.
* No COLUMNS / LINES from the session: pytest-xdist's workers export COLUMNS=80, and dshal's
  piped output honours COLUMNS (as a user asks for it), so the tests' output would depend on
  ``-n``. A test that wants a width sets it.
* Each pytest-xdist worker runs torch on its share of the CPUs (``-n 2`` on 2 cores: one
  thread each), unless OMP_NUM_THREADS says otherwise. At torch's default every worker starts
  a thread per CPU: twice as many threads as cores, and the tiny models' many small ops wait on
  a descheduled thread of their team (a file of model tests ran 3-4x slower). Tests of thread
  counts set their own (``tests/test_core_cgroups.py``, ``tests/test_core_caller_state.py``);
  child processes keep torch's default.
* Every test starts from its own seed of torch's and Python's random generators, drawn from
  its node id: the data it draws does not depend on which tests ran before it in its worker
  (a test run alone, in another order or under another ``-n`` sees the same numbers), so a
  failure seen in CI reproduces with that test alone.
"""

import os
import random
import signal
import zlib

import pytest

from dshal.kernels.triton import compiled_mode_reason, ensure_interpreter_if_cpu

for _variable in ("COLUMNS", "LINES"):
    os.environ.pop(_variable, None)


def _xdist_worker_threads() -> int | None:
    """torch's thread count for this pytest-xdist worker: the CPUs this process can keep busy
    (affinity and cgroup quota) shared among the workers; None outside xdist or where
    OMP_NUM_THREADS chose."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    from dshal.backend import host_usable_cpus

    return max(1, host_usable_cpus() // workers)


if (_threads := _xdist_worker_threads()) is not None:
    import torch

    torch.set_num_threads(_threads)

COMPILED_MODE_REASON = compiled_mode_reason()
if COMPILED_MODE_REASON is None:
    ensure_interpreter_if_cpu("cpu")


def pytest_collection_modifyitems(config, items):
    from dshal.versions import installed, interpreter_refusal

    version = installed("triton")
    if COMPILED_MODE_REASON is not None:
        why = COMPILED_MODE_REASON
    else:
        why = interpreter_refusal(version) if version else "triton is not installed (pip install 'dshal[triton]')"
    if why is None:
        return
    for item in items:
        if item.get_closest_marker("needs_interpreter"):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _seeded_by_node_id(request):
    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True)
def _fresh_dshal_runtime():
    yield
    from dshal import runtime

    runtime.reset()


@pytest.fixture(scope="session")
def cpu_rowwise_scaled_mm_refusal():
    """None where this torch's ``torch._scaled_mm`` takes rowwise scales on CPU tensors, else
    why not: torch 2.11's CPU kernel takes per-tensor scales only (2.13's takes both). Tests
    that use ``_scaled_mm`` as a rival skip their rowwise cases with this reason."""
    import torch

    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError as err:
        return f"torch {torch.__version__}: torch._scaled_mm refuses rowwise scales on CPU ({str(err).splitlines()[0][:200]})"
    return None


def _signals_default_and_unblocked() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@pytest.fixture
def sigint_deliverable():
    """``preexec_fn`` for a child a test presses Ctrl-C on: SIGINT at its default and not
    blocked, whatever the test worker inherited or set (an ignored or blocked SIGINT passes to
    children through fork and exec, and a child that never sees the signal hangs the test)."""
    return _signals_default_and_unblocked


@pytest.fixture
def sigterm_once_made(tmp_path):
    """``run(argv, prefix) -> stderr``: start the dshal command line ``argv`` with its own
    TMPDIR, wait until it has made a temporary folder named ``prefix*`` there, send it SIGTERM,
    and check that it exited 143 with that folder removed (Python's default for SIGTERM skips
    every cleanup)."""
    import os
    import subprocess
    import time

    from dshal.lifetime import child_env, child_python

    def run(argv: list[str], prefix: str) -> str:
        tmp = tmp_path / "tmp"
        tmp.mkdir()
        proc = subprocess.Popen(child_python("-m", "dshal", *argv), env=child_env({**os.environ, "TMPDIR": str(tmp)}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_signals_default_and_unblocked)
        try:
            deadline = time.monotonic() + 120
            while not (made := list(tmp.glob(f"{prefix}*"))):
                assert proc.poll() is None and time.monotonic() < deadline, f"the run made no {prefix}* folder"
                time.sleep(0.1)
            time.sleep(0.5)  # its workers or ranks are starting
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
            assert not made[0].exists() and list(tmp.glob(f"{prefix}*")) == []
            return err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    return run
