"""``determinism: strict``: the config key, the runtime's choice of batch-invariant
providers (and what it says where it has none), and the row-by-row providers themselves."""

from __future__ import annotations

import pytest
import torch

from dshal.config import load_config
from dshal.errors import ConfigError
from dshal.runtime import build_runtime


def test_determinism_key_is_validated_with_file_and_line(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "dshal.yaml"
    path.write_text("backend: cpu\ndeterminism: exact\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: determinism: got 'exact', expected one of: default, strict"):
        load_config(path)
    assert load_config({"determinism": "strict"}).determinism == "strict"
    assert load_config(None).determinism == "default"
    assert load_config({"determinism": "strict"}).to_dict()["determinism"] == "strict"


def test_strict_cpu_serves_every_batch_sensitive_op_row_by_row() -> None:
    rt = build_runtime(load_config({}, backend="cpu", determinism="strict"))
    assert rt.batch_invariant >= {"linear", "fp8_gemm", "rms_norm", "attention", "moe_experts"}
    # Only what no provider can make batch-invariant: linear's tensorwise-FP8 calls.
    assert list(rt.determinism_gaps) == ["linear"] and "tensorwise-FP8" in rt.determinism_gaps["linear"]
    assert rt.unchecked["linear"].__wrapped__ is rt.backend.ops()["linear"]
    assert rt.describe()["determinism"]["mode"] == "strict"
    default = build_runtime(load_config({}, backend="cpu"))
    assert default.batch_invariant == frozenset() and default.unchecked["linear"] is default.backend.ops()["linear"]


@pytest.mark.needs_interpreter
def test_strict_says_where_a_backend_has_no_batch_invariant_provider(caplog) -> None:  # noqa: ANN001
    with caplog.at_level("WARNING", logger="dshal"):
        rt = build_runtime(load_config({}, backend="nvidia", emulate=True, determinism="strict"))
    assert rt.batch_invariant == frozenset()
    for op in ("linear", "fp8_gemm", "rms_norm", "attention", "moe_experts"):
        assert "no batch-invariant provider" in rt.determinism_gaps[op], op
    assert "determinism: strict: no batch-invariant provider for linear" in caplog.text
    over = build_runtime(load_config({}, backend="cpu", determinism="strict", ops={"linear": "cpu"}))
    assert "ops: override" in over.determinism_gaps["linear"]


def test_row_by_row_equals_the_provider_and_keeps_shapes() -> None:
    from dshal.backends.invariant import row_by_row
    from dshal.ops.catalogue import SPECS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    res = torch.randn(2, 3, 64, generator=gen)
    norm = row_by_row("rms_norm", SPECS["rms_norm"].reference_impl)
    y, s = norm(x, w, 1e-6, res)
    ref_y, ref_s = SPECS["rms_norm"].reference_impl(x, w, 1e-6, res)
    assert y.shape == (2, 3, 64) and torch.allclose(y, ref_y) and torch.equal(s, ref_s)
    # A tensorwise (0-d) scale is not split.
    quant = SPECS["quantize_fp8"].reference_impl
    a, sa = quant(torch.randn(5, 128, generator=gen), None, "e4m3fn", None)
    b, sb = quant(torch.randn(32, 128, generator=gen), None, "e4m3fn", None)
    gemm = row_by_row("fp8_gemm", SPECS["fp8_gemm"].reference_impl)
    out = gemm(a, sa, b, sb, torch.float32)
    assert out.shape == (5, 32)
    torch.testing.assert_close(out, SPECS["fp8_gemm"].reference_impl(a, sa, b, sb, torch.float32))
    empty = row_by_row("linear", SPECS["linear"].reference_impl)(torch.zeros(0, 64), torch.randn(8, 64, generator=gen))
    assert empty.shape == (0, 8)


def _tensorwise_fp8_linear() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dshal.ops.catalogue import SPECS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=gen)
    x[1] *= 100  # one row's amax sets the batch's activation scale
    weight, scale = SPECS["quantize_fp8"].reference_impl(torch.randn(128, 256, generator=gen), None, "e4m3fn", None)
    return x, weight, scale


def test_strict_linear_computes_the_contract_for_tensorwise_fp8_and_says_it_is_batch_variant(caplog) -> None:  # noqa: ANN001
    """Strict served a tensorwise-FP8 linear row by row, each row with its own activation
    scale: row 0 was 5e-2 off the op's reference (one scale over all rows) while
    determinism_gaps was empty and the conformance suite passed."""
    import dshal
    from dshal.model.run_report import RunReport
    from dshal.ops.catalogue import SPECS

    x, weight, scale = _tensorwise_fp8_linear()
    want = SPECS["linear"].reference_impl(x, weight, None, scale)
    with caplog.at_level("INFO", logger="dshal"):
        rt = dshal.use(backend="cpu", determinism="strict")
    try:
        torch.testing.assert_close(dshal.ops.linear(x, weight, weight_scale=scale), want, rtol=1e-5, atol=1e-5)
        why = rt.determinism_gaps["linear"]
        assert "tensorwise-FP8" in why and "one scale over all rows" in why and "linear" in rt.batch_invariant
        assert rt.describe()["determinism"]["gaps"]["linear"] == why
        report = RunReport(rt)
        with report.recording():  # a run report lists the gap with the calls it concerns only
            dshal.ops.linear(x, weight.float())
            assert not any(f["kind"] == "determinism" for f in report.to_dict()["fallbacks"])
            dshal.ops.linear(x, weight, weight_scale=scale)
        gap = next(f for f in report.to_dict()["fallbacks"] if f["kind"] == "determinism")
        assert gap["op"] == "linear" and "tensorwise-FP8" in gap["reason"] and gap["calls"] == 1
        assert not any(r.levelname == "WARNING" and "tensorwise" in r.message for r in caplog.records)
        # Rowwise and block FP8 weights (per-row activation scales) stay row by row: invariant.
        for block in ((1, -1), (128, 128)):
            wq, ws = SPECS["quantize_fp8"].reference_impl(torch.randn(128, 256), block, "e4m3fn", None)
            full = dshal.ops.linear(x, wq, weight_scale=ws)
            assert torch.equal(dshal.ops.linear(x[:1].clone(), wq, weight_scale=ws)[0], full[0]), block
        # A model that will make such calls (precision.gemm: fp8-tensor) is warned about.
        caplog.clear()
        with caplog.at_level("WARNING", logger="dshal"):
            build_runtime(load_config({"precision": {"gemm": "fp8-tensor"}}, backend="cpu", determinism="strict"))
        assert "determinism: strict: linear: tensorwise-FP8 weights" in caplog.text
    finally:
        dshal.runtime.reset()


def test_row_by_row_runs_a_tensorwise_fp8_linear_whole() -> None:
    from dshal.backends.invariant import row_by_row
    from dshal.ops.catalogue import SPECS

    x, weight, scale = _tensorwise_fp8_linear()
    reference = SPECS["linear"].reference_impl
    assert torch.equal(row_by_row("linear", reference)(x, weight, None, scale), reference(x, weight, None, scale))
