"""KernelTarget, the interpreter switch and lazy imports of the Triton kernel package."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dshal
from dshal.kernels.triton.target import (
    SHIPPED_TARGETS,
    TILES_DIR,
    KernelTarget,
    TileConfig,
    read_target,
    shipped_target,
)


def test_targets_describe_their_hardware():
    hopper, gfx942, gfx950, interp = (
        shipped_target("nvidia-sm90"),
        shipped_target("amd-gfx942"),
        shipped_target("amd-gfx950"),
        KernelTarget.interpreter(),
    )
    assert hopper.warp_size == 32 and gfx942.warp_size == gfx950.warp_size == 64
    assert hopper.fp8_e4m3 == gfx950.fp8_e4m3 == torch.float8_e4m3fn
    assert gfx942.fp8_e4m3 == torch.float8_e4m3fnuz
    fnuz = torch.float8_e4m3fnuz  # tl.float8e4b8 dots: gfx942 only
    assert gfx942.dot_takes(fnuz) and not hopper.dot_takes(fnuz) and not gfx950.dot_takes(fnuz)
    assert not gfx942.dot_takes(torch.float8_e4m3fn) and hopper.dot_takes(torch.float8_e4m3fn)
    assert hopper.dot_takes(torch.bfloat16)  # non-FP8 operands always go straight to tl.dot
    assert {t.num_warps for t in hopper.gemm_tiles} == {4, 8}
    assert all(t.waves_per_eu is not None and t.matrix_instr_nonkdim == 16 for t in gfx942.gemm_tiles)
    assert all(t.waves_per_eu is None and t.matrix_instr_nonkdim is None for t in hopper.gemm_tiles)
    assert len(interp.gemm_tiles) == 1 and not interp.bf16_dot
    assert KernelTarget.interpreter(torch.float8_e4m3fnuz).dot_takes(torch.float8_e4m3fnuz)
    assert torch.float8_e4m3fnuz not in hopper.fp8_dtypes and torch.float8_e4m3fnuz in gfx942.fp8_dtypes
    assert hash(hopper) == hash(shipped_target("nvidia-sm90"))  # frozen: usable as a cache key


def test_shipped_tables_are_data_keyed_by_target_name():
    assert set(SHIPPED_TARGETS) == {
        "nvidia-sm90", "nvidia-sm89", "nvidia-sm100", "nvidia-sm120", "amd-gfx942", "amd-gfx950", "generic"
    }
    assert all(name == target.name for name, target in SHIPPED_TARGETS.items())
    assert not hasattr(KernelTarget, "nvidia_hopper") and not hasattr(KernelTarget, "amd_gfx942")  # no vendor factories
    with pytest.raises(dshal.ConfigError, match=r"'name' is 'sm_90'.*expected one of amd-gfx942"):
        shipped_target("sm_90")
    assert any("wgmma needs 64 rows" in note for note in shipped_target("nvidia-sm90").notes)  # the why, kept


def test_tile_table_files_are_checked(tmp_path):
    good = json.loads((TILES_DIR / "amd-gfx942.json").read_text())
    for change, fragment in [
        ({"warp_sise": 64}, r"unknown keys \['warp_sise'\]"),
        ({"fp8_dot_dtypes": ["float8_e4m3"]}, "fp8_dot_dtypes holds 'float8_e4m3'"),
        ({"schema": "other/1"}, "schema is not"),
    ]:
        path = tmp_path / "t.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=fragment):
            read_target(path)


def test_tile_kwargs_carry_amd_knobs_only_when_set():
    assert TileConfig(64, 128).kernel_kwargs() == {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "SPLIT_K": 1}
    amd = TileConfig(128, 128, waves_per_eu=2, matrix_instr_nonkdim=16).kernel_kwargs()
    assert amd["waves_per_eu"] == 2 and amd["matrix_instr_nonkdim"] == 16


@pytest.mark.parametrize("change, fragment", [
    (dict(warp_size=48), "warp_size is 48"),
    (dict(fp8_e4m3=torch.float16), "fp8_e4m3 is torch.float16"),
    (dict(gemm_tiles=()), "gemm_tiles is empty"),
    (dict(moe_block_k=96), "moe_block_k is 96"),
    (dict(fp8_dot_dtypes=(torch.float8_e4m3fnuz,)), "must hold fp8_e4m3"),
])
def test_target_rejects_inconsistent_fields(change, fragment):
    with pytest.raises(ValueError, match=fragment):
        KernelTarget(name="bad", **change)


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import dshal, dshal.kernels, dshal.kernels.triton as kt
    from dshal.kernels.triton.target import shipped_target
    shipped_target("nvidia-sm90").gemm_tiles
    report = {"triton_after_import": "triton" in sys.modules}
    if sys.argv[1] == "late":
        import triton  # imported before the interpreter was asked for
        try:
            kt.ensure_interpreter_if_cpu("cpu")
            report["late"] = "no error"
        except dshal.DshalError as err:
            report["late"] = type(err).__name__ + ": " + str(err)
    else:
        report["on"] = kt.ensure_interpreter_if_cpu("cpu")
        from dshal.kernels.triton.norm import rms_norm
        y = rms_norm(torch.ones(2, 8), torch.full((8,), 2.0), eps=0.0)
        report["norm_ok"] = bool((y == 2.0).all())
    print(json.dumps(report))
    """
)


def run_script(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_interpreter_switch_and_lazy_triton_import():
    report = run_script("early")
    assert report == {"triton_after_import": False, "on": True, "norm_ok": True}
    report = run_script("late")
    assert report["triton_after_import"] is False
    assert report["late"].startswith("BackendUnavailableError")
    assert "triton was imported before TRITON_INTERPRET=1" in report["late"]


@pytest.mark.parametrize(
    ("env", "gpu_present", "expected"),
    [
        (None, False, None),  # a CPU machine: the interpreter
        ("", False, None),  # empty counts as unset
        (None, True, "a GPU is present"),
        ("1", True, None),  # asked for on a GPU machine: the emulated tests run there too
        ("0", False, "TRITON_INTERPRET=0 in the environment"),
        ("false", True, "TRITON_INTERPRET=false in the environment"),
    ],
)
def test_compiled_mode_reason(monkeypatch, env, gpu_present, expected):
    from dshal.kernels.triton import compiled_mode_reason

    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    why = compiled_mode_reason(gpu_present=gpu_present)
    if expected is None:
        assert why is None
    else:
        assert expected in why
        assert "TRITON_INTERPRET=1 runs" in why if gpu_present and not env else "Triton runs compiled" in why


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_a_compiled_mode_session_collects_everything_and_skips_the_emulated_tests():
    """What ``pytest`` does on a GPU machine (compiled mode), shown on this CPU by choosing
    compiled mode with TRITON_INTERPRET=0: no test module switches the mode at import, so
    nothing errors at collection, and the interpreter tests skip with the session's reason."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist"]

    collected = subprocess.run([*run, "--collect-only"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert " error" not in collected.stdout.splitlines()[-1], collected.stdout[-3000:]

    modules = ["tests/test_kernels_quant.py", "plugins/nvidia/tests/test_nvidia_emulated_like_hopper.py"]
    ran = subprocess.run([*run, "-rs", *modules], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    summary = ran.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "TRITON_INTERPRET=0 in the environment: Triton runs compiled" in ran.stdout


@pytest.mark.parametrize(("field", "value"), [("group_m", 0), ("group_m", -1), ("num_stages", 0), ("block_m", 48)])
def test_a_tile_that_cannot_launch_is_refused(field, value):
    """group_m 0 returned uninitialised memory and -1 wrote out of bounds (heap corruption),
    from a tile given to fp8_block_gemm(tile=) or read from a hand-edited tuned table."""
    with pytest.raises(ValueError, match=f"TileConfig: {field} is {value}"):
        TileConfig(**{"block_m": 64, "block_n": 64, field: value})


def test_kernel_commands_refuse_a_triton_older_than_supported(monkeypatch):
    """``dshal kernels`` on Triton 3.0-3.5 died in a compile worker (``cannot import name
    'knobs'``); it and ``dshal tune`` name the floor now."""
    import dshal.kernels.triton as kernels

    monkeypatch.setattr(kernels, "installed", lambda package: "3.0.0")
    with pytest.raises(dshal.BackendUnavailableError, match=r"dshal kernels: needs triton>=3.6, found 3.0.0"):
        kernels.require_triton("dshal kernels")
    monkeypatch.setattr(kernels, "installed", lambda package: "3.6.0")
    kernels.require_triton("dshal kernels")  # the GPU machine's


@pytest.fixture
def user_tables(tmp_path, monkeypatch):
    """The user's tuning folder in a fresh cache, with tuned_tables' memory and the warnings
    already given forgotten; tuned_tables is cleared again after the test."""
    from dshal.kernels.triton import target

    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(target, "_WARNED", set())
    target.tuned_tables.cache_clear()
    yield tmp_path / "cache" / "gemm-tuning"
    target.tuned_tables.cache_clear()


def _dshal_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("dshal") and r.levelname == "WARNING"]


def test_an_unreadable_user_tuning_folder_is_skipped_with_one_warning(user_tables, monkeypatch, caplog):
    """``path.exists()`` on the user's tuning folder sat outside the try: a ~/.cache this user
    cannot read (``sudo -u ciuser`` keeps HOME=/root) made every FP8 GEMM on the GPU backends
    raise PermissionError. The folder is skipped with one warning; the shipped tables serve."""
    from dshal.kernels.triton.target import TUNED_DIR, read_tuning, tuned_tables

    shipped = read_tuning(TUNED_DIR / "nvidia-sm90.json", "nvidia-sm90")
    # A name longer than the filesystem allows: stat raises an OSError exists() does not swallow
    # (as it does the PermissionError of a folder closed to this user, which needs a non-root user).
    too_long = user_tables.parent.parent / ("x" * 300)  # in a folder that exists
    try:
        too_long.exists()
        pytest.skip("this Python's Path.exists() swallows ENAMETOOLONG: no OSError to show here")
    except OSError:
        pass
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(too_long))
    with caplog.at_level("WARNING", logger="dshal"):
        assert tuned_tables("nvidia-sm90") == shipped
        tuned_tables("amd-gfx942")
    (said,) = _dshal_warnings(caplog)  # once per process, not once per target
    assert "cannot read the dshal tune tables in" in said and "File name too long" in said
    assert "using the shipped tables" in said


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a folder of mode 000")
def test_a_user_tuning_folder_closed_to_this_user_is_skipped(user_tables, caplog):
    from dshal.kernels.triton.target import tuned_tables

    user_tables.mkdir(parents=True)
    user_tables.chmod(0o000)
    try:
        with caplog.at_level("WARNING", logger="dshal"):
            tuned_tables("nvidia-sm90")
    finally:
        user_tables.chmod(0o700)
    assert "Permission denied" in _dshal_warnings(caplog)[0]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes only")
def test_a_tuned_table_another_user_could_write_is_not_used(user_tables, caplog):
    """A `dshal tune` table chooses the GEMM tiles: one others could write (or a folder of
    theirs) was trusted as the user's. It gets the C-kernel cache's check now: skipped with a
    warning unless this user's and closed to others' writes."""
    from dshal.kernels.triton.target import TUNING_SCHEMA, tuned_tables, user_tuning_dir

    assert user_tuning_dir() == user_tables  # made 0700, as dshal tune makes it
    table = user_tables / "nvidia-sm90.json"
    entry = {"N": 256, "K": 512, "M": 8, "tile": {"block_m": 16, "block_n": 32}}
    table.write_text(json.dumps({"schema": TUNING_SCHEMA, "target": "nvidia-sm90", "entries": [entry]}))

    def tuned() -> bool:
        tuned_tables.cache_clear()
        return (256, 512, 8) in tuned_tables("nvidia-sm90")

    for mode, used in ((0o644, True), (0o666, False), (0o664, True)):  # 0664: umask 002, folder 0700
        table.chmod(mode)
        with caplog.at_level("WARNING", logger="dshal"):
            assert tuned() is used, oct(mode)
    assert [w for w in _dshal_warnings(caplog) if "ignoring the tuned table" in w and "others can write" in w]
    user_tables.chmod(0o750)  # the group may enter: a group-writable table is refused
    assert not tuned()
    table.chmod(0o644)
    user_tables.chmod(0o777)  # this user's folder, opened by an old umask: closed to 0700, then used
    assert tuned() and user_tables.stat().st_mode & 0o777 == 0o700
    if os.getuid() == 0:  # root can stand in for another user: a table of theirs is refused
        os.chown(table, 65534, 65534)
        with caplog.at_level("WARNING", logger="dshal"):
            assert not tuned()
        assert any("belongs to uid 65534" in w for w in _dshal_warnings(caplog))
