"""The cpu backend's native providers against the op references (the oracle), through the
runtime's dispatch, so the spec checks run in front of them as they do in the model."""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal import ops
from dshal.backends.cpu_native import NATIVE_OPS
from dshal.ops.catalogue import SPECS

#: Allowed max |native - reference| / max(|reference|, 1) per dtype (16-bit: a few ulps).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture()
def cpu():
    return dshal.use({"backend": "cpu", "fallback": "error"})


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(want.double().abs().max().item() if want.numel() else 0.0, 1.0)
    assert err <= TOL[want.dtype] * scale, f"max |err| {err:.3g} > {TOL[want.dtype] * scale:.3g}"


def _check(op: str, *args, **kwargs) -> None:
    got = getattr(ops, op)(*args, **kwargs)
    want = SPECS[op].reference_impl(*args, **kwargs)
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        _close(g, w)


def test_the_backend_declares_which_ops_are_native(cpu):
    kinds = cpu.backend.capabilities().op_kinds
    assert {op for op, kind in kinds.items() if kind == "native"} == set(NATIVE_OPS)
    assert set(kinds) == {name for name, spec in SPECS.items() if spec.has_reference}
    assert cpu.describe()["providers"]["attention"] == {"provider": "cpu", "kind": "native"}
    assert cpu.describe()["providers"]["linear"] == {"provider": "cpu", "kind": "reference"}


ATTENTION_CASES = {
    # name: (Hq, Hk, Tq, Tk, D, Dv, causal, window, global_tokens)
    "prefill-causal": (4, 4, 16, 16, 32, 32, True, None, 0),
    "chunk-after-cache": (4, 2, 5, 21, 32, 32, True, None, 0),
    "decode-absorbed-shape": (8, 1, 1, 40, 48, 40, True, None, 0),
    "decode-batch-of-queries-noncausal": (6, 3, 3, 9, 16, 8, False, None, 0),
    "more-queries-than-keys": (2, 2, 7, 4, 16, 16, True, None, 0),
    "window-and-global": (4, 4, 24, 24, 16, 16, True, 5, 3),
    "window-noncausal": (2, 1, 10, 10, 16, 8, False, 3, 2),
    "decode-window": (4, 4, 1, 30, 16, 16, True, 6, 2),
    "empty-keys": (2, 2, 3, 0, 16, 16, True, None, 0),
}


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_attention_matches_the_reference(cpu, case, dtype):
    hq, hk, tq, tk, d, dv, causal, window, global_tokens = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    q = torch.randn(2, hq, tq, d, generator=gen).to(dtype)
    k = torch.randn(2, hk, tk, d, generator=gen).to(dtype)
    v = torch.randn(2, hk, tk, dv, generator=gen).to(dtype)
    _check("attention", q, k, v, causal, 0.3, window, global_tokens)


def test_attention_blind_queries_output_zeros(cpu):
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4)
    out = ops.attention(q, k, v, True)
    assert torch.equal(out[:, :, :3], torch.zeros(1, 2, 3, 4))  # positions -3..-1 see no key
    assert out[:, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rms_norm_silu_and_rotary_match_the_reference(cpu, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    residual, weight = torch.randn(3, 5, 64, generator=gen).to(dtype), torch.rand(64, generator=gen).to(dtype)
    _check("rms_norm", x, weight, 1e-6)
    _check("rms_norm", x, weight, 1e-6, residual)
    _check("rms_norm", x.transpose(0, 1), weight, 1e-5)  # non-contiguous
    _check("silu_and_mul", x)
    _check("silu_and_mul", x[..., ::2])
    cos, sin = torch.rand(5, 32, generator=gen), torch.rand(5, 32, generator=gen)
    for interleaved in (True, False):
        _check("rotary_embedding", x, cos, sin, interleaved)
        _check("rotary_embedding", x.transpose(0, 1)[:, :, None], cos[:3, None], sin[:3, None], interleaved)
