"""The ``graph`` family: unsupported with a reason where graph() captures nothing, host
syncs on an op path found and located, and the replay judgement (equal to eager, also on
new data in the static buffers) able to fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dshal.config import load_config
from dshal.ops.catalogue import SPECS
from dshal.perf.syncs import HostSyncCounter
from dshal.runtime import build_runtime
from dshal_conformance.cases.base import Context
from dshal_conformance.cases.graph import emulation_machinery, first_row, judge_host_sync, judge_replay


def _context(rt: Any, table: dict | None = None) -> Context:
    return Context(table=table or rt.table, provided=frozenset(SPECS), device=rt.device, native_e4m3="e4m3fn",
                   fp8_formats=("e4m3fn",), seed=5)


def test_cpu_report_says_why_graph_is_unsupported(cpu_report: dict) -> None:
    graph = [c for c in cpu_report["cases"] if c["kind"] == "graph"]
    assert {c["op"] for c in graph} >= {"linear", "fp8_gemm", "rms_norm", "attention", "moe_experts"}
    assert all(c["status"] == "unsupported" for c in graph)
    assert all("graph() returns the function itself" in c["reason"] for c in graph if c["id"].endswith("/replay"))
    assert all("computes on the host" in c["reason"] for c in graph if c["id"].endswith("/host-sync"))


@pytest.fixture()
def emulated_nvidia():
    return build_runtime(load_config({}, backend="nvidia", emulate=True, fallback="error")).activate()


@pytest.mark.needs_interpreter
def test_emulated_op_paths_do_no_host_sync(emulated_nvidia) -> None:  # noqa: ANN001
    ctx = _context(emulated_nvidia)
    for op in ("linear", "rms_norm", "attention", "moe_experts", "fp8_gemm"):
        v = judge_host_sync(ctx, op, first_row(op), emulated_nvidia)
        assert v.status == "pass" and v.value == 0.0, (op, v.reason)


def _syncing_rms_norm(x, weight, eps=1e-6, residual=None):
    """Planted: reads a value back to the host on every call."""
    if float(x.abs().max()) > 1e6:
        raise ValueError("too large")
    return SPECS["rms_norm"].reference_impl(x, weight, eps, residual)


@pytest.mark.needs_interpreter
def test_a_planted_host_sync_is_a_finding_with_its_call_site(emulated_nvidia) -> None:  # noqa: ANN001
    table = dict(emulated_nvidia.table, rms_norm=SPECS["rms_norm"].checked(_syncing_rms_norm))
    v = judge_host_sync(_context(emulated_nvidia, table), "rms_norm", first_row("rms_norm"), emulated_nvidia)
    assert v.status == "unsupported" and v.finding == "host-sync" and v.value == 1.0
    assert "test_conformance_graph.py" in v.reason and "_syncing_rms_norm" in v.reason
    assert v.details["events"][0]["what"] == "Tensor.__float__"


def test_only_the_triton_package_itself_is_exempt_from_the_sync_count(tmp_path) -> None:  # noqa: ANN001
    """The exemption used to be any path with a ``triton`` folder in it, which also hid dshal's
    own kernel wrappers (``dshal/kernels/triton/*``): their syncs happen on a device too."""
    import importlib.util

    import dshal

    machinery = emulation_machinery()
    assert machinery and importlib.util.find_spec("triton").origin.startswith(machinery)
    wrappers = Path(dshal.__file__).resolve().parent / "kernels" / "triton" / "moe.py"
    assert wrappers.is_file() and not str(wrappers).startswith(machinery)
    source = tmp_path / "vendor" / "triton" / "wrapper.py"  # a plugin's own kernel folder
    source.parent.mkdir(parents=True)
    source.write_text("def launch(t):\n    return t.sum().item()\n")
    spec = importlib.util.spec_from_file_location("planted_wrapper", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with HostSyncCounter(exempt=machinery) as counter:
        module.launch(torch.ones(3))
    assert [what for what, _ in counter.events] == ["Tensor.item"] and "wrapper.py" in counter.events[0][1]


@pytest.mark.needs_interpreter
def test_host_sync_is_judged_as_a_captured_step_calls_the_op(emulated_nvidia) -> None:  # noqa: ANN001
    """Checked mode reads the MoE ids' range on the host (by design: issue #18, item 9); a
    captured decode step runs inside trusted(), where the check is a device-side assert.
    The judgement counts the trusted path, and the checked one does sync."""
    ctx = _context(emulated_nvidia)
    row = first_row("moe_experts")
    assert judge_host_sync(ctx, "moe_experts", row, emulated_nvidia).value == 0.0
    placed = SPECS["moe_experts"].example_inputs(ctx.draw, row).kwargs
    with HostSyncCounter(exempt=emulation_machinery()) as counter:
        emulated_nvidia.table["moe_experts"](**placed)
    assert counter.events and "spec.py" in counter.events[0][1]


def test_counter_sees_python_and_dispatcher_level_syncs() -> None:
    x = torch.randn(8)
    with HostSyncCounter() as counter:
        x.sum().item()
        x.nonzero()
        x.tolist()
        torch.repeat_interleave(torch.tensor([1, 2]))
        (x + 1).mul(2)  # no sync
    assert [what for what, _ in counter.events] == [
        "Tensor.item", "aten::nonzero", "Tensor.tolist", "aten::repeat_interleave"
    ]
    assert all("test_conformance_graph.py" in site for _, site in counter.events)


class StaticReplay:
    """A stand-in for a device graph, on the CPU (no device is claimed): copies the inputs
    into static buffers captured on the first call and re-runs ``fn`` on them. ``stale``
    plants the classic bug: replays return the captured outputs without recomputing."""

    def __init__(self, fn: Any, stale: bool = False):
        self.fn, self.stale, self.static, self.out = fn, stale, None, None

    def __call__(self, **kwargs: Any) -> Any:
        if self.static is None:
            self.static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            self.out = self.fn(**self.static)
            return self.out
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                self.static[k].copy_(v)
        return self.out if self.stale else self.fn(**self.static)


class _Backend:
    def __init__(self, stale: bool):
        self.name, self.stale = "static-replay", stale

    def graph(self, fn: Any) -> Any:
        return StaticReplay(fn, self.stale)


@pytest.mark.parametrize("op", ["rms_norm", "linear", "moe_experts"])
def test_replay_judgement_passes_a_faithful_replay_and_fails_a_stale_one(op: str) -> None:
    rt = build_runtime(load_config({}, backend="cpu")).activate()
    row = first_row(op)
    good = judge_replay(_context(rt), op, row, _Backend(stale=False))
    assert good.status == "pass", good.reason
    assert "replay-new-data" in good.reason
    bad = judge_replay(_context(rt), op, row, _Backend(stale=True))
    assert bad.status == "fail" and bad.metric.startswith("replay-new-data")


def test_the_exemption_holds_both_spellings_of_a_symlinked_triton(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Frames carry the path as imported; a site-packages reached through a symlink (lib64 ->
    lib) spelled triton's folder differently from its resolved path, and the interpreter's
    own host reads counted as findings."""
    import importlib.machinery
    import importlib.util

    real = tmp_path / "lib" / "triton"
    real.mkdir(parents=True)
    (tmp_path / "lib64").symlink_to(tmp_path / "lib")
    linked = tmp_path / "lib64" / "triton"
    spec = importlib.machinery.ModuleSpec("triton", None, is_package=True)
    spec.submodule_search_locations = [str(linked)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "triton" else None)
    assert set(emulation_machinery()) == {f"{linked}/", f"{real}/"}
