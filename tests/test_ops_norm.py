"""rms_norm against numpy and HF transformers' DeepseekV3RMSNorm."""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import dshal
from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref


def test_rms_norm_matches_numpy_and_residual_pair():
    torch.manual_seed(0)
    x, w, r = torch.randn(3, 5, 32), torch.randn(32), torch.randn(3, 5, 32)
    xn = x.double().numpy()
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * w.double().numpy()
    np.testing.assert_allclose(ref.rms_norm(x, w).numpy(), want, rtol=1e-5, atol=1e-6)
    y, s = ref.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, ref.rms_norm(x + r, w))
    torch.testing.assert_close(SPECS["rms_norm"].run_oracle(x, w), torch.from_numpy(want))


def test_rms_norm_uses_the_eps_it_is_given():
    """Every call site passes DeepSeek-V3's 1e-6, so an eps read from the wrong place passed the
    other tests; a small-magnitude row makes eps decide the result."""
    x, w = torch.full((2, 16), 1e-3, dtype=torch.float64), torch.ones(16, dtype=torch.float64)
    for eps in (0.0, 1e-6, 1e-2):
        want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(ref.rms_norm(x, w, eps), want)
        torch.testing.assert_close(ref.rms_norm(x, w, eps, torch.zeros_like(x))[0], want)


def test_rms_norm_bf16_matches_hf_and_edge_rows():
    torch.manual_seed(1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    norm = hf.DeepseekV3RMSNorm(64, eps=1e-6)
    torch.testing.assert_close(ref.rms_norm(x, norm.weight.detach()), norm(x).to(torch.bfloat16), rtol=1.6e-2, atol=1e-2)
    assert ref.rms_norm(torch.zeros(1, 8), torch.ones(8)).abs().sum() == 0  # zero row: no NaN
    assert ref.rms_norm(torch.empty(0, 8), torch.ones(8)).shape == (0, 8)


BAD = [
    (lambda: ref.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(7)), ShapeError, "'weight' has size 7"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6, torch.ones(2, 9)), ShapeError, "'residual' has shape [2, 9]"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8, device="meta")), DeviceError, "'weight' is on meta"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8), -1.0), ArgumentError, "'eps' is -1.0"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8), float("inf")), ArgumentError,
     "'eps' is inf, expected a finite non-negative float"),
]


def test_rms_norm_rejects_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_rms_norm_dispatch_on_cpu_backend():
    dshal.use(backend="cpu")
    x, w = torch.randn(2, 16), torch.randn(16)
    torch.testing.assert_close(dshal.ops.rms_norm(x, w), ref.rms_norm(x, w))
