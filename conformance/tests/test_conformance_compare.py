"""``dshal matrix --baseline``: each leg's cases against the same leg of an earlier run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from dshal import cli


def _write(folder: Path, name: str, rep: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _set(rep: dict, case_id: str, status: str, reason: str = "") -> None:
    case = next(c for c in rep["cases"] if c["id"] == case_id)
    case["status"], case["reason"] = status, reason or case["reason"]


def test_baseline_names_what_regressed_was_lost_fixed_and_is_new(cpu_report: dict, tmp_path: Path, capsys) -> None:
    passing = [c["id"] for c in cpu_report["cases"] if c["status"] == "pass"]
    regress, lose, fix, drop = passing[:4]
    baseline = copy.deepcopy(cpu_report)
    _set(baseline, fix, "fail", "out.max_err_ratio 3.1 > 1")
    current = copy.deepcopy(cpu_report)
    current["started"] = "2099-01-01T00:00:00+00:00"
    _set(current, regress, "fail", "out.max_err_ratio 85.8 > 1")
    _set(current, lose, "unsupported", "backend does not provide it")
    current["cases"] = [c for c in current["cases"] if c["id"] != drop]
    current["cases"].append({**copy.deepcopy(cpu_report["cases"][0]), "id": "rms_norm/new-row", "status": "error", "reason": "boom"})
    new_leg = copy.deepcopy(cpu_report)
    new_leg["backend"], new_leg["platform"] = "amd", {**cpu_report["platform"], "device": "CPU emulating gfx942", "emulated": True}
    base_dir = tmp_path / "baseline"
    _write(base_dir, "cpu", baseline)
    (base_dir / "cpu.junit.xml").write_text("<testsuite/>")  # a folder of a CI run's reports: XML left out
    reports = [_write(tmp_path / "now", "cpu", current), _write(tmp_path / "now", "amd", new_leg)]
    md, page = tmp_path / "m.md", tmp_path / "m.html"

    args = ["matrix", *reports, "--baseline", str(base_dir), "--markdown", str(md), "--html", str(page)]
    assert cli.main([*args, "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert ("REGRESSED cpu (hardware) · cpu: 1 regressed, 1 new failing, 0 now failing, 1 lost, 1 fixed; 1 cases added, "
            "1 removed") in out
    assert "new leg: amd (emulated) · CPU emulating gfx942" in out
    text = md.read_text()
    assert "## Changes since the baseline" in text and "| ❌ cpu (hardware) · cpu |" in text and "| 1 | 1 | 0 | 1 | 1 | 1 / 1 |" in text
    assert f"- `{regress}`: pass -> fail: out.max_err_ratio 85.8 > 1" in text
    assert f"- `{fix}`: fail -> pass" in text and f"- `{lose}`: pass -> unsupported" in text
    assert "- `rms_norm/new-row`: - -> error: boom" in text and "legs not in the baseline: amd (emulated)" in text
    html_text = page.read_text()
    assert "id='changes'" in html_text and "data-bad='1'" in html_text and "data-change='regressed'" in html_text
    assert cli.main(args) == 0  # without --fail-on-regression: reported, not gating


def test_an_unchanged_leg_passes_the_gate_and_the_flag_needs_a_baseline(cpu_report: dict, tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "now", "cpu", cpu_report)
    same = _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", path, "--baseline", same, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 0
    assert ("cpu (hardware) · cpu: 0 regressed, 0 new failing, 0 now failing, 0 lost, 0 fixed; 0 cases added, "
            "0 removed") in capsys.readouterr().out
    assert cli.main(["matrix", path, "--fail-on-regression"]) == 1
    assert "--fail-on-regression needs --baseline" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["matrix", path, "--baseline", str(empty)]) == 1
    assert "is a folder with no *.json reports in it" in capsys.readouterr().err


def test_a_hardware_leg_that_did_not_run_now_fails_the_gate(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """The runner lost its device: the leg that ran on hardware is "not run" now, another leg."""
    gone = copy.deepcopy(cpu_report)
    gone["platform"] = {**gone["platform"], "not_run": "backend 'cpu' is not available: no device"}
    gone["cases"] = []
    now = _write(tmp_path / "now", "cpu", gone)
    then = _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 1
    out = capsys.readouterr().out
    assert "GONE baseline leg not run now: cpu (hardware) · cpu" in out and "new leg: cpu (not-run)" in out


def test_a_case_that_was_unsupported_or_skipped_and_fails_now_fails_the_gate(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """A plugin that began to declare an op it then fails, or a waiver removed: the case was
    unsupported / skipped in the baseline and fails now. The gate counted only pass -> fail."""
    passing = [c["id"] for c in cpu_report["cases"] if c["status"] == "pass"]
    declared, unwaived = passing[:2]
    baseline = copy.deepcopy(cpu_report)
    _set(baseline, declared, "unsupported", "backend does not provide it")
    _set(baseline, unwaived, "skip", "waived: known issue")
    current = copy.deepcopy(cpu_report)
    _set(current, declared, "fail", "out.max_err_ratio 9 > 1")
    _set(current, unwaived, "error", "crashed")
    now, then = _write(tmp_path / "now", "cpu", current), _write(tmp_path / "then", "cpu", baseline)
    md = tmp_path / "m.md"
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(md)]) == 1
    assert "REGRESSED cpu (hardware) · cpu: 0 regressed, 0 new failing, 2 now failing" in capsys.readouterr().out
    text = md.read_text()
    assert f"- `{declared}`: unsupported -> fail: out.max_err_ratio 9 > 1" in text and f"- `{unwaived}`: skip -> error" in text


def test_a_leg_coming_online_passes_the_gate_and_a_broken_one_fails_it(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """The day an NPU runner gets its device, its leg goes from "not run" to hardware: that failed
    the gate as a gone leg. A leg whose plugin fails to load now passed it (only "new leg")."""
    not_run = copy.deepcopy(cpu_report)
    not_run["platform"] = {**not_run["platform"], "device": "not run", "arch": "", "not_run": "no device"}
    not_run["cases"], not_run["summary"] = [], dict.fromkeys(not_run["summary"], 0)
    then = _write(tmp_path / "then", "cpu", not_run)
    now = _write(tmp_path / "now", "cpu", cpu_report)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 0
    out = capsys.readouterr().out
    assert "came online (not run in the baseline): cpu (not-run) · not run" in out and "GONE" not in out
    broken = copy.deepcopy(not_run)
    broken["platform"]["broken"] = "the plugin failed to load"
    now = _write(tmp_path / "now", "cpu", broken)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 1
    assert "BROKEN now: cpu (not-run) · not run: the plugin failed to load" in capsys.readouterr().out


def test_legs_that_did_not_run_stay_apart_by_their_ci_leg_and_expect_names_a_missing_one(
        cpu_report: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    """Two runners (h100, h200) without their devices both report device "not run": they merged
    into one column. With the CI leg name in each report they stay apart, and ``--expect`` fails
    when an expected leg's report never arrived (it vanished from the matrix before)."""
    from dshal_conformance import report, runner

    monkeypatch.setenv(runner.LEG_ENV, "h100")
    target = runner.Target("nvidia", False, None, "0.1.0", not_run="no CUDA device")
    options = runner.Options(tier="ci", progress=False)
    assert options.leg == "h100"
    h100 = report.build(target, options, [], __import__("datetime").datetime.now(), 0.0, {})
    report.validate(h100)
    h200 = {**copy.deepcopy(h100), "platform": {**h100["platform"], "leg": "h200"}}
    paths = [_write(tmp_path / "h100", "nvidia", h100), _write(tmp_path / "h200", "nvidia", h200),
             _write(tmp_path / "cpu", "cpu", {**cpu_report, "platform": {**cpu_report["platform"], "leg": "cpu"}})]
    md = tmp_path / "m.md"
    assert cli.main(["matrix", *paths, "--markdown", str(md), "--expect", "cpu,h100,h200"]) == 0
    out = capsys.readouterr().out
    assert "newest of 2" not in out and "MISSING" not in out
    text = md.read_text()
    assert "nvidia (not-run) · not run @h100" in text and "nvidia (not-run) · not run @h200" in text
    assert cli.main(["matrix", *paths[1:], "--markdown", str(md), "--expect", "cpu,h100,h200,mi300x"]) == 1
    out = capsys.readouterr().out
    assert "MISSING leg: h100 (no report has platform.leg 'h100'" in out and "MISSING leg: mi300x" in out
    assert "❌ MISSING leg: h100" in md.read_text()


def test_the_matrix_printed_on_stdout_is_the_document_alone(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """With no --html / --markdown the Markdown goes to stdout (``dshal matrix ... > matrix.md``),
    and the baseline's summary and MISSING lines were printed after it, into the document."""
    named = {**copy.deepcopy(cpu_report), "platform": {**cpu_report["platform"], "leg": "cpu"}}
    now, then = _write(tmp_path / "now", "cpu", named), _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", now, "--baseline", then, "--expect", "cpu,h100"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("# dshal hardware matrix") and out.rstrip().endswith("|")  # the last row of its last table
    assert "MISSING leg: h100 (no report has platform.leg 'h100'" in err and "cpu (hardware) · cpu @cpu: 0 regressed" in err
    assert "MISSING leg: h100" not in out.replace("❌ MISSING leg: h100", "")  # the document's own section stays


def test_a_baseline_without_leg_names_still_meets_its_leg_and_an_emulated_leg_is_not_a_hardware_one(
        cpu_report: dict, tmp_path: Path, capsys) -> None:
    """Reports got ``platform.leg``: a baseline made before it never met the same runner's leg
    (every leg "gone", the gate red). And a not-run hardware leg whose backend now runs only
    emulated did not "come online": its report never arrived."""
    named = {**copy.deepcopy(cpu_report), "platform": {**cpu_report["platform"], "leg": "cpu"}}
    now, then = _write(tmp_path / "now", "cpu", named), _write(tmp_path / "then", "cpu", cpu_report)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 0
    out = capsys.readouterr().out
    assert "cpu (hardware) · cpu @cpu: 0 regressed" in out and "GONE" not in out and "new leg" not in out
    not_run = copy.deepcopy(cpu_report)
    not_run["platform"] = {**not_run["platform"], "device": "not run", "arch": "", "not_run": "no device"}
    not_run["cases"], not_run["summary"] = [], dict.fromkeys(not_run["summary"], 0)
    emulated = {**copy.deepcopy(cpu_report), "platform": {**cpu_report["platform"], "emulated": True}}
    now, then = _write(tmp_path / "now2", "cpu", emulated), _write(tmp_path / "then2", "cpu", not_run)
    assert cli.main(["matrix", now, "--baseline", then, "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]) == 1
    out = capsys.readouterr().out
    assert "GONE baseline leg not run now: cpu (not-run)" in out and "came online" not in out


def test_a_hardware_leg_that_met_its_baseline_does_not_bring_another_runners_leg_online(
        cpu_report: dict, tmp_path: Path, capsys) -> None:
    """Baseline: one runner of a backend ran, another did not. Now only the first reports: the
    second's not-run leg "came online" through the first's report, and the gate stayed green
    while a leg had vanished."""
    not_run = copy.deepcopy(cpu_report)
    not_run["platform"] = {**not_run["platform"], "device": "not run", "arch": "", "not_run": "no device"}
    not_run["cases"], not_run["summary"] = [], dict.fromkeys(not_run["summary"], 0)
    then = [_write(tmp_path / "then", "ran", cpu_report), _write(tmp_path / "then", "missing", not_run)]
    now = _write(tmp_path / "now", "cpu", cpu_report)
    args = ["matrix", now, "--baseline", str(tmp_path / "then"), "--fail-on-regression", "--markdown", str(tmp_path / "m.md")]
    assert cli.main(args) == 1, then
    out = capsys.readouterr().out
    assert "GONE baseline leg not run now: cpu (not-run) · not run" in out and "came online" not in out


def test_quantized_codes_may_differ_only_at_rounding_boundaries() -> None:
    """A quantizer dividing in another correct order (DeepGEMM's ``x * (448 / amax)``) breaks
    bf16's exact ties one code the other way: at run seed 89 the tensorwise bf16 row had 22 of
    2048 such codes, over the 1% bound. Codes at a rounding boundary are left out of the
    fraction now; a quantizer rounding toward zero still fails it."""
    from dshal.ops.catalogue import SPECS
    from dshal.ops.examples import Draw, Example
    from dshal_conformance.cases import case_seed
    from dshal_conformance.cases.quant import judge_quantize_fp8

    spec = SPECS["quantize_fp8"]
    row = next(r for r in spec.rows if r.name == "bf16/tensorwise/T8xK256")
    kwargs = spec.example_inputs(Draw(torch.Generator().manual_seed(case_seed(89, row.id))), row).oracle_kwargs
    ref_q, ref_scale = spec.run_oracle(**kwargs)
    x = kwargs["x"].float()
    amax = x.abs().max()

    def quantized(rounding) -> tuple[torch.Tensor, torch.Tensor]:
        return rounding(x * (448.0 / amax)).clamp(-448, 448).to(ref_q.dtype), (amax / 448.0).reshape(ref_scale.shape)

    def failed(out) -> list[str]:
        return [c.metric for c in judge_quantize_fp8(None, row.params, out, (ref_q, ref_scale), Example(kwargs)) if not c.ok]

    assert failed(quantized(lambda v: v)) == []  # the cast rounds to nearest: 22 of 2048 codes sit at a tie
    codes = ref_q.view(torch.uint8).flatten().clone()
    nonzero = ((codes & 0x7F) > 0).nonzero().squeeze(1)
    codes[nonzero[::2]] -= 1  # half the codes one step toward zero (sign-magnitude): a truncating quantizer
    truncated = codes.view(ref_q.dtype).reshape(ref_q.shape)
    assert failed((truncated, quantized(lambda v: v)[1])) == ["fp8_code_mismatch_frac"]
