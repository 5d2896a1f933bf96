"""Installed without torch_npu (this machine): nothing breaks and the reason is precise.

Subprocess tests run a fresh interpreter, as a user would, so an import side effect in the
plugin could not hide behind modules this test process already loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dshal
from dshal.info import collect
from dshal_ascend import AscendBackend
from dshal_ascend.probe import (
    find_cann,
    float_overflow_mode,
    probe_device_index,
    probe_npu,
    probe_program,
    torch_npu_installed,
    visible_devices,
)

pytestmark = pytest.mark.skipif(torch_npu_installed(), reason="torch_npu is installed here: these tests cover hosts without it")

NOT_INSTALLED = "torch_npu not installed"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False)


def test_ascend_import_torch_dshal_and_dshal_info_in_fresh_process():
    done = _run(
        "import sys, torch, dshal\n"
        "a = {i.name: i for i in dshal.backends()}['ascend']\n"
        "print(a.loaded, a.available, 'torch_npu' in sys.modules)\n"
        "from dshal.cli import main\n"
        "code = main(['info'])\n"
        "print('torch_npu' in sys.modules, code)\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "True False False"  # loaded, unavailable, torch_npu never imported
    assert lines[-1] == "False 0"  # `dshal info` worked and still imported no torch_npu
    assert "ascend" in done.stdout and "torch_npu not" in done.stdout  # the reason is shown


def test_ascend_dshal_info_json_reports_the_reason():
    data = collect()
    ascend = next(b for b in data["backends"] if b["name"] == "ascend")
    assert ascend["loaded"] and not ascend["available"]
    assert NOT_INSTALLED in ascend["reason"]
    assert data["runtime"]["backend"] != "ascend"
    auto = {d["name"]: d for d in data["runtime"]["selection"]}
    if "ascend" in auto:  # listed in `prefer`: passed over with the reason
        assert NOT_INSTALLED in auto["ascend"]["reason"] and not auto["ascend"]["taken"]


def test_ascend_backend_unavailable_in_process():
    backend = AscendBackend()
    avail = backend.availability()
    assert not avail.ok and NOT_INSTALLED in avail.reason
    assert "torch_npu" not in sys.modules
    emulated = AscendBackend(emulate=True).availability()
    assert not emulated.ok and "no CPU emulation" in emulated.reason
    with pytest.raises(dshal.BackendUnavailableError, match=NOT_INSTALLED):
        dshal.use(backend="ascend")


def test_ascend_child_probe_reports_import_failure():
    # The real child-process probe, run where torch_npu is absent: a clean "no", no crash.
    probe = probe_npu(timeout_s=120)
    assert not probe.ok
    assert "import torch_npu failed in a child process" in probe.reason and "torch_npu" in probe.reason


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")


def test_ascend_find_cann_libraries_and_version(tmp_path):
    root = tmp_path / "ascend-toolkit" / "latest"
    env = {"ASCEND_TOOLKIT_HOME": str(root)}
    missing = find_cann(env)
    assert missing.missing == ("libascendcl.so", "libhccl.so") and missing.version is None
    _touch(root / "aarch64-linux" / "lib64" / "libascendcl.so")
    (root / "aarch64-linux" / "ascend_toolkit_install.info").write_text(
        "package_name=Ascend-cann-toolkit\nversion=8.0.RC3\ninnerversion=V100R001C19SPC001\narch=aarch64\n"
    )
    partial = find_cann(env)
    assert partial.missing == ("libhccl.so",) and partial.version == "8.0.RC3"
    hccl_dir = tmp_path / "hccl"
    _touch(hccl_dir / "libhccl.so")
    complete = find_cann({**env, "LD_LIBRARY_PATH": f"/nonexistent:{hccl_dir}"})
    assert complete.missing == ()
    assert complete.found["libhccl.so"] == str(hccl_dir / "libhccl.so")


def test_ascend_cann_found_on_disk_but_off_the_library_path_says_source_set_env(tmp_path):
    """set_env.sh not sourced: the libraries sit under the install root, which LD_LIBRARY_PATH
    does not name, so torch_npu's import cannot load them; the reason must say what to do."""
    root = tmp_path / "ascend-toolkit" / "8.0.0"
    for lib in ("libascendcl.so", "libhccl.so"):
        _touch(root / "lib64" / lib)
    latest = tmp_path / "ascend-toolkit" / "latest"
    latest.symlink_to(root)
    env = {"ASCEND_TOOLKIT_HOME": str(latest)}
    off = find_cann(env)
    assert off.missing == () and off.off_library_path == tuple(str(latest / "lib64" / lib) for lib in ("libascendcl.so", "libhccl.so"))
    assert "not on LD_LIBRARY_PATH" in off.library_path_hint and "set_env.sh" in off.library_path_hint
    # as set_env.sh leaves it (the toolkit's lib64, by its "latest" link or the real folder): no hint
    for listed in (latest / "lib64", root / "lib64"):
        on = find_cann({**env, "LD_LIBRARY_PATH": f"/nonexistent:{listed}"})
        assert on.off_library_path == () and on.library_path_hint == ""
    only_hccl = tmp_path / "hccl"
    _touch(only_hccl / "libhccl.so")
    half = find_cann({**env, "LD_LIBRARY_PATH": str(only_hccl)})
    assert half.off_library_path == (str(latest / "lib64" / "libascendcl.so"),)


def test_ascend_diagnosis_names_set_env_and_the_installed_cann_release(tmp_path):
    """The whole diagnosis in a fresh process, with an installed torch_npu that is only metadata
    (its ``__init__`` raises: it stands for no NPU, computes nothing) and a CANN 8.0.0 tree off
    LD_LIBRARY_PATH: the child probe fails, and the reason says to source set_env.sh and that
    torch_npu 2.5.1 (op-plugin 7.0.0, CANN 8.1.RC1) is planned as 6.0.0, what CANN 8.0.0 has."""
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text("raise ImportError('libascendcl.so: cannot open shared object file')\n")
    (site / "torch_npu-2.5.1.dist-info").mkdir()
    (site / "torch_npu-2.5.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.5.1\n")
    root = tmp_path / "cann"
    for lib in ("libascendcl.so", "libhccl.so"):
        _touch(root / "lib64" / lib)
    (root / "ascend_toolkit_install.info").write_text("version=8.0.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k != "LD_LIBRARY_PATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]), ASCEND_HOME_PATH=str(root))
    code = "from dshal_ascend.probe import diagnose\nprint(diagnose()[0])\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ok=False" in out and "import torch_npu failed in a child process" in out
    assert f"{root / 'lib64' / 'libascendcl.so'}" in out and "not on LD_LIBRARY_PATH" in out and "set_env.sh" in out
    assert "CANN 8.0.0 is installed: planned as op-plugin 6.0.0" in out and "release='6.0.0'" in out


def test_ascend_cann_version_from_version_cfg(tmp_path):
    (tmp_path / "version.cfg").write_text("# version info\nVersion=7.0.0.5.242\n")
    cann = find_cann({"ASCEND_HOME_PATH": str(tmp_path)})
    # shown, but an internal number (7.x for CANN 8.0): never compared with a release's CANN
    assert cann.version == "7.0.0.5.242" and not cann.version_is_release
    (tmp_path / "aarch64-linux").mkdir()  # where a toolkit install keeps its release file, beside version.cfg
    (tmp_path / "aarch64-linux" / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=8.0.RC3\n")
    cann = find_cann({"ASCEND_HOME_PATH": str(tmp_path)})
    assert cann.version == "8.0.RC3" and cann.version_is_release


@pytest.mark.parametrize(
    "raw,want",
    [(None, None), ("", []), ("0,1,2", [0, 1, 2]), (" 4, 6 ", [4, 6]), ("3,x,5", [3])],
)
def test_ascend_visible_devices(raw, want):
    env = {} if raw is None else {"ASCEND_RT_VISIBLE_DEVICES": raw}
    assert visible_devices(env) == want


@pytest.mark.parametrize("local_rank, count, want", [
    (None, 8, 0), ("", 8, 0), ("0", 8, 0), ("5", 8, 5), (" 7 ", 8, 7),
    ("3", 1, 0),  # one NPU visible per rank (ASCEND_RT_VISIBLE_DEVICES per rank): that one
    ("9", 8, 1),  # more ranks than NPUs: the backend's device() refuses it; the probe stays quiet
    ("-1", 8, 0), ("x", 8, 0), ("٣", 8, 0), ("2", 0, 0),
])
def test_ascend_probe_reads_this_ranks_npu(local_rank, count, want):
    """Under torchrun each rank's probe describes its own NPU, not NPU 0 for all eight."""
    assert probe_device_index(local_rank, count) == want


def test_ascend_probe_child_runs_the_same_device_choice():
    program = probe_program()
    assert "get_device_properties(index)" in program and "get_device_name(index)" in program
    assert "(0)" not in program  # no NPU 0 read by every rank
    child: dict = {}
    exec(compile(program.split("import json, os, sys")[0], "<probe head>", "exec"), child)  # its definitions only
    ranks = [None, "", "0", "3", "12", "-1", "x"]
    assert [child["probe_device_index"](r, 8) for r in ranks] == [probe_device_index(r, 8) for r in ranks]


def test_ascend_too_old_torch_npu_is_unavailable_with_reason_before_any_op(tmp_path):
    """An installed torch_npu older than the minimum release (2.4.0 = op-plugin 6.0.rc3): the
    version gate reads its metadata and reports ascend unavailable with the reason; selecting it
    fails with that reason up front, not at the first op. The package here is only metadata plus
    an ``__init__`` that raises if imported: it stands for no NPU and computes nothing, and the
    test also shows the gate never imports torch_npu."""
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text("raise ImportError('dshal must not import torch_npu here')\n")
    dist = site / "torch_npu-2.4.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.4.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    code = (
        "import sys, dshal\n"
        "a = {i.name: i for i in dshal.backends()}['ascend']\n"
        "print(a.loaded, a.available)\n"
        "print(a.reason)\n"
        "try:\n"
        "    dshal.use(backend='ascend')\n"
        "except dshal.BackendUnavailableError as err:\n"
        "    print('refused:', err)\n"
        "print('torch_npu' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "True False"
    assert "op-plugin release 6.0.rc3" in lines[1] and "older than the minimum 6.0.0" in lines[1]
    assert lines[2].startswith("refused: backend 'ascend' is not available: torch_npu 2.4.0")
    assert lines[-1] == "False"  # decided from the version alone


@pytest.mark.parametrize("raw, saturating", [(None, False), ("1", False), ("0", True), (" 0 ", True)])
def test_ascend_float_overflow_mode_says_when_non_finite_rules_cannot_hold(raw, saturating):
    """``INF_NAN_MODE_ENABLE=0`` (saturation: NaN computes to 0) is named in the capability
    notes, since no op can keep the contract's NaN rules then; unset or 1 is IEEE 754."""
    mode = float_overflow_mode({} if raw is None else {"INF_NAN_MODE_ENABLE": raw})
    assert mode.startswith("saturation") is saturating
    assert ("non-finite rules cannot hold" in mode) is saturating
