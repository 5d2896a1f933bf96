"""dshal's per-user cache folder: where it is, how its folders are made, and whether a file
found there may be trusted.

The cache holds what dshal builds and then loads or trusts: the cpu backend's C kernels
(``cpu-kernels/``, a shared library it runs), the cross-compile results (``kernels/``) and
the ``dshal tune`` tables (``gemm-tuning/``, which choose GEMM tiles). Every folder dshal
makes there is mode 0700 (:func:`make_private_dir`), and what it loads from there must be
this user's and closed to others' writes (:func:`not_private`): another local user must not
be able to plant code or tables in it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from dshal.errors import ConfigError

try:
    import pwd
except ImportError:  # not on Windows
    pwd = None  # type: ignore[assignment]

#: Where ``tempfile.gettempdir()`` looks before its last resort, the current folder.
_NAMED_TEMP_DIRS = ("/tmp", "/var/tmp", "/usr/tmp")


def _uid() -> int | str:
    return os.getuid() if hasattr(os, "getuid") else "user"


def _usable_home(home: str | None) -> str | None:
    return home if home and os.path.isabs(home) and Path(home) != Path("/") else None


def _home() -> Path | None:
    """This user's home folder: ``$HOME``, else the passwd entry's; None when neither is an
    absolute folder other than ``/`` (``Path.home()`` raised RuntimeError for a uid with no
    passwd entry, and made ``HOME=""`` into ``/``: a cache at the filesystem root)."""
    home = _usable_home(os.environ.get("HOME"))
    if home is None:
        try:
            home = _usable_home(pwd.getpwuid(os.getuid()).pw_dir if pwd is not None else str(Path.home()))
        except (KeyError, RuntimeError):  # no passwd entry: an OpenShift-style random uid
            return None
    return Path(home) if home else None


def _same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def temp_dir() -> Path | None:
    """``tempfile.gettempdir()``, or None when there is no usable one or it is the current
    folder: gettempdir's last resort when /tmp and /var/tmp cannot be written, where a cache
    would land in the user's project (unless TMPDIR, TEMP or TMP names that folder)."""
    try:
        tmp = tempfile.gettempdir()
    except OSError:  # FileNotFoundError: "No usable temporary directory found"
        return None
    named = [os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")] + list(_NAMED_TEMP_DIRS)
    if _same_folder(tmp, os.curdir) and not any(folder and _same_folder(tmp, folder) for folder in named):
        return None
    return Path(tmp)


def cache_dir() -> Path:
    """dshal's per-user cache (built C kernels, cross-compiled kernels, ``dshal tune`` tables):
    ``$DSHAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dshal`` (when absolute, as the XDG spec asks),
    else ``$HOME/.cache/dshal`` (HOME unset, empty, relative or ``/``: the passwd entry's home),
    else, for a user with no home at all, ``dshal-cache-<uid>`` in the temporary folder (made
    there 0700, and refused unless it is a folder of this user's closed to others:
    :func:`_private_temp_cache`). With none of those, a ConfigError naming HOME and
    DSHAL_CACHE_DIR. Nothing else is created here."""
    if os.environ.get("DSHAL_CACHE_DIR"):
        return Path(os.environ["DSHAL_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "dshal"
    home = _home()
    if home is not None:
        return home / ".cache" / "dshal"
    tmp = temp_dir()
    if tmp is not None:
        return _private_temp_cache(tmp / f"dshal-cache-{_uid()}")
    home_var = os.environ.get("HOME")
    raise ConfigError(
        f"dshal's cache folder: environment variable HOME is {'unset' if home_var is None else repr(home_var)}, "
        f"uid {_uid()} has no usable home folder in the passwd database and there is no usable temporary folder; expected "
        "HOME set to your home folder, or DSHAL_CACHE_DIR set to a folder of your own"
    )


def _private_temp_cache(folder: Path) -> Path:
    """``folder``, a predictable name in the shared temporary folder, made 0700 when missing and
    taken only as a real folder of this user's that no one else may write: another local user
    could have made it first, and what dshal keeps under it (a library it loads, the tables it
    trusts) would be theirs to swap, whatever the checks on the files themselves."""
    if not hasattr(os, "getuid"):
        return folder  # no POSIX owners here
    try:
        make_private_dir(folder)
        st = os.lstat(folder)
    except OSError as err:
        why = f"cannot be made ({err.strerror or err})"
    else:
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            why = "is not a folder (a link or a file)"
        elif st.st_uid != os.getuid():
            why = f"belongs to uid {st.st_uid}, not this user ({os.getuid()})"
        elif st.st_mode & 0o022:
            why = f"can be written by others (mode {st.st_mode & 0o7777:o})"
        else:
            return folder
    raise ConfigError(
        f"dshal's cache folder: {folder}, the fallback for a user with no home folder, {why}; expected a folder of "
        "this user's closed to others: set DSHAL_CACHE_DIR to a folder of your own (or HOME)"
    )


def make_private_dir(path: str | Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (whatever the umask: under umask
    000 they were 0777, open to every local user's files), and return it. A folder that
    already exists is left as it is (:func:`not_private` judges it). Raises mkdir's OSError."""
    path = Path(path)
    missing = []
    folder = path
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    return path


def not_private(path: Path) -> str | None:
    """Why ``path`` could hold another user's code or data (a library loaded from a folder
    someone else can write, a predictable name under /tmp, runs theirs; a tile table there
    chooses the kernels), or None. A folder of this user's that others may write (made under
    umask 002: 0775) is closed to 0700 first. Raises stat's or chmod's OSError."""
    if not hasattr(os, "getuid"):
        return None  # no POSIX owners here
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not this user ({os.getuid()})"
    # A folder of this user's an older dshal left group-writable is closed; not one reached
    # through a symlink, nor a setgid one (a deliberately shared folder: its mode is theirs).
    if st.st_mode & 0o022 and path.is_dir() and not path.is_symlink() and not st.st_mode & 0o2000:
        path.chmod(0o700)
        st = path.stat()
    if st.st_mode & 0o022:
        return f"others can write {path} (mode {st.st_mode & 0o7777:o})"
    return None


def not_private_file(path: Path) -> str | None:
    """:func:`not_private` for a file and the folder holding it (a table others could write,
    or put there, would choose the kernels). The file may be group-writable when its folder is
    closed to the group: one written under umask 002 (the default for users with a group of
    their own) in a folder dshal made 0700 can be reached by no one else."""
    why = not_private(path.parent)
    if why or not hasattr(os, "getuid"):
        return why
    st = path.stat()
    group_shut_out = not path.parent.stat().st_mode & 0o010
    if group_shut_out and st.st_uid == os.getuid() and not st.st_mode & 0o002:
        return None
    return not_private(path)


__all__ = ["cache_dir", "make_private_dir", "not_private", "not_private_file", "temp_dir"]
