"""indexer_topk and sparse_mla_attention (DeepSeek Sparse Attention) against per-query loops in
float64: the score and visibility rules, and softmax over the named rows, written out plainly."""

from __future__ import annotations

import math

import pytest
import torch

import dshal
from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref
from dshal.ops.examples import Draw
from dshal.ops.sparse_attention import CHUNK_ELEMENTS


def loop_scores(q, weights, k):
    """``[B, T, S]`` float64: sum over heads of weight * relu(dot), one key at a time."""
    batch, tq, heads, _ = q.shape
    out = torch.zeros(batch, tq, k.shape[1], dtype=torch.float64)
    for b in range(batch):
        for t in range(tq):
            for s in range(k.shape[1]):
                out[b, t, s] = sum(float(weights[b, t, h]) * max(0.0, float(q[b, t, h].double() @ k[b, s].double()))
                                   for h in range(heads))
    return out


def indexer_inputs(batch, tq, slen, heads=3, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tq, heads, dim, generator=g).to(dtype), torch.randn(batch, tq, heads, generator=g),
            torch.randn(batch, slen, dim, generator=g).to(dtype))


@pytest.mark.parametrize("tq, slen, topk", [(5, 5, 2), (3, 9, 4), (1, 7, 7), (4, 5, 5), (6, 4, 2)])
def test_indexer_topk_picks_the_best_visible_keys_causally(tq, slen, topk):
    """Query i sits at position i + S - T and sees keys j <= it; it gets its topk best, -1 past
    the keys it sees (and every entry -1 where T > S leaves it none)."""
    q, w, k = indexer_inputs(2, tq, slen)
    got = ref.indexer_topk(q, w, k, topk)
    assert got.shape == (2, tq, topk) and got.dtype == torch.int64
    scores = loop_scores(q, w, k)
    for b in range(2):
        for t in range(tq):
            seen = [j for j in range(slen) if j <= t + slen - tq]
            want = sorted(seen, key=lambda j: -scores[b, t, j])[:topk]
            row = got[b, t].tolist()
            assert sorted(j for j in row if j >= 0) == sorted(want), (b, t)
            assert row.count(-1) == topk - len(want)


def test_indexer_topk_with_a_visible_mask_and_a_nan_score():
    """``visible`` replaces causality (a row that sees nothing gets all -1); a NaN score ranks
    below every other visible key but above the hidden ones."""
    q, w, k = indexer_inputs(1, 3, 10, seed=1)
    visible = torch.zeros(1, 3, 10, dtype=torch.bool)
    visible[0, 0, [1, 4, 8, 9]] = True
    visible[0, 2, :] = True
    k[0, 4, 0] = float("nan")
    got = ref.indexer_topk(q, w, k, 4, visible)
    scores = loop_scores(q, w, k)
    assert sorted(got[0, 0].tolist()) == [1, 4, 8, 9]  # all four it sees, the NaN one too
    assert got[0, 1].tolist() == [-1] * 4
    finite = [j for j in range(10) if j != 4]
    assert sorted(got[0, 2].tolist()) == sorted(sorted(finite, key=lambda j: -scores[0, 2, j])[:4])


def test_indexer_topk_chunks_long_prefills_without_changing_the_choice(monkeypatch):
    """The reference goes over the queries in chunks (bounded memory at 4096-token prefills):
    chunks of one query give the same indices."""
    import dshal.ops.sparse_attention as sparse  # lazy: the module's chunk bound is patched

    q, w, k = indexer_inputs(2, 7, 12, heads=4)
    whole = ref.indexer_topk(q, w, k, 5)
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 1)
    assert torch.equal(ref.indexer_topk(q, w, k, 5), whole)
    assert CHUNK_ELEMENTS == 2**24


def loop_sparse(q, kv, indices, scale, v_dim):
    batch, heads, tq, _ = q.shape
    out = torch.zeros(batch, heads, tq, v_dim, dtype=torch.float64)
    for b in range(batch):
        for t in range(tq):
            named = [int(j) for j in indices[b, t] if j >= 0]
            if not named:
                continue
            for h in range(heads):
                s = torch.stack([q[b, h, t].double() @ kv[b, j].double() * scale for j in named])
                p = torch.softmax(s, 0)
                out[b, h, t] = sum(p[n] * kv[b, j, :v_dim].double() for n, j in enumerate(named))
    return out


def sparse_inputs(batch=2, heads=3, tq=4, slen=11, dim=12, keys=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g).to(dtype)
    kv = torch.randn(batch, slen, dim, generator=g).to(dtype)
    indices = torch.randint(-1, slen, (batch, tq, keys), generator=g)
    return q, kv, indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sparse_mla_attention_is_softmax_over_the_named_rows(dtype):
    """-1 names nothing, a row named twice counts twice, a query naming none outputs zeros."""
    q, kv, indices = sparse_inputs(dtype=dtype)
    indices[0, 1] = -1
    indices[1, 2, :2] = 3  # twice
    got = ref.sparse_mla_attention(q, kv, indices, 0.4, 7)
    assert got.dtype == dtype and got.shape == (2, 3, 4, 7)
    want = loop_sparse(q, kv, indices, 0.4, 7)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert not got[0, :, 1].any()


def test_sparse_mla_attention_nan_rule_and_chunks(monkeypatch):
    """A NaN in a named row poisons that query's whole row; in a row nobody names (or under a
    -1, gathered as row 0) it reaches nothing. Chunks of one query change nothing."""
    import dshal.ops.sparse_attention as sparse  # lazy: the module's chunk bound is patched

    q, kv, indices = sparse_inputs(batch=1, tq=3, slen=6, keys=3, seed=2)
    indices[0] = torch.tensor([[1, 2, -1], [3, 4, 5], [-1, 2, 2]])
    clean = ref.sparse_mla_attention(q, kv, indices, 0.3, 12)
    kv[0, 0, 5] = float("nan")  # never named (-1 must not gather it)
    kv[0, 4, 11] = float("nan")  # a key-only column of a row query 1 names
    got = ref.sparse_mla_attention(q, kv, indices, 0.3, 12)
    assert got[0, :, 1].isnan().all()
    torch.testing.assert_close(got[0, :, [0, 2]], clean[0, :, [0, 2]], rtol=0, atol=0)
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 1)
    assert torch.equal(ref.sparse_mla_attention(q, kv, indices, 0.3, 12).isnan(), got.isnan())


def test_sparse_mla_attention_refuses_out_of_range_indices_in_checked_and_trusted_mode():
    """Checked mode reads the indices on the host (ShapeError naming the value); trusted mode
    asserts on the device (on CPU a RuntimeError), no host read."""
    q, kv, indices = sparse_inputs()
    indices[1, 0, 2] = 11
    with pytest.raises(ShapeError, match=r"'indices' holds key index 11, expected ids in \[-1, 11\)"):
        ref.sparse_mla_attention(q, kv, indices, 0.3, 4)
    indices[1, 0, 2] = -2
    with pytest.raises(ShapeError, match="key index -2"):
        ref.sparse_mla_attention(q, kv, indices, 0.3, 4)
    with dshal.ops.trusted(), pytest.raises(RuntimeError, match=r"holds a key index outside \[-1, "):
        SPECS["sparse_mla_attention"].reference_impl(q, kv, indices, 0.3, 4)


def _q(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


BAD = [
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4, dtype=torch.int32), _q(1, 2, 3), _q(1, 5, 4), 2), DTypeError, "'q' has dtype torch.int32"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3, dtype=torch.bfloat16), _q(1, 5, 4), 2), DTypeError,
     "'weights' has dtype torch.bfloat16"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), _q(1, 5, 5), 2), ShapeError, "'k' has size 5 in dim 2"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 2), _q(1, 5, 4), 2), ShapeError, "'weights' has size 2 in dim 2"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), _q(1, 5, 4), 0), DshalError, "'topk' is 0"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), _q(1, 5, 4), 6), DshalError, "expected an int in [1, 5] (at most S = 5"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), _q(1, 5, 4), 2, torch.ones(1, 2, 4, dtype=torch.bool)), ShapeError,
     "'visible' has shape [1, 2, 4], expected [1, 2, 5]"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), _q(1, 5, 4), 2, torch.ones(1, 2, 5)), DTypeError, "'visible' has dtype"),
    (lambda: ref.indexer_topk(_q(1, 2, 3, 4), _q(1, 2, 3), torch.ones(1, 5, 4, device="meta"), 2), DeviceError, "'k' is on meta"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8, dtype=torch.bfloat16), torch.zeros(1, 3, 2, dtype=torch.int64), 0.1, 4),
     DTypeError, "'kv' has dtype torch.bfloat16"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 3, 2, dtype=torch.int32), 0.1, 4),
     DTypeError, "'indices' has dtype torch.int32"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 2, 2, dtype=torch.int64), 0.1, 4),
     ShapeError, "'indices' has size 2 in dim 1"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 3, 2, dtype=torch.int64), 0.1, 9),
     DshalError, "'v_dim' is 9, expected an int in [1, 8]"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 3, 2, dtype=torch.int64), math.inf, 4),
     DshalError, "'scale' is inf"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 3, 2, dtype=torch.int64), 1e39, 4),
     DshalError, "'scale' is 1e+39, expected a positive float that float32 holds"),
    (lambda: ref.sparse_mla_attention(_q(1, 2, 3, 8), _q(1, 5, 8), torch.zeros(1, 3, 2, dtype=torch.int64, device="meta"), 0.1, 4),
     DeviceError, "'indices' is on meta"),
]


def test_sparse_attention_ops_reject_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_sparse_attention_ops_dispatch_on_the_cpu_backend_and_cost():
    dshal.use(backend="cpu")
    q, w, k = indexer_inputs(1, 3, 6)
    assert torch.equal(dshal.ops.indexer_topk(q, w, k, 2), ref.indexer_topk(q, w, k, 2))
    assert SPECS["indexer_topk"].cost_of(q, w, k, 2).flops == 2 * 3 * 6 * 3 * 9
    q, kv, indices = sparse_inputs()
    torch.testing.assert_close(dshal.ops.sparse_mla_attention(q, kv, indices, 0.3, 5), ref.sparse_mla_attention(q, kv, indices, 0.3, 5))
    assert SPECS["sparse_mla_attention"].cost_of(q, kv, indices, 0.3, 5).flops == 2 * 2 * 3 * 4 * 5 * (12 + 5)


def test_example_rows_cover_few_visible_keys_and_no_key_indices():
    """The ci rows exercise what providers get wrong: queries seeing fewer keys than topk (and
    none), -1 indices and queries naming none."""
    draw = Draw(torch.Generator().manual_seed(0))
    spec = SPECS["indexer_topk"]
    short = [row.name for row in spec.rows if "ci" in row.tiers and row.kind != "bench"
             and (ref.indexer_topk(**spec.example_inputs(draw, row).kwargs) == -1).any()]
    assert len(short) >= 3, short
    spec = SPECS["sparse_mla_attention"]
    blind = [row.name for row in spec.rows if "ci" in row.tiers and row.kind != "bench"
             and (spec.example_inputs(draw, row).kwargs["indices"] == -1).all(dim=-1).any()]
    assert len(blind) >= 2, blind
