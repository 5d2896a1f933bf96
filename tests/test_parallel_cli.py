"""``dshal run --tp N --ep M``: started by torchrun, or launching its own local ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dshal.parallel.launch import SAID_BY_ANOTHER_RANK, LocalJob

RUN = ["run", "--new-tokens", "3", "--prompt-len", "4", "--no-progress"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DSHAL_BACKEND="cpu", OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def dshal_here(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_main):
    """``dshal_here(*argv, env={})``: ``dshal ARGV`` as ``python -m dshal`` runs it, in this
    process (conftest's ``cli_main``) with that command line in ``sys.argv`` (where a launcher
    reads what its ranks run), :func:`_env`'s variables plus ``env`` (one torch thread, as
    OMP_NUM_THREADS=1 gives a child), a ``CompletedProcess`` of its exit status and output.
    Captured at the file descriptors: a rank it starts writes there too. A single-process run
    or a refusal before any rank starts costs no interpreter start and torch import (~2 s)."""
    import torch

    def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DSHAL_CONFIG", "DSHAL_EMULATE",
                     "DSHAL_PLUGINS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {"DSHAL_BACKEND": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", ["dshal", *argv])
        torch.set_num_threads(1)  # given back after the test (tests/conftest.py)
        return cli_main(capfd, list(argv))

    return run


def test_parallel_cli_launches_local_ranks(tmp_path: Path) -> None:
    """Without torchrun, --ep 2 starts two ranks itself; rank 0 writes the report with the
    per-rank and aggregate tokens/s. Started from a folder holding a ``dshal/`` folder (a
    checkout): the ranks' ``python -m`` put it first on their path, and each died with
    "cannot import name '__version__' from 'dshal' (unknown location)"."""
    out = tmp_path / "report.json"
    (tmp_path / "dshal").mkdir()
    script = Path(sys.executable).parent / "dshal"  # the console script: its own path has no working directory
    done = subprocess.run(
        [str(script), *RUN, "--ep", "2", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2:" in done.stdout and "rank 1/2:" in done.stdout and "aggregate over 2 ranks" in done.stdout
    # each rank's line whole (print() wrote text and newline apart: "... tokens/srank 1/2: ...")
    assert sorted(line[:9] for line in done.stdout.splitlines() if "tokens/s" in line and line.startswith("rank ")) == \
        ["rank 0/2:", "rank 1/2:"] and "tokens/srank" not in done.stdout
    report = json.loads(out.read_text())
    parallel = report["parallel"]
    assert (parallel["tp"], parallel["ep"], parallel["world_size"]) == (1, 2, 2)
    assert [r["rank"] for r in parallel["per_rank"]] == [0, 1]
    assert parallel["aggregate_decode_tokens_per_s"] == min(r["decode_tokens_per_s"] for r in parallel["per_rank"]) > 0
    assert len(report["output_ids"]) == 3


def test_parallel_cli_a_run_without_a_decode_rate_says_none_on_every_rank(tmp_path: Path) -> None:
    """``--new-tokens 2`` times no decode step: one process says n/a (null in the JSON), but a
    split run's ranks and aggregate said "decode 0.0 tokens/s" (0.0 in the JSON), a rate measured as nothing."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "dshal", "run", "--new-tokens", "2", "--prompt-len", "4", "--no-progress",
                           "--ep", "2", "--json", str(out)], env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    parallel = report["parallel"]
    assert report["decode_tokens_per_s"] is None and parallel["aggregate_decode_tokens_per_s"] is None
    assert [r["decode_tokens_per_s"] for r in parallel["per_rank"]] == [None, None]
    assert parallel["aggregate_prefill_tokens_per_s"] == min(r["prefill_tokens_per_s"] for r in parallel["per_rank"]) > 0
    assert "decode 0.0" not in done.stdout and done.stdout.count("decode n/a tokens/s") == 3  # two ranks, the aggregate


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_parallel_cli_under_torchrun() -> None:
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dshal", *RUN, "--tp", "2"],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "aggregate over 2 ranks (TP=2 x EP=1" in done.stdout


def test_parallel_cli_world_size_mismatch(tmp_path: Path) -> None:
    """Two ranks asked for --tp 4: both fail, no traceback, and rank 0 alone says so (each
    did, with its group left live at exit); rank 1 exits SAID_BY_ANOTHER_RANK."""
    job = LocalJob([sys.executable, "-m", "dshal", *RUN, "--tp", "4"], 2, env=_env(), capture=True)
    with job:
        runs = job.communicate(timeout_s=60)
    assert [code for code, _, _ in runs] == [1, SAID_BY_ANOTHER_RANK], [err[-2000:] for _, _, err in runs]
    said = "tp (4) x ep (1) = 4, expected the world size 2"
    assert said in runs[0][2] and said not in runs[1][2]
    assert not any("Traceback" in err for _, _, err in runs)
    assert job.leaked() == []


def test_parallel_cli_a_world_size_below_one_is_refused(dshal_here) -> None:
    """WORLD_SIZE=0 or -3 (a launcher's or a script's mistake) ran as one process, exit 0."""
    for bad in ("0", "-3"):
        done = dshal_here(*RUN, env={"WORLD_SIZE": bad, "RANK": "0"})
        assert done.returncode == 1, done.stderr[-2000:]
        assert f"environment variable WORLD_SIZE is '{bad}', expected an integer >= 1" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--tp", "3"], "--tp 3 --ep 1: tensor_parallel: num_attention_heads is 4, expected a multiple of the group size 3"),
        (["--tp", "2", "--ep", "3"], "--tp 2 --ep 3: expert_parallel: the number of routed experts this rank handles is 8, "
         "expected a multiple of the group size 3"),
        (["--tp", "2", "--checkpoint", "/nonexistent"], "/nonexistent: cannot read model config: no such file"),
    ],
)
def test_parallel_cli_an_error_every_rank_would_hit_is_said_once_before_any_starts(flags, said, dshal_here) -> None:
    """Before, each of the N ranks printed it (N times over) after starting and joining the job."""
    done = dshal_here(*RUN, *flags)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count(said) == 1, done.stderr[-2000:]
    assert done.stderr.count("dshal run") == 1  # "dshal run: error: --tp 3 ...", not "... error: dshal run --tp 3"
    assert "rank 0/" not in done.stdout  # no rank ran


def test_parallel_cli_a_checkpoint_every_rank_refuses_is_said_once(tmp_path: Path) -> None:
    """config.json says 2 heads, the tensors hold 4: one process refuses it, and TP=2 ran it
    as a wrong 2-head model (each rank read half of each 4-head tensor). Each rank now
    refuses its slice, and the refusal is said once (it was said by every rank)."""
    from dshal.model import tiny_args
    from dshal.model.checkpoint import random_checkpoint, save_checkpoint

    args = tiny_args()
    save_checkpoint(tmp_path, args, random_checkpoint(args, 0, 0.05))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(num_attention_heads=args.num_attention_heads // 2, num_key_value_heads=args.num_attention_heads // 2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "dshal", *RUN, "--tp", "2", "--checkpoint", str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = "q_b_proj.weight' has shape"
    assert done.stderr.count(said) == 1 and "(the full tensor, whose rows [" in done.stderr, done.stderr[-3000:]
    assert "rank 0/" not in done.stdout


def test_parallel_cli_a_cache_no_rank_can_hold_is_said_once_with_the_ranks_share() -> None:
    """Each rank checks its own KV cache against its share of the host's free memory (the
    two cpu ranks share it); the refusal they share is said once, by rank 0, not twice."""
    done = subprocess.run(
        [sys.executable, "-m", "dshal", *RUN, "--tp", "2", "--batch", str(10**9)],
        env=_env(), capture_output=True, text=True, timeout=90, check=False,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = "--batch 1000000000 x (--prompt-len 4 + --new-tokens 3) tokens needs a KV cache of"
    assert done.stderr.count(said) == 1, done.stderr[-3000:]
    assert "(the 2 ranks on it share" in done.stderr and "rank 0/" not in done.stdout


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]])
def test_parallel_cli_speculative_mtp_splits_the_mtp_layer_too(tmp_path: Path, layout: list[str], dshal_here) -> None:
    """``--speculative mtp`` under TP (the MTP layer's attention, MoE and vocabulary-parallel
    head split like the others) and EP, two sequences each at its own positions: the tokens
    are the single-process run's, and the run's own check against its eager tokens holds on
    every rank (a rank that kept another draft than its peers would desynchronize the job)."""
    flags = ["run", "--new-tokens", "8", "--prompt-len", "6", "--batch", "2", "--no-progress", "--speculative", "mtp"]
    done = subprocess.run(
        [sys.executable, "-m", "dshal", *flags, *layout, "--json", str(tmp_path / "parallel.json")],
        env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = dshal_here(*flags, "--json", str(tmp_path / "single.json"))  # the single-process run, in this process
    assert alone.returncode == 0, alone.stderr[-3000:]
    parallel, single = (json.loads((tmp_path / name).read_text()) for name in ("parallel.json", "single.json"))
    assert parallel["speculative"]["run"] and parallel["speculative"]["tokens_match_eager"]
    assert parallel["output_ids"] == single["output_ids"]
    # (Not the acceptances: a random MTP layer's logits are near ties, so its drafts may differ
    # with the reduction order of the split; the tokens may not.)


def test_parallel_cli_ranks_started_with_different_settings_are_told_so(tmp_path: Path) -> None:
    """Ranks whose flags or configs differ built different groups (a wrong "peer hung" after the
    whole timeout) or silently computed different models and exited 0. Now the job compares
    every rank's settings first: the lowest rank names each difference and exits 1, the other
    SAID_BY_ANOTHER_RANK."""
    other = tmp_path / "other.yaml"
    other.write_text("distributed:\n  timeout_s: 30\n")
    job = LocalJob([sys.executable, "-m", "dshal", *RUN, "--tp", "2"], 2, env=_env(), capture=True,
                   overrides={1: {"DSHAL_CONFIG": str(other)}})
    with job:
        runs = job.communicate(timeout_s=90)
    assert [code for code, _, _ in runs] == [1, SAID_BY_ANOTHER_RANK], [err[-1500:] for _, _, err in runs]
    said = runs[0][2]
    assert "the ranks were started with different settings: config.distributed.timeout_s: rank 0 300.0, rank 1 30.0" in said
    assert "Traceback" not in said and "different settings" not in runs[1][2]  # said once
    assert job.leaked() == []


def test_parallel_cli_sigterm_to_the_launcher_ends_its_ranks() -> None:
    """`timeout` / `kill` send SIGTERM: the launcher exited 143 and left both ranks generating.
    Its ranks carry its pid (DSHAL_LAUNCHER_PID); none may outlive it."""
    import signal
    import time

    # 4000 new tokens, warm-up included: about two minutes on two cores, far longer than the test.
    launcher = subprocess.Popen([sys.executable, "-m", "dshal", "run", "--new-tokens", "4000", "--prompt-len", "4",
                                 "--no-progress", "--tp", "2"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = f"DSHAL_LAUNCHER_PID={launcher.pid}".encode()

    def ranks() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    try:
        deadline = time.monotonic() + 60
        while len(ranks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(ranks()) == 2, "the ranks did not start"
        time.sleep(2)
        assert launcher.poll() is None
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while ranks() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ranks() == []
    finally:
        launcher.kill()
        for pid in ranks():
            os.kill(pid, signal.SIGKILL)


def test_parallel_cli_a_rank_killed_mid_run_is_named_as_the_first_failure(tmp_path: Path) -> None:
    """The out-of-memory killer ends one rank: the other fails in its next collective with "a peer
    closed its connection", which names no rank. The launcher says which rank died first, and
    how, last on its stderr, and exits 1."""
    import signal
    import time

    # distributed.timeout_s under the launcher's 30 s grace: should rank 0 wait in a collective
    # the closed connection did not end, it says so itself rather than being killed unheard
    config = tmp_path / "dshal.yaml"
    config.write_text("distributed:\n  timeout_s: 25\n")
    launcher = subprocess.Popen([sys.executable, "-m", "dshal", "run", "--new-tokens", "4000", "--prompt-len", "4",
                                 "--no-progress", "--tp", "2", "--config", str(config)],
                                env={**_env(), "PYTHONFAULTHANDLER": "1"},  # a rank's SIGABRT prints its threads' stacks
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Kill rank 1 once the ranks are deep in the run's collectives: their gloo pairs connected
        # (the world group's and the TP group's) and rank 0 has written thousands of times since
        # (gloo's sends: decode steps), not after a fixed sleep, which on a loaded machine landed
        # in the ranks' start.
        ranks, deadline, writes_then = {}, time.monotonic() + 90, None
        while time.monotonic() < deadline:
            ranks = _ranks_of(launcher.pid)
            if len(ranks) == 2 and _tcp_pairs(ranks[0], ranks[1]) >= 2:  # the world group's and tp0's
                writes = _write_calls(ranks[0][0])
                writes_then = writes if writes_then is None else writes_then
                if writes - writes_then >= 3000:
                    break
            time.sleep(0.2)
        assert len(ranks) == 2 and writes_then is not None, f"the ranks did not connect: {ranks}"
        assert _write_calls(ranks[0][0]) - writes_then >= 3000, "rank 0 did not reach its decode steps"
        os.kill(ranks[1][0], signal.SIGKILL)
        # A rank 0 still running 27 s on (under timeout_s 25 and the launcher's 30 s grace, which
        # would kill it unheard) is aborted, so that the failure shows where it waits.
        killed_at = time.monotonic()
        while _running(ranks[0][0], launcher.pid) and time.monotonic() - killed_at < 27:
            time.sleep(0.2)
        if _running(ranks[0][0], launcher.pid):
            os.kill(ranks[0][0], signal.SIGABRT)
        _, err = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode == 1, err[-6000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("dshal: first failure: rank 1 (killed by SIGKILL"), err[-6000:]
    # rank 0's own error: the closed connection, or (a connection gloo did not see close) its timeout, in
    # the words dshal gives it on gloo ("torch said: Operation timed out!" carries no "timed out after")
    assert "a peer closed its connection" in err or "did not answer within distributed.timeout_s" in err, err[-6000:]


def _running(pid: int, parent: int) -> bool:
    """Whether ``pid`` is still ``parent``'s child and not yet exited (a zombie has exited)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False
    return state != "Z" and int(ppid) == parent


def _write_calls(pid: int) -> int:
    """``syscw`` of ``pid`` (/proc/PID/io): its write system calls so far (gloo's sends among them)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/io has no syscw")


def _ranks_of(launcher: int) -> dict[int, tuple[int, int]]:
    """The ranks ``launcher`` started (its children; theirs carry the same environment):
    {RANK: (pid, MASTER_PORT)}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if parent == launcher and b"RANK" in values and b"MASTER_PORT" in values:  # not between fork and exec
            found[int(values[b"RANK"])] = (int(entry.name), int(values[b"MASTER_PORT"]))
    return found


def _tcp_pairs(rank_a: tuple[int, int], rank_b: tuple[int, int]) -> int:
    """How many established TCP connections the two (pid, MASTER_PORT) processes hold both ends
    of, other than the store's (on MASTER_PORT): gloo's pairs between them, one per group."""
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                fields = line.split()
                table[fields[9]] = (fields[1], fields[2], fields[3])  # inode: local, remote, state
        except OSError:
            continue

    def established(pid: int, master_port: int) -> set[tuple[str, str]]:
        store = f":{master_port:04X}"
        ends = set()
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            return ends
        for link in links:
            entry = table.get(link[len("socket:["):-1]) if link.startswith("socket:[") else None
            if entry and entry[2] == "01" and not entry[0].endswith(store) and not entry[1].endswith(store):
                ends.add(entry[:2])
        return ends

    ends_b = established(*rank_b)
    return sum((remote, local) in ends_b for local, remote in established(*rank_a))


@pytest.mark.parametrize(
    ("config", "flags"),
    [
        # split experts and heads with the static (graph) step, the naive cache, chunks and MTP drafts for 3 rows
        ("", ["--tp", "2", "--mla-mode", "naive", "--prefill-chunk", "3", "--graphs", "on", "--speculative", "mtp"]),
        # an attention window past its ring (prompt 20, window 8): graphs and drafts say why they cannot run
        ("attention: {window: 8, global_tokens: 1}\n", ["--ep", "2", "--prefill-chunk", "7", "--graphs", "on",
                                                        "--speculative", "mtp"]),
    ],
    ids=["tp-naive-chunks-graphs-mtp", "ep-window-chunks"],
)
def test_parallel_cli_options_together_keep_the_single_process_tokens(tmp_path: Path, config: str, flags: list[str],
                                                                      dshal_here) -> None:
    """Options that change how the model runs, combined (each is tested alone elsewhere): the
    split run's greedy tokens are the plain single-process run's, its graph and draft runs match
    its own eager tokens or say why they did not run, and its report says what ran."""
    (tmp_path / "dshal.yaml").write_text(f"backend: cpu\n{config}")
    run = ["run", "--config", str(tmp_path / "dshal.yaml"), "--new-tokens", "5", "--prompt-len", "20", "--batch", "3",
           "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "dshal", *run, *flags, "--json", str(tmp_path / "together.json")],
                          env=_env(), capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    plain_run = dshal_here(*run, "--json", str(tmp_path / "plain.json"))  # the single-process run, in this process
    assert plain_run.returncode == 0, plain_run.stderr[-3000:]
    together, plain = (json.loads((tmp_path / name).read_text()) for name in ("together.json", "plain.json"))
    assert together["output_ids"] == plain["output_ids"] and len(plain["output_ids"]) == 5
    assert together["prefill_chunk"] == int(flags[flags.index("--prefill-chunk") + 1]) and together["batch"] == 3
    assert (together["parallel"]["tp"], together["parallel"]["ep"]) == ((2, 1) if "--tp" in flags else (1, 2))
    graphs, drafts = together["graphs"], together["speculative"]
    if config:
        assert not graphs["run"] and "attention window" in graphs["why"] and together["decode_tokens_per_s_graphs"] is None
        assert not drafts["run"] and "attention window" in drafts["why"]
    else:
        assert graphs["run"] and graphs["tokens_match_eager"] and together["decode_tokens_per_s_graphs"] > 0
        assert drafts["run"] and drafts["tokens_match_eager"] and drafts["steps"] + drafts["accepted"] >= 3 * 4
        assert together["model_description"]["kv_cache"]["mode"] == "naive"
