"""The run report: provider and call count per op, every fallback or override with its
reason, precision per layer -- through ``dshal run --report F`` and the Python API."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

import dshal
from dshal.model import random_model, tiny_args
from dshal.model.run_report import RunReport


def test_python_api_counts_calls_and_names_overrides() -> None:
    rt = dshal.use(backend="cpu", ops={"attention": "cpu", "moe_gate": "reference"}, precision={"gemm": "bf16"})
    model = random_model(tiny_args(), seed=1)
    report = RunReport(rt, model)
    with report.recording():
        model.generate(torch.tensor([[1, 2, 3]]), 2)
    data = report.to_dict()
    layers = tiny_args().num_hidden_layers
    # 4 rms_norm per layer (input, post-attention, q_a and kv_a norms) + the final one, per
    # forward; 2 forwards (prefill + 1 decode).
    assert data["ops"]["rms_norm"]["calls"] == 2 * (4 * layers + 1)
    assert data["ops"]["attention"]["calls"] == 2 * layers
    assert data["ops"]["linear"]["provider"] == "cpu" and data["ops"]["linear"]["calls"] > 0
    # The path per weight format, where it depends on it (Capabilities.op_paths): the table shows it too.
    assert data["ops"]["linear"]["paths"]["bf16"]["kind"] == "native" and "paths" not in data["ops"]["rms_norm"]
    shown = io.StringIO()
    report.print(Console(file=shown, width=200))
    want = "native (bf16: native; fp8-block: native; fp8-row: native; fp8-tensor: native; int8: reference)"
    assert want in shown.getvalue()
    assert data["calls_total"] == sum(op["calls"] for op in data["ops"].values())
    override = [f for f in data["fallbacks"] if f["op"] == "attention"]
    assert override == [{"op": "attention", "provider": "cpu", "kind": "override", "reason": "config ops.attention: cpu",
                         "calls": 2 * layers}]
    gate = next(f for f in data["fallbacks"] if f["op"] == "moe_gate")
    assert (gate["provider"], gate["kind"], gate["reason"]) == ("reference", "override", "config ops.moe_gate: reference")
    assert gate["calls"] > 0 and data["ops"]["moe_gate"]["provider"] == "reference"
    assert [layer["modes"] for layer in data["precision"]["layers"]] == [["float32"]] * layers
    # The hook is gone afterwards: nothing more is counted.
    model(torch.tensor([[1, 2]]))
    assert report.to_dict()["calls_total"] == data["calls_total"]


@pytest.mark.needs_interpreter
def test_fallbacks_and_strict_gaps_carry_reasons() -> None:
    rt = dshal.use(backend="nvidia", emulate=True, determinism="strict")
    data = RunReport(rt).to_dict()
    kinds = {(f["op"], f["kind"]) for f in data["fallbacks"]}
    assert ("int8_gemm", "fallback") in kinds and ("linear", "determinism") in kinds
    fb = next(f for f in data["fallbacks"] if f["op"] == "int8_gemm" and f["kind"] == "fallback")
    assert "does not provide 'int8_gemm'" in fb["reason"] and "fallback: warn" in fb["reason"]
    assert fb["provider"] == "reference" and "provider 'reference'" in fb["reason"]
    assert "precision" not in data  # no model given


def test_dshal_run_report_writes_json_and_prints_tables(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    from dshal.cli import main

    monkeypatch.setenv("DSHAL_BACKEND", "cpu")  # not auto: on a GPU machine auto picks the GPU plugin
    out = tmp_path / "run.json"
    assert main(["run", "--new-tokens", "2", "--prompt-len", "3", "--no-progress", "--report", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "cpu" and data["ops"]["linear"]["calls"] > 0
    assert len(data["precision"]["layers"]) == tiny_args().num_hidden_layers
    text = capsys.readouterr().out
    assert "run report: ops served on cpu" in text and f"run report: {out}" in text


def test_a_report_counts_its_own_threads_calls_and_a_second_one_is_a_clear_error() -> None:
    """In a service, request A's report counted request B's op calls (404 instead of 202),
    and a second concurrent report was a bare RuntimeError from the dispatcher."""
    import threading

    dshal.use(backend="cpu")
    x, w = torch.randn(2, 8), torch.ones(8)
    report = RunReport(dshal.current())
    started, release, seen = threading.Event(), threading.Event(), []

    def other_request() -> None:
        started.set()
        for _ in range(5):
            dshal.ops.rms_norm(x, w)
        try:
            with RunReport(dshal.current()).recording():
                pass
        except dshal.DshalError as err:
            seen.append(str(err))
        release.set()

    with report.recording():
        dshal.ops.rms_norm(x, w)
        worker = threading.Thread(target=other_request)
        worker.start()
        release.wait(30)
        worker.join()
    assert report.calls["rms_norm"] == 1
    assert seen and "hooks do not nest" in seen[0]


def test_calls_a_native_provider_served_with_the_reference_are_reported(install_plugin) -> None:
    """A provider listed as native that computes some inputs with dshal's reference (the Ascend
    plugin's float32 attention) was invisible: the report said every call was the backend's kernel."""
    install_plugin("backends", {"partref": "PartlyReferenceBackend"})
    rt = dshal.use(backend="partref")
    rt.backend.inside["rms_norm"] = 5  # before the recording: not this run's
    report = RunReport(rt)
    with report.recording():
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            dshal.ops.rms_norm(torch.ones(2, 8, dtype=dtype), torch.ones(8, dtype=dtype))
    inside = [f for f in report.to_dict()["fallbacks"] if f["kind"] == "reference inside"]
    assert inside == [{"op": "rms_norm", "provider": "partref", "kind": "reference inside", "calls": 2,
                       "reason": inside[0]["reason"]}]
    assert inside[0]["reason"].startswith("2 rms_norm computations (of 3 rms_norm calls; ")
    assert "used dshal's reference math inside backend 'partref', not its kernel" in inside[0]["reason"]
    shown = io.StringIO()
    report.print(Console(file=shown, width=250))
    assert "reference inside" in shown.getvalue()


def test_dshal_run_says_what_a_native_provider_computed_with_the_reference(install_plugin, tmp_path, capsys) -> None:
    from dshal.cli import main

    install_plugin("backends", {"partref": "PartlyReferenceBackend"})
    out_json = tmp_path / "run.json"
    assert main(["run", "--backend", "partref", "--prompt-len", "3", "--new-tokens", "2", "--no-progress",
                 "--json", str(out_json)]) == 0
    inside = json.loads(out_json.read_text())["reference_inside"]
    assert list(inside) == ["rms_norm"] and inside["rms_norm"] > 0  # the tiny model is float32
    assert ("reference math inside partref's providers (inputs their kernels do not take; this process, warm-up "
            f"included): rms_norm x{inside['rms_norm']}") in capsys.readouterr().out


def test_dshal_run_json_names_a_checkpoint_in_the_home_folder_from_tilde(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """``model`` was the absolute ``--checkpoint`` path: a shared run file named the user's home."""
    from dshal.cli import main
    from dshal.model.checkpoint import random_checkpoint, save_checkpoint

    monkeypatch.setenv("DSHAL_BACKEND", "cpu")
    monkeypatch.setenv("HOME", str(tmp_path))
    save_checkpoint(tmp_path / "ckpt", tiny_args(), random_checkpoint(tiny_args(), seed=0))
    out = tmp_path / "run.json"
    argv = ["run", "--checkpoint", str(tmp_path / "ckpt"), "--new-tokens", "1", "--prompt-len", "2", "--no-progress",
            "--graphs", "off", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["model"] == "~/ckpt"
