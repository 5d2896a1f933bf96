"""dshal.comm across real local processes (gloo on 127.0.0.1, a free port per job).

Each job starts ``tests/comm_worker.py`` once per rank through
:class:`dshal.parallel.launch.LocalJob`; ranks write their findings as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from dshal.parallel.launch import LocalJob

WORKER = Path(__file__).with_name("comm_worker.py")
COMM_ERROR_EXIT = 17
FAIL_TIMEOUT_S = 5.0


def results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def run_job(tmp_path: Path, scenario: str, world: int, *args: str, timeout_s: float = 90) -> tuple[LocalJob, list, Path]:
    out = tmp_path / f"{scenario}{world}"
    out.mkdir()
    job = LocalJob([sys.executable, str(WORKER), scenario, str(out), *args], world, capture=True)
    with job:
        runs = job.communicate(timeout_s)
    return job, runs, out


@pytest.mark.parametrize("world", [2, 4])
def test_comm_collectives_exact(tmp_path: Path, world: int) -> None:
    job, runs, out = run_job(tmp_path, "collectives", world)
    assert [code for code, _, _ in runs] == [0] * world, [err[-3000:] for _, _, err in runs]
    for rank, payload in enumerate(results(out, world)):
        failed = {name: why for name, why in payload["checks"].items() if why != "ok"}
        assert not failed, f"rank {rank}: {failed}"
        # the catalogue of checks really ran (reduce ops x dtypes, uneven/empty all_to_all, groups)
        assert len(payload["checks"]) >= 30
        assert {"all_to_all[rank0 receives none]", "subgroups", "all_reduce[avg]"} <= set(payload["checks"])
    assert not any(alive(pid) for pid in job.pids)


@pytest.mark.parametrize("world", [2, 3])
def test_comm_disagreeing_ranks_raise_comm_error(tmp_path: Path, world: int) -> None:
    """Issue #16 class 8: a 4- vs 5-element all_reduce, float32 vs int64, mismatched ops,
    sources and collectives, and all_to_all splits that disagree with the peer's each raise
    CommError on every rank naming the ranks (gloo used to abort the process, all_to_all to
    return uninitialized rows); the group stays usable; ops.trusted() skips the check."""
    job, runs, out = run_job(tmp_path, "disagree", world)
    assert [code for code, _, _ in runs] == [0] * world, [err[-3000:] for _, _, err in runs]
    for rank, payload in enumerate(results(out, world)):
        failed = {name: why for name, why in payload["checks"].items() if why != "ok"}
        assert not failed, f"rank {rank}: {failed}"
        assert len(payload["checks"]) == 10
    assert not any(alive(pid) for pid in job.pids)


def test_comm_ranks_get_their_local_rank_device(tmp_path: Path) -> None:
    """Issue #18 item 2.1: each rank's GPU backends compute their device from LOCAL_RANK (not
    cuda:0 for all). The launcher's LOCAL_RANK is swapped against RANK to show which one counts."""
    pytest.importorskip("dshal_nvidia")
    pytest.importorskip("dshal_amd")
    out = tmp_path / "devices"
    out.mkdir()
    overrides = {0: {"LOCAL_RANK": "1"}, 1: {"LOCAL_RANK": "0"}}
    job = LocalJob([sys.executable, str(WORKER), "devices", str(out)], 2, capture=True, overrides=overrides)
    with job:
        runs = job.communicate(90)
    assert [code for code, _, _ in runs] == [0, 0], [err[-3000:] for _, _, err in runs]
    found = results(out, 2)
    if found[0]["cuda_devices"] == 1:
        pytest.skip("one CUDA device visible: by design it is every rank's (device index 0)")
    for rank, payload in enumerate(found):
        local = 1 - rank
        assert payload["nvidia"] == ["cuda", local] and payload["amd"] == ["cuda", local], payload
        assert payload["cpu runtime"] == "cpu"
        assert payload["all ranks"] == [1, 0]  # different indices, gathered across the ranks


@pytest.mark.skipif(torch.cuda.is_available(), reason="written for a machine without CUDA devices")
def test_local_device_index_rules() -> None:
    """LOCAL_RANK wins; without it the current device (0 with no device module); bad values
    are DeviceErrors naming LOCAL_RANK."""
    from dshal.backend import local_device_index
    from dshal.errors import DeviceError

    assert local_device_index("cuda", {"LOCAL_RANK": "3"}) == 3  # no CUDA here: nothing to check it against
    assert local_device_index("cuda", {}) == 0
    assert local_device_index("npu", {"LOCAL_RANK": "2"}) == 2  # torch_npu absent: no torch.npu module
    for bad in ("x", "-1"):
        with pytest.raises(DeviceError, match="LOCAL_RANK"):
            local_device_index("cuda", {"LOCAL_RANK": bad})


def test_comm_nccl_failure_logic() -> None:
    """The device-process-group side of the failure policy, as logic (no NCCL here): a failed
    device group is aborted, a gloo one destroyed; device groups get a longer timeout than
    dshal's own host wait, so the CommError comes before torch's watchdog."""
    from dshal import comm

    assert comm.teardown_action("cuda") == "abort" and comm.teardown_action("npu") == "abort"
    assert comm.teardown_action("cpu") == "destroy"
    # a barrier carries no tensor: it runs on the group's device (it was taken for the host,
    # so a failed NCCL barrier destroyed its group instead of aborting it)
    joined = comm._session.get("device_type")
    try:
        comm._session["device_type"] = "cuda"
        assert comm.collective_device(()) == "cuda" and comm.collective_device((torch.ones(1),)) == "cpu"
    finally:
        comm._session["device_type"] = joined
    # checked mode waits on the host with the timeout (what catches a dead NCCL peer); a trusted
    # (decode, graph-captured) collective on device tensors stays asynchronous; gloo always waits
    assert comm.host_waits("cuda", checking=True) and not comm.host_waits("cuda", checking=False)
    assert comm.host_waits("cpu", checking=False)
    assert comm.process_group_timeout(10, "cpu").total_seconds() == 10
    assert comm.process_group_timeout(10, "cuda").total_seconds() > 10 + 4


def test_comm_agreement_records_logic() -> None:
    """The agreement check on hand-made records: what it compares and how it names ranks."""
    import torch

    from dshal import comm

    a = comm.agreement_record("all_reduce", torch.ones(4), "sum", 2)
    b = comm.agreement_record("all_reduce", torch.ones(5), "sum", 2)
    assert len(a) == len(comm.agreement_record("all_to_all", torch.ones(2, 2, 2, 2, 2, 2, 2, 2, 2, 2), "", 2, [1, 1], [1, 1]))
    assert comm.disagreement("all_reduce", [a, a], [0, 1], "op") is None
    why = comm.disagreement("all_reduce", [a, b], [4, 6], "op")
    assert "rank 4" in why and "rank 6" in why and "[4]" in why and "[5]" in why
    ins0 = comm.agreement_record("all_to_all", torch.ones(3, 2), "", 2, [1, 2], [1, 1])
    ins1 = comm.agreement_record("all_to_all", torch.ones(2, 2), "", 2, [1, 1], [1, 1])
    assert "rank 0 sends 2 rows to rank 1" in comm.disagreement("all_to_all", [ins0, ins1], [0, 1], "")


def test_comm_dead_peer_raises_comm_error(tmp_path: Path) -> None:
    """The last rank SIGKILLs itself mid-loop: the others raise CommError naming the
    collective and the group well within timeout_s, then refuse further collectives."""
    world = 3
    start = time.monotonic()
    job, runs, out = run_job(tmp_path, "die", world, str(FAIL_TIMEOUT_S), timeout_s=60)
    codes = [code for code, _, _ in runs]
    assert codes[-1] == -9
    assert codes[:-1] == [COMM_ERROR_EXIT] * (world - 1), [err[-2000:] for _, _, err in runs]
    for payload in results(out, world - 1):
        assert "all_reduce" in payload["error"] and "world group" in payload["error"]
        assert payload["elapsed"] < FAIL_TIMEOUT_S + 10
        assert "shut down after an earlier failure" in payload["after"]
    assert time.monotonic() - start < 60
    assert not any(alive(pid) for pid in job.pids)


def test_comm_hung_peer_times_out(tmp_path: Path) -> None:
    """The last rank hangs: the others raise CommError after about timeout_s (no silent hang);
    the launcher kills the hung rank, leaking nothing."""
    world = 2
    out = tmp_path / "hang"
    out.mkdir()
    job = LocalJob([sys.executable, str(WORKER), "hang", str(out), str(FAIL_TIMEOUT_S)], world, capture=True)
    with job:
        runs = job.communicate(timeout_s=60, grace_s=2)
    codes = [code for code, _, _ in runs]
    assert codes[0] == COMM_ERROR_EXIT, runs[0][2][-2000:]
    assert codes[1] == -9  # still hanging when the launcher gave up on it
    payload = results(out, 1)[0]
    assert "all_reduce" in payload["error"] and "did not answer within distributed.timeout_s" in payload["error"]
    assert FAIL_TIMEOUT_S - 1 <= payload["elapsed"] < FAIL_TIMEOUT_S + 10
    assert not any(alive(pid) for pid in job.pids)


def _emulated_nvidia_usable() -> bool:
    """Whether the nvidia plugin runs emulated here (installed, and a Triton whose interpreter
    can), asked in a child process: emulation switches this process's Triton mode."""
    import subprocess

    code = "import dshal; dshal.use(backend='nvidia', emulate=True)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_comm_init_errors_are_clear(tmp_path: Path) -> None:
    """Port in use, a missing rank, mismatched WORLD_SIZE and a store that never answers each
    give a CommError that says so. The jobs run side by side to keep the wall time down."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    layouts = {
        "port_in_use": {"world_size": 1, "port": busy_port},
        "missing_rank": {"world_size": 2, "ranks": [0]},
        "mismatch": {"world_size": 2, "overrides": {1: {"WORLD_SIZE": "3"}}},
        # a port that accepts and never answers (a stopped old job's store): rank 1 hung in the handshake
        "silent_store": {"world_size": 2, "ranks": [1], "port": busy_port},
    }
    if _emulated_nvidia_usable():
        # rank 1 on another backend (as a rank that could not use its GPU falls to the cpu one)
        layouts["mixed_backends"] = {"world_size": 2, "overrides": {1: {"DSHAL_TEST_BACKEND": "nvidia"}}}
    # distributed.timeout_s also bounds the rendezvous: the ranks of a job must all arrive within
    # it. Only the jobs whose message is about that wait get 3 s; the others' errors come as soon
    # as every rank has joined, which on a loaded machine can take longer than 3 s.
    waits = {"missing_rank": "3", "silent_store": "3"}
    jobs = {}
    try:
        for name, layout in layouts.items():
            (tmp_path / name).mkdir()
            argv = [sys.executable, str(WORKER), "init", str(tmp_path / name), waits.get(name, "60")]
            jobs[name] = LocalJob(argv, capture=True, **layout).start()
        runs = {name: job.communicate(30) for name, job in jobs.items()}
    finally:
        busy.close()
        for job in jobs.values():
            job.kill()
    messages = {}
    for name, job in jobs.items():
        assert [code for code, _, _ in runs[name]] == [COMM_ERROR_EXIT] * len(job.ranks), (name, runs[name])
        messages[name] = [json.loads((tmp_path / name / f"rank{r}.json").read_text())["init_error"] for r in job.ranks]
        assert not any(alive(pid) for pid in job.pids)
    (port_msg,) = messages["port_in_use"]
    assert "already in use" in port_msg and str(busy_port) in port_msg
    (missing_msg,) = messages["missing_rank"]
    assert "not all WORLD_SIZE=2 ranks joined" in missing_msg
    for msg in messages["mismatch"]:
        assert "mismatched world size" in msg and "WORLD_SIZE=2" in msg and "WORLD_SIZE=3" in msg
    for msg in messages.get("mixed_backends", []):
        assert "mismatched backends" in msg and "backend 'cpu' (gloo)" in msg and "backend 'nvidia' (gloo)" in msg
    (silent_msg,) = messages["silent_store"]
    assert f"rank 1 got no answer from the store at MASTER_ADDR=127.0.0.1 MASTER_PORT={busy_port} within 3 s" in silent_msg


def test_comm_not_initialized_and_env_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dshal import comm
    from dshal.errors import CommError

    for name, call in (("all_reduce", lambda: comm.all_reduce(torch.ones(2))), ("broadcast", lambda: comm.broadcast(torch.ones(2))),
                       ("all_to_all", lambda: comm.all_to_all(torch.ones(2)))):
        with pytest.raises(CommError, match=f"^{name}: torch.distributed is not initialized"):  # named world_size before
            call()
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CommError, match=r"\['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\] are not set"):
        comm.init()
    base = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert comm.launch_env(base).local_rank == 0
    with pytest.raises(CommError, match=r"RANK is 2, expected 0 <= RANK < WORLD_SIZE \(2\)"):
        comm.launch_env({**base, "RANK": "2"})
    with pytest.raises(CommError, match="WORLD_SIZE is 'two', expected an integer"):
        comm.launch_env({**base, "WORLD_SIZE": "two"})
    with pytest.raises(CommError, match="MASTER_PORT is 70000"):
        comm.launch_env({**base, "MASTER_PORT": "70000"})
    with pytest.raises(CommError, match="LOCAL_RANK is 3"):
        comm.launch_env({**base, "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"})
    assert os.environ.get("RANK") is None


def test_shared_input_gives_every_rank_rank_0s_lines_however_long_the_user_takes(tmp_path: Path) -> None:
    """``dshal run --interactive --tp N``: rank 0 reads the terminal and every rank gets each
    line (non-ASCII and empty included) and then the end of input; a user slower than the
    comm timeout (2 s here; 3 s per line) ends nothing, since rank 0 keeps posting "waiting"."""
    job, runs, out = run_job(tmp_path, "shared_input", 2, "2")
    assert [code for code, _, _ in runs] == [0, 0], [err[-3000:] for _, _, err in runs]
    found = results(out, 2)
    assert [r["lines"] for r in found] == [["héllo ✓", "", "a second line"]] * 2
    assert all(r["seconds"] >= 4 * 3.0 - 0.5 for r in found)  # four reads of 3 s, each longer than the timeout


SUBGROUP_AFTER_FAILURE = """
import torch
import dshal
from dshal import comm
from dshal.errors import CommError

dshal.use(backend="cpu")
comm.init(timeout_s=20)
tp = comm.new_groups([[0]], "tp")

def boom(*args, **kwargs):
    raise RuntimeError("Connection closed by peer")

try:
    comm.communicator(tp)._run("all_reduce", boom, torch.ones(2))
except CommError:
    pass
for call in (lambda: comm.all_reduce(torch.ones(2), group=tp), lambda: comm.communicator(tp).world_size):
    try:
        call()
    except CommError as err:
        print("CommError:", str(err).split(":")[0])
comm.shutdown()
"""


def test_a_subgroup_after_a_failure_still_raises_comm_error(tmp_path: Path) -> None:
    """After a failure every group is torn down and torch forgets their ranks: naming a tp / ep
    group then raised a bare KeyError from every later call on it, not the CommError promised."""
    import subprocess

    from dshal.parallel.launch import free_port, rank_env

    env = {**os.environ, **rank_env(0, 1, free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SUBGROUP_AFTER_FAILURE], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["CommError: all_reduce on the group 'tp0'", "CommError: world_size on the group 'tp0'"]


BACKEND_HOOKS = """
import os
import torch.distributed as dist
import dshal
from dshal import comm

backend = dshal.use(backend="cpu").backend
aborted = []
backend.process_group_environment = lambda timeout_s: {"DSHAL_TEST_LIB_TIMEOUT": str(timeout_s), "DSHAL_TEST_USER_SET": "dshal"}
backend.abort_communicators = lambda groups: aborted.append([dist.get_process_group_ranks(g) for g in groups])
comm.init(timeout_s=20)
print(os.environ["DSHAL_TEST_LIB_TIMEOUT"], os.environ["DSHAL_TEST_USER_SET"])
tp = comm.new_groups([[0]], "tp")
comm._teardown("npu")  # a failed collective on device tensors: the groups are aborted
print(aborted)
comm.shutdown()
comm.init(timeout_s=30)  # a later job's timeout: what dshal set follows it, the user's stays
print(os.environ["DSHAL_TEST_LIB_TIMEOUT"], os.environ["DSHAL_TEST_USER_SET"])
comm.shutdown()
backend.process_group_environment = lambda timeout_s: {"DSHAL_TEST_FIRST": "1", "DSHAL_TEST_LIB_TIMEOUT": 30}
try:
    comm.init(timeout_s=30)
except dshal.DshalError as err:
    print(type(err).__name__, str(err), "DSHAL_TEST_FIRST" in os.environ)
"""


def test_the_backends_process_group_hooks_set_its_environment_and_abort_every_group(tmp_path: Path) -> None:
    """HCCL's communicators are out of reach of torch's process-group abort (torch_npu's abort is
    an overload, not an override): a failed collective left work queued on the dead peer and the
    exit waited ~30 min. The backend now gets every group this rank made to abort, and sets its
    library's timeouts from distributed.timeout_s, leaving a variable the user set alone."""
    import subprocess

    from dshal.parallel.launch import free_port, rank_env

    env = {**os.environ, **rank_env(0, 1, free_port()), "OMP_NUM_THREADS": "1", "DSHAL_TEST_USER_SET": "user"}
    done = subprocess.run([sys.executable, "-c", BACKEND_HOOKS], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "20.0 user", "[[[0], [0]]]", "30.0 user",
        "ProviderError backend 'cpu': process_group_environment() gave 'DSHAL_TEST_LIB_TIMEOUT': 30, expected names and "
        "values that are strings False",  # nothing set: all or none
    ]


PLANS_DIFFER = """
import os
import dshal
from dshal import comm
from dshal.errors import CommError
from dshal.parallel import groups
from dshal.parallel.placement import topology_from_matrix

dshal.use(backend="cpu")
comm.init(timeout_s=30)
if comm.get_rank() == 1:  # this rank's node answers with NVLink pairs (0, 2) and (1, 3): another plan
    pairs = topology_from_matrix([["self" if i == j else ("nvlink" if (i - j) % 2 == 0 else "pcie") for j in range(4)]
                                  for i in range(4)], source="test: this rank's node")
    dshal.current().backend.topology = lambda: pairs
try:
    groups.setup_groups(tp=2, ep=2)
    print("groups made")
except CommError as err:
    print("CommError:", str(err)[:80])
comm.shutdown()
"""


def test_ranks_that_plan_other_groups_say_so_before_making_any(tmp_path: Path) -> None:
    """Each rank plans TP/EP groups from its own node's topology; a node that answers otherwise
    (no NVML, a degraded link) made its ranks call new_group with other rank lists: a hang or
    wrong groups. The plans are compared first, and every rank raises naming the ranks that differ."""
    job = LocalJob([sys.executable, "-c", PLANS_DIFFER], 4, capture=True)
    with job:
        runs = job.communicate(timeout_s=120)
    assert [code for code, _, _ in runs] == [0] * 4, [err[-1500:] for _, _, err in runs]
    for _, out, _ in runs:
        assert out.strip().startswith("CommError: setup_groups: ranks [1] planned other TP/EP groups than rank 0"), out


class _WorkStandIn:
    """Not a collective: an object with a c10d Work's ``is_completed`` / ``wait`` that completes
    after ``polls`` checks (or never), to check :func:`dshal.comm.wait_on_host`'s logic."""

    def __init__(self, polls: int | None):
        self.polls, self.checked, self.waited = polls, 0, False

    def is_completed(self) -> bool:
        self.checked += 1
        return self.polls is not None and self.checked > self.polls

    def wait(self, timeout=None):  # noqa: ANN001, ANN201
        self.waited = True
        return True


def test_device_collectives_are_polled_finely_and_still_time_out() -> None:
    """A device group's ``work.wait(timeout)`` polls with a 1 ms (older torch: 10 ms) sleep,
    a floor under every checked collective on NCCL; dshal polls ``is_completed()`` at 20 us,
    then ``wait()`` (its error, the stream order), and still raises at the timeout."""
    import time

    from dshal import comm

    done = _WorkStandIn(polls=5)
    start = time.monotonic()
    comm.wait_on_host(done, 5.0, "cuda")
    assert done.waited and done.checked == 6 and time.monotonic() - start < 0.5
    never = _WorkStandIn(polls=None)
    with pytest.raises(RuntimeError, match="timed out after 0.05 s"):
        comm.wait_on_host(never, 0.05, "cuda")
    assert not never.waited and never.checked > 10


def test_a_process_that_exits_without_shutdown_leaves_the_job_before_the_interpreter_tears_down(tmp_path):
    """A script that joined with ``dshal.comm.init()`` and exited without ``shutdown()`` left
    its process groups (and rank 0's store server) to the interpreter's teardown, where gloo's
    store thread was destroyed while joinable: "terminate called without an active exception",
    SIGABRT, in about a third of 2-rank runs. ``init`` leaves the job at exit now: an exit hook
    registered before ``init`` (so run after dshal's) finds no process group left."""
    script = tmp_path / "exit_without_shutdown.py"
    script.write_text(
        "import atexit\n"
        "import torch.distributed as dist\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized(), flush=True))\n"
        "import dshal, dshal.comm\n"
        "dshal.use(backend='cpu')\n"
        "dshal.comm.init()\n"
        "dshal.comm.barrier()\n"
    )
    with LocalJob([sys.executable, str(script)], 2, capture=True) as job:
        runs = job.communicate(timeout_s=120)
    for code, out, err in runs:
        assert code == 0, err[-2000:]
        assert "initialized at exit: False" in out, out + err[-2000:]


def test_comm_arguments_that_name_no_possible_group_or_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refused before any collective runs, naming the argument or variable, what was seen
    and what was expected (a simulated group runs the real communicator's checks)."""
    import torch.distributed as dist

    import dshal
    from dshal import comm
    from dshal.errors import CommError, ConfigError, ShapeError

    with pytest.raises(CommError, match="this rank is not a member of the group it was given"):
        comm.ProcessGroupCommunicator(dist.GroupMember.NON_GROUP_MEMBER)
    for size, rank in ((0, 0), (2, 2), (2, -1)):
        with pytest.raises(CommError, match=rf"SimulatedGroup: rank {rank} of size {size}, expected 0 <= rank < size"):
            comm.SimulatedGroup(size, rank)
    pair = comm.SimulatedCommunicator(comm.SimulatedGroup(2, 0))
    with pytest.raises(ShapeError, match="all_to_all: argument 't' is a 0-d tensor, expected at least 1 dim"):
        pair.all_to_all(torch.tensor(1.0))
    with pytest.raises(ShapeError, match="all_to_all: argument 't' has 3 rows, expected a multiple of the group size 2"):
        pair.all_to_all(torch.ones(3, 4))
    with pytest.raises(CommError, match=r"broadcast: argument 'src' is 2, expected a group rank in \[0, 2\)"):
        pair.broadcast(torch.ones(2), src=2)
    base = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(CommError, match="init: WORLD_SIZE is 0, expected a positive number of ranks"):
        comm.launch_env({**base, "WORLD_SIZE": "0"})
    with pytest.raises(CommError, match=r"new_groups\('tp'\): torch.distributed is not initialized; call dshal.comm.init\(\) first"):
        comm.new_groups([[0]], "tp")
    for var, value in base.items():
        monkeypatch.setenv(var, value)
    dshal.use(backend="cpu")
    for timeout in (0, -1.5, 10**12):  # refused before the rendezvous: nothing listens on the port
        with pytest.raises(ConfigError, match=rf"init: argument 'timeout_s': got {timeout}, expected a number of seconds in \(0, "):
            comm.init(timeout_s=timeout)
    assert not comm.is_initialized()


PARTITION_MISSES_A_RANK = """
import dshal
from dshal import comm
from dshal.errors import CommError

dshal.use(backend="cpu")
comm.init(timeout_s=30)
for partition in ([[0], [0]], [[1]], [[]]):
    try:
        comm.new_groups(partition, "ep")
    except CommError as err:
        print(err)
comm.shutdown()
"""


def test_new_groups_refuses_a_partition_that_does_not_cover_the_world_once(tmp_path: Path) -> None:
    import subprocess

    from dshal.parallel.launch import free_port, rank_env

    env = {**os.environ, **rank_env(0, 1, free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PARTITION_MISSES_A_RANK], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    said = "expected every rank 0..0 exactly once"
    assert done.stdout.splitlines() == [f"new_groups('ep'): argument 'partition' is {p}, {said}" for p in ("[[0], [0]]", "[[1]]", "[[]]")]
