"""Fixtures for the dshal core tests.

``install_plugin`` builds a throw-away distribution the way pip lays one out in
site-packages -- ``<dist>-<version>.dist-info/{METADATA,entry_points.txt}`` with the
plugin module beside it -- puts that directory on ``sys.path`` and refreshes the
registry, so discovery goes through real entry points (no mocks).
"""

from __future__ import annotations

import itertools
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

PLUGIN_TEMPLATES = Path(__file__).parent / "fixtures" / "core_plugins"
DSHAL_ENV = ("DSHAL_CONFIG", "DSHAL_BACKEND", "DSHAL_EMULATE", "DSHAL_PLUGINS")


def write_distribution(
    site: Path, dist: str, version: str, module_file: Path, module: str, entry_points: Mapping[str, str]
) -> Path:
    """Lay out one installed distribution in ``site``: the module plus its dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(module_file, site / f"{module}.py")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dshal.backends]\n{lines}")
    return info


@pytest.fixture
def clean_dshal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DSHAL_* variable from the caller's shell leaks into the test."""
    for var in DSHAL_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def install_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_dshal_env: None
) -> Iterator[Callable[..., str]]:
    """``install_plugin(template, {ep_name: attr}, module=None) -> module name``.

    Copies ``tests/fixtures/core_plugins/<template>.py`` under a unique module name (so no
    test sees a module another test imported), declares ``ep_name = module:attr`` for
    each entry, and makes it discoverable.
    """
    from dshal.registry import REGISTRY

    counter = itertools.count()
    modules: list[str] = []

    def install(template: str, entry_points: Mapping[str, str], *, module: str | None = None,
                source: Path | None = None, dist: str | None = None, version: str = "0.1") -> str:
        module = module or f"dshal_test_{template}_{uuid.uuid4().hex[:8]}"
        site = tmp_path / f"site{next(counter)}"
        values = {name: f"{module}:{attr}" if attr else module for name, attr in entry_points.items()}
        write_distribution(site, dist or f"dshal-test-{template}", version,
                           source or PLUGIN_TEMPLATES / f"{template}.py", module, values)
        monkeypatch.syspath_prepend(str(site))
        modules.append(module)
        REGISTRY.refresh()
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)
    REGISTRY.refresh()  # the next test discovers without these sites


# ----------------------------------------------------------------- bad inputs of the ops
class BadInput:
    """One ``(call, error, fragment)`` of a test module's ``BAD`` list: ``call()`` must raise
    ``error`` with ``fragment`` in its message."""

    def __init__(self, call: Callable[[], object], error: type[BaseException], fragment: str):
        self.call, self.error, self.fragment = call, error, fragment

    def check(self) -> None:
        with pytest.raises(self.error) as info:
            self.call()
        assert self.fragment in str(info.value)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``bad_input`` runs once per entry of its module's ``BAD`` list."""
    if "bad_input" in metafunc.fixturenames:
        bad = metafunc.module.BAD
        metafunc.parametrize("bad_input", [BadInput(*b) for b in bad], ids=[f"bad{i}" for i in range(len(bad))])
