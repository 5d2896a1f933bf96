"""DeepSeek-V3.2's Triton kernels (sparse MLA, the indexer's scores) on CPU tensors under the
interpreter, against the ops' references on every ci example row, and their refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest
import dshal  # noqa: E402
from dshal.errors import DTypeError, ShapeError  # noqa: E402
from dshal.kernels.triton.sparse_attention import indexer_topk, sparse_mla_attention  # noqa: E402
from dshal.kernels.triton.target import KernelTarget  # noqa: E402
from dshal.ops import SPECS, reference as ref  # noqa: E402
from dshal.ops.examples import Draw  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

ROWS = [row for row in SPECS["sparse_mla_attention"].rows if "ci" in row.tiers and row.kind != "bench"]
INDEX_ROWS = [row for row in SPECS["indexer_topk"].rows if "ci" in row.tiers and row.kind != "bench"]


@pytest.mark.parametrize("row", INDEX_ROWS, ids=lambda row: row.name)
def test_indexer_topk_picks_the_references_keys_on_every_ci_row(row):
    """Fewer visible keys than topk (the -1 entries), a visible mask, T > S, a NaN key: the same
    keys as the reference (random scores: no near-tie at these sizes)."""
    kw = SPECS["indexer_topk"].example_inputs(Draw(torch.Generator().manual_seed(1)), row).kwargs
    got = indexer_topk(**kw, target=KernelTarget.interpreter())
    want = ref.indexer_topk(**kw)
    assert got.dtype == torch.int64 and torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_sparse_mla_attention_matches_the_reference_on_every_ci_row(row):
    """Decode and MTP at DeepSeek-V3.2's latent dims, -1 indices, queries naming none (zeros),
    K > S, non-contiguous inputs, NaN in named and unnamed rows (the row rule)."""
    kw = SPECS["sparse_mla_attention"].example_inputs(Draw(torch.Generator().manual_seed(1)), row).kwargs
    got = sparse_mla_attention(**kw, target=KernelTarget.interpreter())
    want = ref.sparse_mla_attention(**kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.isnan(), want.isnan())
    tol = 2e-2 if got.dtype == torch.bfloat16 else 2e-6
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=tol, atol=tol)


def test_a_nan_in_a_bfloat16_query_poisons_its_head_only():
    """The interpreter keeps bfloat16 as raw bits: a NaN test on them saw none, and the head's
    softmax (all NaN) came out as zeros."""
    torch.manual_seed(0)
    q, kv = torch.randn(1, 16, 1, 64).to(torch.bfloat16), torch.randn(1, 40, 64).to(torch.bfloat16)
    indices = torch.randint(0, 40, (1, 1, 20))
    q[0, 3, 0, 5] = float("nan")
    got = sparse_mla_attention(q, kv, indices, 0.125, 32, target=KernelTarget.interpreter())
    assert got[0, 3].isnan().all() and not got[0, torch.arange(16) != 3].isnan().any()


def test_a_nan_score_ranks_last_among_the_visible_keys():
    """relu as tl.maximum(x, 0) turns NaN into 0: the key would rank as any other."""
    torch.manual_seed(0)
    q, weights, k = torch.randn(1, 1, 16, 32), -torch.rand(1, 1, 16), torch.randn(1, 10, 32)
    k[0, 4, 3] = float("nan")  # with negative weights a real score is <= 0: a NaN read as 0 would rank first
    got = indexer_topk(q, weights, k, 9, target=KernelTarget.interpreter())
    assert 4 not in got[0, 0].tolist() and torch.equal(got.sort(dim=-1).values, ref.indexer_topk(q, weights, k, 9).sort(dim=-1).values)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the padding heads' 0 * inf
def test_an_infinite_key_scores_as_the_reference_with_padding_heads():
    """4 heads padded to the dot's 16: the padding heads' 0 * inf is NaN, which must not make
    the key's score NaN (its real heads all see -inf: relu gives 0)."""
    torch.manual_seed(0)
    q, weights, k = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4), torch.randn(1, 10, 32)
    q[0, 0, :, 0] = 1.0
    k[0, 2, 0] = -float("inf")  # every real head's dot is -inf: score 0
    got = indexer_topk(q, weights, k, 9, target=KernelTarget.interpreter())
    assert torch.equal(got.sort(dim=-1).values, ref.indexer_topk(q, weights, k, 9).sort(dim=-1).values)


def test_refusals_name_the_argument():
    q, kv, indices = torch.randn(1, 2, 1, 32), torch.randn(1, 8, 32), torch.zeros(1, 1, 4, dtype=torch.int64)
    with pytest.raises(DTypeError, match="'q' has dtype torch.float64"):
        sparse_mla_attention(q.double(), kv.double(), indices, 0.1, 16)
    with pytest.raises(ShapeError, match="'v_dim' is 1100, expected at most 1024"):
        sparse_mla_attention(torch.randn(1, 2, 1, 1100), torch.randn(1, 8, 1100), indices, 0.1, 1100)
    indices[0, 0, 2] = 8
    with pytest.raises(ShapeError, match=r"'indices' holds key index 8, expected ids in \[-1, 8\)"):
        sparse_mla_attention(q, kv, indices, 0.1, 16)
    with dshal.ops.trusted(), pytest.raises(RuntimeError, match="outside"):  # a device-side assert, no host read
        sparse_mla_attention(q, kv, indices, 0.1, 16)


def test_trusted_mode_skips_the_wrapper_checks_same_bits(kernel_checks):
    torch.manual_seed(0)
    q, kv = torch.randn(2, 16, 1, 64).to(torch.bfloat16), torch.randn(2, 40, 64).to(torch.bfloat16)
    indices = torch.randint(-1, 40, (2, 1, 24))
    kernel_checks.trusted_matches_checked(lambda: sparse_mla_attention(q, kv, indices, 0.125, 32))
    heads_q, weights = q.transpose(1, 2).contiguous(), torch.rand(2, 1, 16)  # [B, T, Hi, Di]
    kernel_checks.trusted_matches_checked(lambda: indexer_topk(heads_q, weights, kv, 8))
