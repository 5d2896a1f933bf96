"""``dshal diff --decode N``: the prefill and N greedy decode steps (KV cache, absorbed MLA,
trusted steps) compared on both backends, teacher-forced with A's tokens. cpu agrees with
the float64 reference at every step; a backend wrong only for a single query passes the
prefill comparison and is caught at decode step 1, with the op named."""

from __future__ import annotations

import json
import re

import pytest

from dshal.cli import main
from dshal.errors import ConfigError
from dshal_conformance.diff import DEFAULT_DECODE, compare

PREFILL_KEYS = ("layers", "logit_drift", "argmax_agreement", "first_layer_over", "first_op_over", "likely_cause",
                "ops", "unmatched_calls")


@pytest.mark.parametrize("path", ["generate", "static"])
def test_cpu_and_reference_agree_at_every_decode_step(path: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "diff.json"
    assert main(["diff", "--backend", "cpu", "--backend", "reference", "--prompt-len", "4", "--decode", "3",
                 "--decode-path", path, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    tol = result["tolerance"]["drift"]
    steps = result["steps"]
    assert result["decode_steps"] == 3 and result["decode_path"] == path
    assert [s["name"] for s in steps] == ["prefill", "decode 1", "decode 2", "decode 3"]
    assert [s["tokens"] for s in steps] == [4, 1, 1, 1]
    assert result["first_drift"] is None and result["greedy_differs_at"] == []
    for s in steps:
        # Small drift, not none: float32 against float64 at every layer of every pass.
        assert 0 < s["logit_drift"] < tol, (s["name"], s["logit_drift"])
        assert s["first_layer_over"] is None and s["first_op_over"] is None
        assert s["unmatched_calls"] == 0 and s["greedy"]["differs"] is False
        assert {r["step"] for r in s["ops"]} == {s["step"]} and {r["step"] for r in s["layers"]} == {s["step"]}
        assert {"linear", "attention", "moe_experts"} <= {r["op"] for r in s["ops"]}
    # Teacher forcing: the token fed to step i + 1 is A's greedy choice after pass i.
    assert result["fed_tokens"] == [s["greedy"]["a"] for s in steps[:-1]]
    # The prefill's keys stay where they were (the prefill-only report's shape).
    for key in PREFILL_KEYS:
        assert result[key] == steps[0][key], key


def test_decode_only_bug_passes_the_prefill_and_is_caught_at_decode_step_1(decode_wrong_backend_installed,  # noqa: ANN001
                                                                            tmp_path) -> None:  # noqa: ANN001
    out, page = tmp_path / "diff.json", tmp_path / "diff.html"
    with decode_wrong_backend_installed():
        prefill_only = compare("cpu", "decodewrong", decode=0)
        assert main(["diff", "--backend", "cpu", "--backend", "decodewrong", "--json", str(out),
                     "--html", str(page)]) == 0
    # Prefill alone: nothing to see (the bug needs a single query).
    assert prefill_only["first_layer_over"] is None and prefill_only["first_op_over"] is None
    assert prefill_only["decode_steps"] == 0 and [s["name"] for s in prefill_only["steps"]] == ["prefill"]

    result = json.loads(out.read_text())
    tol = result["tolerance"]["drift"]
    assert result["decode_steps"] == DEFAULT_DECODE >= 1 and len(result["steps"]) == DEFAULT_DECODE + 1
    prefill, step1 = result["steps"][0], result["steps"][1]
    assert prefill["first_layer_over"] is None and prefill["first_op_over"] is None
    assert result["first_layer_over"] is None  # the top-level (prefill) verdict as before
    first = result["first_drift"]
    assert first["step"] == 1 and first["name"] == "decode 1" and first["layer"] == "layers.0"
    assert first["op"]["op"] == "attention" and first["op"]["layer"] == "layers.0" and first["op"]["step"] == 1
    cause = first["likely_cause"]
    assert cause["op"] == "attention" and cause["local_drift"] > tol
    # Every other op of that layer, given cpu's inputs, agrees: the drift starts in attention.
    others = [r for r in step1["ops"] if r["layer"] == "layers.0" and r["op"] != "attention"]
    assert others and all(r["local_drift"] <= tol for r in others)
    assert all(r["op"] == "attention" for r in step1["ops"] if r["local_over"])
    # Teacher-forced: both fed cpu's tokens, so every step is compared and stays over.
    assert all(s["first_op_over"] is not None for s in result["steps"][1:])
    assert result["fed_tokens"] == [s["greedy"]["a"] for s in result["steps"][:-1]]
    assert result["greedy_differs_at"] == [s["step"] for s in result["steps"] if s["greedy"]["a"] != s["greedy"]["b"]]
    text = page.read_text()
    assert "first drift at decode 1" in text and "likely cause: attention" in text


@pytest.mark.parametrize(("flags", "said"), [
    (["--decode", "-1"], "--decode: got -1, expected an integer >= 0"),
    (["--decode", "100000"], "--decode: prompt (8) plus 100000 decode steps exceed the model's max_position_embeddings ("),
    (["--prompt-len", "0"], "--prompt-len: got 0, expected an integer >= 1"),
    (["--top", "0"], "--top: got 0, expected an integer >= 1"),
    (["--precision", "fp4"], "--precision: got 'fp4', expected one of: high, "),
    (["--backend", "cpu"], "--backend: given 3 time(s), expected exactly 2 (A and B)"),
])
def test_diff_rejects_bad_flags_with_one_line_naming_the_flag(flags, said, capsys) -> None:  # noqa: ANN001
    assert main(["diff", "--backend", "cpu", "--backend", "reference", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dshal diff: error: {said}") and err.count("\n") == 1, err


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"decode_path": "graph"}, "--decode-path: got 'graph', expected one of: generate, static"),
    ({"decode": -1}, "--decode: got -1, expected an integer >= 0"),
    ({"decode": 2.0}, "--decode: got 2.0, expected an integer >= 0"),
])
def test_compare_refuses_decode_settings_the_cli_parser_would_have(kwargs, said) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=re.escape(said)):
        compare("cpu", "reference", prompt_len=4, **kwargs)
