"""The ``model`` family and ``dshal diff``: the cpu backend passes; a provider defect that
every op case lets through is caught at the model level and named by ``dshal diff``."""

from __future__ import annotations

import json

import pytest

from dshal.cli import main
from dshal.model.checkpoint import save_checkpoint
from dshal_conformance import modelcheck as mc, runner
from dshal_conformance.diff import compare


def _by_id(rep: dict) -> dict:
    return {c["id"]: c for c in rep["cases"]}


def test_cpu_model_family_reports_drift_per_layer_and_tokens(cpu_report: dict) -> None:
    cases = _by_id(cpu_report)
    for mode in ("high", "fp8-block"):
        drift, tokens = cases[f"model/{mode}/drift"], cases[f"model/{mode}/tokens"]
        assert drift["status"] == "pass" and tokens["status"] == "pass", (drift["reason"], tokens["reason"])
        assert drift["kind"] == "model" and drift["op"] == "model"
        layers = drift["details"]["layer_drift"]
        assert list(layers) == ["embed", "layers.0", "layers.1", "layers.2", "norm", "lm_head"]
        assert layers["embed"] == 0.0  # a lookup: exact
        assert 0 < drift["value"] <= drift["threshold"]
        assert drift["details"]["first_layer_over"] is None
        assert tokens["details"]["decisive"] >= 3 and tokens["value"] == 1.0
    # The mode's tolerance carries its origin.
    assert "torch.testing" in cases["model/high/drift"]["details"]["origin"]


@pytest.fixture(scope="module")
def biased_reports(biased_backend_installed) -> tuple[dict, dict]:  # noqa: ANN001
    with biased_backend_installed():
        target = runner.resolve("biased")
        assert target.not_run is None, target.not_run
        ops = runner.run(target, runner.Options(ops=["linear"], cases=["linear/*"], progress=False, collectives=False))
        model = runner.run(runner.resolve("biased"), runner.Options(cases=["model/high"], progress=False, collectives=False))
    return ops, model


def test_every_linear_case_lets_the_bias_through(biased_reports: tuple[dict, dict]) -> None:
    ops, _ = biased_reports
    judged = [c for c in ops["cases"] if c["kind"] in ("accuracy", "edge")]
    assert len(judged) >= 10
    assert {c["status"] for c in judged} <= {"pass", "unsupported"}, [c["id"] for c in judged if c["status"] not in ("pass", "unsupported")]
    assert sum(c["status"] == "pass" for c in judged) >= 10


def test_model_family_catches_the_compounding_bias(biased_reports: tuple[dict, dict]) -> None:
    _, model = biased_reports
    drift = _by_id(model)["model/high/drift"]
    assert drift["status"] == "fail"
    assert drift["value"] > 10 * drift["threshold"]  # far past the float32 model bound
    details = drift["details"]
    assert details["first_layer_over"] == "layers.0"
    layers = details["layer_drift"]
    assert layers["embed"] == 0.0 and layers["layers.0"] > details["tolerance"]
    assert "first layer over" in drift["reason"] and "layers.0" in drift["reason"]


@pytest.fixture(scope="module")
def partial_reports(partial_backends_installed) -> dict[str, dict]:  # noqa: ANN001
    options = runner.Options(cases=["model/*", "capability/attention"], progress=False, collectives=False)
    with partial_backends_installed():
        return {name: runner.run(runner.resolve(name), options) for name in ("partial", "partialbiased")}


def test_a_partial_plugin_gets_its_ops_judged_inside_the_model(partial_reports: dict[str, dict]) -> None:
    cases = _by_id(partial_reports["partial"])
    # Undeclared ops stay undeclared: the stand-ins serve the model case only.
    assert cases["capability/attention"]["status"] == "unsupported"
    drift, tokens = cases["model/high/drift"], cases["model/high/tokens"]
    assert drift["status"] == "pass" and tokens["status"] == "pass", (drift["reason"], tokens["reason"])
    served = drift["details"]["reference_served"]
    assert "attention" in served and "moe_experts" in served
    assert "linear" not in served and "rms_norm" not in served
    assert "served by the reference" in drift["reason"] and "attention" in drift["reason"]
    assert tokens["details"]["reference_served"] == served
    # fp8-block needs quantize_fp8 and fp8_gemm from the backend itself.
    assert cases["model/fp8-block/drift"]["status"] == "unsupported"
    assert "fp8_gemm" in cases["model/fp8-block/drift"]["reason"]
    from dshal_conformance.legs import family_rows

    _, cells = family_rows([partial_reports["partial"]], "model")
    assert "reference served: " in cells["high"][0] and "attention" in cells["high"][0]


def test_a_partial_plugin_with_a_compounding_bias_fails_the_model_case(partial_reports: dict[str, dict]) -> None:
    drift = _by_id(partial_reports["partialbiased"])["model/high/drift"]
    assert drift["status"] == "fail", drift["reason"]
    assert drift["details"]["first_layer_over"] == "layers.0"
    assert "attention" in drift["details"]["reference_served"]


def test_diff_names_linear_in_the_first_drifting_layer(biased_backend_installed, tmp_path) -> None:  # noqa: ANN001

    out = tmp_path / "diff.json"
    page = tmp_path / "diff.html"
    with biased_backend_installed():
        assert main(["diff", "--backend", "cpu", "--backend", "biased", "--json", str(out), "--html", str(page)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "dshal.diff/1"
    assert result["first_layer_over"] == "layers.0"
    cause, first = result["likely_cause"], result["first_op_over"]
    assert cause["op"] == "linear" and cause["layer"] == "layers.0"
    assert cause["local_drift"] > result["tolerance"]["drift"]
    assert first["op"] == "linear" and first["layer"] == "layers.0" and first["a"] != first["b"]
    # Every other op of that layer, given the same inputs, agrees with cpu.
    others = [r for r in result["ops"] if r["layer"] == "layers.0" and r["op"] != "linear"]
    assert others and all(r["local_drift"] <= result["tolerance"]["drift"] for r in others)
    text = page.read_text()
    assert "likely cause: linear" in text and "layers.0" in text


def test_diff_rejects_one_backend() -> None:

    assert main(["diff", "--backend", "cpu"]) == 1


@pytest.mark.needs_interpreter
def test_diff_cpu_against_emulated_nvidia_agrees(tmp_path) -> None:  # noqa: ANN001
    """Across vendors here: the nvidia plugin's own kernels (Triton interpreter) against cpu."""

    result = compare("cpu", "nvidia", emulate=True, prompt_len=4)
    assert result["backends"][1]["emulated"] is True
    assert result["first_layer_over"] is None, result["layers"]
    assert result["ops"] and all(r["local_drift"] <= result["tolerance"]["drift"] for r in result["ops"])
    # ... and in the decode steps (the plugin's kernels at M = 1, on the absorbed KV cache).
    assert result["decode_steps"] >= 1 and result["first_drift"] is None, result["first_drift"]


def test_diff_reads_a_checkpoint_directory_and_the_float64_reference(tmp_path) -> None:  # noqa: ANN001
    """``--checkpoint DIR`` (a Hugging Face layout on disk) against ``reference``, the float64 oracle."""

    args = mc.suite_args("ci")
    save_checkpoint(tmp_path / "ckpt", args, mc.suite_checkpoint(args))
    result = compare("cpu", "reference", checkpoint=str(tmp_path / "ckpt"), prompt_len=4)
    assert result["checkpoint"] == str(tmp_path / "ckpt")
    assert [r["layer"] for r in result["layers"]] == ["embed", "layers.0", "layers.1", "layers.2", "norm", "lm_head"]
    assert result["first_layer_over"] is None and 0 < result["logit_drift"] < result["tolerance"]["drift"]
    assert result["backends"][1]["providers"]["linear"] == "reference"
