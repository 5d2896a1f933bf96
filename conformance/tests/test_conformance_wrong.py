"""A deliberately wrong backend fails exactly the cases its bugs touch, with readable reasons."""

from __future__ import annotations

import pytest

from dshal.errors import ConfigError
from dshal_conformance import runner, waivers


@pytest.fixture(scope="module")
def wrong_report(wrong_backend_installed) -> dict:  # noqa: ANN001
    options = runner.Options(
        ops=["rms_norm", "quantize_fp8", "fp8_gemm", "attention", "moe_gate", "all_to_all"],
        cases=["rms_norm/*", "quantize_fp8/*", "fp8_gemm/*", "attention/*", "moe_gate/*", "capability/*", "comm/all_to_all-*/w2"],
        progress=False,
    )
    with wrong_backend_installed():
        target = runner.resolve("wrong")
        assert target.not_run is None
        return runner.run(target, options)


def _by_id(rep: dict) -> dict:
    return {c["id"]: c for c in rep["cases"]}


def test_off_by_one_rmsnorm_eps_fails(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    small = cases["rms_norm/f32/small-eps-matters"]
    assert small["status"] == "fail" and small["metric"] == "out.max_err_ratio" and small["value"] > 100
    assert "max |err|" in small["reason"] and "reference" in small["reason"]
    assert small["needed"]["rtol"] > 1e-4  # the tolerance it would have needed
    assert cases["rms_norm/bf16/T4xH256"]["status"] == "pass"  # eps 1e-5 vs 1e-6 hides in bf16 noise


def test_wrong_fp8_max_fails_on_the_scales(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    for cid in ("quantize_fp8/bf16/act-1x128/T4xK256", "quantize_fp8/f32/fp8-max", "quantize_fp8/f32/weight-128x128/N256xK384"):
        assert cases[cid]["status"] == "fail" and cases[cid]["metric"] == "scale_rel_err", cid
        assert "ratio 1.86667" in cases[cid]["reason"]  # 448 / 240
    assert cases["quantize_fp8/f32/e5m2/T4xK256"]["status"] == "pass"  # the bug is E4M3-only


def test_gemm_ignoring_scales_fails_both_judgements(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    for suffix in ("vs-dequant", "vs-prequant"):
        c = cases[f"fp8_gemm/block/bf16/M128xN256xK256/{suffix}"]
        assert c["status"] == "fail"
        assert c["metric"].split("_vs_")[0] in ("similarity", "sqnr"), c["metric"]
        assert f"similarity_{suffix.replace('-', '_')} = 0.9999 (FAILED" in c["reason"]
    assert cases["fp8_gemm/block/K200-floor-scale-rejected"]["status"] == "pass"  # checks are the core's


def test_attention_forgetting_the_window_fails_only_window_cases(wrong_report: dict) -> None:
    att = {i: c for i, c in _by_id(wrong_report).items() if i.startswith("attention/") and "/bad_input/" not in i}
    failing = {i for i, c in att.items() if c["status"] == "fail"}
    assert failing == {i for i, c in att.items() if c["params"].get("window")}
    # A forgotten window shows as a plain error, or in the NaN cases as a NaN where none belongs.
    assert all("max |err|" in att[i]["reason"] or "break the NaN/Inf policy" in att[i]["reason"] for i in failing)
    assert any("nan" in i for i in failing)


def test_gate_ignoring_the_bias_picks_other_experts(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    c = cases["moe_gate/f32/v3-router/T16xE256"]
    assert c["status"] == "fail" and c["metric"] == "routing_mismatch" and c["value"] > 0
    assert "picked different experts" in c["reason"] and "instead of" in c["reason"]
    assert cases["moe_gate/f32/no-bias/T16xE64"]["status"] == "pass"


def test_all_to_all_with_swapped_splits_fails_uneven_only(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    assert cases["comm/all_to_all-even/w2"]["status"] == "pass"  # swapping equal splits is harmless
    uneven = cases["comm/all_to_all-uneven/w2"]
    assert uneven["status"] == "fail" and "rank 0" in uneven["reason"]


def test_correct_ops_of_the_wrong_backend_still_pass(wrong_report: dict) -> None:
    cases = _by_id(wrong_report)
    # (the spoiled-argument cases also judge the answers to accepted inputs: test_conformance_spoiled.py)
    assert all(c["status"] == "pass" for i, c in cases.items()
               if ("/bad_input/" in i and not i.endswith("/spoiled")) or i.startswith("capability/"))
    assert wrong_report["summary"]["failed"] > 0


def test_waivers_skip_and_loosen_and_are_listed(wrong_backend_installed, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "conformance-waivers.yaml"
    path.write_text(
        "waivers:\n"
        "  - match: 'rms_norm/f32/T3xH512'\n"
        "    thresholds: {max_err_ratio: 2.0}\n"
        "    reason: eps measured differently on this part\n"
        "  - match: 'rms_norm/f32/*'\n"
        "    thresholds: {similarity_vs_prequant: 1.0}\n"
        "    reason: a metric this case does not judge\n"
        "  - match: 'attention/*window*'\n"
        "    skip: true\n"
        "    reason: sliding window lands later\n"
        "  - match: 'moe_gate/nothing-matches'\n"
        "    skip: true\n"
        "    reason: stale\n"
    )
    options = runner.Options(cases=["rms_norm/f32/T3xH512", "attention/bf16/window16/T96"], progress=False, waivers=waivers.load(path))
    with wrong_backend_installed():
        rep = runner.run(runner.resolve("wrong"), options)
    cases = _by_id(rep)
    loosened = cases["rms_norm/f32/T3xH512"]
    assert loosened["status"] == "pass" and loosened["threshold"] == 2.0 and "loosened" in loosened["reason"]
    assert loosened["waivers"] == ["eps measured differently on this part"]  # not the one naming another metric
    assert cases["attention/bf16/window16/T96"]["status"] == "skip"
    listed = {w["reason"]: w["cases"] for w in rep["waivers"]}
    assert listed == {
        "eps measured differently on this part": ["rms_norm/f32/T3xH512"],
        "sliding window lands later": ["attention/bf16/window16/T96"],
        "a metric this case does not judge": [],
        "stale": [],
    }


def test_a_waiver_without_a_reason_is_refused(tmp_path) -> None:

    path = tmp_path / "w.yaml"
    path.write_text("waivers:\n  - match: 'rms_norm/*'\n    skip: true\n")
    with pytest.raises(ConfigError, match="reason"):
        waivers.load(path)


BAD_WAIVER_FILES = [
    ("", "expected a top-level 'waivers:' list"),
    ("waivers: {match: 'x'}\n", "expected a top-level 'waivers:' list"),
    ("- match: 'rms_norm/*'\n", "expected a top-level 'waivers:' list"),
    ("waivers:\n  - rms_norm/*\n", "waivers[0]: expected a mapping with match, reason and skip or thresholds"),
    ("waivers:\n  - {match: 'rms_norm/*', reason: r, skip: true, until: 2025}\n",
     "waivers[0]: unknown key(s) ['until'], expected match, reason, skip, thresholds"),
    ("waivers:\n  - {reason: r, skip: true}\n", "waivers[0].match: got None, expected a case-id glob such as 'attention/*'"),
    ("waivers:\n  - {match: '', reason: r, skip: true}\n", "waivers[0].match: got '', expected a case-id glob"),
    ("waivers:\n  - {match: 'a/*', reason: r, skip: true}\n  - {match: 'b/*', reason: r, skip: 'yes'}\n",
     "waivers[1].skip: got 'yes', expected true or false"),
    ("waivers:\n  - {match: 'a/*', reason: r, thresholds: {max_err: 2}}\n", "waivers[0].thresholds: got {'max_err': 2}, expected metric"),
    ("waivers:\n  - {match: 'a/*', reason: r, thresholds: 2}\n", "waivers[0].thresholds: got 2, expected metric"),
    ("waivers:\n  - {match: 'a/*', reason: r}\n", "waivers[0]: says neither skip: true nor thresholds: {...}"),
    ("waivers:\n  - {match: 'a/*', reason: r, skip: false}\n", "waivers[0]: says neither skip: true nor thresholds"),
]


@pytest.mark.parametrize(("text", "said"), BAD_WAIVER_FILES, ids=[said.split(":")[0] + f"-{i}" for i, (_, said) in enumerate(BAD_WAIVER_FILES)])
def test_a_malformed_waivers_file_names_the_file_the_entry_and_what_was_expected(tmp_path, text, said) -> None:  # noqa: ANN001
    path = tmp_path / "conformance-waivers.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        waivers.load(path)
    assert str(caught.value).startswith(f"{path}: {said}"), str(caught.value)
    assert caught.value.file == str(path)


@pytest.mark.parametrize("limit", ["-1", ".nan", ".inf"])
def test_a_waiver_threshold_must_be_a_finite_number_at_least_zero(tmp_path, limit) -> None:  # noqa: ANN001
    path = tmp_path / "w.yaml"
    path.write_text(f"waivers:\n  - match: 'rms_norm/*'\n    reason: measured\n    thresholds: {{max_err_ratio: {limit}}}\n")
    with pytest.raises(ConfigError, match=r"waivers\[0\]\.thresholds: .* expected metric -> a finite number >= 0"):
        waivers.load(path)


def test_a_waiver_of_one_result_leaves_its_sibling_judged(wrong_backend_installed, tmp_path) -> None:  # noqa: ANN001
    """A waiver naming ``.../vs-prequant`` skipped (or loosened) ``.../vs-dequant`` too: the
    case's waivers were gathered over all its result ids and applied to every result."""
    case = "fp8_gemm/block/bf16/M128xN256xK256"
    path = tmp_path / "conformance-waivers.yaml"
    path.write_text(
        "waivers:\n"
        f"  - match: '{case}/vs-prequant'\n"
        "    skip: true\n"
        "    reason: prequant path lands later\n"
        f"  - match: '{case}/vs-prequant'\n"
        "    thresholds: {similarity_vs_dequant: 0.5}\n"
        "    reason: names the sibling's metric\n"
    )
    options = runner.Options(cases=[f"{case}/*"], progress=False, waivers=waivers.load(path))
    with wrong_backend_installed():
        rep = runner.run(runner.resolve("wrong"), options)
    cases = _by_id(rep)
    assert cases[f"{case}/vs-prequant"]["status"] == "skip"
    dequant = cases[f"{case}/vs-dequant"]
    assert dequant["status"] == "fail" and not dequant.get("waivers"), dequant  # the scales bug still shows
    assert {w["reason"]: w["cases"] for w in rep["waivers"]} == {"prequant path lands later": [case], "names the sibling's metric": []}
    # A waiver naming the case id covers every result of it.
    path.write_text(f"waivers:\n  - match: '{case}'\n    skip: true\n    reason: the whole case\n")
    with wrong_backend_installed():
        rep = runner.run(runner.resolve("wrong"), runner.Options(cases=[f"{case}/*"], progress=False, waivers=waivers.load(path)))
    assert {c["id"]: c["status"] for c in rep["cases"]} == {f"{case}/vs-dequant": "skip", f"{case}/vs-prequant": "skip"}


def test_collective_threshold_waivers_rejudge_the_ranks() -> None:
    """``seconds_to_error`` / ``collective_ulp`` waivers were accepted and never applied."""
    from dshal_conformance.collectives import DEAD_PEER, _merge

    slow = {r: {DEAD_PEER: ("fail", 40.0, "CommError after 40.00 s")} for r in range(2)}
    assert _merge(DEAD_PEER, 3, slow, 60.0, {}).status == "fail"
    waived = _merge(DEAD_PEER, 3, slow, 60.0, {}, {"seconds_to_error": 45.0})
    assert waived.status == "pass" and waived.threshold == 45.0 and waived.waived == ("seconds_to_error",)
    assert _merge(DEAD_PEER, 3, slow, 60.0, {}, {"seconds_to_error": 30.0}).status == "fail"
    off = {r: {"all_reduce-sum": ("fail", 1.0, "1 of 8 elements differ")} for r in range(2)}
    assert _merge("all_reduce-sum", 2, off, 60.0, {}, {"collective_ulp": 1.0}).status == "pass"
    wrong_type = {r: {DEAD_PEER: ("fail", None, "raised RuntimeError instead of CommError")} for r in range(2)}
    assert _merge(DEAD_PEER, 3, wrong_type, 60.0, {}, {"seconds_to_error": 1e9}).status == "fail"  # no metric to loosen
