"""A backend wrong only in decode: the cpu backend whose ``attention`` drops the newest key
when it is given a single query -- the classic decode bug of a kernel that reads the KV
cache up to ``seq_len - 1`` (the current token's own key and value left out).

A prefill (many queries, causal) never reaches that branch, so ``dshal diff --decode 0``
sees nothing; the first decode step (one query over the cache) does. Registered as the
plugin ``decodewrong`` through a throw-away ``dist-info`` (see conftest.py), found like
any vendor plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cpu_variant import CpuVariant


def drops_newest_key(attention: Callable[..., Any]) -> Callable[..., Any]:
    def attention_without_newest_key(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        if q.shape[-2] == 1 and k.shape[-2] > 1:  # one query: the decode step
            k, v = k[..., :-1, :], v[..., :-1, :]
        return attention(q, k, v, causal, scale, window, global_tokens)

    return attention_without_newest_key


class DecodeWrongBackend(CpuVariant):
    variant_name, variant_note = "decodewrong", "attention drops the newest key for one query"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return {"attention": drops_newest_key(cpu_ops["attention"])}
