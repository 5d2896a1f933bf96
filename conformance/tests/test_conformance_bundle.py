"""The submission bundle's ``.tar.gz`` is written atomically: whole, or not at all.

Failures are real ones, not mocks: the file size limit of the writing process (RLIMIT_FSIZE,
the kernel refuses the write with EFBIG mid-archive), and a destination the rename cannot
replace (a directory where the archive goes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dshal_conformance import report

#: A bundle of ~512 KiB of incompressible bytes, written by a process that may not write past
#: ``limit`` bytes per file (the archive's write fails with EFBIG part-way through).
WRITER = """
import os, resource, signal, sys
from pathlib import Path
from dshal_conformance import report

out_dir, limit = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    report.write_bundle({}, {"device": "cpu"}, [out_dir / "payload.bin"], out_dir)
except OSError as err:
    print("refused:", err.errno, err.strerror)
    sys.exit(3)
print("written")
"""


def _bundle_dir(tmp_path: Path) -> Path:
    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "payload.bin").write_bytes(os.urandom(512 * 1024))
    return out_dir


def _write_in_child(out_dir: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(out_dir), str(limit)],
                          capture_output=True, text=True, timeout=120)


def test_bundle_archive_is_whole_after_a_write(tmp_path: Path) -> None:
    out_dir = _bundle_dir(tmp_path)
    done = _write_in_child(out_dir, 64 * 1024 * 1024)
    assert done.returncode == 0, done.stdout + done.stderr
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        payload = tar.extractfile("bundle/payload.bin").read()
    assert {"bundle/payload.bin", "bundle/environment.json", "bundle/SHA256SUMS"} <= names
    assert payload == (out_dir / "payload.bin").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_bundle_archive_failing_mid_write_leaves_the_previous_one(tmp_path: Path) -> None:
    out_dir = _bundle_dir(tmp_path)
    archive = tmp_path / "bundle.tar.gz"
    archive.write_bytes(b"the previous archive")
    done = _write_in_child(out_dir, 128 * 1024)  # the report files fit, the 512 KiB archive does not
    assert done.returncode == 3 and "refused: 27" in done.stdout, done.stdout + done.stderr  # 27: EFBIG
    assert archive.read_bytes() == b"the previous archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.tar.gz"]  # no temporary file left


def test_bundle_archive_failing_mid_write_leaves_no_file(tmp_path: Path) -> None:
    out_dir = _bundle_dir(tmp_path)
    done = _write_in_child(out_dir, 128 * 1024)
    assert done.returncode == 3, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_bundle_archive_unreplaceable_destination_leaves_no_temporary(tmp_path: Path) -> None:
    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "cpu.json").write_text("{}\n")
    (tmp_path / "bundle.tar.gz").mkdir()  # the rename over a directory fails after the whole write
    with pytest.raises(OSError):
        report.write_bundle({}, {"device": "cpu"}, [out_dir / "cpu.json"], out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.tar.gz"]
    assert (tmp_path / "bundle.tar.gz").is_dir() and not any((tmp_path / "bundle.tar.gz").iterdir())


def test_a_reused_bundle_folder_packs_this_runs_files_only(tmp_path: Path) -> None:
    """A folder reused for another backend's bundle packed the earlier run's report too
    (outside SHA256SUMS); its environment file broke `dshal matrix reports/*/*.json`."""
    import json

    from dshal_conformance.matrix import read_reports

    out_dir = tmp_path / "bundle"
    out_dir.mkdir()
    (out_dir / "cpu.json").write_text("{}")  # an earlier run's report
    (out_dir / "ascend.json").write_text("{}")
    archive = report.write_bundle({}, {"device": "npu"}, [out_dir / "ascend.json"], out_dir)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["bundle/SHA256SUMS", "bundle/ascend.json", "bundle/environment.json"]
    env = out_dir / "environment.json"
    assert json.loads(env.read_text())["schema"] == report.ENVIRONMENT_SCHEMA
    warned: list[str] = []
    assert read_reports([str(env)], warn=warned.append) == []
    assert "environment file, not a report" in warned[0]
    assert not report.is_environment_file(out_dir / "cpu.json")


def test_dshal_conformance_bundle_archive_is_checked_before_the_run_and_dot_is_named(tmp_path: Path) -> None:
    """The archive goes beside the folder, where nothing checked it: a directory there was an
    IsADirectoryError traceback after the whole run, and ``--bundle .`` a ValueError ("'.' has
    an empty name")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    argv = [sys.executable, "-m", "dshal", "conformance", "--backend", "cpu", "--ops", "rms_norm", "--no-collectives",
            "--quiet", "--report-dir", str(tmp_path / "reports")]
    (tmp_path / "taken.tar.gz").mkdir()
    blocked = subprocess.run([*argv, "--bundle", str(tmp_path / "taken")], capture_output=True, text=True, timeout=120, env=env)
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr, blocked.stderr[-2000:]
    assert blocked.stderr == f"dshal conformance: error: --bundle's archive: {tmp_path / 'taken.tar.gz'} is a directory, expected a file path\n"
    assert not list((tmp_path / "reports").iterdir())  # refused before the run: no report
    here = tmp_path / "leg"
    here.mkdir()
    dot = subprocess.run([*argv, "--bundle", "."], capture_output=True, text=True, timeout=120, env=env, cwd=here)
    assert dot.returncode == 0, dot.stderr[-2000:]
    with tarfile.open(tmp_path / "leg.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["leg/SHA256SUMS", "leg/cpu.json", "leg/cpu.junit.xml", "leg/environment.json"]
