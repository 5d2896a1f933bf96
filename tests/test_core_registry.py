"""Registry, selection and dispatch against real entry points (throw-away distributions)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import dshal
from dshal.backends.cpu_native import NATIVE_OPS
from dshal.errors import BackendUnavailableError, PluginLoadError, UnsupportedOpError
from dshal.ops.catalogue import SPECS
from dshal.registry import REGISTRY

GOOD = {"goodtest": "GoodBackend"}
BROKEN_AFTER_IMPORT = {
    "raises": "AvailabilityRaisesBackend",
    "badsig": "BadSignatureBackend",
    "oldapi": "OldApiBackend",
}


def by_name() -> dict[str, dshal.BackendInfo]:
    return {info.name: info for info in dshal.backends()}


def call_counts(module: str) -> dict[str, int]:
    """The CALLS counter of an installed test plugin (discovery imports it lazily)."""
    dshal.backends()
    return sys.modules[module].CALLS


@pytest.fixture
def zoo(install_plugin):
    """cpu + one good plugin + every kind of broken one; returns the good module's name."""
    good = install_plugin("backends", {**GOOD, **BROKEN_AFTER_IMPORT, "offline": "UnavailableBackend"})
    install_plugin("missing_runtime", {"noruntime": "MissingRuntimeBackend"})
    install_plugin("asserts_on_import", {"asserts": "Whatever"})
    return good


def test_broken_plugins_are_listed_with_their_error_and_the_good_ones_work(zoo):
    infos = by_name()
    assert set(infos) >= {"cpu", "goodtest", "offline", "raises", "badsig", "oldapi", "noruntime", "asserts"}

    good = infos["goodtest"]
    assert (good.loaded, good.available, good.reason, good.version) == (True, True, "test plugin ready", "0.1")
    assert infos["cpu"].loaded and infos["cpu"].available

    noruntime = infos["noruntime"]
    assert not noruntime.loaded and isinstance(noruntime.error, ModuleNotFoundError)
    assert "import failed: ModuleNotFoundError" in noruntime.reason
    assert "dshal_test_vendor_runtime_that_does_not_exist" in noruntime.reason

    raises = infos["raises"]
    assert not raises.loaded and isinstance(raises.error, RuntimeError)
    assert raises.reason == "availability() raised RuntimeError: driver query exploded"

    badsig = infos["badsig"]
    assert isinstance(badsig.error, PluginLoadError)
    assert "plugin 'badsig'" in badsig.reason and "op 'rms_norm'" in badsig.reason
    assert "expected (x, weight, eps=1e-06, residual=None), got (x, w, epsilon=1e-05)" in badsig.reason

    oldapi = infos["oldapi"]
    assert isinstance(oldapi.error, PluginLoadError)
    assert "api_version '0'" in oldapi.reason and "api_version '1'" in oldapi.reason

    # stevedore re-raises AssertionError from a plugin import; the registry must isolate it.
    asserts = infos["asserts"]
    assert isinstance(asserts.error, AssertionError)
    assert asserts.reason.startswith("import failed: AssertionError: vendor sanity check failed (at ")
    assert asserts.reason.endswith(".py:3)")  # the plugin's own line, not stevedore's


@pytest.mark.parametrize("name", ["noruntime", "asserts", *BROKEN_AFTER_IMPORT])
def test_selecting_a_broken_plugin_by_name_raises_its_error(zoo, name):
    info = by_name()[name]
    with pytest.raises(PluginLoadError) as caught:
        dshal.use(backend=name)
    assert name in str(caught.value) and info.reason in str(caught.value)
    assert caught.value.__cause__ is info.error
    # ... and the good ones still select.
    assert dshal.use(backend="goodtest").backend.name == "goodtest"


def test_unavailable_backend_by_name_raises_backend_unavailable(zoo):
    with pytest.raises(BackendUnavailableError, match="backend 'offline' is not available: no frobnicator device found"):
        dshal.use(backend="offline")


def test_unknown_backend_by_name_lists_the_installed_ones(clean_dshal_env):
    with pytest.raises(PluginLoadError, match=r"backend 'nope' is not installed; installed: \[.*'cpu'.*\]"):
        dshal.use(backend="nope")


def test_entry_point_that_is_not_a_backend_class_is_reported(install_plugin):
    install_plugin("backends", {"notabackend": "NotABackend", "alias": "GoodBackend"})
    infos = by_name()
    assert not infos["notabackend"].loaded and "must name a dshal.Backend subclass" in infos["notabackend"].reason
    assert infos["alias"].reason == (
        "plugin registered as 'alias' reports name 'goodtest'; the entry-point name must match")


def test_a_name_claimed_by_two_distributions_is_reported_and_neither_is_imported(install_plugin):
    first = install_plugin("backends", {"twin": "GoodBackend"}, dist="dshal-test-twin-a", version="1.0")
    second = install_plugin("backends", {"twin": "GoodBackend"}, dist="dshal-test-twin-b", version="2.0")
    info = by_name()["twin"]
    assert not info.loaded and not info.available
    assert info.reason.startswith("2 installed distributions register the backend name 'twin' in 'dshal.backends': ")
    assert f"{first}:GoodBackend (from dshal-test-twin-a 1.0)" in info.reason
    assert f"{second}:GoodBackend (from dshal-test-twin-b 2.0)" in info.reason
    assert first not in sys.modules and second not in sys.modules  # which would win is sys.path luck
    with pytest.raises(PluginLoadError, match="register the backend name 'twin'.*uninstall all but one"):
        dshal.use(backend="twin")
    assert by_name()["cpu"].available  # the others are untouched


def test_auto_walks_prefer_and_records_why(zoo):
    rt = dshal.use(backend="auto", prefer=["nosuchvendor", "noruntime", "offline", "raises", "goodtest", "cpu"])
    assert rt.backend.name == "goodtest"
    trace = [(d.name, d.taken, d.reason) for d in rt.selection]
    assert trace[0] == ("nosuchvendor", False, "not installed")
    assert trace[1][:2] == ("noruntime", False) and trace[1][2].startswith("failed to load: import failed")
    assert trace[2] == ("offline", False, "unavailable: no frobnicator device found")
    assert trace[3] == ("raises", False, "failed to load: availability() raised RuntimeError: driver query exploded")
    assert trace[4] == ("goodtest", True, "test plugin ready")
    assert len(trace) == 5  # cpu was never needed


def test_auto_with_nothing_usable_names_every_candidate(zoo):
    with pytest.raises(BackendUnavailableError) as caught:
        dshal.use(prefer=["offline", "nosuchvendor"])
    msg = str(caught.value)
    assert "offline: unavailable: no frobnicator device found" in msg and "nosuchvendor: not installed" in msg


def test_allow_list_never_imports_excluded_plugins(install_plugin, monkeypatch, tmp_path):
    mark = tmp_path / "imported.mark"
    monkeypatch.setenv("DSHAL_TEST_IMPORT_MARK", str(mark))
    install_plugin("records_on_import", {"recorder": ""})
    install_plugin("backends", GOOD)

    monkeypatch.setenv("DSHAL_PLUGINS", "cpu,goodtest")
    assert sorted(by_name()) == ["cpu", "goodtest"]
    assert not mark.exists()
    # auto says why an installed-but-excluded name was passed over
    rt = dshal.use(prefer=["recorder", "goodtest"])
    assert (rt.selection[0].name, rt.selection[0].reason) == ("recorder", "excluded by DSHAL_PLUGINS='cpu,goodtest'")
    with pytest.raises(PluginLoadError, match=r"backend 'recorder' is installed but excluded by DSHAL_PLUGINS='cpu,goodtest'"):
        dshal.use(backend="recorder")
    assert not mark.exists()

    # Control: without the allow-list the same plugin is imported (and fails), so the
    # absence of the mark above is meaningful.
    monkeypatch.delenv("DSHAL_PLUGINS")
    assert "this module was imported" in by_name()["recorder"].reason
    assert mark.read_text() == "imported"


def test_refresh_sees_a_plugin_rewritten_in_place(install_plugin):
    module = install_plugin("backends", GOOD)
    assert "goodtest" in by_name() and "offline" not in by_name()
    site = next(p for p in map(str, sys.path) if p.endswith("site0"))
    ep_file = next(__import__("pathlib").Path(site).glob("*.dist-info/entry_points.txt"))
    ep_file.write_text(f"[dshal.backends]\noffline = {module}:UnavailableBackend\n")  # same path, same second
    assert "goodtest" in by_name()  # cached until refreshed...
    REGISTRY.refresh()
    infos = by_name()
    assert "offline" in infos and "goodtest" not in infos  # ...and fresh afterwards


def test_fallback_warn_logs_once_per_op(install_plugin, caplog):
    install_plugin("backends", GOOD)
    rt = dshal.use(backend="goodtest", fallback="warn")
    assert rt.providers["rms_norm"] == "goodtest"
    assert rt.fallbacks == frozenset(SPECS) - {"rms_norm"}
    assert all(rt.providers[op] == "reference" for op in rt.fallbacks)
    x = torch.randn(4, 256)
    with caplog.at_level(logging.WARNING, logger="dshal"):
        for _ in range(3):
            dshal.ops.quantize_int8(x)
            dshal.ops.rms_norm(x, torch.ones(256))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "dshal: backend 'goodtest' lacks op 'quantize_int8'; serving it with the op's reference (provider 'reference', fallback: warn)"
    ]


def test_fallback_error_raises_unsupported(install_plugin):
    """With ``fallback: error`` no one serves an op the backend lacks, and the runtime says so:
    it named the reference as the provider (``rt.providers``, ``dshal info``, run reports)
    while every call raised."""
    install_plugin("backends", GOOD)
    rt = dshal.use(backend="goodtest", fallback="error")
    assert "quantize_int8" not in rt.fallbacks and "fallback: error" in rt.refused["quantize_int8"]
    assert (rt.providers["quantize_int8"], rt.provider_kind("quantize_int8")) == ("none", "refused")
    assert rt.provider_entry("quantize_int8") == {"provider": "none", "kind": "refused"}
    with pytest.raises(UnsupportedOpError, match="backend 'goodtest' does not provide op 'quantize_int8'.*fallback: error"):
        dshal.ops.quantize_int8(torch.randn(4, 8))
    y = dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(8))  # its own op still works
    assert y.shape == (2, 8)


def test_ops_override_routes_one_op_to_another_backend(install_plugin):
    module = install_plugin("backends", GOOD)
    calls = call_counts(module)
    rt = dshal.use(backend="goodtest", ops={"rms_norm": "cpu"})
    assert rt.providers["rms_norm"] == "cpu" and rt.provider_kind("rms_norm") == "override"
    before = calls["rms_norm"]
    x, w = torch.randn(3, 16), torch.rand(16)
    torch.testing.assert_close(dshal.ops.rms_norm(x, w), dshal.ops.reference.rms_norm(x, w))
    assert calls["rms_norm"] == before

    rt = dshal.use(backend="cpu", ops={"rms_norm": "goodtest"})
    dshal.ops.rms_norm(x, w)
    assert calls["rms_norm"] == before + 1 and rt.providers["rms_norm"] == "goodtest"


def test_reference_is_the_fallback_provider_and_cpu_is_the_cpu_backend(install_plugin, tmp_path):
    """`reference` serves an op with its oracle; `cpu` always means the cpu backend's own
    implementation, which for attention is its native kernel, not the reference."""
    module = install_plugin("backends", GOOD)
    calls = call_counts(module)
    path = tmp_path / "dshal.yaml"
    path.write_text("backend: goodtest\nops:\n  rms_norm: reference\n  attention: cpu\n")
    rt = dshal.use(path)
    assert (rt.providers["rms_norm"], rt.provider_kind("rms_norm")) == ("reference", "override")
    assert (rt.providers["attention"], rt.provider_kind("attention")) == ("cpu", "override")
    assert rt.unchecked["rms_norm"] is SPECS["rms_norm"].reference_impl
    assert rt.unchecked["attention"] is NATIVE_OPS["attention"]  # the cpu backend's native SDPA ...
    assert rt.unchecked["attention"] is not SPECS["attention"].reference_impl  # ... not the reference
    before = calls["rms_norm"]
    x, w = torch.randn(3, 16), torch.rand(16)
    torch.testing.assert_close(dshal.ops.rms_norm(x, w), dshal.ops.reference.rms_norm(x, w))
    assert calls["rms_norm"] == before  # the plugin's own rms_norm was not called
    # The cpu backend itself may be asked for the reference of an op it serves natively.
    rt = dshal.use(backend="cpu", ops={"linear": "reference"})
    assert rt.providers["linear"] == "reference" and rt.unchecked["linear"] is SPECS["linear"].reference_impl
    assert rt.providers["attention"] == "cpu" and rt.provider_kind("attention") == "native"


def test_a_plugin_cannot_take_the_reference_name(install_plugin):
    install_plugin("backends", {"reference": "GoodBackend", "none": "GoodBackend"})
    info = by_name()["reference"]
    assert not info.loaded and "the backend name 'reference' is reserved" in info.reason
    assert "the backend name 'none' is reserved" in by_name()["none"].reason
    rt = dshal.use(backend="cpu", ops={"rms_norm": "reference"})  # still the op's reference
    assert rt.unchecked["rms_norm"] is SPECS["rms_norm"].reference_impl


def test_fallback_error_hint_names_the_reference_provider(install_plugin):
    install_plugin("backends", GOOD)
    dshal.use(backend="goodtest", fallback="error")
    with pytest.raises(UnsupportedOpError, match=r"ops: \{attention: reference\} to serve it with the reference"):
        dshal.ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    # ... and the hint works: the same config with that override serves the op.
    rt = dshal.use(backend="goodtest", fallback="error", ops={"attention": "reference"})
    assert "attention" not in rt.fallbacks and rt.providers["attention"] == "reference"


@pytest.mark.parametrize("selected", ["cpu", "goodtest"])
def test_ops_override_naming_a_backend_without_the_op_is_a_config_error(install_plugin, tmp_path, selected):
    install_plugin("backends", GOOD)
    path = tmp_path / "dshal.yaml"
    path.write_text(f"backend: {selected}\nops: {{quantize_int8: goodtest}}\n")
    with pytest.raises(dshal.ConfigError, match=rf"^{path}:2: ops.quantize_int8: backend 'goodtest' does not provide "
                                                 r"op 'quantize_int8' \(it provides: rms_norm\)"):
        dshal.use(path)


def test_dispatch_is_resolved_at_use_not_per_call(install_plugin):
    module = install_plugin("backends", GOOD)
    calls = call_counts(module)
    rt = dshal.use(backend="goodtest")
    asked = calls["ops"]
    x, w = torch.randn(2, 8), torch.ones(8)
    for _ in range(5):
        dshal.ops.rms_norm(x, w)
    assert calls["rms_norm"] >= 5
    assert calls["ops"] == asked  # no per-call lookup of the backend's ops
    assert dshal.ops.DISPATCHER.provider("rms_norm") is rt.table["rms_norm"]
    # Discovery is not consulted per call either: forgetting it changes nothing.
    REGISTRY.refresh()
    dshal.ops.rms_norm(x, w)
    assert REGISTRY._cache == {}
    # Switching runtimes switches the table.
    dshal.use(backend="cpu")
    n = calls["rms_norm"]
    dshal.ops.rms_norm(x, w)
    assert calls["rms_norm"] == n


def test_calling_an_op_before_use_activates_the_default(install_plugin, monkeypatch):
    module = install_plugin("backends", GOOD)
    monkeypatch.setenv("DSHAL_BACKEND", "goodtest")
    dshal.runtime.reset()
    assert dshal.runtime._state["active"] is None
    dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(8))
    assert dshal.current().backend.name == "goodtest"
    assert call_counts(module)["rms_norm"] == 1


def test_providers_and_describe(clean_dshal_env):
    rt = dshal.use(backend="cpu")
    assert set(rt.providers) == set(SPECS) and set(rt.providers.values()) == {"cpu"}
    desc = rt.describe()
    assert desc["providers"]["rms_norm"] == {"provider": "cpu", "kind": "native"}
    assert {k: desc["providers"]["linear"][k] for k in ("provider", "kind")} == {"provider": "cpu", "kind": "native"}
    assert desc["providers"]["linear"]["paths"]["bf16"]["kind"] == "native"
    assert desc["providers"]["fp8_gemm"] == {"provider": "cpu", "kind": "reference"}
    assert desc["selection"] == [{"name": "cpu", "taken": True, "reason": desc["selection"][0]["reason"]}]
    json.dumps(desc)
    assert dshal.current() is rt


def test_import_dshal_discovers_nothing_and_imports_no_vendor_runtime():
    code = textwrap.dedent(
        """
        import json, sys
        import dshal
        vendor = [m for m in ("triton", "torch_npu", "pynvml", "amdsmi", "stevedore") if m in sys.modules]
        torch_at_import = "torch" in sys.modules
        from dshal.registry import REGISTRY
        print(json.dumps({"vendor": vendor, "torch": torch_at_import, "discovered": bool(REGISTRY._cache),
                          "active": dshal.runtime._state["active"] is not None}))
        dshal.use()
        vendor = [m for m in ("triton", "torch_npu", "pynvml", "amdsmi") if m in sys.modules]
        print(json.dumps({"after": "stevedore" in sys.modules, "backends_is_function": callable(dshal.backends),
                          "vendor_after_discovery": vendor}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.splitlines()
    # `import dshal` loads neither torch nor a plugin: the public names import on first use.
    assert json.loads(out[0]) == {"vendor": [], "torch": False, "discovered": False, "active": False}
    # control: discovery does load stevedore; and importing dshal.backends.cpu must not
    # shadow the dshal.backends() function with the dshal/backends/ package.
    # Discovery (every installed plugin's import, availability and capabilities) imports no
    # vendor runtime either; plugins import those lazily, when an op runs.
    assert json.loads(out[1]) == {"after": True, "backends_is_function": True, "vendor_after_discovery": []}


def test_trusted_skips_the_input_checks_for_this_thread_only(install_plugin):
    module = install_plugin("backends", GOOD)
    calls = call_counts(module)
    rt = dshal.use(backend="goodtest", fallback="warn")
    assert rt.unchecked["rms_norm"] is rt.table["rms_norm"].__wrapped__
    # A weight of the wrong size that torch would broadcast: only the checker refuses it.
    x, bad = torch.randn(2, 8), torch.ones(1)
    with pytest.raises(dshal.ShapeError, match="argument 'weight' has size 1"):
        dshal.ops.rms_norm(x, bad)
    before = calls["rms_norm"]
    seen_in_thread: list[BaseException] = []

    def other_thread() -> None:
        try:
            dshal.ops.rms_norm(x, bad)
        except dshal.DshalError as err:
            seen_in_thread.append(err)

    with dshal.ops.trusted():
        assert dshal.ops.rms_norm(x, bad).shape == (2, 8)  # straight to the provider
        with dshal.ops.trusted():  # nests
            dshal.ops.rms_norm(x, torch.ones(8))
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        # An op served by the fallback reference still goes through the fallback caller.
        q, s = dshal.ops.quantize_int8(torch.randn(4, 8))
        assert q.dtype == torch.int8 and s.shape == (4, 1)
    assert calls["rms_norm"] == before + 2
    assert len(seen_in_thread) == 1 and isinstance(seen_in_thread[0], dshal.ShapeError)  # the other thread checks
    with pytest.raises(dshal.ShapeError):  # checks are back after the block
        dshal.ops.rms_norm(x, bad)


def test_trusted_block_restores_the_checks_after_an_error(clean_dshal_env):
    dshal.use(backend="cpu")
    with pytest.raises(ValueError), dshal.ops.trusted():
        raise ValueError("boom")
    with pytest.raises(dshal.ShapeError):
        dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(5))


def test_trusted_before_use_activates_the_default(install_plugin, monkeypatch):
    module = install_plugin("backends", GOOD)
    monkeypatch.setenv("DSHAL_BACKEND", "goodtest")
    dshal.runtime.reset()
    with dshal.ops.trusted():
        dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(8))
    assert dshal.current().backend.name == "goodtest"
    assert call_counts(module)["rms_norm"] == 1


def test_dshal_backends_is_the_registry_listing():
    """``dshal.backends`` defers the registry import (``import dshal`` stays light) but keeps
    its signature and answer."""
    import inspect

    from dshal import registry

    assert inspect.signature(dshal.backends) == inspect.signature(registry.backends)
    assert [i.name for i in dshal.backends()] == [i.name for i in registry.backends()]


@pytest.mark.parametrize("first", ["import dshal.backends.cpu_native as native", "import dshal; dshal.backends()"])
def test_dshal_backends_is_both_the_package_and_the_listing_call(first):
    """``dshal.backends`` names the package of built-in backends and DESIGN's listing call:
    either use works first, and the other still works after it."""
    code = textwrap.dedent(f"""
        {first}
        import dshal.backends.cpu_native as native
        import dshal
        names = [info.name for info in dshal.backends()]
        assert "cpu" in names, names
        assert callable(native.NATIVE_OPS.get) and dshal.backends.cpu_native is native
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_an_import_error_says_where_and_a_clash_with_the_builtin_cpu_says_what_to_do(install_plugin):
    """The listing names the plugin's file and line an import raised at (the CLI shows no
    traceback); a plugin registered as 'cpu' is told that the name is dshal's own, not to
    uninstall one of the two (one of them is dshal)."""
    module = install_plugin("fails_on_import", {"failing": None})
    failing = by_name()["failing"]
    assert failing.reason.startswith("import failed: ValueError: invalid literal for int() with base 10: 'x' (at ")
    assert failing.reason.endswith(f"{module}.py:5)")
    install_plugin("backends", {"cpu": "GoodBackend"})
    cpu = by_name()["cpu"]
    assert not cpu.loaded and "it is the name of dshal's built-in backend: register the others under another name" in cpu.reason


def test_a_plugin_that_imports_what_this_dshal_lacks_is_told_of_the_version_it_met(install_plugin):
    """A plugin written for a later core failed as a bare ImportError ("cannot import name
    'NO_EXPERT' from 'dshal.plugin'"), with nothing saying the two versions do not match."""
    import dshal

    install_plugin("needs_newer_dshal", {"later": None})
    reason = by_name()["later"].reason
    assert reason.startswith("import failed: ImportError: cannot import name 'a_hook_of_a_later_dshal' from 'dshal.plugin'")
    assert reason.endswith(f"; the plugin may be written for another dshal than the {dshal.__version__} installed "
                           "here (check the dshal version it requires)")
    install_plugin("fails_on_import", {"failing": None})
    assert "another dshal" not in by_name()["failing"].reason  # its own bug, not a version skew


def test_allow_list_typos_are_named(install_plugin, monkeypatch):
    """DSHAL_PLUGINS=recordr (a typo) said "cpu: not installed (excluded by DSHAL_PLUGINS)", of
    the built-in backend, and never showed the value or the name that matched nothing; "," gave
    an empty allow-list that excluded every plugin."""
    install_plugin("backends", GOOD)
    monkeypatch.setenv("DSHAL_PLUGINS", "goodtset")
    with pytest.raises(BackendUnavailableError) as caught:
        dshal.use(prefer=["cpu"])
    assert str(caught.value).endswith("(cpu: excluded by DSHAL_PLUGINS='goodtset'); DSHAL_PLUGINS names no installed "
                                      "plugin: goodtset ('goodtset' -> 'goodtest'?)")
    with pytest.raises(PluginLoadError, match=r"backend 'cpu' is installed but excluded by DSHAL_PLUGINS='goodtset'"):
        dshal.use(backend="cpu")
    monkeypatch.setenv("DSHAL_PLUGINS", " , ")
    with pytest.raises(dshal.ConfigError, match=r"environment variable DSHAL_PLUGINS is ',', expected backend names "
                                                r"separated by commas \(installed: .*cpu.*\), or unset for all"):
        dshal.use(backend="cpu")


def test_capabilities_the_core_cannot_act_on_are_each_named(install_plugin):
    """In the process that discovers the plugins (``dshal info``'s test reads the same reasons
    through a subprocess): the plugin is listed as failed with every problem, never selected."""
    install_plugin("backends", {"capsdict": "CapabilitiesDictBackend", "capsclaims": "CapabilitiesClaimsBackend",
                                "capspaths": "CapabilitiesPathsBackend"})
    infos = by_name()
    assert infos["capsdict"].reason == "plugin 'capsdict': capabilities() must return dshal.Capabilities, got dict"
    claims = infos["capsclaims"].reason
    for said in ("fp8_formats is 'e4m3fn', expected a tuple of e4m3fn, e4m3fnuz, e5m2",
                 "op_kinds names 'attention', which ops() does not provide",
                 "op_kinds['rms_norm'] is 'fast', expected one of native, triton, emulated, reference",
                 "notes is {'driver': 'int', 'runtime': 'str'}, expected a mapping of str to str", "arch is None, expected a str"):
        assert said in claims, claims
    paths = infos["capspaths"].reason
    for said in ("native_e4m3 is 'e5m2', expected 'e4m3fn' or 'e4m3fnuz'", "op_paths names 'linear', which ops() does not provide",
                 "op_paths['rms_norm'] has formats ['bf16', 'fp4'], expected some of", "device_name is 7, expected a str"):
        assert said in paths, paths
    for name in ("capsdict", "capsclaims", "capspaths"):
        assert isinstance(infos[name].error, PluginLoadError) and not infos[name].loaded
        with pytest.raises(PluginLoadError, match=f"plugin '{name}': capabilities"):
            dshal.use(backend=name)
