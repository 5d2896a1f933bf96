"""Faults a vendor's plugin makes that the suite must name as what they are."""

from __future__ import annotations

import torch

from dshal.ops.catalogue import SPECS
from dshal.redact import code_path
from dshal_conformance.cases.base import Context, conformance_rows, run_accuracy
from dshal_conformance.cases.norm import judge_same_dtype


def _context(table: dict) -> Context:
    return Context(table=table, provided=frozenset(table), device=torch.device("cpu"), native_e4m3="e4m3fn",
                   fp8_formats=("e4m3fn",), seed=3)


def _run(rms_norm) -> str:
    row = next(r for r in conformance_rows("rms_norm") if "residual" not in r.params)
    [outcome] = run_accuracy(_context({"rms_norm": rms_norm}), "rms_norm", row.params, judge_same_dtype, ("",))
    return f"{outcome.verdict.status}: {outcome.verdict.reason}"


def test_a_provider_that_writes_into_its_input_is_told_so():
    """A right result written back into ``x`` was judged against the oracle computed afterwards
    from the clobbered ``x``: "max_err_ratio 5.5e4", a kernel-accuracy bug that was not there."""
    reference = SPECS["rms_norm"].reference_impl

    def clobbering(x, weight, eps=1e-6, residual=None):
        out = reference(x, weight, eps, residual)
        x.copy_(out if isinstance(out, torch.Tensor) else out[0])
        return out

    said = _run(clobbering)
    assert said.startswith("fail: the provider breaks the op's contract: rms_norm: the provider wrote into its "
                           "argument 'x'"), said
    assert _run(reference).startswith("pass"), _run(reference)


def test_a_crash_in_a_provider_names_where_it_happened():
    def crashing(x, weight, eps=1e-6, residual=None):
        return x[x.shape[0] + 5]

    said = _run(crashing)
    # the file as its module is imported, not this machine's folders (dshal.redact.code_path)
    assert said.startswith("error: the provider crashed with IndexError") and f"{code_path(__file__)}:" in said, said
    assert f"{__file__}:" not in said, said
    assert "in crashing)" in said, said


def test_traceback_shows_each_crash_whole_on_stderr_and_is_silent_without_it(capsys):
    """The report keeps one line per crash; a vendor debugging one asks `--traceback` for the
    whole stack. Without it nothing is printed (logging's last resort would print errors)."""
    import io
    import logging

    from dshal_conformance.cases.base import CRASH_LOG
    from dshal_conformance.command import show_crashes

    def crashing(x, weight, eps=1e-6, residual=None):
        return helper_that_fails(x)

    def helper_that_fails(x):
        return x[x.shape[0] + 5]

    _run(crashing)
    assert capsys.readouterr().err == ""
    shown, handlers = io.StringIO(), list(CRASH_LOG.handlers)
    with show_crashes(shown):
        said = _run(crashing)
    assert CRASH_LOG.handlers == handlers and CRASH_LOG.level == logging.NOTSET  # undone: a second run shows once
    with show_crashes(io.StringIO()):
        _run(crashing)
    text = shown.getvalue()
    assert text.startswith(f"crash: {said.removeprefix('error: ')}\nTraceback (most recent call last):"), text
    assert "in crashing" in text and "in helper_that_fails" in text and text.count("Traceback") == 1, text
    assert text.rstrip().splitlines()[-1].startswith("IndexError: "), text


def test_the_matrix_names_a_failure_without_a_number_and_flags_a_failing_one():
    """A ProviderError cell read "worst: None inf (<= inf)", an errored collective cell
    "worst: collective_ulp 0 (<= 0)", which reads as a pass."""
    from dshal_conformance.matrix import Cell

    base = {"id": "rms_norm/bf16/T3", "op": "rms_norm"}
    cell = Cell()
    cell.add({**base, "status": "fail", "metric": None, "value": None, "threshold": None})
    assert cell.worst_text() == "fail rms_norm/bf16/T3"
    errored = Cell()
    errored.add({**base, "status": "error", "metric": "collective_ulp", "value": 0, "threshold": 0})
    assert errored.worst_text() == "collective_ulp 0 (<= 0), error"
    fine = Cell()
    fine.add({**base, "status": "pass", "metric": "out.max_err_ratio", "value": 0.5, "threshold": 1})
    assert fine.worst_text() == "out.max_err_ratio 0.5 (<= 1)"


def test_a_crash_instead_of_the_documented_error_is_logged_with_its_site(capsys):
    """A bad-input case whose provider crashed instead of raising the documented error had no
    file:line in its reason and nothing for ``--traceback`` to show."""
    import io

    from dshal_conformance.cases import all_cases
    from dshal_conformance.command import show_crashes

    def crashing(x, weight, eps=1e-6, residual=None):
        return x[x.shape[0] + 5]

    shown = io.StringIO()
    with show_crashes(shown):
        case = next(c for c in all_cases("ci") if c.op == "rms_norm" and c.kind == "bad_input" and "spoiled" not in c.id)
        [outcome, *_] = case.body(_context({"rms_norm": crashing}))
    reason = outcome.verdict.reason
    assert "crashed with IndexError instead of raising" in reason and f"{code_path(__file__)}:" in reason, reason
    assert "Traceback (most recent call last):" in shown.getvalue()
