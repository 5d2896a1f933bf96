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
    assert rt.determinism_gaps == {}
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
