"""Attention's non-finite rule (issue #16, class 5), provider by provider, against a
brute-force statement of the contract: keys a query does not see never reach it; a NaN or
Inf in its q row, or in a k row it sees, makes its output row NaN; in a v entry it sees,
that output column NaN."""

from __future__ import annotations

import itertools

import pytest
import torch

import dshal
from dshal.ops.attention import visible_keys

SHAPES = [  # (tq, tk, causal, window, global_tokens)
    (8, 8, True, None, 0),
    (8, 8, True, 3, 0),
    (8, 8, True, 4, 2),
    (6, 6, False, 2, 0),
    (6, 6, False, 2, 3),
    (1, 12, True, None, 0),
    (1, 12, True, 4, 0),
    (5, 9, False, None, 0),  # every query sees every key: the guard runs the kernel on the inputs as given
    (10, 6, True, None, 0),  # Tq > Tk: the first queries see nothing
]


def expected_nan(q, k, v, causal, window, global_tokens) -> torch.Tensor:
    batch, hq, tq, _ = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    seen = visible_keys(tq, tk, causal, window, global_tokens, q.device)
    seen = torch.ones(tq, tk, dtype=torch.bool) if seen is None else seen
    want = torch.zeros(batch, hq, tq, dv, dtype=torch.bool)
    for b, h, i in itertools.product(range(batch), range(hq), range(tq)):
        keys = seen[i].nonzero().flatten().tolist()
        if not keys:
            continue
        kv = h // (hq // hk)
        if not torch.isfinite(q[b, h, i]).all() or any(not torch.isfinite(k[b, kv, j]).all() for j in keys):
            want[b, h, i] = True
        for j in keys:
            want[b, h, i] |= ~torch.isfinite(v[b, kv, j])
    return want


def _inputs(tq, tk, seed, bad):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, 16, generator=gen) for h, t in ((4, tq), (2, tk), (2, tk)))
    # One poisoned entry per tensor named in `bad`, at spots that differ per seed.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if name in bad:
            flat = t.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = bad[name]
    return q, k, v


def _providers():
    yield "reference", dshal.ops.reference.attention
    rt = dshal.use(backend="cpu")
    yield "cpu", rt.op("attention")


@pytest.mark.parametrize("shape", SHAPES, ids=[f"Tq{s[0]}xTk{s[1]}-{'c' if s[2] else 'nc'}-w{s[3]}-g{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("bad", [{"k": float("nan")}, {"v": float("inf")}, {"q": float("nan")}, {"k": float("-inf"), "v": float("nan")}])
def test_every_provider_follows_the_nonfinite_rule(shape, bad, clean_dshal_env):
    tq, tk, causal, window, global_tokens = shape
    for seed in range(3):
        q, k, v = _inputs(tq, tk, seed, bad)
        want = expected_nan(q, k, v, causal, window, global_tokens)
        clean = _inputs(tq, tk, seed, {})  # the same values without the poison
        for name, attention in _providers():
            out = attention(q, k, v, causal=causal, window=window, global_tokens=global_tokens)
            got = torch.isnan(out)
            assert torch.equal(got, want), f"{name}: NaN where {(got & ~want).nonzero().tolist()[:3]}, lost {(want & ~got).nonzero().tolist()[:3]}"
            # Outputs the poison cannot reach are unchanged only where no visible key was poisoned.
            ref_clean = dshal.ops.reference.attention(*clean, causal=causal, window=window, global_tokens=global_tokens)
            untouched = ~want.any(dim=-1, keepdim=True).expand_as(want)
            if "k" not in bad and "q" not in bad:
                assert torch.isfinite(out[~want]).all()
            torch.testing.assert_close(out[untouched & torch.isfinite(ref_clean)], ref_clean[untouched], rtol=1e-5, atol=1e-5)


@pytest.mark.needs_interpreter
def test_nvidia_emulated_attention_follows_the_rule(monkeypatch, clean_dshal_env):
    pytest.importorskip("dshal_nvidia", reason="the dshal-nvidia plugin is not installed")
    rt = dshal.use(backend="nvidia", emulate=True)
    attention = rt.op("attention")
    for tq, tk, causal, window, global_tokens in SHAPES:
        q, k, v = _inputs(tq, tk, 7, {"k": float("nan"), "v": float("inf")})
        out = attention(q, k, v, causal=causal, window=window, global_tokens=global_tokens)
        assert torch.equal(torch.isnan(out), expected_nan(q, k, v, causal, window, global_tokens)), (tq, tk, causal, window)


def test_the_guard_copies_nothing_where_every_key_is_visible():
    """A decode step's query (causal, Tq 1) and non-causal attention without a window see every
    key: the guard then hands the kernel q, k and v themselves (no zeroed copies of the KV
    cache), finds the poison with reductions, and still marks exactly the contract's NaNs."""
    from dshal.ops.attention import nonfinite_guard

    for tq, tk, causal in ((1, 12, True), (5, 9, False)):
        q, k, v = _inputs(tq, tk, 3, {"k": float("nan"), "v": float("-inf")})
        guard = nonfinite_guard(q, k, v, causal, may_read_host=False)
        assert guard.q is q and guard.k is k and guard.v is v
        out = guard.apply(dshal.ops.reference.attention(*_inputs(tq, tk, 3, {}), causal=causal))
        assert torch.equal(torch.isnan(out), expected_nan(q, k, v, causal, None, 0))
        clean = _inputs(tq, tk, 4, {})
        assert not nonfinite_guard(*clean, causal, may_read_host=False).poison.any()
    # MLA's absorbed decode: one latent head, the values its first columns (one read serves both).
    gen = torch.Generator().manual_seed(5)
    q, latent = torch.randn(2, 4, 1, 24, generator=gen), torch.randn(2, 10, 24, generator=gen)
    for spot in ((0, 3, 20), (1, 6, 5)):  # past the values' columns (a key only); inside them
        poisoned = latent.clone()
        poisoned[spot] = float("inf")
        k, v = poisoned[:, None], poisoned[:, None, :, :16]
        guard = nonfinite_guard(q, k, v, True, may_read_host=False)
        assert guard.k is k and torch.equal(guard.poison.expand(2, 4, 1, 16), expected_nan(q, k, v, True, None, 0))
    q, k, v = _inputs(8, 8, 3, {})  # causal, Tq > 1: keys hidden from some queries, zeroed copies
    masked = nonfinite_guard(q, k, v, True, may_read_host=False)
    assert masked.k is not k and torch.equal(masked.k, k)


def test_values_sharing_the_keys_buffer_in_every_layout(clean_dshal_env):
    """v and k as views of one buffer: v = k's first columns (absorbed MLA: the zeroed copy the
    guard makes is shared too), and v *wider* than k (k = buf[..., :D], v = buf: Dv > D is the
    contract's). The second crashed in the guard's shortcut, which read v as k's columns."""
    from dshal.ops.attention import nonfinite_guard

    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 4, 24, generator=gen)
    buf = torch.randn(1, 1, 10, 40, generator=gen)
    buf[0, 0, 2, 30] = float("nan")  # a value column past the keys (in v only)
    buf[0, 0, 6, 3] = float("inf")  # in both
    for k, v in ((buf[..., :24], buf[..., :24][..., :16]), (buf[..., :24], buf)):
        want = expected_nan(q, k, v, True, None, 0)
        for name, attention in _providers():
            out = attention(q, k, v, causal=True)
            assert out.shape == (1, 4, 4, v.shape[3]) and torch.equal(torch.isnan(out), want), name
    k, v = buf[..., :24], buf[..., :16]
    guard = nonfinite_guard(q, k, v, True, may_read_host=False)  # causal, Tq > 1: zeroed copies
    assert guard.v.data_ptr() == guard.k.data_ptr() and guard.v.stride() == guard.k.stride()


@pytest.mark.parametrize("window", [2**62, 2**63 - 1])
def test_a_window_near_the_int64_limit_hides_nothing(window, clean_dshal_env):
    """``pos + window`` wrapped in int64 for a window near 2**63: the guard then thought the
    queries saw no key and dropped a NaN they do see."""
    q, k, v = _inputs(5, 5, 1, {"k": float("nan")})
    want = expected_nan(q, k, v, False, None, 0)
    assert want.any()
    for name, attention in _providers():
        for global_tokens in (0, 2):
            out = attention(q, k, v, causal=False, window=window, global_tokens=global_tokens)
            assert torch.equal(torch.isnan(out), want), name


@pytest.mark.parametrize("shape", SHAPES[:5], ids=[f"Tq{s[0]}xTk{s[1]}-w{s[3]}-g{s[4]}" for s in SHAPES[:5]])
def test_the_guard_runs_kv_head_groups_alone_with_the_same_result(shape):
    """The guard holds a few times k and v (masks, int32 prefix counts, zeroed copies): ~40 GiB
    for a 2048-token prefill chunk over 128k keys of 128 expanded heads. guarded_attention
    takes kv heads in groups of at most ``group_bytes`` (here one head each) and gives the
    whole call's result, NaN placement included, with GQA and with v as k's columns."""
    from dshal.ops.attention import guarded_attention

    tq, tk, causal, window, global_tokens = shape
    reference = dshal.ops.reference.attention
    q, k, v = _inputs(tq, tk, 2, {"k": float("nan"), "v": float("inf")})
    k[0, 1, 0, 0] = float("nan")  # a poisoned first key in the second head too
    shared = (k, k[..., :12])  # values that are the keys' first columns (absorbed MLA's layout)
    for k_, v_ in ((k, v), shared):
        calls = []

        def kernel(q, k, v, *args, calls=calls):
            calls.append((q.shape[1], k.shape[1], v.data_ptr() == k.data_ptr()))
            return reference(q, k, v, *args)

        whole = guarded_attention(reference, q, k_, v_, causal, None, window, global_tokens, may_read_host=False)
        split = guarded_attention(kernel, q, k_, v_, causal, None, window, global_tokens, may_read_host=False,
                                  group_bytes=1)
        assert calls == [(2, 1, v_ is not v)] * 2  # one kv head and its two query heads per call
        assert torch.equal(torch.isnan(split), expected_nan(q, k_, v_, causal, window, global_tokens))
        torch.testing.assert_close(split, whole, equal_nan=True, rtol=1e-5, atol=1e-6)  # other batched shapes: ulps
