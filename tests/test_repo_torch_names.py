"""Every ``torch.…`` name that dshal, its plugins and the conformance suite spell out exists
in the installed torch.

GPU-only paths (CUDA graphs, NCCL process groups, device properties) never run on a CPU
machine, so a name that a torch release renamed or dropped would only fail on the device.
Checking the names statically catches that here: CI checks its torch, and the same test run
under the GPU machine's torch 2.11.0+cu130 (PyPI's CUDA build runs on a CPU) checks that one
(benchmarks/RESULTS.md). Names reached through ``getattr`` are fallbacks by design and are not
checked; nor are calls' results (``props.L2_cache_size``)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "dshal", REPO / "conformance" / "dshal_conformance", *sorted(REPO.glob("plugins/*/dshal_*"))]
#: Namespaces an out-of-tree device package adds to torch when imported; never installed here.
VENDOR_REGISTERED = {"torch.npu": "torch_npu registers it when imported (never installed on this machine)"}


def torch_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the torch module or object it stands for (``F`` -> ``torch.nn.functional``)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    aliases[alias.asname or "torch"] = alias.name if alias.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
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
    names = dotted_names(tree, torch_aliases(tree))
    assert set(names) == {"torch.cuda.graph", "torch.nn.functional.silu", "torch.cuda.no_such_thing_xyz"}
    assert [n for n in names if not resolves(n)] == ["torch.cuda.no_such_thing_xyz"]


def test_every_torch_name_in_the_sources_exists_in_this_torch():
    checked, missing = 0, []
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in dotted_names(tree, torch_aliases(tree)).items():
                if any(name == ns or name.startswith(ns + ".") for ns in VENDOR_REGISTERED):
                    continue
                checked += 1
                if not resolves(name):
                    missing.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert checked > 100  # the scan saw the sources (131 distinct names in 2026-12)
    assert not missing, f"torch {torch.__version__} lacks:\n" + "\n".join(missing)
