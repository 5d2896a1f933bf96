"""Is an Ascend NPU usable here? Answered without importing torch_npu into this process.

An installed ``torch_npu`` whose CANN runtime is missing makes ``import torch_npu`` (and,
through torch's device-backend autoload, ``import torch``) fail or abort. So the checks
go from harmless to risky, and stop at the first failure:

1. ``importlib.util.find_spec("torch_npu")`` -- is the package there at all (no import);
2. the CANN shared libraries (``libascendcl.so``, ``libhccl.so``) in ``ASCEND_HOME_PATH``,
   ``ASCEND_TOOLKIT_HOME``, ``LD_LIBRARY_PATH`` or ``/usr/local/Ascend/...``, and the CANN
   version from the toolkit's install-info file -- plain file reads;
3. the installed torch_npu version (package metadata, no import) against the minimum
   supported op-plugin release (:mod:`dshal_ascend.releases`): an older release is reported
   unavailable with the reason, rather than failing at its first kernel call; once the CANN
   version is known, a release wanting a newer CANN steps down to one the installed CANN has
   (:func:`~dshal_ascend.releases.release_for`);
4. only then a child process (``TORCH_DEVICE_BACKEND_AUTOLOAD=0``, with a timeout) that
   imports torch_npu, counts the NPUs and reads the schemas of the kernels the plugin calls
   (``torch.ops.npu.<kernel>``), so the op table follows what is really installed.
   A crash there cannot hurt this process.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from dshal_ascend.releases import KERNELS, ReleaseMatch, release_for, release_of

#: CANN libraries torch_npu needs at import (ACL runtime) and for collectives (HCCL).
REQUIRED_LIBRARIES = ("libascendcl.so", "libhccl.so")
#: Where CANN installs by default (toolkit, and the newer unified ``cann`` layout).
DEFAULT_CANN_ROOTS = (
    "/usr/local/Ascend/ascend-toolkit/latest",
    "/usr/local/Ascend/cann",
    "/usr/local/Ascend/latest",
)
PROBE_TIMEOUT_S = 120.0
#: What puts CANN's libraries on the loader's path (and its Python packages on PYTHONPATH).
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


def probe_device_index(local_rank: str | None, count: int) -> int:
    """The NPU the probe describes: this rank's, ``LOCAL_RANK`` modulo the ``count`` NPUs it
    sees (the backend binds a rank to ``npu:LOCAL_RANK``), so the ranks of a torchrun job do not
    all open NPU 0; 0 without a ``LOCAL_RANK`` that is a non-negative integer (the probe never
    raises: the backend's device() reports a bad one). Runs in the probe's child too."""
    rank = (local_rank or "").strip()
    return int(rank) % count if count > 0 and rank.isascii() and rank.isdecimal() else 0


# Runs in a child process after probe_device_index's source: import torch_npu explicitly
# (autoload disabled), describe this rank's NPU and read the schemas of the kernels named in
# argv[1] (JSON list).
_PROBE_SOURCE = r"""
import json, os, sys
import torch
import torch_npu
out = {"torch_npu": getattr(torch_npu, "__version__", "?"), "count": int(torch.npu.device_count())}
schemas = {}
for kernel in json.loads(sys.argv[1]):
    try:
        packet = getattr(torch.ops.npu, kernel)
        texts = [str(getattr(packet, o)._schema).replace("npu::", "", 1) for o in packet.overloads()]
    except Exception:
        continue
    schemas[kernel] = [t for t in texts if not t.split("(", 1)[0].endswith(".out")]
out["schemas"] = schemas
if out["count"]:
    index = probe_device_index(os.environ.get("LOCAL_RANK"), out["count"])
    props = torch.npu.get_device_properties(index)
    out["name"] = torch.npu.get_device_name(index)
    out["memory"] = int(getattr(props, "total_memory", 0) or 0)
    out["cores"] = int(getattr(props, "cube_core_num", 0) or 0)
try:
    from torch_npu.npu.utils import get_cann_version
    out["cann"] = str(get_cann_version())
except Exception:
    pass
sys.stdout.write("DSHAL_PROBE " + json.dumps(out) + "\n")
"""


@dataclass(frozen=True)
class CannInstall:
    """What the file system says about CANN."""

    #: Directories searched for the libraries, in order.
    searched: tuple[str, ...]
    #: Library name -> path where it was found.
    found: Mapping[str, str] = field(default_factory=dict)
    #: Toolkit version from the install-info file, e.g. ``"8.0.RC3"``; None when unknown.
    version: str | None = None
    #: Whether ``version`` is the release's own (an ``*_install.info`` file), which may decide the
    #: kernel release; ``version.cfg``'s ``Version=`` is an internal number (7.x for CANN 8.0):
    #: shown, never compared.
    version_is_release: bool = False
    #: Found libraries no ``LD_LIBRARY_PATH`` folder holds: the loader may not find them.
    off_library_path: tuple[str, ...] = ()

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(lib for lib in REQUIRED_LIBRARIES if lib not in self.found)

    @property
    def library_path_hint(self) -> str:
        """What to do when libraries were found on disk but not on ``LD_LIBRARY_PATH``, else ""."""
        if not self.off_library_path:
            return ""
        return (f"{', '.join(self.off_library_path)} found, but not on LD_LIBRARY_PATH (CANN's set_env.sh not "
                f"sourced?); {SET_ENV_HINT}")


@dataclass(frozen=True)
class NpuProbe:
    """The child process's answer."""

    ok: bool
    reason: str
    count: int = 0
    name: str = ""
    memory_bytes: int | None = None
    cube_cores: int | None = None
    cann_version: str | None = None
    torch_npu_version: str | None = None
    #: The op-plugin release the torch_npu version belongs to (e.g. ``"7.0.0"``).
    release: str | None = None
    #: Kernel name -> schema strings read from ``torch.ops.npu`` in the child (empty: not read).
    schemas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def cann_roots(env: Mapping[str, str]) -> list[Path]:
    """Candidate CANN install roots, most specific first (env vars, then defaults)."""
    roots = [env.get(var, "") for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")] + list(DEFAULT_CANN_ROOTS)
    seen: list[Path] = []
    for r in roots:
        if r and Path(r) not in seen:
            seen.append(Path(r))
    return seen


def library_dirs(env: Mapping[str, str]) -> list[Path]:
    """Directories where the CANN shared libraries may live."""
    dirs: list[Path] = []
    for root in cann_roots(env):
        dirs += [root / "lib64", root / "runtime" / "lib64"]
        dirs += sorted(root.glob("*-linux/lib64")) if root.is_dir() else []
    dirs += [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


_VERSION_LINE = re.compile(r"^\s*(?:version|Version)\s*=\s*\[?([0-9][0-9A-Za-z.\-_]*)", re.MULTILINE)


def cann_version(env: Mapping[str, str]) -> tuple[str | None, Path | None]:
    """The CANN toolkit version, from ``ascend_toolkit_install.info`` (``version=8.0.RC3``)
    or ``version.cfg`` under an install root, and the file it was read from; (None, None)
    when no such file is readable."""
    for root in cann_roots(env):
        if not root.is_dir():
            continue
        # a release's own version (install-info files) before version.cfg's internal number
        candidates = [root / "ascend_toolkit_install.info", *sorted(root.glob("*-linux/ascend_toolkit_install.info"))]
        candidates += [*sorted(root.glob("*_install.info")), root / "version.cfg"]
        for path in candidates:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            match = _VERSION_LINE.search(text)
            if match:
                return match.group(1), path
    return None, None


def find_cann(env: Mapping[str, str] | None = None) -> CannInstall:
    """Look for the CANN runtime libraries and version (file-system checks only)."""
    env = os.environ if env is None else env
    dirs = library_dirs(env)
    found: dict[str, str] = {}
    for lib in REQUIRED_LIBRARIES:
        for d in dirs:
            path = d / lib
            if path.exists():
                found[lib] = str(path)
                break
    loader_dirs = [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    off_path = tuple(path for lib, path in found.items() if not any((d / lib).exists() for d in loader_dirs))
    version, version_file = cann_version(env)
    return CannInstall(searched=tuple(str(d) for d in dirs), found=found, version=version,
                       version_is_release=version_file is not None and version_file.name.endswith("_install.info"),
                       off_library_path=off_path)


def torch_npu_installed() -> bool:
    """Whether the torch_npu package is importable -- decided without importing it."""
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def visible_devices(env: Mapping[str, str] | None = None) -> list[int] | None:
    """Physical NPU ids listed by ``ASCEND_RT_VISIBLE_DEVICES`` (None: all are visible).

    Logical device ``npu:i`` is physical device ``visible_devices()[i]``, as with
    ``CUDA_VISIBLE_DEVICES``. Parsing stops at the first entry that is not an id (what the
    CANN runtime does with e.g. ``"0,1,x,3"`` is not documented; we do not guess past it).
    """
    env = os.environ if env is None else env
    raw = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if raw is None:
        return None
    ids: list[int] = []
    for part in raw.split(","):
        part = part.strip()
        if not part.isdigit():
            break
        ids.append(int(part))
    return ids


def float_overflow_mode(env: Mapping[str, str] | None = None) -> str:
    """The NPU's floating-point overflow mode as ``INF_NAN_MODE_ENABLE`` sets it (CANN's
    environment reference: 1, the default on Atlas A2/A3, is IEEE 754's Inf/NaN; 0 is
    saturation, where an Inf computes to +-max and a NaN to 0, whatever the op). In
    saturation mode no op can keep the non-finite rules of the op contract (attention's NaN
    rows and columns, quantization's refusals): said in the backend's capability notes."""
    env = os.environ if env is None else env
    if env.get("INF_NAN_MODE_ENABLE", "1").strip() == "0":
        return ("saturation (INF_NAN_MODE_ENABLE=0): Inf computes to +-max and NaN to 0, so the ops' "
                "non-finite rules cannot hold")
    return "Inf/NaN, IEEE 754 (INF_NAN_MODE_ENABLE unset or 1)"


def probe_program() -> str:
    """The child's program: :func:`probe_device_index` as written here, then the probe."""
    return inspect.getsource(probe_device_index) + _PROBE_SOURCE


def probe_npu(timeout_s: float = PROBE_TIMEOUT_S, env: Mapping[str, str] | None = None) -> NpuProbe:
    """Import torch_npu in a child process and count the visible NPUs. Never raises."""
    child_env = dict(os.environ if env is None else env)
    child_env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe_program(), json.dumps(list(KERNELS))],
            env=child_env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        return NpuProbe(False, f"probing torch_npu in a child process timed out after {timeout_s:.0f} s")
    except OSError as err:
        return NpuProbe(False, f"could not start the torch_npu probe: {err}")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("DSHAL_PROBE ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return NpuProbe(False, f"import torch_npu failed in a child process (exit {done.returncode}): {tail}")
    data = json.loads(line[len("DSHAL_PROBE "):])
    schemas = {k: tuple(v) for k, v in (data.get("schemas") or {}).items()}
    common = dict(cann_version=data.get("cann"), torch_npu_version=data.get("torch_npu"), schemas=schemas)
    if not data.get("count"):
        shown = os.environ.get("ASCEND_RT_VISIBLE_DEVICES") if env is None else env.get("ASCEND_RT_VISIBLE_DEVICES")
        hint = f" (ASCEND_RT_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        return NpuProbe(False, f"no NPU visible{hint}", **common)
    return NpuProbe(
        True, f"{data['count']} NPU(s), {data.get('name', '?')}", count=int(data["count"]), name=data.get("name", ""),
        memory_bytes=data.get("memory") or None, cube_cores=data.get("cores") or None, **common,
    )


def installed_torch_npu_version() -> str | None:
    """The installed torch_npu distribution's version, from its metadata (no import)."""
    try:
        return metadata.version("torch_npu")
    except metadata.PackageNotFoundError:
        return None


def release_gate(torch_npu_version: str | None) -> tuple[NpuProbe | None, ReleaseMatch | None]:
    """Check 3: an unavailable NpuProbe saying why when the version is older than the minimum
    release (or not understood); ``(None, match)`` when it may go on."""
    if torch_npu_version is None:  # metadata missing (e.g. a source build): the child probe decides
        return None, None
    match = release_of(torch_npu_version)
    if not match.supported:
        return NpuProbe(False, match.reason, torch_npu_version=torch_npu_version,
                        release=match.release.name if match.release else None), match
    return None, match


def diagnose(
    env: Mapping[str, str] | None = None, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[NpuProbe, CannInstall | None]:
    """Run checks 1-4 (module docstring), stopping at the first that fails."""
    if not torch_npu_installed():
        return NpuProbe(False, "torch_npu not installed (install dshal-ascend's npu extra on an NPU host)"), None
    too_old, match = release_gate(installed_torch_npu_version())
    if too_old is not None:
        return too_old, None
    cann = find_cann(env)
    if cann.missing:
        where = ", ".join(cann.searched[:4]) + (" ..." if len(cann.searched) > 4 else "")
        reason = (
            f"torch_npu present but CANN runtime missing ({', '.join(cann.missing)} not found in {where}); "
            f"{SET_ENV_HINT}"
        )
        return NpuProbe(False, reason), cann
    probe = probe_npu(timeout_s, env)
    if not probe.ok and cann.library_path_hint:  # e.g. torch_npu's import could not load libascendcl
        probe = replace(probe, reason=f"{probe.reason}; {cann.library_path_hint}")
    if match is None and probe.torch_npu_version:  # version known only from the child
        too_old, match = release_gate(probe.torch_npu_version)
        if too_old is not None:
            return too_old, cann
    version = probe.cann_version or cann.version
    # torch_npu's own answer, or an install-info file's: a version.cfg number is not a release's
    compared = probe.cann_version or (cann.version if cann.version_is_release else None)
    if match is not None:  # the installed CANN may be older than the torch_npu's release wants
        match = release_for(match.torch_npu, compared)
        if not match.supported:
            return NpuProbe(False, match.reason, torch_npu_version=match.torch_npu, cann_version=version,
                            release=match.release.name if match.release else None), cann
    release = match.release.name if match and match.release else None
    suffix = f"; CANN {version}" if version else ""
    suffix += f"; torch_npu {match.torch_npu}: {match.reason}" if match else ""
    return replace(probe, reason=probe.reason + suffix, cann_version=version, release=release), cann
