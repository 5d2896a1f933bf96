"""DeepSeek Sparse Attention (DeepSeek-V3.2) on Ascend: ``indexer_topk`` through
``npu_lightning_indexer`` and ``sparse_mla_attention`` through ``npu_sparse_flash_attention``.

Every call the plugin makes is bound against each release's recorded schema by
:class:`~dshal_ascend.standin.SignatureCheckingStandIn`, which also holds the kernels' documented
limits and computes their documented result (the doc pages' formulas, in plain torch on the CPU)
from the arguments the plugin translated. The results are checked against the op contract written
out below, so a wrong layout, transposition, split or index order fails. The stand-in is not an
NPU: nothing here says anything about an NPU's numerics or speed.
"""

from __future__ import annotations

import pytest
import torch

from dshal import registry
from dshal.errors import PluginLoadError
from dshal.model import build_model, tiny_args
from dshal.model.checkpoint import random_checkpoint
from dshal.model.loader import DictReader
from dshal.ops.dispatch import DISPATCHER
from dshal.plugin import SPECS, ShapeError
from dshal_ascend import backend as backend_mod, layouts
from dshal_ascend.backend import AscendBackend, release_capabilities
from dshal_ascend.npu_ops import DSA_OP_NAMES, AscendOps, served_op_names
from dshal_ascend.releases import RELEASE_BY_NAME, kernel_features, plan_ops
from dshal_ascend.schema import SignatureError, recorded_releases, recorded_signatures
from dshal_ascend.standin import SignatureCheckingStandIn

RELEASES = recorded_releases()
WITH_DSA = tuple(r for r in RELEASES if RELEASE_BY_NAME[r].key >= (7, 3, 0))
FLOAT32_WEIGHTS = tuple(r for r in RELEASES if RELEASE_BY_NAME[r].key >= (26, 0, 0))
needs_dsa_ops = pytest.mark.skipif(not set(DSA_OP_NAMES) <= set(SPECS), reason="this dshal has no DSA ops")


def _ops(release: str) -> tuple[AscendOps, SignatureCheckingStandIn]:
    stand_in = SignatureCheckingStandIn(recorded_signatures(release))
    return AscendOps(kernel_features(release), stand_in), stand_in


# ---------------------------------------------------------------- the op contract, written out
def contract_topk(q, weights, k, topk):
    """indexer_topk's default visibility: per query its topk visible keys by float32 score, -1 past them."""
    batch, tq, _, _ = q.shape
    s = k.shape[1]
    scores = torch.einsum("bth,bths->bts", weights.float(), torch.relu(torch.einsum("bthd,bsd->bths", q.float(), k.float())))
    position = torch.arange(tq) + s - tq
    scores = scores.masked_fill(torch.arange(s)[None, :] > position[:, None], float("-inf"))
    best = scores.topk(topk, dim=-1)
    return torch.where(torch.isinf(best.values), -1, best.indices)


def contract_sparse(q, kv, indices, scale, v_dim):
    """sparse_mla_attention: softmax over each query's named keys (float32), zeros without one."""
    batch, heads, tq, _ = q.shape
    out = torch.zeros(batch, heads, tq, v_dim)
    for b in range(batch):
        for t in range(tq):
            keys = indices[b, t][indices[b, t] >= 0]
            if keys.numel():
                rows = kv[b, keys].float()
                p = torch.softmax(q[b, :, t].float() @ rows.T * scale, dim=-1)
                out[b, :, t] = p @ rows[:, :v_dim]
    return out.to(q.dtype)


def same_choice(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Each query's chosen keys as a set (the contract allows any order)."""
    return got.shape == want.shape and torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)


def indexer_inputs(b, t, s, hi, di, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hi, di, generator=g).to(dtype)
    k = torch.randn(b, s, di, generator=g).to(dtype)
    w = torch.randn(b, t, hi, generator=g) * (hi * di) ** -0.5
    return q, w, k


def sparse_inputs(b, h, t, s, d, k, seed=0, none=0.3, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    kv = torch.randn(b, s, d, generator=g).to(dtype)
    idx = torch.rand(b, t, max(s, k), generator=g).argsort(dim=-1)[..., :k]
    idx = torch.where(idx < s, idx, -1)
    idx = torch.where(torch.rand(b, t, k, generator=g) < none, -1, idx)  # -1 anywhere, not only last
    return q, kv, idx


# ---------------------------------------------------------------- recorded facts
def test_ascend_dsa_kernels_are_in_torch_npu_from_7_3_0():
    """op_plugin_functions.yaml: both kernels from 7.3.0 (one schema each, the same in 26.x), none before."""
    for release in RELEASES:
        sig = recorded_signatures(release)
        has = RELEASE_BY_NAME[release].key >= (7, 3, 0)
        assert sig.has("npu_lightning_indexer") == has and sig.has("npu_sparse_flash_attention") == has, release
    texts = {r: {k: [s.text for s in recorded_signatures(r).ops[k]] for k in ("npu_lightning_indexer", "npu_sparse_flash_attention")}
             for r in WITH_DSA}
    assert all(t == texts["7.3.0"] for t in texts.values())
    (indexer,) = recorded_signatures("7.3.0").ops["npu_lightning_indexer"]
    assert [p.name for p in indexer.params if not p.keyword_only] == ["query", "key", "weights"]
    assert indexer.param("sparse_count").default == "2048" and indexer.param("sparse_mode").default == "3"
    assert indexer.returns == ("Tensor", "Tensor")
    (sfa,) = recorded_signatures("7.3.0").ops["npu_sparse_flash_attention"]
    assert [p.name for p in sfa.params if not p.keyword_only] == ["query", "key", "value", "sparse_indices", "scale_value"]
    assert sfa.param("attention_mode").default == "0" and sfa.param("layout_kv").default == '"BSND"'
    assert sfa.returns == ("Tensor", "Tensor", "Tensor")


def test_ascend_dsa_plan_per_release():
    """Before 7.3.0: no kernels. 7.3.0: its indexer takes weights only in q's dtype, so indexer_topk
    (float32 weights) stays the reference; 26.0.0+: both native."""
    for release in RELEASES:
        routes, f = plan_ops(kernel_features(release)), kernel_features(release)
        key = RELEASE_BY_NAME[release].key
        assert f.indexer_float32_weights == f.indexer_large_counts == (key >= (26, 0, 0))
        if key < (7, 3, 0):
            assert routes["indexer_topk"].kind == routes["sparse_mla_attention"].kind == "reference"
            assert "npu_lightning_indexer missing" in routes["indexer_topk"].why
            continue
        assert routes["sparse_mla_attention"].kind == "native"
        assert routes["sparse_mla_attention"].path.startswith("npu_sparse_flash_attention")
        if key < (26, 0, 0):
            assert routes["indexer_topk"].kind == "reference" and "weights only in q's dtype" in routes["indexer_topk"].why
        else:
            assert routes["indexer_topk"].kind == "native" and routes["indexer_topk"].path.startswith("npu_lightning_indexer")


# ---------------------------------------------------------------- indexer_topk
@pytest.mark.parametrize("release", FLOAT32_WEIGHTS)
@pytest.mark.parametrize("b,t,s,hi,di,topk", [
    (2, 3, 10, 4, 32, 5),      # a head dim under 128: zero-padded
    (1, 12, 12, 8, 128, 6),    # a prefill: the first queries see fewer than topk keys (-1 past them)
    (3, 1, 100, 64, 128, 32),  # DeepSeek-V3.2's 64 heads of 128, one decode query
    (1, 2, 40, 16, 64, 40),    # MTP: two queries, topk = S
])
def test_ascend_indexer_topk_runs_the_lightning_indexer(release, b, t, s, hi, di, topk):
    ops, stand_in = _ops(release)
    q, w, k = indexer_inputs(b, t, s, hi, di, seed=b * 100 + t)
    got = ops.indexer_topk(q, w, k, topk)
    assert got.dtype == torch.int64 and same_choice(got, contract_topk(q, w, k, topk))
    (call,) = stand_in.called("npu_lightning_indexer")
    a = call.arguments
    assert a["query"].shape == (b, t, hi, 128) and a["key"].shape == (b, s, 1, 128)
    assert a["weights"].dtype == torch.float32 and a["weights"].shape == (b, t, hi)
    assert (a["layout_query"], a["layout_key"], a["sparse_count"], a["sparse_mode"]) == ("BSND", "BSND", topk, 3)
    assert not ops.reference_calls


def test_ascend_indexer_topk_entries_past_the_visible_keys_are_minus_one():
    """What the kernel writes past a query's visible keys is not documented (op-plugin's own test
    expects the masked keys there, which the stand-in writes): the plugin sets them to -1."""
    ops, stand_in = _ops("26.1.0")
    q, w, k = indexer_inputs(1, 8, 8, 4, 32, seed=3)
    got = ops.indexer_topk(q, w, k, 6)
    raw = stand_in.npu_lightning_indexer(*(t for t in layouts.indexer_operands(q, w, k)), sparse_count=6)[0][:, :, 0]
    assert (raw[0, 0] >= 0).all()  # the kernel-as-tested: masked keys fill query 0's row
    assert got[0, 0].tolist()[1:] == [-1] * 5 and got[0, 0, 0] == 0  # query 0 sees key 0 only
    assert ((got >= 0).sum(-1) == torch.tensor([[1, 2, 3, 4, 5, 6, 6, 6]])).all()


@pytest.mark.parametrize("case,message", [
    ("visible", "explicit visible mask"),
    ("float32", "float16 / bfloat16"),
    ("head dim 192", "index head dim 192"),
    ("65 heads", "65 index heads"),
    ("topk 2500", "topk 2500"),
    ("more queries than keys", "12 queries over 8 keys"),
])
def test_ascend_indexer_topk_outside_the_kernels_limits_is_the_reference(case, message):
    q, w, k = indexer_inputs(1, 4, 3000 if case == "topk 2500" else 20, 4, 32)
    visible, topk = None, 4
    if case == "visible":
        visible = torch.ones(1, 4, 20, dtype=torch.bool)
    elif case == "float32":
        q, k = q.float(), k.float()
    elif case == "head dim 192":
        q, w, k = indexer_inputs(1, 4, 20, 4, 192)
    elif case == "65 heads":
        q, w, k = indexer_inputs(1, 4, 20, 65, 32)
    elif case == "topk 2500":
        topk = 2500
    else:
        q, w, k = indexer_inputs(1, 12, 8, 4, 32)
    why = layouts.lightning_indexer_unsupported(q, w, k, topk, visible, float32_weights=True, large_counts=True)
    assert why is not None and message in why
    if set(DSA_OP_NAMES) <= set(SPECS):  # the method's fallback needs the op's reference
        ops, stand_in = _ops("26.1.0")
        got = ops.indexer_topk(q, w, k, topk, visible)
        assert same_choice(got, SPECS["indexer_topk"].reference_impl(q, w, k, topk, visible))
        assert not stand_in.called("npu_lightning_indexer") and ops.reference_calls == {"indexer_topk": 1}


def test_ascend_indexer_topk_counts_and_weights_per_release():
    """sparse_count 1-2048 everywhere, 3072 ... 8192 in steps of 1024 from 26.0.0; float32 weights
    from 26.0.0 (7.3.0: q's dtype only, so dshal's float32 weights go to the reference there)."""
    fits = layouts.indexer_sparse_count_fits
    assert fits(2048, False) and not fits(3072, False) and fits(3072, True) and fits(8192, True)
    assert not fits(2049, True) and not fits(9216, True) and not fits(0, True)
    q, w, k = indexer_inputs(1, 2, 20, 4, 32)
    old = layouts.lightning_indexer_unsupported(q, w, k, 4, None, float32_weights=False, large_counts=False)
    assert "weights torch.float32 with q torch.bfloat16" in old
    assert layouts.lightning_indexer_unsupported(q, w.bfloat16(), k, 4, None, float32_weights=False, large_counts=False) is None
    stand_in = SignatureCheckingStandIn(recorded_signatures("7.3.0"))
    query, key, weights = layouts.indexer_operands(*indexer_inputs(1, 2, 20, 64, 128)[:3])
    with pytest.raises(SignatureError, match="weights torch.float32 with query"):
        stand_in.npu_lightning_indexer(query, key, weights)
    assert stand_in.npu_lightning_indexer(query, key, weights.bfloat16(), sparse_count=4)[0].shape == (1, 2, 1, 4)
    with pytest.raises(SignatureError, match="N1 == 64"):  # 7.3.0 takes exactly 64 heads
        stand_in.npu_lightning_indexer(query[:, :, :32].contiguous(), key, weights[:, :, :32].bfloat16().contiguous())


# ---------------------------------------------------------------- sparse_mla_attention
@pytest.mark.parametrize("release", WITH_DSA)
@pytest.mark.parametrize("b,h,t,s,d,v,k", [
    (2, 16, 1, 200, 576, 512, 64),  # DeepSeek-V3.2 decode, 16 heads per rank (TP=8)
    (1, 5, 3, 40, 576, 512, 24),    # 5 heads: padded to 8 with zero queries
    (1, 8, 4, 30, 96, 64, 8),       # a smaller latent: zero-padded to 512 + 64
    (1, 128, 1, 50, 576, 512, 70),  # 128 heads, K > S: -1 padding
])
def test_ascend_sparse_mla_attention_runs_sparse_flash_attention(release, b, h, t, s, d, v, k):
    ops, stand_in = _ops(release)
    q, kv, idx = sparse_inputs(b, h, t, s, d, k, seed=h + t)
    idx[0, 0] = -1  # a query with no key: zeros
    got = ops.sparse_mla_attention(q, kv, idx, 0.07, v)
    want = contract_sparse(q, kv, idx, 0.07, v)
    assert got.shape == want.shape == (b, h, t, v) and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert (got[0, :, 0] == 0).all()
    (call,) = stand_in.called("npu_sparse_flash_attention")
    a = call.arguments
    heads = layouts.sfa_heads(h)
    assert a["query"].shape == (b, t, heads, 512) and a["query_rope"].shape == (b, t, heads, 64)
    assert a["key"].shape == (b, s, 1, 512) and a["key_rope"].shape == (b, s, 1, 64) and a["value"] is a["key"]
    assert a["sparse_indices"].dtype == torch.int32 and a["sparse_indices"].shape == (b, t, 1, k)
    assert (a["attention_mode"], a["sparse_mode"], a["sparse_block_size"], a["scale_value"]) == (2, 0, 1, 0.07)
    assert (a["layout_query"], a["layout_kv"]) == ("BSND", "BSND") and not ops.reference_calls


@pytest.mark.parametrize("h,d,v", [(4, 576, 512), (5, 96, 64)])  # the second padded (heads and columns)
def test_ascend_sparse_mla_attention_meets_the_nan_rule_around_the_kernel(h, d, v):
    """A non-finite q row or named kv row makes the query's row NaN; an unnamed kv row reaches no
    one. The kernel's own NaN handling is not documented: it gets zeroed inputs."""
    ops, stand_in = _ops("26.1.0")
    q, kv, idx = sparse_inputs(1, h, 3, 30, d, 6, seed=5, none=0.0)
    idx[0, 2] = -1
    unnamed = sorted(set(range(30)) - set(idx.flatten().tolist()))[0]
    kv[0, int(idx[0, 0, 3]), 7] = float("nan")      # named by query 0
    kv[0, unnamed, 1] = float("inf")                 # named by no one
    q[0, 2, 1, 0] = float("nan")                     # head 2 of query 1
    q[0, 1, 2, 0] = float("nan")                     # query 2 has no key: zeros stay
    got = ops.sparse_mla_attention(q, kv, idx, 0.05, v)
    bad = got.isnan().any(dim=-1)[0]  # [H, T]
    want = torch.zeros(h, 3, dtype=torch.bool)
    want[:, 0], want[2, 1] = True, True
    assert torch.equal(bad, want) and (got[0, :, 2] == 0).all()
    a = stand_in.called("npu_sparse_flash_attention")[0].arguments
    assert all(bool(torch.isfinite(a[n]).all()) for n in ("query", "query_rope", "key", "key_rope"))
    ok = ~want[None, :, :, None].expand_as(got)
    finite = contract_sparse(q.nan_to_num(0, 0, 0), kv.nan_to_num(0, 0, 0), idx, 0.05, v)
    torch.testing.assert_close(got[ok].float(), finite[ok].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case,message", [
    ("float32", "float16 / bfloat16"),
    ("129 heads", "129 query heads"),
    ("head dim 600", "head dim 600"),
    ("v_dim 520", "v_dim 520"),
    ("no indices", "0 indices per query"),
])
def test_ascend_sparse_mla_attention_outside_the_kernels_limits_is_the_reference(case, message):
    h, d, v, k = 4, 576, 512, 6
    if case == "129 heads":
        h = 129
    elif case == "head dim 600":
        d = 600
    elif case == "v_dim 520":
        v = 520
    elif case == "no indices":
        k = 0
    q, kv, idx = sparse_inputs(1, h, 2, 20, d, k)
    if case == "float32":
        q, kv = q.float(), kv.float()
    why = layouts.sparse_attention_unsupported(q, kv, idx, v)
    assert why is not None and message in why
    if set(DSA_OP_NAMES) <= set(SPECS):
        ops, stand_in = _ops("26.1.0")
        got = ops.sparse_mla_attention(q, kv, idx, 0.1, v)
        torch.testing.assert_close(got, SPECS["sparse_mla_attention"].reference_impl(q, kv, idx, 0.1, v))
        assert not stand_in.called("npu_sparse_flash_attention") and ops.reference_calls == {"sparse_mla_attention": 1}


def test_ascend_sparse_mla_attention_checks_the_indices_before_the_kernel():
    ops, stand_in = _ops("26.1.0")
    q, kv, idx = sparse_inputs(1, 4, 2, 20, 576, 6)
    idx[0, 1, 2] = 20
    with pytest.raises(ShapeError, match=r"'indices' holds key index 20, expected ids in \[-1, 20\)"):
        ops.sparse_mla_attention(q, kv, idx, 0.1, 512)
    assert not stand_in.called("npu_sparse_flash_attention")


# ---------------------------------------------------------------- a broken translation fails here
def test_ascend_dsa_stand_in_refuses_wrong_names_order_and_layouts():
    stand_in = SignatureCheckingStandIn(recorded_signatures("26.1.0"))
    query, key, weights = layouts.indexer_operands(*indexer_inputs(1, 2, 20, 8, 128))
    with pytest.raises(SignatureError, match="unexpected keyword argument 'topk'"):
        stand_in.npu_lightning_indexer(query, key, weights, topk=4)
    with pytest.raises(SignatureError, match="positional"):
        stand_in.npu_lightning_indexer(query, key, weights, None, None, None, "BSND")
    with pytest.raises(SignatureError, match=r"key \[B, S2, 1, D\]"):  # a BNSD key ([B, 1, S, D])
        stand_in.npu_lightning_indexer(query, key.transpose(1, 2).contiguous(), weights)
    with pytest.raises(SignatureError, match="layout_key=BSND"):
        stand_in.npu_lightning_indexer(query, key, weights, layout_key="PA_BSND")
    with pytest.raises(SignatureError, match="weights \\[B, S1, N1\\]"):
        stand_in.npu_lightning_indexer(query, key, weights.transpose(1, 2).contiguous())
    q, kv, idx = sparse_inputs(1, 8, 2, 20, 576, 6, none=0.5)
    ops = layouts.sparse_attention_operands(q, kv, idx, 8)
    good = dict(query_rope=ops.query_rope, key_rope=ops.key_rope, attention_mode=2, sparse_mode=0)
    out, _, _ = stand_in.npu_sparse_flash_attention(ops.query, ops.key, ops.key, ops.sparse_indices, 0.1, **good)
    assert out.shape == (1, 2, 8, 512)
    with pytest.raises(SignatureError, match="positional"):  # query_rope is keyword-only
        stand_in.npu_sparse_flash_attention(ops.query, ops.key, ops.key, ops.sparse_indices, 0.1, ops.query_rope)
    bad_order = idx.to(torch.int32)[:, :, None].contiguous()  # -1 not moved last
    with pytest.raises(SignatureError, match="valid entries first"):
        stand_in.npu_sparse_flash_attention(ops.query, ops.key, ops.key, bad_order, 0.1, **good)
    with pytest.raises(SignatureError, match=r"query_rope \[B, S1, N1, 64\]"):  # a BNSD query ([B, N, S, D])
        stand_in.npu_sparse_flash_attention(ops.query.transpose(1, 2).contiguous(), ops.key, ops.key,
                                            ops.sparse_indices, 0.1, **good)
    with pytest.raises(SignatureError, match="attention_mode 2"):
        stand_in.npu_sparse_flash_attention(ops.query, ops.key, ops.key, ops.sparse_indices, 0.1,
                                            **{**good, "attention_mode": 0})
    with pytest.raises(SignatureError, match="int32"):
        stand_in.npu_sparse_flash_attention(ops.query, ops.key, ops.key, ops.sparse_indices.long(), 0.1, **good)


def test_ascend_dsa_a_broken_translation_fails_against_the_stand_in(monkeypatch):
    """The checks above catch a plugin that translates wrongly: query and query_rope split at the
    wrong column (numbers differ), the -1 entries left where they are (refused), the indexer's
    tail left as the kernel wrote it (the masked keys leak)."""
    ops, _ = _ops("26.1.0")
    q, kv, idx = sparse_inputs(1, 8, 2, 40, 576, 12)
    want = contract_sparse(q, kv, idx, 0.07, 512)
    torch.testing.assert_close(ops.sparse_mla_attention(q, kv, idx, 0.07, 512).float(), want.float(), rtol=2e-2, atol=2e-2)
    real = layouts.sparse_attention_operands

    def split_wrong(*args):
        o = real(*args)
        rolled = torch.cat((o.query[..., 1:], o.query_rope[..., :1]), dim=-1).contiguous()
        return layouts.SparseAttentionOperands(rolled, o.query_rope, o.key, o.key_rope, o.sparse_indices, o.has_key,
                                               o.poisoned)

    monkeypatch.setattr("dshal_ascend.npu_ops.sparse_attention_operands", split_wrong)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ops.sparse_mla_attention(q, kv, idx, 0.07, 512).float(), want.float(), rtol=2e-2, atol=2e-2)

    def unsorted(*args):
        o = real(*args)
        return layouts.SparseAttentionOperands(o.query, o.query_rope, o.key, o.key_rope,
                                               idx.to(torch.int32)[:, :, None].contiguous(), o.has_key, o.poisoned)

    monkeypatch.setattr("dshal_ascend.npu_ops.sparse_attention_operands", unsorted)
    with pytest.raises(SignatureError, match="valid entries first"):
        ops.sparse_mla_attention(q, kv, idx, 0.07, 512)
    qi, w, k = indexer_inputs(1, 8, 8, 4, 32)
    monkeypatch.setattr("dshal_ascend.npu_ops.indexer_result", lambda s, keys: s[:, :, 0].long())
    assert not same_choice(ops.indexer_topk(qi, w, k, 6), contract_topk(qi, w, k, 6))


# ---------------------------------------------------------------- against a dshal with or without the ops
def test_ascend_serves_the_dsa_ops_only_where_dshal_has_them(monkeypatch):
    """The registry refuses a plugin providing an op its catalogue does not know: against a dshal
    without DSA's ops the plugin provides none of them and leaves them out of its notes."""

    older = {op: spec for op, spec in SPECS.items() if op not in DSA_OP_NAMES}
    assert not set(DSA_OP_NAMES) & set(served_op_names(older))
    assert set(served_op_names({**older, "indexer_topk": None})) >= {"indexer_topk"}
    ops, _ = _ops("26.1.0")
    everything = {op: getattr(ops, op) for op in served_op_names(older) + DSA_OP_NAMES}
    monkeypatch.setattr(registry, "SPECS", older)
    with pytest.raises(PluginLoadError, match="'indexer_topk' is not in the catalogue"):
        registry.check_op_signatures("ascend", everything)
    monkeypatch.setattr("dshal_ascend.npu_ops.OP_NAMES", served_op_names(older))
    backend = AscendBackend()
    backend._ops = ops  # the 26.1.0 stand-in's ops in place of an NPU's
    provided = dict(backend.ops())
    registry.check_op_signatures("ascend", provided)
    assert not set(DSA_OP_NAMES) & set(provided)
    monkeypatch.setattr(backend_mod, "SPECS", older)
    notes = release_capabilities(kernel_features("26.1.0"), device_name="x", arch="x", notes={}).notes
    assert "op attention" in notes and not any(f"op {op}" in notes for op in DSA_OP_NAMES)


@needs_dsa_ops
def test_ascend_dsa_ops_match_their_specs_and_are_provided_where_native():

    for release, native in (("7.3.0", {"sparse_mla_attention"}), ("26.1.0", set(DSA_OP_NAMES))):
        ops, _ = _ops(release)
        backend = AscendBackend()
        backend._ops = ops
        provided = dict(backend.ops())
        registry.check_op_signatures("ascend", provided)
        assert set(DSA_OP_NAMES) & set(provided) == native
        caps = release_capabilities(kernel_features(release), device_name="x", arch="x", notes={})
        assert {op for op in DSA_OP_NAMES if op in caps.op_kinds} == native


@needs_dsa_ops
def test_ascend_dsa_ops_serve_a_tiny_deepseek_v32_as_its_reference_does():
    """The model core's V3.2 path (the indexer's choice in every step, sparse attention over the
    cached latent in decode steps) with the plugin's two ops through the 26.1.0 stand-in and the
    reference for every other op: the same prefill logits, and the decode steps' logits within
    bf16 rounding of the reference alone's, fed the same tokens (bf16; 16 index heads of 64, padded
    to 128; 6 keys kept of prompts of 12; DeepSeek's latent of 512 + rope 64, split there, and 4
    heads). A latent split at the wrong place, or keys in the wrong order, moves the logits by ~3."""

    args = tiny_args(index_n_heads=16, index_head_dim=64, index_topk=6, num_hidden_layers=1, kv_lora_rank=512,
                     qk_rope_head_dim=64).with_(dtype=torch.bfloat16)
    model = build_model(args, DictReader(random_checkpoint(args, seed=3, std=0.1)), device="cpu")
    ids = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, args.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))

    def run(table):
        with DISPATCHER.overlay({name: SPECS[name].checked(fn) for name, fn in table.items()}, table):
            cache = model.new_cache(2, 16, mode="absorb")
            logits = [model(ids, 0, cache)]
            for i in range(steps.shape[1]):
                logits.append(model(steps[:, i : i + 1], 12 + i, cache))
            return logits

    references = {name: spec.reference_impl for name, spec in SPECS.items()}
    want = run(references)
    ops, stand_in = _ops("26.1.0")
    got = run(references | {op: getattr(ops, op) for op in DSA_OP_NAMES})
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # prefill: the same keys chosen
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * float(w.abs().max()))
    assert len(stand_in.called("npu_lightning_indexer")) == 5 and len(stand_in.called("npu_sparse_flash_attention")) == 4
    assert not ops.reference_calls
