"""Conformance on a backend that cannot hold float8 tensors on its device
(``Capabilities.fp8_storage`` False, as Ascend declares): cases whose inputs are FP8 are
reported ``unsupported`` with that capability as the reason, instead of erroring when the
suite places their inputs on the device; the other cases run as usual.

The backend is the core tests' fixture ``tests/fixtures/core_plugins/no_fp8_storage.py``
(the cpu backend's ops under a plugin declaring no FP8 storage; not an NPU), registered here
through a throw-away dist-info, as ``biased`` and ``wrong`` are (``no_fp8_storage_installed``).
"""

from __future__ import annotations

import pytest

from dshal_conformance import runner


@pytest.fixture(scope="module")
def report(no_fp8_storage_installed) -> dict:  # noqa: ANN001
    with no_fp8_storage_installed():
        options = runner.Options(tier="ci", ops=["dequantize_fp8", "fp8_gemm", "quantize_int8"], progress=False,
                                 collectives=False)
        return runner.run(runner.resolve("nofp8test"), options)


def test_fp8_input_cases_are_unsupported_with_the_capability_as_reason(report):
    cases = {c["id"]: c for c in report["cases"]}
    fp8_inputs = [c for c in cases.values() if c["op"] in ("dequantize_fp8", "fp8_gemm") and c["kind"] != "capability"
                  and not c["id"].startswith("graph/")]  # graph: unsupported earlier (the cpu ops have no graph())
    assert {c["kind"] for c in fp8_inputs} >= {"accuracy", "edge", "bad_input"}, sorted({c["kind"] for c in fp8_inputs})
    for case in fp8_inputs:
        assert case["status"] == "unsupported", case
        assert "fp8_storage False" in case["reason"] and "cannot hold float8 tensors" in case["reason"], case
    assert report["summary"]["errors"] == 0 and report["summary"]["failed"] == 0, report["summary"]


def test_other_cases_still_run(report):
    int8 = [c for c in report["cases"] if c["op"] == "quantize_int8" and c["kind"] == "accuracy"]
    assert int8 and all(c["status"] == "pass" for c in int8)
