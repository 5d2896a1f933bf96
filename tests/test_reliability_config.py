"""Hostile configs, environment and plugins (issue #16, classes 3, 4 and 9): the YAML loader
is bounded, every error says where it came from, and a misbehaving plugin cannot hang,
kill or hijack discovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dshal
from dshal.config import MAX_YAML_DEPTH, load_config
from dshal.errors import BackendUnavailableError, ConfigError, PluginLoadError

ALIAS_BOMB = "\n".join(
    ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    + ["backend: cpu"]
)


# ----------------------------------------------------------------- class 3: the YAML loader
def test_alias_bomb_fails_fast_with_file_and_line(tmp_path, clean_dshal_env):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb") as caught:
        dshal.use(path)
    assert time.perf_counter() - started < 5
    assert caught.value.file == str(path) and caught.value.line is not None


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path, clean_dshal_env):
    path = tmp_path / "deep.yaml"
    path.write_text("ops: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"nesting deeper than {MAX_YAML_DEPTH} levels") as caught:
        load_config(path)
    assert caught.value.line == 1


def test_non_utf8_config_names_the_byte_and_line(tmp_path, clean_dshal_env):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backend: cpu\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 0xe9 at line 2, column 6") as caught:
        load_config(path)
    assert (caught.value.file, caught.value.line) == (str(path), 2)


@pytest.mark.parametrize("source", [123, 1.5, b"dshal.yaml", ["dshal.yaml"]])
def test_use_with_a_non_path_is_a_config_error(source, clean_dshal_env):
    with pytest.raises(ConfigError, match=r"config: got .*expected a YAML file path, a dict"):
        dshal.use(source)


def test_config_file_that_is_a_folder_or_a_loop(tmp_path, clean_dshal_env):
    with pytest.raises(ConfigError, match="it is a directory, expected a file"):
        load_config(tmp_path)
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    with pytest.raises(ConfigError, match="symlink loop"):
        load_config(loop)
    dangling = tmp_path / "dangling.yaml"
    os.symlink(tmp_path / "gone.yaml", dangling)
    with pytest.raises(ConfigError, match="a symlink to .*gone.yaml.*which does not exist"):
        load_config(dangling)


def test_bench_shapes_file_goes_through_the_same_bounded_loader(tmp_path):
    from dshal.perf.bench import shape_cases

    path = tmp_path / "shapes.yaml"
    path.write_text(ALIAS_BOMB.replace("backend: cpu", "cases: []"))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        shape_cases(str(path))
    assert time.perf_counter() - started < 5
    path.write_bytes(b"cases:\n  - {op: rms_norm, M: 4, \xff: 1}\n")
    with pytest.raises(ConfigError, match="shapes file is not UTF-8"):
        shape_cases(str(path))


# ----------------------------------------------------------------- class 4: errors say where from
def test_unknown_backend_in_ops_names_the_key_and_file(tmp_path, clean_dshal_env):
    path = tmp_path / "dshal.yaml"
    path.write_text("backend: cpu\nops:\n  attention: tpu\n")
    with pytest.raises(PluginLoadError, match=rf"'tpu' is not installed.*requested by ops.attention, set by {path}:3"):
        dshal.use(path)


def test_unknown_backend_from_environment_names_the_variable(monkeypatch, clean_dshal_env):
    monkeypatch.setenv("DSHAL_BACKEND", "tpu")
    with pytest.raises(PluginLoadError, match="requested by backend, set by environment variable DSHAL_BACKEND"):
        dshal.use()


@pytest.mark.parametrize("value", ["maybe", "2", "enable"])
def test_invalid_cpu_kernels_variable_is_refused(monkeypatch, clean_dshal_env, value):
    monkeypatch.setenv("DSHAL_CPU_KERNELS", value)
    with pytest.raises(ConfigError, match=f"environment variable DSHAL_CPU_KERNELS: got '{value}', expected 1 or 0"):
        load_config()


@pytest.mark.parametrize("timeout", [1e30, float("inf"), float("nan"), 0, -1, True])
def test_timeout_out_of_range_is_refused_at_load(timeout, clean_dshal_env):
    with pytest.raises(ConfigError, match=r"distributed.timeout_s: got .*at most 604800"):
        load_config({"distributed": {"timeout_s": timeout}})


def test_op_checks_raise_the_contract_error_classes():
    q = torch.zeros(1, 3, 2, 4)
    kv = torch.zeros(1, 2, 2, 4)
    with pytest.raises(dshal.ShapeError, match="2 heads, expected a divisor of the 3 heads"):
        dshal.ops.reference.attention(q, kv, kv)
    with pytest.raises(dshal.errors.ArgumentError, match="'window' is 0"):
        dshal.ops.reference.attention(q, q, q, window=0)
    with pytest.raises(dshal.errors.ArgumentError, match="'interleaved' is 1"):
        dshal.ops.reference.rotary_embedding(torch.zeros(2, 4), torch.zeros(2, 2), torch.zeros(2, 2), interleaved=1)
    with pytest.raises(dshal.errors.ArgumentError, match="'eps' is -1"):
        dshal.ops.reference.rms_norm(torch.zeros(2, 4), torch.ones(4), eps=-1.0)


# ----------------------------------------------------------------- class 9: misbehaving plugins
def test_hung_availability_is_bounded_and_not_probed_for_a_named_backend(install_plugin, monkeypatch):
    module = install_plugin("sleeps_in_availability", {"sleepy": "SleepyBackend"})
    monkeypatch.setenv("DSHAL_PLUGIN_TIMEOUT_S", "0.5")
    started = time.perf_counter()
    rt = dshal.use(backend="cpu")  # a named selection loads only cpu
    assert rt.backend.name == "cpu" and sys.modules.get(module) is None
    started = time.perf_counter()
    info = {i.name: i for i in dshal.backends()}["sleepy"]
    assert time.perf_counter() - started < 10
    assert not info.available and "availability() did not return within 0.5 s" in info.reason
    assert sys.modules[module].CALLS["availability"] == 1
    # it loaded; it is unavailable (the README's promise), not a plugin that failed to load
    assert info.loaded
    with pytest.raises(BackendUnavailableError, match="'sleepy' is not available: availability.. did not return"):
        info.require()


@pytest.mark.parametrize("stage", ["import", "constructor", "ops"])
def test_a_plugin_slow_to_load_is_named_in_a_warning_on_the_callers_thread(install_plugin, monkeypatch, caplog, stage):
    """A plugin whose import, constructor or ops() blocked hung ``dshal info`` without a word.
    They stay on the caller's thread (a plugin may install signal handlers as it imports: on
    a worker thread that failed, "signal only works in main thread"), and past
    DSHAL_PLUGIN_TIMEOUT_S a warning names the plugin and the ways out."""
    import logging

    monkeypatch.setenv("DSHAL_TEST_SLEEP_AT", stage)
    monkeypatch.setenv("DSHAL_TEST_SLEEP_S", "1.5")
    monkeypatch.setenv("DSHAL_PLUGIN_TIMEOUT_S", "0.3")
    install_plugin("sleeps_while_loading", {"drowsy": "DrowsyBackend"})
    with caplog.at_level(logging.WARNING, logger="dshal"):
        infos = {i.name: i for i in dshal.backends()}
    assert infos["drowsy"].available and infos["cpu"].available  # slow, not broken: it loaded
    what = {"import": "the import", "constructor": "the constructor", "ops": "ops()"}[stage]
    assert f"{what} of plugin 'drowsy' has not returned after 0.3 s" in caplog.text
    assert "DSHAL_PLUGINS" in caplog.text
    assert "plugin 'cpu'" not in caplog.text  # one that returns in time: no warning (the timer is cancelled)


def test_auto_selection_probes_only_its_candidates_up_to_the_first_usable(install_plugin, monkeypatch):
    module = install_plugin("sleeps_in_availability", {"sleepy": "SleepyBackend"})
    rt = dshal.use(backend="auto", prefer=["cpu", "sleepy"])
    assert rt.backend.name == "cpu" and [d.name for d in rt.selection] == ["cpu"]
    assert sys.modules.get(module) is None  # neither imported nor asked for availability()


@pytest.mark.parametrize(
    ("template", "reason"),
    [("exits_on_import", "SystemExit: 3"), ("interrupts_on_import", "KeyboardInterrupt: vendor init gave up")],
)
def test_base_exceptions_from_a_plugin_import_are_that_plugins_failure(install_plugin, template, reason):
    install_plugin(template, {"rude": None})
    infos = {i.name: i for i in dshal.backends()}
    assert infos["cpu"].available  # discovery went on
    assert not infos["rude"].loaded and reason in infos["rude"].reason
    with pytest.raises(PluginLoadError, match=reason):
        dshal.use(backend="rude")


def test_a_plugin_cannot_take_over_an_op_by_assignment(install_plugin):
    install_plugin("hijacks_ops", {"hijack": "HijackBackend"})
    infos = {i.name: i for i in dshal.backends()}
    assert not infos["hijack"].loaded and "dshal.ops.rms_norm is read-only" in infos["hijack"].reason
    rt = dshal.use(backend="cpu")
    x, w = torch.randn(2, 8), torch.ones(8)
    assert rt.providers["rms_norm"] == "cpu"
    torch.testing.assert_close(dshal.ops.rms_norm(x, w), dshal.ops.reference.rms_norm(x, w))


def test_real_ctrl_c_during_a_hung_probe_exits_130(install_plugin, tmp_path, sigint_deliverable):
    install_plugin("sleeps_in_availability", {"sleepy": "SleepyBackend"})
    marker = tmp_path / "probing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DSHAL_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dshal", "info"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_deliverable,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:  # wait until the hung probe runs
        time.sleep(0.1)
    assert marker.exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def test_sigterm_during_a_plugin_import_ends_the_command_with_143_not_as_that_plugins_failure(
    install_plugin, tmp_path, sigint_deliverable
):
    """`timeout` / `kill` send SIGTERM. Python's default ended `dshal` at once (no cleanup, no word;
    -15, not a shell's 143); now every command unwinds and says so. Raised inside a plugin's
    import, the signal must not pass for the plugin's own SystemExit (a plugin failure that
    discovery would list and go on from)."""
    install_plugin("sleeps_while_loading", {"drowsy": "DrowsyBackend"})
    marker = tmp_path / "importing"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DSHAL_TEST_MARKER": str(marker),
           "DSHAL_TEST_SLEEP_AT": "import", "DSHAL_TEST_SLEEP_S": "60", "DSHAL_PLUGIN_TIMEOUT_S": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "dshal", "info"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_deliverable)  # an inherited ignore
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out, err)
    assert err.strip().splitlines()[-1] == "dshal info: terminated (SIGTERM)" and "Traceback" not in err
    assert "drowsy" not in out  # no listing went on after the signal
