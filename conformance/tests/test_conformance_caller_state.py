"""The conformance suite's in-process API (``runner.run``, ``diff.compare``) gives the caller's
own ``dshal.use()`` runtime back when it returns (it left none active: the next op call then
activated the defaults, another backend than the one the caller chose)."""

from __future__ import annotations

import dshal
from dshal_conformance import runner
from dshal_conformance.diff import compare


def test_runner_run_gives_back_the_callers_active_runtime():
    mine = dshal.use(backend="cpu")
    result = runner.run(runner.resolve("cpu"), runner.Options(cases=["rms_norm*"], progress=False))
    assert result["summary"]["passed"] > 0
    assert dshal.current() is mine


def test_diff_compare_gives_back_the_callers_active_runtime():
    mine = dshal.use(backend="cpu")
    result = compare("cpu", "reference", prompt_len=2, decode=0)
    assert result["first_drift"] is None
    assert dshal.current() is mine
