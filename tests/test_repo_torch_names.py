"""Every ``torch.…`` and ``triton.…`` name that dshal, its plugins and the conformance suite
spell out exists in the installed torch and Triton.

GPU-only paths (CUDA graphs, NCCL process groups, device properties) never run on a CPU
machine, so a name that a torch or Triton release renamed or dropped would only fail on the
device. Checking the names statically catches that here: CI checks its torch and Triton, and
the same test run under the GPU machine's torch 2.11.0+cu130 (PyPI's CUDA build runs on a
CPU) and Triton 3.6 checks those (benchmarks/RESULTS.md). Names reached through ``getattr`` are fallbacks by design and are not
checked; nor are calls' results (``props.L2_cache_size``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "dshal", REPO / "conformance" / "dshal_conformance", *sorted(REPO.glob("plugins/*/dshal_*"))]
#: Namespaces an out-of-tree device package adds to torch when imported; never installed here.
VENDOR_REGISTERED = {"torch.npu": "torch_npu registers it when imported (never installed on this machine)"}


def package_aliases(tree: ast.Module, packages: tuple[str, ...]) -> dict[str, str]:
    """Local name -> the module or object of ``packages`` it stands for (``F`` ->
    ``torch.nn.functional``, ``tl`` -> ``triton.language``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in packages:
                    aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in packages:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted_names(tree: ast.Module, aliases: dict[str, str]) -> dict[str, int]:
    """Each longest ``alias.a.b`` chain in ``tree`` as a full torch name -> its first line."""
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        parts, base = [], node
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in aliases:
            found.setdefault(".".join([aliases[base.id], *reversed(parts)]), node.lineno)
    return found


def resolves(name: str) -> bool:
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule not imported by its package
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            return False
    return True


def test_the_scan_finds_names_and_flags_a_missing_one():
    tree = ast.parse("import torch\nimport torch.nn.functional as F\nx = torch.cuda.graph\ny = F.silu\nz = torch.cuda.no_such_thing_xyz\n")
    names = dotted_names(tree, package_aliases(tree, ("torch",)))
    assert set(names) == {"torch.cuda.graph", "torch.nn.functional.silu", "torch.cuda.no_such_thing_xyz"}
    assert [n for n in names if not resolves(n)] == ["torch.cuda.no_such_thing_xyz"]


@pytest.mark.parametrize("package", ["torch", "triton"])
def test_every_name_in_the_sources_exists_in_the_installed_package(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    module = importlib.import_module(package)
    checked, missing = 0, []
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in dotted_names(tree, package_aliases(tree, (package,))).items():
                if any(name == ns or name.startswith(ns + ".") for ns in VENDOR_REGISTERED):
                    continue
                checked += 1
                if not resolves(name):
                    missing.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert checked > 30  # the scan saw the sources (2026-12: 136 torch names, 39 Triton ones)
    assert not missing, f"{package} {module.__version__} lacks:\n" + "\n".join(missing)
