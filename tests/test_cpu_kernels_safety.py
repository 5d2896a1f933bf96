"""Memory safety of dshal's C kernels (``dshal.kernels.cpu``): what the C cannot handle
safely (indices it would follow out of bounds, tables too small for the rows it indexes,
counts its int32 outputs cannot hold) is refused by the wrappers with a ``DshalError``."""

from __future__ import annotations

import pytest
import torch

from dshal.errors import DeviceError, ShapeError
from dshal.kernels import cpu as K
from dshal.ops.catalogue import SPECS

needs_kernels = pytest.mark.skipif(
    not K.status().available, reason=f"dshal cpu C kernels unavailable here: {K.status().detail}"
)
GEN = torch.Generator().manual_seed(11)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@needs_kernels
def test_moe_combine_refuses_order_slots_outside_the_tokens():
    y, weights = _randn(4, 8), torch.rand(2, 2, generator=GEN)
    for slot in (4, 1_000_000, -1, -3):  # each indexed weights and out out of bounds (read, then written)
        order = torch.tensor([0, 1, 2, slot])
        with pytest.raises(ShapeError, match=f"argument 'order' holds {slot} at position 3, expected slots in \\[0, 4\\)"):
            K.moe_combine(y, order, weights)
    with pytest.raises(DeviceError, match="argument 'order' is on meta, expected cpu"):
        K.moe_combine(y, torch.arange(4, device="meta"), weights)
    x = _randn(2, 8)
    xs, order, _ = K.moe_group(x, torch.tensor([[1, 0], [0, 1]]), 2)  # a permutation of all four slots: taken
    assert torch.equal(K.moe_combine(xs, order, torch.ones(2, 2)), 2 * x)


@needs_kernels
@pytest.mark.parametrize(
    "x_shape,table_shape",
    [
        ((5, 8), (0, 4)),  # an empty table: the kernel read row 0 of it
        ((2, 5, 2, 8), (2, 3, 2, 4)),  # 3 of x's 5 rows in the middle dim: 20 table rows read, 12 there
        ((5, 8), (7, 4)),
        ((1, 8), (3, 4)),  # the tables would broadcast x up, not x the tables
        ((5, 8), (2, 5, 4)),  # more dims than x
    ],
    ids=str,
)
def test_rotary_refuses_tables_that_do_not_broadcast_to_x(x_shape, table_shape):
    x, table = _randn(*x_shape), _randn(*table_shape)
    with pytest.raises(ShapeError, match=f"argument 'cos' has shape \\[{', '.join(map(str, table_shape))}\\]"):
        K.rotary(x, table, table)


@needs_kernels
def test_rotary_still_takes_every_broadcast_the_op_allows():
    ref = SPECS["rotary_embedding"].reference_impl
    x = _randn(2, 5, 3, 8)
    for table_shape in ((5, 1, 4), (2, 5, 3, 4), (1, 4), (4,), (5, 3, 4), (2, 1, 1, 4)):
        cos, sin = _randn(*table_shape), _randn(*table_shape)
        got = K.rotary(x, cos, sin)
        assert got is not None and torch.allclose(got, ref(x, cos, sin), atol=1e-6), table_shape


@needs_kernels
def test_fp8_wrappers_refuse_weights_of_the_wrong_rank():
    e4m3 = torch.float8_e4m3fn
    for weight, scale in ((torch.zeros(8, dtype=e4m3), torch.ones(1)), (torch.zeros((), dtype=e4m3), torch.ones(()))):
        with pytest.raises(ShapeError, match="argument 'weight' must be 2-D, got shape"):  # was IndexError
            K.fp8_block_gemm(_randn(1, 8), weight, scale)
    w = torch.zeros(4, 8, dtype=e4m3)
    with pytest.raises(ShapeError, match="argument 'w13' must be 3-D, got shape \\[4, 8\\]"):  # was ValueError
        K.moe_token_fp8(_randn(1, 8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), w, w, torch.ones(1, 1),
                        torch.ones(1, 1))  # fmt: skip


@needs_kernels
def test_moe_group_refuses_more_slots_than_its_int32_ends_hold():
    # 2**40 slots of an expanded (storage-free) ids tensor: refused before anything is allocated
    ids = torch.zeros(1, 1, dtype=torch.int64).expand(2**20, 2**20)
    with pytest.raises(ShapeError, match=f"\\({2**40} slots\\), expected at most {2**31 - 1} slots"):
        K.moe_group(torch.empty(2**20, 0), ids, 4)
