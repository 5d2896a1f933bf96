"""Building and loading ``kernels.c``: the system C compiler, the on-disk cache, ctypes.

The library is compiled the first time a kernel is asked for (``-O3 -march=native``, for
the machine it runs on) into ``$DSHAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dshal`` or
``~/.cache/dshal``) under ``cpu-kernels/``, named by a hash of the source, the compiler,
its flags and the CPU, so a changed source or another machine sharing the directory builds
its own. Where that folder cannot be made, is not this user's alone, or is full, a per-user
folder in the temporary folder serves; an intact build in a read-only cache folder is loaded
as it is. Concurrent processes may build at once: each writes a temporary file and renames
it into place. ``DSHAL_CPU_KERNELS=0`` turns the kernels off; so does any failure to build or
load them, with the reason (:func:`status`): the cpu backend serves with torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dshal.cache import cache_dir, make_private_dir, not_private, temp_dir
from dshal.config import env_flag  # one parser for on/off variables: a typo is a ConfigError
from dshal.errors import BackendUnavailableError, DshalError
from dshal.outputs import atomic_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
#: Tried in order: the first that compiles is used (``-march=native`` may be unknown to a compiler).
FLAG_SETS = (
    ("-O3", "-march=native", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared"),
    ("-O3", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared"),
)
_C_INT64, _C_PTR = ctypes.c_int64, ctypes.c_void_p
#: name -> (restype, argtypes) of every exported kernel.
SIGNATURES = {
    "dshal_gemv_f32": (None, [_C_PTR, _C_PTR, _C_PTR, _C_PTR, _C_INT64, _C_INT64, _C_INT64]),
    "dshal_moe_tokens_f32": (_C_INT64, [_C_PTR] * 5 + [_C_INT64] * 5 + [_C_PTR] * 4),
    "dshal_rms_norm_f32": (None, [_C_PTR] * 3 + [ctypes.c_float] + [_C_PTR] * 2 + [_C_INT64] * 2),
    "dshal_moe_gate_f32": (_C_INT64, [_C_PTR] * 2 + [_C_INT64] * 5 + [ctypes.c_float, _C_INT64] + [_C_PTR] * 4),
    "dshal_moe_group_f32": (_C_INT64, [_C_PTR] * 2 + [_C_INT64] * 4 + [_C_PTR] * 4),
    "dshal_moe_combine_f32": (_C_INT64, [_C_PTR] * 3 + [_C_INT64] * 3 + [_C_PTR]),
    "dshal_rotary_f32": (None, [_C_PTR, _C_INT64, _C_PTR, _C_PTR] + [_C_INT64] * 5 + [_C_PTR]),
    "dshal_fp8_block_gemm_f32": (None, [_C_PTR] * 6 + [_C_INT64] * 4),
    "dshal_moe_tokens_fp8": (_C_INT64, [_C_PTR] * 7 + [_C_INT64] * 7 + [_C_PTR] * 4),
    "dshal_fp8_fake_quant_rows": (None, [_C_PTR] + [_C_INT64] * 5 + [_C_PTR]),
}
#: The FP8 formats the FP8 kernels read: E4M3 (DeepSeek-V3's) and AMD's E4M3 FNUZ -> the kernels' fnuz flag.
FP8_E4M3 = {torch.float8_e4m3fn: 0, torch.float8_e4m3fnuz: 1}


@dataclass(frozen=True)
class KernelStatus:
    """Whether the C kernels are usable here: ``detail`` is the library path and the
    compiler, or the reason they are not."""

    available: bool
    detail: str


def _disabled_reason() -> str | None:
    raw = os.environ.get("DSHAL_CPU_KERNELS", "").strip().lower()
    return None if env_flag("DSHAL_CPU_KERNELS", True) else f"disabled by DSHAL_CPU_KERNELS={raw}"


def _cpu_identity() -> str:
    """The CPU the library is built for (``-march=native``): model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    if sys.platform == "darwin":  # no /proc: the chip's name (an M1 cannot run an M3 -march=native build)
        wanted.append(_command_output(["sysctl", "-n", "machdep.cpu.brand_string"]))
    # the C library it links against too: a build from a host with a newer glibc (a shared home) does not load
    return "\n".join([platform.machine(), platform.processor(), " ".join(platform.libc_ver()), *sorted(set(wanted))])


def _command_output(command: list[str]) -> str:
    """What ``command`` prints, "" when it cannot run or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _compiler() -> str | None:
    """``$CC`` (may carry words, e.g. ``ccache gcc``), else the first of cc, gcc, clang on PATH.
    On macOS /usr/bin's compilers are stubs until the Command Line Tools are installed (they
    open an installer dialog): those count only when ``xcode-select -p`` names the tools."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found and not _apple_stub(found):
            return found
    return None


def _apple_stub(compiler: str) -> bool:
    """Whether ``compiler`` is one of macOS's /usr/bin stubs with no Command Line Tools behind it."""
    return sys.platform == "darwin" and compiler.startswith("/usr/bin/") and not _command_output(["xcode-select", "-p"])


#: A folder that has no room for the build (full, over quota, read-only): the next one is tried.
_NO_ROOM = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS)


def _temp_candidate() -> Path:
    tmp = temp_dir()
    if tmp is None:
        raise OSError("none writable (the current folder, tempfile's last resort, is not used)")
    return tmp / f"dshal-cpu-kernels-{getattr(os, 'getuid', lambda: 'user')()}"


def _cache_folders(refused: list[str]) -> Iterator[tuple[Path, bool]]:
    """The folders the library may be kept in, best first, each with whether this process can
    write it: ``cache_dir()/cpu-kernels``, then a per-user temporary folder; a missing one is
    made (mode 0700) when reached (lazily: the temporary one only when the first will not do);
    either only when this user owns it and no one else can write it. A read-only one is yielded
    too: an intact build in it (baked into an image) is loaded from there. Why one is refused
    goes to ``refused``."""
    for where, candidate in (("dshal's cache folder", lambda: cache_dir() / "cpu-kernels"),
                             ("the temporary folder", _temp_candidate)):
        try:  # naming the folder may fail too: cache_dir() of a user with no home and no /tmp
            folder = candidate()
            where = str(folder)
            if not folder.is_dir():
                make_private_dir(folder)
            why = not_private(folder)
        except OSError as err:
            why = f"{where}: {err.strerror or err}"
        except Exception as err:  # the next folder may do
            why = str(err) if isinstance(err, DshalError) else f"{where}: {type(err).__name__}: {err}"
        if why is None:
            yield folder, os.access(folder, os.W_OK | os.X_OK)
        else:
            refused.append(why)


def _no_folder(reasons: list[str]) -> OSError:
    return OSError(f"no folder with room for the built kernels that only this user can write: {'; '.join(reasons)} "
                   "(set DSHAL_CACHE_DIR to a folder of your own)")


def _digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether the cached ``target`` is the file its build wrote: its ``.sha256`` beside it
    matches. A truncated or emptied file (a crash or power loss mid-write) would otherwise be
    mapped as it is: SIGBUS, or the kernels off for good."""
    try:
        return _digest(target) == target.with_suffix(".sha256").read_text().strip()
    except OSError:
        return False


def _reusable(target: Path) -> bool:
    """Whether ``target`` is an earlier build to load: this user's, closed to others, intact."""
    try:
        return target.exists() and not_private(target) is None and _intact(target)
    except OSError:
        return False


#: Builds write here first, then rename; a process killed mid-build (Ctrl-C during the first
#: run: the build thread is dropped at exit) leaves one behind.
BUILD_TEMP_PREFIX = ".dshal-build-"
#: Older than this, a build's temporary file is an orphan: a build takes at most the compiler's
#: 120 s timeout, so a concurrent process's file is younger.
ORPHAN_AGE_S = 600.0


def _sweep_orphans(folder: Path) -> None:
    """Remove build temporaries in ``folder`` that no running build can own (see ORPHAN_AGE_S);
    ``tmp*.so`` are those of releases that named them so. Run when a build starts and when an
    earlier one is reused (a rerun soon after Ctrl-C finds the orphan young, then reuses the build
    for good). Best effort: a read-only folder, or another process sweeping the same file."""
    now = time.time()
    for leftover in [*folder.glob(f"{BUILD_TEMP_PREFIX}*.so"), *folder.glob("tmp*.so")]:
        try:
            if now - leftover.stat().st_mtime > ORPHAN_AGE_S:
                leftover.unlink()
        except OSError:
            pass


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile ``kernels.c`` into ``target`` through a temporary file and a rename (concurrent
    processes may race): None when built, else the compiler's complaint. A folder with no room
    (a full disk, a quota, read-only) raises OSError with that errno, whoever found it. Orphaned
    temporaries of killed builds are swept first."""
    _sweep_orphans(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=BUILD_TEMP_PREFIX, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*shlex.split(compiler), *flags, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C"},  # untranslated messages: a full disk is told by its strerror
        )
        if done.returncode != 0:
            complaint = done.stderr.strip()
            for code in _NO_ROOM:
                if os.strerror(code) in complaint:
                    raise OSError(code, f"{os.strerror(code)} ({compiler} {' '.join(flags)}: {complaint[-200:]})")
            return f"{compiler} {' '.join(flags)}: {complaint[-400:] or f'exit {done.returncode}'}"
        with open(tmp, "rb") as built:  # on disk before its name is: no empty file after a power loss
            os.fsync(built.fileno())
        atomic_write(target.with_suffix(".sha256"), _digest(tmp) + "\n")
        os.replace(tmp, target)
        return None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # renamed into place
            pass


def _build(compiler: str, fresh: bool = False) -> tuple[Path, tuple[str, ...]]:
    """Reuse an intact earlier build (unless ``fresh``: it did not load), else compile
    ``kernels.c`` into the first cache folder this process can write. An earlier build is looked
    for in that folder and in the read-only ones before it (a build baked into an image). The
    flag sets are tried in order; a folder with no room is left after its first failure for the
    next one (a full disk made every start compile and fail twice)."""
    source = SOURCE.read_bytes()
    refused: list[str] = []
    folders = _cache_folders(refused)  # made as they are reached: the temporary one only when needed
    reached: list[Path] = []
    folder: Path | None = None  # where builds go
    errors: list[str] = []
    told = False
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_identity().encode()])
        )
        name = f"dshal_cpu_{key.hexdigest()[:16]}.so"
        for earlier in [] if fresh else reached:
            if _reusable(earlier / name):
                _sweep_orphans(earlier)
                return earlier / name, flags
        while True:
            if folder is None:
                following = next(folders, None)
                if following is None:
                    break
                reached.append(following[0])
                if not fresh and _reusable(following[0] / name):
                    _sweep_orphans(following[0])  # a build killed before this one finished left its file
                    return following[0] / name, flags
                if not following[1]:
                    refused.append(f"{following[0]} is not writable")
                    continue
                folder = following[0]
            if not told:  # the first run waits seconds here, silent otherwise (the dshal CLI shows it at a terminal)
                log.info("dshal: compiling the cpu backend's C kernels for this CPU into %s (first use only)", folder)
                told = True
            try:
                complaint = _compile(compiler, flags, folder / name)
            except OSError as err:
                if err.errno not in _NO_ROOM:
                    raise
                errors.append(f"{folder}: {err.strerror}")
                folder = None  # the next folder, same flags
                continue
            if complaint is None:
                return folder / name, flags
            errors.append(complaint)
            break  # the compiler's own failure: the next flag set, in the same folder
    if folder is None:
        raise _no_folder(errors + refused)
    raise OSError("; ".join(errors))


class _Loaded:
    """This process's load result, once. A plain attribute, not ``functools.cache``: the backend
    asks for it inside ops that ``torch.compile`` traces, and dynamo warns about (and traces
    through) any functools cache it meets."""

    lock = threading.Lock()
    result: tuple[ctypes.CDLL | None, KernelStatus] | None = None


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    result = _Loaded.result
    if result is None:
        with _Loaded.lock:
            if _Loaded.result is None:  # another thread may have loaded it while this one waited
                _Loaded.result = _build_and_load()
            result = _Loaded.result
    return result


def _build_and_load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    reason = _disabled_reason()
    if reason:
        return None, KernelStatus(False, reason)
    if sys.platform == "win32":  # the build is POSIX (cc -shared -fPIC, a .so through ctypes)
        return None, KernelStatus(False, "not built on Windows (the pure torch paths serve)")
    compiler = _compiler()
    if compiler is None:
        hint = "xcode-select --install, or set CC" if sys.platform == "darwin" else "set CC, or install cc/gcc/clang"
        return None, KernelStatus(False, f"no C compiler found ({hint})")
    try:
        path, flags = _build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            if "failed to map segment" in str(err) and _intact(path):  # the build's bytes, refused by the folder
                raise OSError(f"{err} (is {path.parent} on a noexec mount? set DSHAL_CACHE_DIR elsewhere)") from err
            path, flags = _build(compiler, fresh=True)  # damaged or built elsewhere: build again, once
            lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, subprocess.SubprocessError) as exc:
        return None, KernelStatus(False, f"building {SOURCE.name} failed: {exc}")
    except Exception as exc:  # whatever else fails (the cache, ctypes), the backend runs with the kernels off
        return None, KernelStatus(False, f"building {SOURCE.name} failed: {type(exc).__name__}: {exc}")
    return lib, KernelStatus(True, f"{path} ({Path(shlex.split(compiler)[0]).name} {' '.join(flags[:2])})")


def reload() -> KernelStatus:
    """Forget this process's build result and load again, reading ``DSHAL_CPU_KERNELS`` and
    ``CC`` anew (for tests and benchmarks that compare with the kernels on and off)."""
    with _Loaded.lock:
        _Loaded.result = None
    return status()


def status() -> KernelStatus:
    """Build (once per process) and report whether the kernels are usable."""
    return _load()[1]


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when :func:`status` says it is unavailable."""
    return _load()[0]


def require_library() -> ctypes.CDLL:
    """The loaded kernel library; BackendUnavailableError with the reason when there is none."""
    lib, state = _load()
    if lib is None:
        raise BackendUnavailableError(f"dshal cpu kernels are unavailable: {state.detail}")
    return lib
