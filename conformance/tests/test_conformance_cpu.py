"""The cpu backend passes the ci tier; the report, JUnit XML and bundle are well formed."""

from __future__ import annotations

import hashlib
import json
from xml.etree import ElementTree as ET

import jsonschema
import pytest

from dshal.ops.catalogue import SPECS
from dshal_conformance import report, runner
from dshal_conformance.cases import all_cases


def test_cpu_backend_passes_the_ci_tier(cpu_report: dict) -> None:
    # determinism differences are findings, graph is unsupported on cpu, and so is hooks'
    # tracks-allocation (the host's memory): all status unsupported.
    findings = ("determinism", "graph", "hooks")
    bad = [f"{c['id']}: {c['status']}: {c['reason']}" for c in cpu_report["cases"]
           if c["status"] != "pass" and not (c["kind"] in findings and c["status"] == "unsupported")]
    assert not bad, "\n".join(bad)
    kinds = {c["kind"] for c in cpu_report["cases"]}
    assert kinds == {"accuracy", "edge", "bad_input", "capability", "collective", "model", "determinism", "graph", "hooks"}
    s = cpu_report["summary"]
    assert s["passed"] + s["unsupported"] == len(cpu_report["cases"]) > 150 and s["failed"] == s["errors"] == 0
    assert report.ok(cpu_report)
    # DESIGN: the ci tier runs in minutes on 2 cores (measured in the report; loose contract bound).
    assert cpu_report["duration_s"] < 300


def test_every_op_and_collective_is_covered(cpu_report: dict) -> None:

    ops = {c["op"] for c in cpu_report["cases"] if c["kind"] in ("accuracy", "edge")}
    assert set(SPECS) <= ops
    ids = {c["id"] for c in cpu_report["cases"]}
    for name in ("all_reduce-sum", "all_reduce-max", "all_gather", "all_gather-last-dim", "reduce_scatter",
                 "reduce_scatter-last-dim", "all_to_all-even", "all_to_all-uneven", "broadcast", "barrier"):
        assert {f"comm/{name}/w2", f"comm/{name}/w4"} <= ids
    assert "comm/dead-peer/w2" in ids
    for edge in ("M0", "M1", "noncontiguous", "nan_inf", "fp8-max", "zero-block", "fp8-subnormals", "K200-partial-block", "K200-floor-scale-rejected"):
        assert any(edge in i for i in ids), edge


def test_report_validates_against_the_shipped_schema(cpu_report: dict) -> None:
    report.validate(cpu_report)
    assert cpu_report["schema"] == "dshal.conformance/1"
    assert cpu_report["platform"]["emulated"] is False
    broken = json.loads(json.dumps(cpu_report))
    broken["cases"][0]["status"] = "passed"  # not one of the five statuses
    with pytest.raises(jsonschema.ValidationError):
        report.validate(broken)
    del broken["cases"][0]["status"]
    with pytest.raises(jsonschema.ValidationError):
        report.validate(broken)


def test_fp8_gemm_is_judged_against_dequantized_and_prequantized_inputs(cpu_report: dict) -> None:
    by_id = {c["id"]: c for c in cpu_report["cases"]}
    deq = by_id["fp8_gemm/block/bf16/M128xN256xK256/vs-dequant"]
    pre = by_id["fp8_gemm/block/bf16/M128xN256xK256/vs-prequant"]
    assert "similarity_vs_dequant" in deq["reason"] and "sqnr_vs_dequant_db" in deq["reason"]
    assert "similarity_vs_prequant" in pre["reason"] and "sqnr_vs_prequant_db" in pre["reason"]
    # Quantization itself costs accuracy: the pre-quantization comparison is much looser.
    sim = lambda c, k: float(c["reason"].split(f"{k} = ")[1].split(" ")[0])  # noqa: E731
    assert sim(pre, "similarity_vs_prequant") > 10 * sim(deq, "similarity_vs_dequant")


def test_each_case_records_metric_value_threshold_and_needed_tolerance(cpu_report: dict) -> None:
    accuracy = [c for c in cpu_report["cases"] if c["kind"] == "accuracy"]
    assert all(c["metric"] and c["threshold"] is not None and c["reason"] for c in accuracy)
    close = [c for c in accuracy if c["metric"].endswith("max_err_ratio")]
    assert close and all(set(c["needed"]) == {"rtol", "atol"} for c in close)
    assert all(isinstance(c["seed"], int) for c in cpu_report["cases"])
    assert cpu_report["seed"] == runner.DEFAULT_SEED


def test_a_case_id_reproduces_one_case(cpu_report: dict) -> None:
    wanted = "attention/bf16/window16/T96"
    again = runner.run(runner.resolve("cpu"), runner.Options(cases=[wanted], progress=False))
    assert [c["id"] for c in again["cases"]] == [wanted]
    first = next(c for c in cpu_report["cases"] if c["id"] == wanted)
    assert again["cases"][0]["value"] == first["value"] and again["cases"][0]["seed"] == first["seed"]
    # A result id selects its case: both FP8 judgements come back.
    both = runner.select(all_cases("ci"), runner.Options(cases=["fp8_gemm/block/M1/vs-prequant"]))
    assert [c.id for c in both] == ["fp8_gemm/block/M1"]


def test_a_spent_budget_reports_the_cases_left_skipped_and_still_writes(tmp_path) -> None:
    """``--budget-s``: a device window of fixed length (gpu_check's 150 s) killed the run before
    its report was written, losing every result; now the cases past the budget are skipped,
    never passed, and the report is whole."""
    from dshal.cli import main

    ops = ["--ops", "rms_norm,all_reduce", "--quiet", "--report-dir", str(tmp_path)]
    assert main(["conformance", "--backend", "cpu", *ops, "--budget-s", "0"]) == 1  # cut short: not a pass
    spent = json.loads((tmp_path / "cpu.json").read_text())
    report.validate(spent)
    assert spent["cases"] and {c["status"] for c in spent["cases"]} == {"skip"}
    assert all(c["reason"].startswith("time budget: --budget-s 0") for c in spent["cases"])
    assert {c["op"] for c in spent["cases"]} == {"rms_norm", "all_reduce"}
    assert main(["conformance", "--backend", "cpu", *ops, "--budget-s", "600"]) == 0
    assert "skip" not in {c["status"] for c in json.loads((tmp_path / "cpu.json").read_text())["cases"]}
    assert main(["conformance", "--backend", "cpu", *ops, "--budget-s", "-1"]) != 0


def test_full_tier_uses_deepseek_v3_and_deepgemm_shapes() -> None:
    full = {c.id: c for c in all_cases("full")}
    ci = {c.id for c in all_cases("ci")}
    assert ci < set(full)
    for n, k in [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]:
        for m in (1, 64, 128, 4096):
            assert f"fp8_gemm/block/deepgemm/M{m}xN{n}xK{k}" in full
    assert any("T4096xH7168" in i for i in full) and "moe_gate/f32/v3-router/T4096xE256" in full
    # ci shapes stay small enough for the Triton interpreter: M and N at most 256, K at most 512
    # (more than two 128-wide K blocks, where a scale read at the wrong K block shows), and no
    # product past the largest 256 x 256 x 256 one.
    for case in all_cases("ci"):
        m, n, k = (case.params.get(key, 0) for key in ("m", "n", "k"))
        assert m <= 256 and n <= 256 and k <= 512 and m * n * k <= 256**3, case.id


def test_junit_xml_and_submission_bundle(cpu_report: dict, tmp_path) -> None:
    junit = report.write_junit(cpu_report, tmp_path / "cpu.junit.xml")
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and int(suite.get("tests")) == len(cpu_report["cases"])
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == len(cpu_report["cases"])
    js = report.write_json(cpu_report, tmp_path / "cpu.json")
    env = runner.environment(runner.resolve("cpu"))
    assert {"device", "torch", "suite_version", "git_commit", "dshal_version"} <= set(env)
    archive = report.write_bundle(cpu_report, env, [js, junit], tmp_path / "bundle")
    assert archive.exists()
    sums = (tmp_path / "bundle" / "SHA256SUMS").read_text().split("\n")
    listed = dict(reversed(line.split("  ")) for line in sums if line)
    assert set(listed) == {"cpu.json", "cpu.junit.xml", "environment.json"}
    for name, digest in listed.items():
        assert hashlib.sha256((tmp_path / "bundle" / name).read_bytes()).hexdigest() == digest
