"""silu_and_mul against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dshal
from dshal.errors import DeviceError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref


def numpy_silu_and_mul(x: np.ndarray) -> np.ndarray:
    d = x.shape[-1] // 2
    gate, up = x[..., :d], x[..., d:]
    return gate / (1.0 + np.exp(-gate)) * up


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float64, 1e-12)])
def test_silu_and_mul_matches_numpy(dtype, tol):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 64) * 4).to(dtype)
    got = ref.silu_and_mul(x)
    assert got.dtype == dtype and got.shape == (3, 4, 32)
    np.testing.assert_allclose(got.double().numpy(), numpy_silu_and_mul(x.double().numpy()), rtol=tol, atol=tol)


def test_silu_and_mul_edge_cases():
    x = torch.randn(64, 6).T  # non-contiguous [6, 64]
    np.testing.assert_allclose(ref.silu_and_mul(x).numpy(), numpy_silu_and_mul(x.double().numpy()), rtol=1e-6, atol=1e-6)
    assert ref.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    assert ref.silu_and_mul(torch.tensor([-1000.0, 3.0])).item() == 0.0  # silu saturates, no NaN
    torch.testing.assert_close(SPECS["silu_and_mul"].run_oracle(x), ref.silu_and_mul(x.double()))


BAD = [
    (lambda: ref.silu_and_mul(torch.ones(4, 8, dtype=torch.int64)), DTypeError, "'x' has dtype torch.int64"),
    (lambda: ref.silu_and_mul(torch.ones(4, 7)), ShapeError, "last dim 7"),
    (lambda: ref.silu_and_mul(torch.ones(())), ShapeError, "at least 1 dims"),
    (lambda: ref.silu_and_mul("x"), DTypeError, "must be a torch.Tensor, got str"),
]


def test_silu_and_mul_rejects_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_silu_and_mul_dispatch_on_cpu_backend():
    dshal.use(backend="cpu")
    x = torch.randn(2, 10)
    torch.testing.assert_close(dshal.ops.silu_and_mul(x), ref.silu_and_mul(x))
    with pytest.raises(DeviceError, match="on device meta"):
        dshal.ops.silu_and_mul(torch.ones(2, 4, device="meta"))
    assert SPECS["silu_and_mul"].cost_of(x).flops == 5 * 10
