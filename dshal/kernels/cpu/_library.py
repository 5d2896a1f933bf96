"""Building and loading ``kernels.c``: the system C compiler, the on-disk cache, ctypes.

The library is compiled the first time a kernel is asked for (``-O3 -march=native``, for
the machine it runs on) into ``$DSHAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dshal`` or
``~/.cache/dshal``) under ``cpu-kernels/``, named by a hash of the source, the compiler,
its flags and the CPU, so a changed source or another machine sharing the directory builds
its own. Concurrent processes may build at once: each writes a temporary file and renames
it into place. ``DSHAL_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from dshal.config import cache_dir, env_flag  # one parser for on/off variables: a typo is a ConfigError
from dshal.errors import BackendUnavailableError
from dshal.outputs import atomic_write

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
    "dshal_moe_token_f32": (_C_INT64, [_C_PTR] * 5 + [_C_INT64] * 4 + [_C_PTR, _C_PTR]),
    "dshal_rms_norm_f32": (None, [_C_PTR] * 3 + [ctypes.c_float] + [_C_PTR] * 2 + [_C_INT64] * 2),
    "dshal_moe_gate_f32": (_C_INT64, [_C_PTR] * 2 + [_C_INT64] * 5 + [ctypes.c_float, _C_INT64] + [_C_PTR] * 4),
    "dshal_moe_group_f32": (_C_INT64, [_C_PTR] * 2 + [_C_INT64] * 4 + [_C_PTR] * 4),
    "dshal_moe_combine_f32": (None, [_C_PTR] * 3 + [_C_INT64] * 3 + [_C_PTR]),
    "dshal_rotary_f32": (None, [_C_PTR, _C_INT64, _C_PTR, _C_PTR] + [_C_INT64] * 5 + [_C_PTR]),
    "dshal_fp8_block_gemm_f32": (None, [_C_PTR] * 6 + [_C_INT64] * 4),
    "dshal_moe_token_fp8": (_C_INT64, [_C_PTR] * 7 + [_C_INT64] * 6 + [_C_PTR, _C_PTR]),
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
    # the C library it links against too: a build from a host with a newer glibc (a shared home) does not load
    return "\n".join([platform.machine(), platform.processor(), " ".join(platform.libc_ver()), *sorted(set(wanted))])


def _compiler() -> str | None:
    """``$CC`` (may carry words, e.g. ``ccache gcc``), else the first of cc, gcc, clang on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _not_private(path: Path) -> str | None:
    """Why ``path`` could hold another user's code (a library loaded from a folder someone else
    can write, a predictable name under /tmp, runs theirs), or None. A folder of this user's
    that others may write (made under umask 002: 0775) is closed to 0700 first."""
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


def _writable_dir() -> Path:
    """``cache_dir()/cpu-kernels``, or a per-user temporary directory (mode 0700) when that cannot
    be created; either only when this user owns it and no one else can write it."""
    refused = []
    for candidate in (
        cache_dir() / "cpu-kernels",
        Path(tempfile.gettempdir()) / f"dshal-cpu-kernels-{getattr(os, 'getuid', lambda: 'user')()}",
    ):
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            why = _not_private(candidate) or (None if os.access(candidate, os.W_OK) else f"{candidate} is not writable")
        except OSError as err:
            why = f"{candidate}: {err.strerror or err}"
        if why is None:
            return candidate
        refused.append(why)
    raise OSError(f"no directory for the built kernels that only this user can write: {'; '.join(refused)} "
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


def _build(compiler: str, fresh: bool = False) -> tuple[Path, tuple[str, ...]]:
    """Compile ``kernels.c`` into the cache (atomically: concurrent processes may race), or
    reuse an intact earlier build unless ``fresh``."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_identity().encode()])
        )
        target_dir = _writable_dir()
        target = target_dir / f"dshal_cpu_{key.hexdigest()[:16]}.so"
        if not fresh and target.exists() and _not_private(target) is None and _intact(target):
            return target, flags
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_dir)
        os.close(fd)
        try:
            done = subprocess.run(
                [*shlex.split(compiler), *flags, str(SOURCE), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0:
                with open(tmp, "rb") as built:  # on disk before its name is: no empty file after a power loss
                    os.fsync(built.fileno())
                atomic_write(target.with_suffix(".sha256"), _digest(tmp) + "\n")
                os.replace(tmp, target)
                return target, flags
            errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-400:] or f'exit {done.returncode}'}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError("; ".join(errors))


_LOCK = threading.Lock()


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    with _LOCK:
        reason = _disabled_reason()
        if reason:
            return None, KernelStatus(False, reason)
        compiler = _compiler()
        if compiler is None:
            return None, KernelStatus(False, "no C compiler found (set CC, or install cc/gcc/clang)")
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
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            return None, KernelStatus(False, f"building {SOURCE.name} failed: {exc}")
        return lib, KernelStatus(True, f"{path} ({Path(shlex.split(compiler)[0]).name} {' '.join(flags[:2])})")


def reload() -> KernelStatus:
    """Forget this process's build result and load again, reading ``DSHAL_CPU_KERNELS`` and
    ``CC`` anew (for tests and benchmarks that compare with the kernels on and off)."""
    _load.cache_clear()
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
