"""Fixtures for the dshal core tests.

``install_plugin`` builds a throw-away distribution the way pip lays one out in
site-packages -- ``<dist>-<version>.dist-info/{METADATA,entry_points.txt}`` with the
plugin module beside it -- puts that directory on ``sys.path`` and refreshes the
registry, so discovery goes through real entry points (no mocks).
"""

from __future__ import annotations

import collections
import itertools
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch

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
def cli_main() -> Callable[..., subprocess.CompletedProcess]:
    """``cli_main(capture, argv)``: ``dshal ARGV`` through :func:`dshal.cli.main` in this process
    (which gives back the caller's state), as a ``CompletedProcess`` of its exit status and the
    output ``capture`` (pytest's capsys or capfd) took; argparse's usage errors are exits too.
    About 2 s a call less than a child process (no interpreter to start, no torch to import)."""
    from dshal.cli import main  # lazy: a fixture, not every test of the package needs the CLI

    def run(capture: pytest.CaptureFixture[str], argv: list[str]) -> subprocess.CompletedProcess:
        capture.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        out, err = capture.readouterr()
        return subprocess.CompletedProcess(["dshal", *argv], code, out, err)

    return run


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """A test that sets torch's thread count itself (``torch.set_num_threads``, ``set_threads``;
    ``dshal.cli.main`` gives the caller's back) gets it restored after, so no later test's threads
    depend on the test order."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


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


# ----------------------------------------------------------------- kernel wrappers' checks
class KernelChecks(collections.Counter):
    """The ``kernel_checks`` fixture: input-check calls of the Triton kernel wrappers so far,
    by ``module.name``."""

    def trusted_matches_checked(self, call: Callable[[], object]) -> None:
        """``call()`` checked (some of its wrapper's checks run), then inside
        ``dshal.ops.trusted()`` (none run): the same outputs, bit for bit."""
        import torch

        import dshal

        self.clear()
        checked = call()
        assert self, "the checked call ran no input checks"
        self.clear()
        with dshal.ops.trusted():
            trusted = call()
        assert not self, f"input checks ran inside dshal.ops.trusted(): {dict(self)}"
        as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
        for want, got in zip(as_tuple(checked), as_tuple(trusted), strict=True):
            assert isinstance(got, torch.Tensor) and (got.dtype, got.shape) == (want.dtype, want.shape)
            assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.fixture
def kernel_checks(monkeypatch: pytest.MonkeyPatch) -> KernelChecks:
    """Counts the input-check calls of dshal's Triton kernel wrappers, by ``module.name``:
    every ``check_*`` / ``_check_*`` function a kernel module calls through its namespace
    (``check_tensor``, ``check_dim``, ``check_same_device``, ``check_kernel_device``... and
    the wrappers' own helpers) and ``KernelTarget.check_fp8_dtype``. Not the ids' range check
    (``check_ids_in_range``): inside ``dshal.ops.trusted()`` it is a device-side assert, kept.
    Imports the kernel modules (interpreter tests only: mark them ``needs_interpreter``)."""
    from dshal.kernels.triton import load_kernel_modules
    from dshal.kernels.triton.target import KernelTarget

    counts = KernelChecks()

    def counted(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return fn(*args, **kwargs)

        return call

    for module_name, module in load_kernel_modules("cpu").items():
        for attr, value in list(vars(module).items()):
            if callable(value) and attr.lstrip("_").startswith("check_") and attr != "check_ids_in_range":
                monkeypatch.setattr(module, attr, counted(f"{module_name}.{attr}", value))
    monkeypatch.setattr(
        KernelTarget, "check_fp8_dtype", counted("KernelTarget.check_fp8_dtype", KernelTarget.check_fp8_dtype)
    )
    return counts
