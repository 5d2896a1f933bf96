"""dshal.outputs: a file written through atomic_output is replaced whole or left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dshal import outputs
from dshal.errors import ArgumentError
from dshal.outputs import atomic_output, atomic_write, check_writable


def test_atomic_output_replaces_the_file_when_the_block_ends(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "r.json", "old\n")
    with atomic_output(target) as f:
        f.write(b"new ")
        assert target.read_text() == "old\n"  # readers still see the previous file mid-write
        f.write(b"report\n")
    assert target.read_text() == "new report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_atomic_output_interrupted_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "r.json", "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as f:
        f.write(b"half a rep")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_check_writable_names_a_file_that_stands_where_a_folder_should(tmp_path: Path) -> None:
    """``--json afile/out.json`` said "cannot write to afile (File exists); expected a writable
    folder": the path names a file as a folder."""
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile" / "out.json", tmp_path / "afile" / "deeper" / "out.json"):
        with pytest.raises(ArgumentError, match=r"--json: .*afile is a file, expected a folder to hold"):
            check_writable(path, "--json")
    assert check_writable(tmp_path / "new" / "out.json", "--json") == tmp_path / "new" / "out.json"


def test_reading_the_umask_leaves_it_alone_for_other_threads():
    """The umask was read by setting it to 022 and back: for that instant a file another thread
    made got 022's mode. On Linux it is read from /proc, never set."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status: the umask can only be read by setting it")
    set_to = []
    real = os.umask

    def watching(mask: int) -> int:
        set_to.append(mask)
        return real(mask)

    was = real(0o027)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "umask", watching)
            assert outputs._umask() == 0o027
        assert set_to == []
    finally:
        real(was)
