"""``dshal run`` under torchrun's elastic agent: what its summary and its per-attempt logs show
of a failed rank, and a restart (``--max-restarts``) after one. The torchrun tests start real
agents on loopback (each start imports torch: seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dshal.error_file import ERROR_FILE_ENV, record_failure
from dshal.lifetime import free_port
from dshal.parallel.launch import SAID_BY_ANOTHER_RANK

needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
RUN = ["-m", "dshal", "run", "--new-tokens", "4", "--prompt-len", "4"]
#: what each rank says for --tp 3 on a world of 2 (plan_groups, in the groups' setup)
TP3_LINE = "dshal run: error: plan_groups: tp (3) x ep (1) = 3, expected the world size 2"


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DSHAL_CONFIG",
            "DSHAL_PLUGINS", "DSHAL_EMULATE", ERROR_FILE_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "DSHAL_BACKEND": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def _failure(path: Path, local_rank: int = 0, exitcode: int = 1):
    """torch's own reading of a worker's error file (what the agent's summary prints)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    return ProcessFailure(local_rank=local_rank, pid=0, exitcode=exitcode, error_file=str(path))


def test_error_file_is_what_torch_reads_and_a_consequence_keeps_the_first(tmp_path: Path, monkeypatch) -> None:
    """The layout of torch's ErrorHandler: its ProcessFailure reads the message and the timestamp;
    a consequence (terminated after another rank failed) neither replaces a failure already
    described nor is stamped before one."""
    path = tmp_path / "error.json"
    assert not record_failure("dshal run: error: x")  # outside torchrun: nothing to write
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    assert record_failure("dshal run: error: first")
    first = _failure(path)
    assert first.message["message"] == "dshal run: error: first"
    assert first.message["extraInfo"]["py_callstack"] == "dshal run: error: first"
    assert not record_failure("dshal run: terminated (SIGTERM)", consequence=True)
    assert _failure(path).message["message"] == "dshal run: error: first"
    path.unlink()
    assert record_failure("dshal run: terminated (SIGTERM)", consequence=True)
    assert _failure(path).timestamp >= first.timestamp


def test_a_rank_killed_outright_stays_the_root_cause_over_the_rank_that_lost_it(tmp_path: Path, monkeypatch) -> None:
    """A rank killed outright (SIGKILL: the OOM killer) writes no error file; the agent stamps it
    with the whole second at which it noticed (int(time.time()), within its monitor interval,
    0.1 s). Its peer, which saw the connection close a few ms after the kill, wrote a
    consequence. Stamped only rounded up, the two tied whenever a second began between them,
    and on a tie the agent named the peer (the lower rank) as the root cause."""
    import time

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    monkeypatch.setattr(time, "time", lambda: 1_000_000.96)  # rank 0 saw rank 1's socket close
    assert record_failure("dshal run: error: all_reduce ...: a peer closed its connection", consequence=True)
    peer = _failure(path, 0)
    monkeypatch.setattr(time, "time", lambda: 1_000_001.04)  # the agent's next look, 0.1 s after the kill
    killed = _failure(tmp_path / "none.json", 1, exitcode=-9)
    assert ChildFailedError("dshal", {0: peer, 1: killed}).get_first_failure()[0] == 1


def test_cli_describes_its_error_for_torchrun_and_says_the_same_as_before(tmp_path: Path, monkeypatch, capfd,
                                                                         cli_main) -> None:
    """Under torchrun (TORCHELASTIC_ERROR_FILE set) a DshalError's line lands in the error file
    too; stderr and the exit status stay as outside torchrun."""
    path = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    done = cli_main(capfd, ["run", "--tp", "0"])
    line = "dshal run: error: --tp is 0, expected an integer >= 1"
    assert (done.returncode, done.stderr.strip()) == (1, line)
    assert _failure(path).message["message"] == line


def _torchrun(*flags: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(["torchrun", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(stderr: str) -> str:
    """The agent's "dshal FAILED" block."""
    assert "dshal FAILED" in stderr, stderr[-3000:]
    return stderr[stderr.index("dshal FAILED"):]


@needs_torchrun
def test_each_nodes_summary_names_the_error_a_rank_said_once(tmp_path: Path) -> None:
    """Two agents on loopback as two nodes of one rendezvous, one rank each, asked for --tp 3.
    The lowest rank says the error and exits 1; the other exits SAID_BY_ANOTHER_RANK in silence.
    Each agent's summary showed only exit codes, ``error_file: <N/A>`` and a link: the node
    without the speaker had no word of the error. Now both summaries carry it, and the job's own
    error file (what a scheduler above torchrun reads) holds the root cause."""
    port, job = free_port(), f"dshal-{uuid.uuid4().hex[:8]}"
    flags = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", job, "--rdzv-conf", "join_timeout=60"]
    agents = [_torchrun(*flags, *RUN, "--tp", "3", env=_env(**{ERROR_FILE_ENV: str(tmp_path / f"node{n}.json")}))
              for n in range(2)]
    try:
        outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    summaries = {}
    for n, (_out, err) in enumerate(outputs):
        assert agents[n].returncode == 1, err[-3000:]
        summary = _summary(err)
        assert "error_file: <N/A>" not in summary and "To enable traceback" not in summary, summary
        assert TP3_LINE in summary, summary
        summaries[n] = summary
    # c10d numbers the nodes in its own order: find the speaker's (rank 0)
    speaker = next(n for n, s in summaries.items() if "rank      : 0 (local_rank: 0)" in s)
    other = 1 - speaker
    assert "exitcode  : 1 " in summaries[speaker] and f"exitcode  : {SAID_BY_ANOTHER_RANK} " in summaries[other]
    assert f"traceback : {TP3_LINE}" in summaries[speaker]
    assert f"traceback : dshal run: rank 1 met the error rank 0 said: {TP3_LINE}" in summaries[other]
    # dshal's own stderr unchanged: the speaker's line once, the other rank silent
    assert outputs[speaker][1].count(TP3_LINE) == 1 + summaries[speaker].count(TP3_LINE)
    assert outputs[other][1].count(TP3_LINE) == summaries[other].count(TP3_LINE)
    # the agent copies the root cause into its own error file
    assert json.loads((tmp_path / f"node{speaker}.json").read_text())["message"]["message"] == TP3_LINE


@pytest.mark.slow  # ~10 s on two busy cores: an agent and two attempts of two ranks, each importing torch
@needs_torchrun
def test_a_rank_that_fails_once_is_restarted_and_each_attempt_logs_per_rank(tmp_path: Path, install_plugin) -> None:
    """--max-restarts 1 --log-dir D --redirects 3, with a backend whose rms_norm raises a plain
    RuntimeError on rank 1 of the first attempt (a plugin defect mid-run):

    - the restarted ranks met the first attempt's records in the agent's store, which it keeps
      for every attempt, and hung connecting to the dead ranks' gloo addresses (until the comm
      timeout);
    - the failed rank's error file holds its traceback, and the rank that only lost its peer is
      stamped after it, so torch's root cause is the rank that raised;
    - each rank's stdout log is its own output, without the stray blank line a progress bar
      left where stdout is not a terminal; no thread dumps in the stderr logs."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    install_plugin("fails_first_attempt", {"flaky": "FailsFirstAttemptBackend"})  # on sys.path: the ranks' PYTHONPATH
    logs, report = tmp_path / "logs", tmp_path / "run.json"
    env = _env(DSHAL_BACKEND="flaky")
    agent = _torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(logs),
                      "--redirects", "3", *RUN, "--tp", "2", "--json", str(report), env=env)
    try:
        out, err = agent.communicate(timeout=150)
    finally:
        agent.kill()
    assert agent.returncode == 0, err[-3000:]
    (run_dir,) = logs.iterdir()
    first, second = run_dir / "attempt_0", run_dir / "attempt_1"
    failures = {rank: _failure(first / str(rank) / "error.json", rank) for rank in (0, 1)}
    raised = failures[1].message
    assert raised["message"] == "dshal run: RuntimeError: flaky: rms_norm failed on the first attempt"
    assert raised["extraInfo"]["py_callstack"].startswith("Traceback (most recent call last):")
    # rank 0 lost its peer (CommError) or was stopped: stamped after rank 1's failure, whichever
    # the agent saw first; the agent's root cause is the rank that raised
    assert failures[0].timestamp > failures[1].timestamp, (failures[0].message, failures[1].timestamp)
    assert ChildFailedError("dshal", failures).get_first_failure()[0] == 1
    for rank in (0, 1):
        said = (first / str(rank) / "stderr.log").read_text()
        assert "Thread 0x" not in said and "Current thread" not in said, said[-2000:]
    assert "Traceback" not in (first / "0" / "stderr.log").read_text()
    outs = [(second / str(rank) / "stdout.log").read_text() for rank in (0, 1)]
    assert outs[1].startswith("rank 1/2: prefill") and outs[0].startswith("rank 0/2: prefill"), outs
    assert "aggregate over 2 ranks" in outs[0] and "aggregate" not in outs[1]
    assert all(not (second / str(rank) / "error.json").exists() for rank in (0, 1))
    assert len(json.loads(report.read_text())["output_ids"]) == 4
