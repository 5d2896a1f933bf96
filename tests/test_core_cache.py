"""dshal's cache folder (``dshal.cache``): where it is for users without a home, the
temporary folder it may fall back to, and the mode of the folders dshal makes there."""

from __future__ import annotations

import os
import pwd
import tempfile

import pytest

from dshal.cache import cache_dir, make_private_dir, temp_dir
from dshal.errors import ConfigError

posix_only = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes only")


@pytest.fixture
def no_home(tmp_path, monkeypatch):
    """A user as OpenShift runs one (a random uid with no passwd entry) or ``env -i``: no
    HOME, no passwd home; the temporary folder is ``tmp_path / "tmp"``."""
    for name in ("HOME", "DSHAL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


@posix_only
def test_a_user_with_no_home_gets_a_cache_in_the_temporary_folder(no_home, monkeypatch):
    """``Path.home()`` raised RuntimeError("Could not determine home directory") for a uid
    with no passwd entry and HOME unset: the cpu backend failed to load, other commands ended
    in a traceback. And ``HOME=""`` made it ``/``: ``/.cache/dshal`` at the filesystem root."""
    private = no_home / f"dshal-cache-{os.getuid()}"
    assert cache_dir() == private
    monkeypatch.setenv("HOME", "")
    assert cache_dir() == private
    monkeypatch.setenv("HOME", "/")
    assert cache_dir() == private
    monkeypatch.setenv("XDG_CACHE_HOME", str(no_home / "xdg"))  # the XDG folder still wins when set
    assert cache_dir() == no_home / "xdg" / "dshal"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says: not the current folder
    assert cache_dir() == private


@posix_only
def test_a_squatted_temporary_cache_folder_is_refused(no_home):
    """``dshal-cache-<uid>`` has a predictable name in the shared /tmp: another user could make
    it first (0777, theirs) and swap what dshal keeps under it, the C-kernel library it loads
    included. Taken only as this user's folder closed to others; made 0700 when missing."""
    private = no_home / f"dshal-cache-{os.getuid()}"
    assert cache_dir() == private and private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)  # as another user's folder would be (the test cannot own one as another uid)
    with pytest.raises(ConfigError, match=r"dshal-cache-\d+, the fallback for a user with no home folder, can be "
                                          r"written by others \(mode 777\); .*set DSHAL_CACHE_DIR"):
        cache_dir()
    private.rmdir()
    private.symlink_to(no_home)  # a link planted at the name
    with pytest.raises(ConfigError, match=r"is not a folder \(a link or a file\)"):
        cache_dir()


@posix_only
def test_an_empty_home_falls_back_to_the_passwd_home(tmp_path, monkeypatch):
    for name in ("DSHAL_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "")
    fields = list(pwd.getpwuid(os.getuid()))
    fields[5] = str(tmp_path / "home")  # pw_dir
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: pwd.struct_passwd(fields))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dshal"  # was /.cache/dshal


@posix_only
def test_no_home_and_no_temporary_folder_is_a_config_error(no_home, monkeypatch):
    def none_usable() -> str:
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp']")

    monkeypatch.setattr(tempfile, "gettempdir", none_usable)
    with pytest.raises(ConfigError, match=r"environment variable HOME is unset, uid \d+ has no usable home folder.*"
                       r"expected HOME set to your home folder, or DSHAL_CACHE_DIR set"):
        cache_dir()


def test_the_current_folder_is_no_temporary_folder(tmp_path, monkeypatch):
    """``tempfile.gettempdir()`` falls back to the current folder when /tmp and /var/tmp cannot
    be written: the C-kernel cache was built in the user's project (``proj/dshal-cpu-kernels-0``)."""
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(project))  # what gettempdir settled on
    monkeypatch.chdir(tmp_path)
    assert temp_dir() == project
    monkeypatch.chdir(project)
    assert temp_dir() is None
    monkeypatch.setenv("TMPDIR", str(project))  # named on purpose: used
    assert temp_dir() == project


@posix_only
def test_cache_folders_are_made_0700_whatever_the_umask(tmp_path, monkeypatch):
    """Under umask 000 ``~/.cache/dshal``, ``kernels/`` and ``gemm-tuning/`` were made 0777:
    another local user could put a tile table there that dshal then trusted."""
    from dshal.kernels.triton.crosscompile import default_cache_dir, usable_cache_dir
    from dshal.kernels.triton.target import user_tuning_dir
    from dshal.outputs import atomic_write

    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "a" / "cache"))
    old = os.umask(0)
    try:
        folder = user_tuning_dir()
        results = usable_cache_dir(default_cache_dir())  # dshal kernels' result cache
        deep = make_private_dir(tmp_path / "x" / "y" / "z")
        table = atomic_write(folder / "t.json", "{}", private=True)  # what dshal tune writes there
        report = atomic_write(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert folder == tmp_path / "a" / "cache" / "gemm-tuning" and results == folder.parent / "kernels"
    for made in (folder, folder.parent, folder.parent.parent, results, deep, deep.parent, deep.parent.parent):
        assert made.stat().st_mode & 0o777 == 0o700, made
    assert table.stat().st_mode & 0o777 == 0o600 and report.stat().st_mode & 0o777 == 0o666  # a report: the umask's
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    assert make_private_dir(existing) == existing and existing.stat().st_mode & 0o777 == 0o755  # not dshal's to change
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(NotADirectoryError):
        make_private_dir(blocked / "cache")
    with pytest.raises(NotADirectoryError):
        make_private_dir(blocked)
