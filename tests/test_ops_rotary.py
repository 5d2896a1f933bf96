"""rotary_embedding against HF transformers' rotate_half / interleave functions and complex math."""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import dshal
from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref


def angles(t: int, d: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)  # [T, D/2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_half_matches_hf_rotate_half(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16, dtype=dtype)
    theta = angles(5, 16).to(dtype)
    cos, sin = theta.cos(), theta.sin()
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    want = x * full_cos + hf.rotate_half(x) * full_sin
    torch.testing.assert_close(ref.rotary_embedding(x, cos, sin, interleaved=False), want)


def test_rotary_interleaved_matches_complex_multiplication_and_hf_layout():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 8)
    theta = angles(6, 8).float()
    got = ref.rotary_embedding(x, theta.cos(), theta.sin(), interleaved=True)
    as_complex = torch.view_as_complex(x.reshape(2, 4, 6, 4, 2).contiguous())
    want = torch.view_as_real(as_complex * torch.polar(torch.ones_like(theta), theta)).flatten(-2)
    torch.testing.assert_close(got, want)
    # HF's DeepSeek function returns the rotated pairs de-interleaved ([evens, odds]).
    full = lambda t: torch.cat((t, t), -1)[None]  # noqa: E731
    hf_q, _ = hf.apply_rotary_pos_emb_interleave(x, x, full(theta.cos()), full(theta.sin()))
    torch.testing.assert_close(torch.cat((got[..., 0::2], got[..., 1::2]), -1), hf_q)


def test_rotary_bf16_broadcast_noncontiguous_and_zero_angle():
    torch.manual_seed(2)
    x = torch.randn(3, 16, 7).transpose(1, 2).to(torch.bfloat16)  # [3, 7, 16] non-contiguous
    theta = angles(7, 16).float()
    got = ref.rotary_embedding(x, theta.cos(), theta.sin())
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    want = ref.rotary_embedding(x.double(), theta.cos().double(), theta.sin().double())
    torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1e-2)
    ones, zeros = torch.ones(8), torch.zeros(8)
    assert torch.equal(ref.rotary_embedding(x, ones, zeros), x)
    torch.testing.assert_close(SPECS["rotary_embedding"].run_oracle(x, theta.cos(), theta.sin()), want)


BAD = [
    (lambda: ref.rotary_embedding(torch.ones(2, 8, dtype=torch.int32), torch.ones(4), torch.ones(4)), DTypeError, "'x' has dtype torch.int32"),
    (lambda: ref.rotary_embedding(torch.ones(2, 7), torch.ones(3), torch.ones(3)), ShapeError, "last dim 7"),
    (lambda: ref.rotary_embedding(torch.ones(2, 8), torch.ones(8), torch.ones(8)), ShapeError, "broadcastable to [2, 4]"),
    (lambda: ref.rotary_embedding(torch.ones(2, 8), torch.ones(4), torch.ones(2, 4)), ShapeError, "'sin' has shape [2, 4]"),
    (lambda: ref.rotary_embedding(torch.ones(2, 8), torch.ones(3, 4), torch.ones(3, 4)), ShapeError, "'cos' has shape [3, 4]"),
    (lambda: ref.rotary_embedding(torch.ones(2, 8), torch.ones(4, device="meta"), torch.ones(4)), DeviceError, "'cos' is on meta"),
    (lambda: ref.rotary_embedding(torch.ones(2, 8), torch.ones(4), torch.ones(4), interleaved="yes"), DshalError, "'interleaved' is 'yes'"),
]


def test_rotary_rejects_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_rotary_dispatch_on_cpu_backend():
    dshal.use(backend="cpu")
    x, theta = torch.randn(2, 4, 8), angles(4, 8).float()
    torch.testing.assert_close(dshal.ops.rotary_embedding(x, theta.cos(), theta.sin(), False), ref.rotary_embedding(x, theta.cos(), theta.sin(), False))
