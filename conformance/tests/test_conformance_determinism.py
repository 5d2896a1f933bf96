"""The ``determinism`` family: findings are recorded (never errors), a planted batch
dependence or run-to-run noise is found and located, and ``determinism: strict`` turns the
backend's promise into a pass/fail check."""

from __future__ import annotations

import pytest
import torch

from dshal import cli
from dshal.config import load_config
from dshal.ops.catalogue import SPECS
from dshal.runtime import build_runtime
from dshal_conformance import report, runner
from dshal_conformance.cases.base import Context
from dshal_conformance.cases.determinism import OPS, ROWS, _sub_batches, run_op

FAMILY_OPS = {"linear", "fp8_gemm", "rms_norm", "attention", "moe_experts"}


def test_cpu_report_has_a_determinism_row_per_op_and_only_findings(cpu_report: dict) -> None:
    det = [c for c in cpu_report["cases"] if c["kind"] == "determinism"]
    assert {c["op"] for c in det} == FAMILY_OPS
    assert {c["id"].rsplit("/", 1)[1] for c in det} == {"repeat", "batch-invariant"}
    for c in det:
        assert c["status"] in ("pass", "unsupported"), (c["id"], c["reason"])
        if c["status"] == "unsupported":
            assert c["finding"] in ("batch-variant", "nondeterministic") and "differs" in c["reason"]
    # The cpu backend's float32 linear runs up to 8 rows through its C GEMV and more through
    # torch's GEMM (another summation order): batch-variant, which the leg must say (with
    # sub-batches of at most 4 rows of 4 it said batch-invariant).
    linear = next(c for c in det if c["id"] == "determinism/linear/f32/batch-invariant")
    assert (linear["status"], linear["finding"]) == ("unsupported", "batch-variant"), linear["reason"]
    report.validate(cpu_report)


def _context(table: dict, provided: frozenset[str]) -> Context:
    return Context(table=table, provided=provided, device=torch.device("cpu"), native_e4m3="e4m3fn",
                   fp8_formats=("e4m3fn",), seed=3)


def _batch_dependent_rms_norm(x, weight, eps=1e-6, residual=None):
    """Planted: the result depends on how many rows share the call."""
    y, s = SPECS["rms_norm"].reference_impl(x, weight, eps, residual)
    return y + 1e-3 * x.shape[0], s


def _noisy_linear(x, weight, bias=None, weight_scale=None):
    """Planted: run-to-run noise (as an atomics-based reduction would give)."""
    return SPECS["linear"].reference_impl(x, weight, bias, weight_scale) + 1e-4 * torch.rand(1)


@pytest.fixture()
def default_cpu():
    rt = build_runtime(load_config({}, backend="cpu")).activate()
    yield rt


def test_planted_batch_dependence_is_a_finding_with_the_row(default_cpu) -> None:  # noqa: ANN001
    table = dict(default_cpu.table, rms_norm=SPECS["rms_norm"].checked(_batch_dependent_rms_norm))
    repeat, invariant = run_op(_context(table, frozenset(SPECS)), "rms_norm", torch.bfloat16)
    assert repeat.verdict.status == "pass"
    v = invariant.verdict
    assert v.status == "unsupported" and v.finding == "batch-variant"
    # The evidence is the sub-batch with the largest difference (here one of the single rows).
    assert v.value > 0 and 0 <= v.details["row"] < ROWS and f"row {v.details['row']} " in v.reason


def _gemv_up_to_eight_rows_linear(x, weight, bias=None, weight_scale=None):
    """Planted: as the cpu backend's float32 linear, another summation order above 8 rows."""
    y = SPECS["linear"].reference_impl(x, weight, bias, weight_scale)
    return y if x.reshape(-1, x.shape[-1]).shape[0] <= 8 else torch.nextafter(y, torch.full_like(y, float("inf")))


def test_sub_batches_cross_a_row_count_threshold(default_cpu) -> None:  # noqa: ANN001
    """With a batch of 4 (sub-batches of 1 and 3 rows) every call stayed at or under 8 rows:
    a linear whose path changes above 8 rows passed as batch-invariant."""
    sizes = [s.stop - s.start for s in _sub_batches(ROWS)]
    assert min(sizes) == 1 and max(sizes) > 8 and ROWS > 64
    table = dict(default_cpu.table, linear=SPECS["linear"].checked(_gemv_up_to_eight_rows_linear))
    repeat, invariant = run_op(_context(table, frozenset(SPECS)), "linear", torch.float32)
    assert repeat.verdict.status == "pass"
    v = invariant.verdict
    # Every row alone takes the <=8-row path, unlike in the full batch.
    assert v.status == "unsupported" and v.finding == "batch-variant" and 0 <= v.details["row"] < ROWS, v.reason


def _rare_rows_linear(marked: float):
    """Planted: a smaller call rounds a row apart (the one whose first input is ``marked``),
    as a kernel whose rounding lands apart only for some values (the cpu fp8_gemm at 3 of 96
    rows)."""

    def linear(x, weight, bias=None, weight_scale=None):
        rows = x.reshape(-1, x.shape[-1])
        # row by row (the reference's float32 matmul itself may sum a lone row in another order)
        y = torch.cat([SPECS["linear"].reference_impl(row[None], weight, bias, weight_scale) for row in rows])
        if rows.shape[0] == ROWS:
            return y
        apart = (rows[:, 0] == marked)[:, None]
        return torch.where(apart, torch.nextafter(y, torch.full_like(y, float("inf"))), y)

    return linear


def test_a_difference_at_a_few_rows_is_found_wherever_they_are(default_cpu) -> None:  # noqa: ANN001
    """Sub-batches of rows 0, 1..4, 0..15 and 95 missed a backend whose smaller calls round
    only some rows apart (the cpu fp8_gemm's real batch variance was dropped that way): every
    row is compared alone now. Planted here: row 40's values."""
    kwargs = SPECS["linear"].example_inputs(_context(default_cpu.table, frozenset(SPECS)).draw,
                                            {**OPS["linear"][1], "dtype": torch.float32}).kwargs
    marked = float(kwargs["x"][40, 0])
    assert int((kwargs["x"][:, 0] == marked).sum()) == 1
    table = dict(default_cpu.table, linear=SPECS["linear"].checked(_rare_rows_linear(marked)))
    _, invariant = run_op(_context(table, frozenset(SPECS)), "linear", torch.float32)
    assert invariant.verdict.finding == "batch-variant", invariant.verdict.reason
    assert invariant.verdict.details["row"] == 40


def test_planted_run_to_run_noise_is_a_finding(default_cpu) -> None:  # noqa: ANN001
    table = dict(default_cpu.table, linear=SPECS["linear"].checked(_noisy_linear))
    repeat, _ = run_op(_context(table, frozenset(SPECS)), "linear", torch.float32)
    assert repeat.verdict.status == "unsupported" and repeat.verdict.finding == "nondeterministic"
    assert "the same call twice differs" in repeat.verdict.reason


def test_strict_makes_a_broken_promise_a_failure() -> None:
    rt = build_runtime(load_config({}, backend="cpu", determinism="strict")).activate()
    table = dict(rt.table, rms_norm=SPECS["rms_norm"].checked(_batch_dependent_rms_norm))
    _, invariant = run_op(_context(table, frozenset(SPECS)), "rms_norm", torch.bfloat16)
    assert invariant.verdict.status == "fail" and "although determinism: strict" in invariant.verdict.reason


def test_strict_cpu_is_deterministic_and_batch_invariant_for_every_op() -> None:
    rt = build_runtime(load_config({}, backend="cpu", fallback="error", determinism="strict"))
    target = runner.Target("cpu", False, rt, None)
    rep = runner.run(target, runner.Options(cases=["determinism/*"], progress=False, collectives=False))
    det = [c for c in rep["cases"] if c["kind"] == "determinism"]
    assert len(det) == 2 * sum(len(d) for d, _, _ in OPS.values())
    assert all(c["status"] == "pass" for c in det), [(c["id"], c["reason"]) for c in det if c["status"] != "pass"]


def test_command_line_strict_mode(tmp_path) -> None:  # noqa: ANN001
    import json


    args = ["conformance", "--backend", "cpu", "--case", "determinism/fp8_gemm/*", "--report-dir", str(tmp_path), "--quiet"]
    assert cli.main([*args, "--determinism", "strict"]) == 0
    rep = json.loads((tmp_path / "cpu.json").read_text())
    assert [c["status"] for c in rep["cases"]] == ["pass", "pass"]  # row-by-row: invariant by construction


def _one_ulp_jitter_rms_norm(x, weight, eps=1e-6, residual=None):
    """Planted: float32 noise of one ulp at random places, which bf16 rounding would hide."""
    y, s = SPECS["rms_norm"].reference_impl(x, weight, eps, residual)
    flip = (torch.rand(y.shape) < 0.5).to(torch.int32)
    return (y.view(torch.int32) + flip).view(torch.float32) if y.dtype == torch.float32 else y, s


def test_float32_one_ulp_noise_is_a_finding(default_cpu) -> None:  # noqa: ANN001
    """rms_norm was checked in bf16 only: a vendor's 1-ulp float32 jitter passed, and the
    matrix said deterministic for a model that runs in float32."""
    assert torch.float32 in OPS["rms_norm"][0]
    table = dict(default_cpu.table, rms_norm=SPECS["rms_norm"].checked(_one_ulp_jitter_rms_norm))
    repeat, _ = run_op(_context(table, frozenset(SPECS)), "rms_norm", torch.float32)
    assert repeat.verdict.status == "unsupported" and repeat.verdict.finding == "nondeterministic"
