"""The project's import structure: no cycles, any import order works, lazy imports say why.

- The module-level import graph between project modules (dshal, dshal_conformance, the
  plugins' dshal_* packages), read statically with ``ast``, has no cycle.
- Every project module imports in a fresh interpreter, in several orders.
- An import of a project module inside a function is allowed only for start-up time or a
  lazy vendor runtime, and says so with a trailing ``# lazy: <reason>`` comment.
"""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dshal

REPO = Path(__file__).resolve().parents[1]
#: Package directories whose modules are project modules.
PROJECT_PACKAGES = (REPO / "dshal", REPO / "conformance" / "dshal_conformance", *sorted(REPO.glob("plugins/*/dshal_*")))

#: Files and directories (relative to the repo) whose function-level project imports must
#: carry a ``# lazy: <reason>`` comment: all of the project's packages.
LAZY_IMPORT_CHECKED_PATHS = ("dshal", "conformance/dshal_conformance", "plugins")
LAZY_MARK = "# lazy:"


@dataclass
class Module:
    name: str
    path: Path
    #: project modules this one needs at import time
    imports: set[str] = field(default_factory=set)
    #: (line, source) of project imports inside functions
    function_level: list[tuple[int, str]] = field(default_factory=list)


def project_modules() -> dict[str, Module]:
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted(package.rglob("*.py")):
            parts = path.relative_to(package.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = Module(name, path)
    return modules


def _lazy_names() -> dict[str, str]:
    """``from dshal import NAME`` of a lazily loaded name needs NAME's module (dshal's table)."""
    return {**dshal._LAZY_NAMES, **{m: f"dshal.{m}" for m in dshal._LAZY_MODULES}}


def _targets(modules: dict[str, Module], me: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules one import statement needs, with the packages Python runs first
    (a package's ``__init__`` runs before its submodule, unless it encloses the importer)."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = me.name if me.path.name == "__init__.py" else me.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        lazy = _lazy_names() if base == "dshal" else {}
        named = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else lazy.get(alias.name, base)
            for alias in node.names
        ]
    enclosing = {".".join(me.name.split(".")[:i]) for i in range(1, me.name.count(".") + 2)}
    out = []
    for target in named:
        while target and target not in modules:  # e.g. ``import torch``, or a name in a module
            target = target.rpartition(".")[0]
        if not target or (isinstance(node, ast.Import) and target in enclosing):
            continue  # ``import dshal`` inside dshal only binds the package: nothing is read yet
        parts = target.split(".")
        out += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in enclosing]
        out.append(target)
    return [t for t in out if t != me.name]


def _names_project_module(node: ast.Import | ast.ImportFrom, roots: set[str]) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] in roots
    return any(alias.name.split(".")[0] in roots for alias in node.names)


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def scan(modules: dict[str, Module]) -> None:
    """Fill each module's imports (module level) and function-level imports."""
    roots = {name.split(".")[0] for name in modules}
    for module in modules.values():
        source = module.path.read_text()
        lines = source.splitlines()

        def visit(node: ast.AST, in_function: bool, module: Module = module, lines: list[str] = lines) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                    if _names_project_module(child, roots):
                        text = " ".join(lines[child.lineno - 1 : child.end_lineno])
                        module.function_level.append((child.lineno, text))
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    module.imports.update(_targets(modules, module, child))
                elif isinstance(child, ast.If) and _is_type_checking(child):
                    visit(ast.Module(body=child.orelse, type_ignores=[]), in_function)  # the body never runs
                else:
                    visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(source, str(module.path)), False)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = project_modules()
    scan(found)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_scan_sees_module_level_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "dshal"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        from dshal import b
        if TYPE_CHECKING:
            from dshal import c
        def f():
            from dshal.c import x  # lazy: start-up time
            import dshal.c
    """))
    (pkg / "b.py").write_text("from . import c\n")
    (pkg / "c.py").write_text("")
    found = {m.name: m for m in (Module("dshal", pkg / "__init__.py"), Module("dshal.a", pkg / "a.py"),
                                 Module("dshal.b", pkg / "b.py"), Module("dshal.c", pkg / "c.py"))}
    scan(found)
    assert found["dshal.a"].imports == {"dshal.b"}
    assert found["dshal.b"].imports == {"dshal.c"}
    assert [line for line, _ in found["dshal.a"].function_level] == [6, 7]
    assert LAZY_MARK in found["dshal.a"].function_level[0][1] and LAZY_MARK not in found["dshal.a"].function_level[1][1]


def test_module_level_import_graph_has_no_cycle(modules: dict[str, Module]) -> None:
    assert "dshal.ops.dispatch" in modules and "dshal_conformance" in modules  # the scan sees the tree
    graph = {name: module.imports for name, module in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or ())


def test_ops_and_runtime_are_layered(modules: dict[str, Module]) -> None:
    """The runtime installs into the ops' dispatcher and builds on the device interface and
    the communicators; those import nothing of the runtime (they reach the active one through
    the public ``dshal.current()`` at call time), so either may import the other freely."""
    assert {"dshal.ops.dispatch", "dshal.backend", "dshal.registry"} <= modules["dshal.runtime"].imports
    below_runtime = {"dshal.ops", "dshal.comm", "dshal.backend", *(n for n in modules if n.startswith("dshal.ops."))}
    for name in below_runtime:
        assert not modules[name].imports & {"dshal.runtime", "dshal.registry"}, name


def _in_checked_paths(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in LAZY_IMPORT_CHECKED_PATHS)


def test_function_level_project_imports_say_why(modules: dict[str, Module]) -> None:
    assert all((REPO / p).exists() for p in LAZY_IMPORT_CHECKED_PATHS), "a checked path moved: update the list"
    unexplained = [
        f"{module.path.relative_to(REPO)}:{line}: {text.strip()}"
        for module in modules.values()
        if _in_checked_paths(module.path)
        for line, text in module.function_level
        if not text.partition(LAZY_MARK)[2].strip()
    ]
    assert not unexplained, (
        f"project imports inside functions need a trailing '{LAZY_MARK} <reason>' (start-up time or a lazy "
        "vendor runtime), or belong at module level:\n" + "\n".join(unexplained)
    )


# Each order runs in one fresh interpreter: import every project module in turn and report
# which failed and why. A module that needs a vendor runtime this machine lacks is skipped.
IMPORT_ALL = textwrap.dedent("""\
    import importlib, json, sys, traceback
    project = set(sys.argv[2].split(","))
    result = {"imported": 0, "skipped": {}, "failed": {}}
    for name in json.loads(sys.argv[1]):
        try:
            importlib.import_module(name)
            result["imported"] += 1
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] in project:
                result["failed"][name] = traceback.format_exc(limit=-4)
            else:
                result["skipped"][name] = f"needs {err.name}, not installed here"
        except BaseException:
            result["failed"][name] = traceback.format_exc(limit=-4)
    print(json.dumps(result))
""")


def import_orders(names: list[str]) -> dict[str, list[str]]:
    shuffled = list(names)
    random.Random(15).shuffle(shuffled)
    return {"sorted": sorted(names), "reversed": sorted(names, reverse=True), "shuffled": shuffled}


def test_every_module_imports_in_any_of_several_orders(modules: dict[str, Module]) -> None:
    # __main__ modules run a command when imported; they hold only that call.
    names = [n for n in modules if not n.endswith("__main__")]
    roots = ",".join(sorted({n.split(".")[0] for n in names}))
    runs = {
        order: subprocess.Popen(
            [sys.executable, "-c", IMPORT_ALL, json.dumps(listed), roots],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for order, listed in import_orders(names).items()
    }
    for order, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{order}: the importing interpreter failed:\n{err[-3000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert not result["failed"], f"{order} order: " + "\n".join(f"{n}:\n{tb}" for n, tb in result["failed"].items())
        assert result["imported"] + len(result["skipped"]) == len(names) and result["imported"] > 0
        for name, why in result["skipped"].items():
            print(f"{order}: skipped {name}: {why}")


def test_the_start_up_reasons_hold() -> None:
    """The ``# lazy: start-up time`` imports above keep these modules free of torch (and of
    discovery): the CLI's parser, a config file and ``dshal plan --help`` start at once."""
    code = "import sys, dshal, dshal.cli, dshal.config, dshal.plan.command; print(sorted({'torch', 'stevedore'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


#: Command lines answered from the parser alone (help, a usage error, exit 2): they import no
#: torch, nor discovery or the table printer. Every command's options live in a module that
#: imports none of them (``dshal.run_command``, ``dshal_conformance.conformance_command``, ...).
PARSER_ONLY_COMMANDS = (
    ["--help"], ["--version"], ["inf"], ["info", "--help"], ["info", "--jsn"], ["plan", "--help"], ["matrix", "--help"],
    *([command, flag] for command in ("run", "conformance", "bench", "profile", "diff", "kernels", "tune")
      for flag in ("--help", "--bogus")),
)
HEAVY_FOR_THE_PARSER = ("torch", "stevedore", "rich", "transformers", "triton", "dshal.registry", "dshal.model")


@pytest.mark.parametrize("argv", PARSER_ONLY_COMMANDS, ids=" ".join)
def test_commands_answered_by_the_parser_import_nothing_heavy(argv: list[str]) -> None:
    code = textwrap.dedent(f"""\
        import sys
        from dshal.cli import main
        try:
            status = main({argv!r})
        except SystemExit as done:
            status = done.code
        print("exit", status, "loaded:", sorted(set({HEAVY_FOR_THE_PARSER!r}) & set(sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    answered = 0 if argv[-1] in ("--help", "--version") else 2  # else a usage error: argparse's exit 2
    assert done.stdout.splitlines()[-1] == f"exit {answered} loaded: []", done.stderr
