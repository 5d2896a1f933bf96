"""attention against explicit per-query loops and torch's scaled_dot_product_attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dshal
from dshal.errors import DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref


def loop_attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    """One query row at a time, with the visibility rule written as plain conditions."""
    batch, hq, tq, d = q.shape
    hk, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(batch, hq, tq, dv, dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hk)
            for i in range(tq):
                pos = i + tk - tq
                keys = []
                for j in range(tk):
                    if causal and j > pos:
                        continue
                    in_window = window is None or (pos - j < window if causal else abs(pos - j) < window)
                    if in_window or j < global_tokens:
                        keys.append(j)
                if not keys:
                    continue
                s = torch.stack([q[b, h, i].double() @ k[b, kv, j].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, kv, j].double() for n, j in enumerate(keys))
    return out


def qkv(batch, hq, hk, tq, tk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(batch, hq, tq, d), mk(batch, hk, tk, d), mk(batch, hk, tk, dv)


CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, window=3),
    dict(causal=True, window=2, global_tokens=2),
    dict(causal=False, window=2),
    dict(causal=False, window=2, global_tokens=1),
    dict(causal=True, scale=0.3),
]


@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 5, 8, 6), (1, 2, 1, 3, 7, 4, 4), (1, 2, 2, 6, 4, 4, 3), (1, 3, 3, 1, 6, 8, 8)])
@pytest.mark.parametrize("opts", CASES, ids=[str(c) for c in CASES])
def test_attention_matches_loops(shape, opts):
    q, k, v = qkv(*shape)
    got = ref.attention(q, k, v, **opts)
    assert got.shape == q.shape[:3] + (v.shape[3],) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_attention(q, k, v, **opts), rtol=1e-5, atol=1e-6)


def test_attention_query_without_keys_is_zero():
    q, k, v = qkv(1, 1, 1, 5, 3, 4, 4)  # Tq > Tk: the first two queries sit before key 0
    got = ref.attention(q, k, v, causal=True)
    assert torch.equal(got[0, 0, :2], torch.zeros(2, 4))
    assert not torch.isnan(got).any()
    assert torch.equal(ref.attention(*qkv(1, 2, 1, 2, 0, 4, 4)), torch.zeros(1, 2, 2, 4))


def test_attention_matches_sdpa_gqa_bf16_and_noncontiguous():
    q, k, v = qkv(2, 8, 2, 6, 6, 16, 16, dtype=torch.bfloat16, seed=3)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous view with the same values
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    got = ref.attention(q, k, v)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1e-2)
    oracle = SPECS["attention"].run_oracle(q, k, v)
    assert oracle.dtype == torch.float64
    torch.testing.assert_close(oracle, loop_attention(q, k, v))


BAD = [
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4, dtype=torch.int32)), DTypeError, "'q' has dtype torch.int32"),
    (lambda: ref.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4).double(), torch.ones(1, 1, 3, 4)), DTypeError, "'k' has dtype torch.float64"),
    (lambda: ref.attention(torch.ones(2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4)), ShapeError, "'q' must be 4-D"),
    (lambda: ref.attention(torch.ones(1, 3, 3, 4), torch.ones(1, 2, 3, 4), torch.ones(1, 2, 3, 4)), DshalError, "expected a divisor of the 3 heads"),
    (lambda: ref.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 5), torch.ones(1, 1, 3, 4)), ShapeError, "'k' has size 5 in dim 3"),
    (lambda: ref.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 2, 4)), ShapeError, "'v' has size 2 in dim 2"),
    (lambda: ref.attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4, device="meta"), torch.ones(1, 1, 3, 4)), DeviceError, "'k' is on meta"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), window=0), DshalError, "'window' is 0"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), global_tokens=-1), DshalError, "'global_tokens' is -1"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), scale=-1.0), DshalError, "'scale' is -1.0"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), scale=float("inf")), DshalError,
     "'scale' is inf, expected None or a finite positive float"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), scale=10**30), DshalError, "'scale' is 10000"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), window=10**30), DshalError,
     "expected None or an int >= 1 (at most 2**63 - 1)"),
    (lambda: ref.attention(*qkv(1, 2, 1, 3, 3, 4, 4), global_tokens=2**63), DshalError, "'global_tokens' is 9223372036854775808"),
    # no query head: the cpu backend's chunk path divided by zero in C (SIGFPE); a head of width 0: 1/sqrt(0)
    (lambda: dshal.ops.attention(torch.ones(1, 0, 3, 16), torch.ones(1, 2, 5, 16), torch.ones(1, 2, 5, 8)), ShapeError,
     "'q' has shape [1, 0, 3, 16], expected at least one head"),
    (lambda: ref.attention(torch.ones(1, 2, 3, 0), torch.ones(1, 2, 5, 0), torch.ones(1, 2, 5, 8)), ShapeError,
     "expected at least one head (Hq >= 1) of width D >= 1"),
]


def test_attention_rejects_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_attention_dispatch_on_cpu_backend_and_cost():
    dshal.use(backend="cpu")
    q, k, v = qkv(1, 4, 2, 3, 5, 8, 6)
    torch.testing.assert_close(dshal.ops.attention(q, k, v, window=2, global_tokens=1), ref.attention(q, k, v, window=2, global_tokens=1))
    # causal, 3 queries at the end of 5 keys: 3 + 4 + 5 pairs of the 3 x 5
    assert SPECS["attention"].cost_of(q, k, v).flops == 2 * 1 * 4 * (3 + 4 + 5) * (8 + 6)
    assert SPECS["attention"].cost_of(q, k, v, causal=False).flops == 2 * 1 * 4 * 3 * 5 * (8 + 6)


def test_attention_cost_counts_the_pairs_the_mask_lets_through():
    """The cost model counted causal and windowed attention as dense: bench and profile gave
    FLOP/s and roofline shares for work no kernel does (the cpu provider runs causal 3x
    faster). It counts the visible (query, key) pairs now, the mask's own count."""
    import itertools

    from dshal.ops import SPECS
    from dshal.ops.attention import visible_keys, visible_pairs

    for tq, tk, causal, window, pinned in itertools.product((1, 3, 16), (1, 4, 20), (True, False), (None, 1, 5, 100), (0, 2)):
        mask = visible_keys(tq, tk, causal, window, pinned, torch.device("cpu"))
        assert visible_pairs(tq, tk, causal, window, pinned) == (tq * tk if mask is None else int(mask.sum()))
    q = torch.empty(1, 8, 1024, 64, device="meta")
    dense = SPECS["attention"].cost_of(q, q, q, causal=False).flops
    assert SPECS["attention"].cost_of(q, q, q, causal=True).flops == dense * (1024 * 1025 // 2) // (1024 * 1024)


def test_sdpa_with_grouped_kv_heads_on_a_torch_without_enable_gqa():
    """torch 2.4 (pyproject's floor; torch_npu 6.0.0 / 7.0.0) has no ``enable_gqa``: the cpu and
    GPU backends passed it on every call. The fallback repeats the kv heads per group."""
    from dshal.ops.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask[:, 0] = True
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {}):
        repeated = sdpa(q, k, v, native_gqa=False, **kwargs)
        torch.testing.assert_close(repeated, sdpa(q, k, v, native_gqa=True, **kwargs))
    torch.testing.assert_close(sdpa(q, k, v, native_gqa=False, is_causal=True), dshal.ops.reference.attention(q, k, v))
    plain = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(sdpa(q, q, q, native_gqa=False), plain)  # no groups: untouched
