"""dshal is a typed library for the code written against it (PEP 561).

Each package ships a ``py.typed`` marker, or a user's mypy / pyright ignores every annotation
of ``dshal.use``, ``dshal.ops.*`` and ``dshal.Backend``; and the public annotations hold up
under ``mypy --strict`` in user code written the way the README and docs show it
(tests/fixtures/typed_user_code.py), while code that misuses the API still gets errors.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "typed_user_code.py"

#: Folder holding a distribution's pyproject.toml -> its import package.
PACKAGES = {
    ".": "dshal",
    "conformance": "dshal_conformance",
    "plugins/nvidia": "dshal_nvidia",
    "plugins/amd": "dshal_amd",
    "plugins/ascend": "dshal_ascend",
}

#: Misuses a user's type checker must catch once the packages are typed: line -> error code.
MISUSE = {
    "dshal.usee()": "attr-defined",  # a module __getattr__ would make any name Any
    'dshal.ops.linear(torch.ones(2), "w")': "arg-type",
    "bad: str = dshal.ops.rms_norm(torch.ones(2), torch.ones(2))": "assignment",
    "pair: torch.Tensor = dshal.ops.rms_norm(torch.ones(2), torch.ones(2), residual=torch.ones(2))": "assignment",
    "ref: str = dshal.ops.reference.linear(torch.ones(2), torch.ones(2, 2))": "assignment",
    "att: str = dshal.ops.reference.attention(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))": "assignment",
    "names: list[str] = dshal.backends()": "assignment",
    'logits: str = dshal.model.random_model()(torch.ones(1, 1, dtype=torch.long))': "assignment",
    'model: str = dshal.model.from_pretrained("ckpt")': "assignment",
}
MISUSE_BACKEND = '''

class WrongHooks(dshal.Backend):
    name = "wrong"
    device_type = "cpu"

    def availability(self) -> dshal.Availability:
        return dshal.Availability(True)

    def capabilities(self) -> dshal.Capabilities:
        return dshal.Capabilities()

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        return {}

    def prepare_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:  # role missing
        return weight
'''


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_each_package_ships_a_py_typed_marker_as_package_data(folder: str) -> None:
    package = PACKAGES[folder]
    assert (ROOT / folder / package / "py.typed").is_file(), f"{folder}/{package}/py.typed is missing"
    pyproject = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"].get("package-data", {})
    assert "py.typed" in package_data.get(package, []), (
        f"{folder}/pyproject.toml: [tool.setuptools.package-data] {package} lacks 'py.typed' (a wheel would ship "
        f"without the marker); has {package_data.get(package)}"
    )


def _mypy(files: list[Path], cache: Path) -> subprocess.CompletedProcess[str]:
    # The sources, as a type checker finds an installed typed package: the editable installs'
    # import hooks are invisible to mypy. follow-imports=silent: judge the user's file only.
    source_roots = [ROOT, *(ROOT / folder for folder in PACKAGES if folder != ".")]
    env = {**os.environ, "MYPYPATH": os.pathsep.join(map(str, source_roots))}
    command = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
               "--show-error-codes", "--cache-dir", str(cache), *map(str, files)]
    return subprocess.run(command, cwd=cache.parent, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (the dev extra installs it)")
def test_user_code_type_checks_under_mypy_strict_and_misuse_is_caught(tmp_path: Path) -> None:
    misuse = tmp_path / "misuse.py"
    header = ("from collections.abc import Callable, Mapping\nfrom typing import Any\n\nimport torch\n\n"
              "import dshal\nimport dshal.model\n\n")
    misuse.write_text(header + "\n".join(MISUSE) + "\n" + MISUSE_BACKEND)
    done = _mypy([FIXTURE, misuse], tmp_path / "mypy-cache")
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert done.returncode in (0, 1) and not done.stderr.strip(), done.stdout + done.stderr  # 2: mypy itself failed
    in_fixture = [line for line in errors if not line.startswith(f"{misuse.name}:")]  # mypy runs in tmp_path
    assert not in_fixture, "dshal's public annotations fail user code under mypy --strict:\n" + "\n".join(in_fixture)
    lines = misuse.read_text().splitlines()
    caught = {}
    for line in errors:
        number, code = re.match(r".*?:(\d+): error: .*\[([a-z-]+)\]$", line).groups()
        caught[lines[int(number) - 1].strip()] = code
    want = {**MISUSE, "def prepare_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:  # role missing": "override"}
    assert caught == want, done.stdout
