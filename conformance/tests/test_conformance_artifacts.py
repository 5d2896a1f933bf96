"""Reports, bundles and matrices are artifacts: CI diffs, caches and archives them, and a vendor
sends its bundle to others. The same inputs give the same bytes but for the fields that are
volatile by nature (``started``, ``duration_s``, JUnit ``time`` / ``timestamp``, measured values:
README "Reports are artifacts"), and none of them says more about the machine than the matrix
needs: no secret of the environment, no home folder, no user name."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import pytest

from dshal_conformance import report, runner, waivers
from dshal_conformance.cases.base import crash_site
from dshal_conformance.legs import checked, prepare
from dshal_conformance.matrix import read_reports, to_markdown

FIXTURE = Path(__file__).parent / "fixtures" / "reports" / "nvidia-emulated-3c76802.json"
SECRET = "tok-9f8e7d6c5b4a39281706"
URL_PASSWORD = "pa55-w0rd-xyz"
VOLATILE = {"started", "duration_s"}


def _stable(value: object) -> object:
    """``value`` without its volatile fields (README: reports are artifacts)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _conformance(cwd: Path, home: Path, ops: str, *, hash_seed: str, tz: str, umask: int) -> subprocess.CompletedProcess:
    from dshal.cache import cache_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    # the C kernels already built (another HOME would build them again, seconds per run)
    env.update(DSHAL_CACHE_DIR=str(cache_dir()), HOME=str(home), PYTHONHASHSEED=hash_seed, TZ=tz, LANG="C.UTF-8", MY_SERVICE_API_TOKEN=SECRET)
    (home / "waivers.yaml").write_text(
        "waivers:\n  - match: 'nothing/matches/this'\n    skip: true\n"
        f"    reason: 'tracked at https://ci-bot:{URL_PASSWORD}@issues.example.com/12 (token {SECRET})'\n")
    argv = [sys.executable, "-m", "dshal", "conformance", "--backend", "cpu", "--ops", ops, "--no-collectives", "--quiet",
            "--report-dir", "reports", "--bundle", "bundle", "--waivers", str(home / "waivers.yaml")]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(umask))


def test_two_runs_give_the_same_files_but_for_the_volatile_fields(tmp_path: Path) -> None:
    """Two runs of the same selection (its ops in another order), from other folders, homes,
    hash seeds, time zones and umasks: the same report, JUnit, environment and archive layout;
    neither a secret of the environment nor a password in a waiver's link nor a temporary
    folder in any file."""
    runs = []
    for name, ops, seed, tz, umask in (("a", "rms_norm,quantize_fp8", "1", "UTC", 0o022),
                                      ("b", "quantize_fp8,rms_norm", "2", "Asia/Tokyo", 0o077)):
        cwd, home = tmp_path / name / "work", tmp_path / name / "home"
        cwd.mkdir(parents=True)
        home.mkdir()
        done = _conformance(cwd, home, ops, hash_seed=seed, tz=tz, umask=umask)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(cwd)
    a, b = runs
    rep_a, rep_b = (json.loads((d / "reports" / "cpu.json").read_text()) for d in runs)
    assert _stable(rep_a) == _stable(rep_b)
    assert rep_a["selection"]["ops"] == ["quantize_fp8", "rms_norm"]  # one leg of the matrix, whatever the order given
    assert rep_a["waivers"][0]["source"] == "~/waivers.yaml"
    untimed = lambda d: re.sub(r' (time|timestamp)="[^"]*"', "", (d / "reports" / "cpu.junit.xml").read_text())  # noqa: E731
    assert untimed(a) == untimed(b)
    assert (a / "bundle" / "environment.json").read_bytes() == (b / "bundle" / "environment.json").read_bytes()

    members = []
    for d, rep in ((a, rep_a), (b, rep_b)):
        raw = (d / "bundle.tar.gz").read_bytes()
        assert raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"  # gzip header: no file name, no time
        with tarfile.open(d / "bundle.tar.gz") as tar:
            infos = tar.getmembers()
            assert {i.mtime for i in infos} == {int(datetime.fromisoformat(rep["started"]).timestamp())}
            members.append([(i.name, i.mode, i.uid, i.gid, i.uname, i.gname) for i in infos])
    assert members[0] == members[1] == [(f"bundle/{n}", 0o644, 0, 0, "", "") for n in
                                        ("SHA256SUMS", "cpu.json", "cpu.junit.xml", "environment.json")]

    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "waivers.yaml":
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            for leaked in (SECRET, URL_PASSWORD, str(tmp_path)):
                assert leaked.encode() not in data, f"{path} holds {leaked!r}"


def test_the_bundle_archive_is_a_function_of_its_files(tmp_path: Path) -> None:
    """Packed at another time, from files of other times and modes, by another umask: the same bytes."""
    rep = {"started": "2026-12-07T08:42:07+00:00"}
    archives = []
    for name, when, umask in (("a", 1_000_000_000, 0o022), ("b", 1_700_000_000, 0o077)):
        out_dir = tmp_path / name / "bundle"
        out_dir.mkdir(parents=True)
        (out_dir / "cpu.json").write_text('{"x": 1}\n')
        os.utime(out_dir / "cpu.json", (when, when))
        old = os.umask(umask)
        try:
            archives.append(report.write_bundle(rep, {"device": "cpu"}, [out_dir / "cpu.json"], out_dir).read_bytes())
        finally:
            os.umask(old)
    assert archives[0] == archives[1]


def test_the_environment_names_the_plugins_commit_not_the_working_folders(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``git rev-parse HEAD`` ran in the working folder: a vendor running the suite from any
    other repository (its dotfiles, a monorepo) got that repository's commit in its bundle."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    other = tmp_path / "other-repo"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(other)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    target = runner.resolve("cpu")
    monkeypatch.chdir(other)
    inside = runner.environment(target)["git_commit"]
    monkeypatch.chdir(tmp_path)
    outside = runner.environment(target)["git_commit"]
    assert inside == outside != theirs
    assert runner.source_commit(type(target.runtime.backend)) == inside


def test_a_crash_names_its_file_as_the_module_is_imported() -> None:
    """A crash's reason said ``(at /home/<user>/venv/lib/python3.11/site-packages/...)``."""
    import torch

    from dshal.errors import ShapeError
    from dshal.ops import reference

    with pytest.raises(ShapeError) as raised:
        reference.silu_and_mul(torch.ones(3, 5))  # an odd last dim: refused inside dshal/ops
    site = crash_site(raised.value)
    assert re.fullmatch(r" \(at dshal/ops/\w+\.py:\d+ in \w+\)", site), site


def test_a_waivers_files_source_is_named_from_its_package_or_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "w.yaml"
    path.write_text("waivers:\n  - {match: 'x/*', skip: true, reason: r}\n")
    assert waivers.load(path)[0].source == "~/w.yaml"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site" / "dshal_acme").mkdir(parents=True)
    shipped = tmp_path / "site" / "dshal_acme" / waivers.FILE_NAME
    shutil.copy(path, shipped)
    assert waivers.load(shipped)[0].source == f"dshal_acme/{waivers.FILE_NAME}"


def _partial(rep: dict, ops: list[str]) -> dict:
    out = copy.deepcopy(rep)
    out["selection"] = {"ops": ops, "cases": None, "collectives": True}
    return out


def test_matrix_columns_read_the_same_however_the_report_paths_are_given(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two columns that share a header are told apart by their files: the paths as given
    (``/home/runner/work/...``) made the matrix depend on the runner's folder."""
    rep = report.load(FIXTURE)
    rep.pop("_read_notes")
    for leg, ops, started in (("h100", ["rms_norm"], "2026-12-07T08:42:07+00:00"),
                              ("h200", ["rms_norm", "silu_and_mul"], "2026-12-07T09:00:00+00:00")):
        (tmp_path / leg).mkdir()
        (tmp_path / leg / "nvidia.json").write_text(json.dumps({**_partial(rep, ops), "started": started}))
    monkeypatch.chdir(tmp_path)
    relative = to_markdown(read_reports(["h100/nvidia.json", "h200/nvidia.json"]))
    absolute = to_markdown(read_reports([str(tmp_path / "h200" / "nvidia.json"), str(tmp_path / "h100" / "nvidia.json")]))
    assert relative == absolute
    assert "h100/nvidia.json" in relative and str(tmp_path) not in relative
    from dshal_conformance.matrix import distinct_tails  # lazy: the test above stands without it

    assert distinct_tails(["/w/r/h100/nvidia.json", "r/h200/nvidia.json", "/x/cpu.json"]) == [
        "h100/nvidia.json", "h200/nvidia.json", "cpu.json"]


def test_reports_of_one_leg_started_in_the_same_second_merge_alike_in_any_order() -> None:
    rep = report.load(FIXTURE)
    rep.pop("_read_notes")
    first, second = copy.deepcopy(rep), copy.deepcopy(rep)
    second["duration_s"] = first["duration_s"] + 1
    kept_ab, _ = prepare([first, second])
    kept_ba, _ = prepare([second, first])
    assert kept_ab == kept_ba


def test_an_earlier_suites_ops_in_another_order_are_one_leg() -> None:
    """Reports of earlier suites kept ``--ops`` in the order given."""
    rep = report.load(FIXTURE)
    assert checked(_partial(rep, ["silu_and_mul", "rms_norm"])) == checked(_partial(rep, ["rms_norm", "silu_and_mul"]))


def test_a_report_and_its_junit_hold_no_secret_and_no_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash message with a credential, a path in the home folder: written redacted."""
    monkeypatch.setenv("HOME", "/home/jdoe")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    rep = report.load(FIXTURE)
    rep.pop("_read_notes")
    rep["cases"][0].update(status="error", reason=f"crashed: 401 for https://u:{URL_PASSWORD}@hub.example/x with "
                                                  f"{SECRET} (at /home/jdoe/venv/x.py:3 in f)")
    rep["summary"] = report.summarize(rep["cases"])
    for path in (report.write_json(rep, tmp_path / "r.json"), report.write_junit(rep, tmp_path / "r.junit.xml")):
        text = path.read_text()
        assert SECRET not in text and URL_PASSWORD not in text and "/home/jdoe" not in text, text
        assert "[redacted HF_TOKEN]" in text and "(at ~/venv/x.py:3 in f)" in text
