"""examples/plugin_example/ -- the README's plugin -- discovered through its own entry point."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
import torch

import dshal
from dshal.ops.catalogue import SPECS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_example"


@pytest.fixture
def tiny(install_plugin) -> str:
    """Install the example exactly as its pyproject.toml declares it (name, version, entry point)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    (name, value), = project["entry-points"]["dshal.backends"].items()
    module, attr = value.split(":")
    install_plugin("tiny", {name: attr}, module=module, source=EXAMPLE / f"{module}.py",
                   dist=project["name"], version=project["version"])
    return name


def test_example_is_discovered_and_serves_rms_norm(tiny, caplog):
    info = next(i for i in dshal.backends() if i.name == tiny)
    assert (info.loaded, info.available, info.version, info.reason) == (True, True, "0.1.0", "runs on any CPU")

    rt = dshal.use(backend=tiny)
    assert rt.providers["rms_norm"] == "tiny" and rt.provider_kind("rms_norm") == "native"
    assert rt.fallbacks == frozenset(SPECS) - {"rms_norm"}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen)
    w = torch.rand(64, generator=gen) + 0.5
    torch.testing.assert_close(dshal.ops.rms_norm(x, w), dshal.ops.reference.rms_norm(x, w))
    xb, rb = x.bfloat16(), torch.randn(4, 64, generator=gen).bfloat16()
    y, summed = dshal.ops.rms_norm(xb, w, residual=rb)
    y_ref, summed_ref = dshal.ops.reference.rms_norm(xb, w, residual=rb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(summed, summed_ref, rtol=0, atol=0)

    # The rest falls back to the reference, and says so once.
    with caplog.at_level(logging.WARNING, logger="dshal"):
        q, scale = dshal.ops.quantize_int8(x)
        dshal.ops.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (4, 1)
    assert [r.getMessage() for r in caplog.records].count(
        "dshal: backend 'tiny' lacks op 'quantize_int8'; serving it with the op's reference (provider 'reference', fallback: warn)") == 1


def test_example_inputs_are_checked_by_dshal(tiny):
    dshal.use(backend=tiny)
    with pytest.raises(dshal.ShapeError, match="weight"):
        dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(7))


def test_example_stays_readme_sized():
    lines = (EXAMPLE / "tiny_backend.py").read_text().splitlines()
    assert len(lines) <= 30
