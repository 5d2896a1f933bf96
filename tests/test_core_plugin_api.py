"""Plugins reach dshal through its public surface only: ``dshal`` and the toolkit
``dshal.plugin`` (plus their own package), and nothing imports a private name of dshal.

Read from the sources with ``ast`` (multi-line imports and function-level imports included),
so a new import of an internal module fails here rather than breaking a plugin when that
module moves."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dshal
import dshal.plugin

ROOT = Path(__file__).resolve().parents[1]
#: The modules a plugin may import from dshal.
PLUGIN_MODULES = {"dshal", "dshal.plugin"}


def _dshal_imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import of dshal or a dshal submodule."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "dshal" or node.module.startswith("dshal."):
                yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dshal" or alias.name.startswith("dshal."):
                    yield node.lineno, alias.name, []


def _plugin_sources() -> list[Path]:
    """The plugins' own package sources and the examples (their tests may reach further)."""
    files = [
        f
        for package in sorted(ROOT.glob("plugins/*/dshal_*"))
        if package.is_dir()
        for f in sorted(package.rglob("*.py"))
    ]
    files += sorted(f for f in (ROOT / "examples").rglob("*.py") if "tests" not in f.parts)
    return files


def test_plugin_sources_are_found():
    names = {f.relative_to(ROOT).parts[1] for f in _plugin_sources() if f.relative_to(ROOT).parts[0] == "plugins"}
    assert {"nvidia", "amd"} <= names
    assert any(f.name == "tiny_backend.py" for f in _plugin_sources())


@pytest.mark.parametrize("path", _plugin_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_dshal_and_the_toolkit(path):
    bad = [f"{path.relative_to(ROOT)}:{line}: {module}" for line, module, _ in _dshal_imports(path)
           if module not in PLUGIN_MODULES]  # fmt: skip
    assert not bad, "plugins import only dshal and dshal.plugin (add what a plugin needs to dshal.plugin):\n" + "\n".join(bad)


def test_no_private_names_imported_from_dshal():
    """The issue's check, ``grep -rn "from dshal\\.[a-z_.]* import _" dshal plugins conformance``,
    over parsed sources (so multi-line imports count too)."""
    bad = []
    for top in ("dshal", "plugins", "conformance"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if ".venv" in path.parts or "build" in path.parts:
                continue
            for line, module, names in _dshal_imports(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if module != "dshal" and private:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: from {module} import {', '.join(private)}")
    assert not bad, "private dshal names imported (make them public where they are needed):\n" + "\n".join(bad)


def test_toolkit_is_re_exports_only():
    """dshal.plugin defines nothing: every name in __all__ is an object defined elsewhere, and
    every public name of the module is listed."""
    tree = ast.parse(Path(dshal.plugin.__file__).read_text())
    defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign))]
    assert [type(n).__name__ for n in defined] == ["Assign"]  # only __all__
    assert ast.get_docstring(tree)
    public = {n for n in vars(dshal.plugin) if not n.startswith("_") and n != "annotations"}
    assert public == set(dshal.plugin.__all__)


def test_toolkit_serves_what_the_plugins_import_today():
    """Every name a plugin imports from dshal.plugin is one it lists in ``__all__``."""
    imported = {
        name
        for path in _plugin_sources()
        for _, module, names in _dshal_imports(path)
        if module == "dshal.plugin"
        for name in names
    }
    assert {"Backend", "SPECS", "TorchGpuBackend", "dequantize_to"} <= imported  # every plugin was scanned
    assert imported <= set(dshal.plugin.__all__), sorted(imported - set(dshal.plugin.__all__))
    assert dshal.plugin.Backend is dshal.Backend and dshal.plugin.DshalError is dshal.DshalError
    assert dshal.plugin.SPECS["rms_norm"].reference_impl is not None


def test_shared_gpu_base_holds_no_vendor_probe():
    """dshal/backends/triton_gpu.py routes ops on declared facts: no build or arch checks and
    no vendor library in its code (those live in the plugins, e.g. dshal_nvidia.cublaslt)."""
    tree = ast.parse((ROOT / "dshal" / "backends" / "triton_gpu.py").read_text())
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    probes = {"version", "hip", "get_device_capability", "gcnArchName", "ScalingType", "scaled_mm"}
    assert not attributes & probes, attributes & probes  # torch.version.*, capabilities, cuBLASLt blockwise
    assert not imported & {"pynvml", "amdsmi", "triton", "torch_npu"}, imported


def test_device_graph_refuses_arguments_a_replay_would_not_refresh():
    """A replay copies top-level tensor arguments into the capture's buffers; anything else is
    baked into the graph and keyed by value. A list of tensors was keyed by its repr (which
    abbreviates large tensors, and never refreshed their contents): replays read stale data.
    The key is computed before anything touches a device, so this runs on CPU."""
    DeviceGraph = dshal.plugin.DeviceGraph  # noqa: N806
    token = torch.zeros(2, 1, dtype=torch.int64)
    key = DeviceGraph._key((token, 3), {"eps": 1e-6, "dtype": torch.bfloat16})
    assert key != DeviceGraph._key((token, 4), {"eps": 1e-6, "dtype": torch.bfloat16})
    assert key != DeviceGraph._key((token, 3.0), {"eps": 1e-6, "dtype": torch.bfloat16})  # 3 vs 3.0
    assert key != DeviceGraph._key((token.t(), 3), {"eps": 1e-6, "dtype": torch.bfloat16})  # strides
    assert DeviceGraph._key((token, (2, 4)), {}) != DeviceGraph._key((token, (2, 8)), {})  # a shape: a plain value
    with pytest.raises(dshal.ArgumentError, match=r"argument 1 is of type list, expected a tensor or a plain value"):
        DeviceGraph._key((token, [token]), {})
    with pytest.raises(dshal.ArgumentError, match=r"argument 1 is of type tuple"):
        DeviceGraph._key((token, (token,)), {})  # a tuple holding a tensor: not refreshed either
    with pytest.raises(dshal.ArgumentError, match=r"argument 'cache' is of type object"):
        DeviceGraph._key((token,), {"cache": object()})
