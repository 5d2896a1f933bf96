"""Shared fixtures of the conformance suite's own tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dshal_conformance import runner
from dshal.registry import REGISTRY

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def cpu_report() -> dict:
    """The cpu backend's full ci-tier report (collectives included), run once per session."""

    return runner.run(runner.resolve("cpu"), runner.Options(tier="ci", progress=False))


@pytest.fixture(scope="session")
def wrong_backend_path(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Paths that make ``conformance_wrong_backend.WrongBackend`` an installed plugin
    named ``wrong``: a throw-away dist-info declaring the entry point, and this folder.
    Nothing is put on sys.path here (see :func:`wrong_backend_installed`)."""
    site = tmp_path_factory.mktemp("wrong-plugin")
    info = site / "dshal_wrong-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dshal-wrong\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[dshal.backends]\nwrong = conformance_wrong_backend:WrongBackend\n")
    return [str(site), str(HERE)]


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
    site = tmp_path_factory.mktemp("biased-plugin")
    info = site / "dshal_biased-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dshal-biased\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[dshal.backends]\nbiased = conformance_biased_backend:BiasedBackend\n")
    return lambda: _installed([str(site), str(HERE)])
