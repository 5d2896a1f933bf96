"""Shared fixtures of the conformance suite's own tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dshal.registry import REGISTRY
from dshal_conformance import runner

HERE = Path(__file__).resolve().parent
CORE_PLUGIN_FIXTURES = HERE.parents[1] / "tests" / "fixtures" / "core_plugins"


@pytest.fixture(scope="session")
def cpu_report() -> dict:
    """The cpu backend's full ci-tier report (collectives included), run once per session."""

    return runner.run(runner.resolve("cpu"), runner.Options(tier="ci", progress=False))


@pytest.fixture(scope="session")
def wrong_backend_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Paths that make ``conformance_wrong_backend.WrongBackend`` an installed plugin
    named ``wrong``: a throw-away dist-info declaring the entry point, and this folder.
    Nothing is put on sys.path here (see :func:`wrong_backend_installed`)."""
    return [_dist_info(tmp_path_factory, "wrong", "conformance_wrong_backend:WrongBackend"), str(HERE)]


@pytest.fixture(scope="session")
def wrong_backend_installed(wrong_backend_path: list[str]):
    """``with wrong_backend_installed(): ...`` -- see :func:`_installed`."""
    return lambda: _installed(wrong_backend_path)


@contextlib.contextmanager
def _installed(paths: list[str]) -> Iterator[None]:
    """The ``wrong`` plugin is discoverable inside the block only (also by the collective
    rank processes, which inherit sys.path), so other tests never see it."""

    sys.path[:0] = paths
    REGISTRY.refresh()
    try:
        yield
    finally:
        for p in paths:
            sys.path.remove(p)
        REGISTRY.refresh()


@pytest.fixture(scope="session")
def biased_backend_installed(tmp_path_factory: pytest.TempPathFactory):
    """``with biased_backend_installed(): ...``: ``conformance_biased_backend.BiasedBackend``
    is the installed plugin ``biased`` inside the block (a throw-away dist-info, as ``wrong``)."""
    site = _dist_info(tmp_path_factory, "biased", "conformance_biased_backend:BiasedBackend")
    return lambda: _installed([site, str(HERE)])


@pytest.fixture(scope="session")
def partial_backends_installed(tmp_path_factory: pytest.TempPathFactory):
    """``with partial_backends_installed(): ...``: ``conformance_partial_backend``'s
    ``partial`` and ``partialbiased`` (linear and rms_norm only) are installed plugins inside the block."""
    sites = [
        _dist_info(tmp_path_factory, "partial", "conformance_partial_backend:PartialBackend"),
        _dist_info(tmp_path_factory, "partialbiased", "conformance_partial_backend:PartialBiasedBackend"),
    ]
    return lambda: _installed([*sites, str(HERE)])


@pytest.fixture(scope="session")
def decode_wrong_backend_installed(tmp_path_factory: pytest.TempPathFactory):
    """``with decode_wrong_backend_installed(): ...``: ``conformance_decode_wrong_backend.DecodeWrongBackend``
    (attention wrong only for a single query) is the installed plugin ``decodewrong`` inside the block."""
    site = _dist_info(tmp_path_factory, "decodewrong", "conformance_decode_wrong_backend:DecodeWrongBackend")
    return lambda: _installed([site, str(HERE)])


@pytest.fixture(scope="session")
def fragile_backend_installed(tmp_path_factory: pytest.TempPathFactory):
    """``with fragile_backend_installed(): ...``: ``conformance_fragile_backend.FragileBackend``
    (silu_and_mul assumes a contiguous input) is the installed plugin ``fragile`` inside the block."""
    site = _dist_info(tmp_path_factory, "fragile", "conformance_fragile_backend:FragileBackend")
    return lambda: _installed([site, str(HERE)])


@pytest.fixture(scope="session")
def broken_plugin_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Paths that make ``tests/fixtures/core_plugins/fails_on_import.py`` (its import raises)
    an installed plugin named ``broken``: a plugin bug, not an absent plugin."""
    return [_dist_info(tmp_path_factory, "broken", "fails_on_import:Backend"), str(CORE_PLUGIN_FIXTURES)]


@pytest.fixture(scope="session")
def no_fp8_storage_installed(tmp_path_factory: pytest.TempPathFactory):
    """``with no_fp8_storage_installed(): ...``: the core tests' fixture backend
    ``tests/fixtures/core_plugins/no_fp8_storage.py`` (the cpu backend's ops, declaring
    ``Capabilities.fp8_storage`` False) is the installed plugin ``nofp8test`` inside the block."""
    site = _dist_info(tmp_path_factory, "nofp8test", "no_fp8_storage:NoFp8StorageBackend")
    return lambda: _installed([site, str(CORE_PLUGIN_FIXTURES)])


def _dist_info(tmp_path_factory: pytest.TempPathFactory, name: str, target: str) -> str:
    """A throw-away site folder holding ``dshal-<name>``'s dist-info, whose entry point
    declares backend ``name = target``; the module itself comes from another path."""
    site = tmp_path_factory.mktemp(f"{name}-plugin")
    info = site / f"dshal_{name}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dshal-{name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[dshal.backends]\n{name} = {target}\n")
    return str(site)
