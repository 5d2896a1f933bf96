"""What the non-finite safety checks of issue #16 cost, measured side by side in one run.

1. Attention's non-finite guard on the cpu backend: the op as shipped (finite inputs: three
   sums of q, k, v read on the host, then the kernel) against the same kernel with the guard
   bypassed. Decode (MLA absorbed: all heads on one latent head) and prefill shapes.
2. The guard a device backend builds on every call (``may_read_host=False``: no host read, so
   it cannot skip itself for finite inputs), alone, at a decode step of DeepSeek-V3's absorbed
   MLA: the general path (zeroed copies of q, k and v, per-key prefix sums; taken here by a
   window as long as the keys, which hides none) against the path for a query that sees every
   key (products of zeros with k and v, whose IEEE 0·NaN = NaN marks the non-finite ones; no copies).
3. The load-time NaN/Inf scan of checkpoint weights: ``from_pretrained`` of a small random
   checkpoint with ``DSHAL_CHECK_FINITE=1`` (default) against ``=0``.

    python benchmarks/nonfinite_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from unittest import mock

import torch

import dshal
from dshal.backends import cpu_native
from dshal.model import from_pretrained, tiny_args
from dshal.model.checkpoint import random_checkpoint, save_checkpoint


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_rows(repeats: int) -> list[tuple[str, float, float]]:
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "decode B1 H16 Tq1 Tk2048 D576/512": ((1, 16, 1, 576), (1, 1, 2048, 576), (1, 1, 2048, 512), True),
        "prefill B1 H16 T512 D192/128": ((1, 16, 512, 192), (1, 16, 512, 192), (1, 16, 512, 128), True),
    }
    rows = []
    for name, (qs, ks, vs, causal) in shapes.items():
        q, k, v = (torch.randn(s, generator=gen, dtype=torch.bfloat16) for s in (qs, ks, vs))
        attention = partial(cpu_native.attention, q, k, v, causal)
        guarded = _median_s(attention, repeats)
        with mock.patch.object(importlib.import_module("dshal.ops.attention"), "nonfinite_guard", lambda *a, **kw: None):  # what guarded_attention calls
            bare = _median_s(attention, repeats)
        rows.append((name, guarded, bare))
    return rows


def device_guard_rows(repeats: int) -> list[tuple[str, float, float]]:
    """(case, the guard for a query seeing every key, the general guard) in seconds."""
    from dshal.ops.attention import nonfinite_guard

    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch, keys in ((1, 4096), (8, 4096)):
        q = torch.randn(batch, 16, 1, 577, generator=gen, dtype=torch.bfloat16)
        latent = torch.randn(batch, keys, 577, generator=gen, dtype=torch.bfloat16)
        k, v = latent[:, None], latent[:, None, :, :512]
        visible = _median_s(lambda q=q, k=k, v=v: nonfinite_guard(q, k, v, True, may_read_host=False), repeats)
        general = _median_s(lambda q=q, k=k, v=v, n=keys: nonfinite_guard(q, k, v, True, n, may_read_host=False), repeats)
        rows.append((f"device guard, decode B{batch} H16 Tk{keys} D577/512", visible, general))
    return rows


def load_rows(repeats: int) -> list[tuple[str, float, float]]:

    args = tiny_args(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, vocab_size=4096)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, args, random_checkpoint(args))
        config = {"backend": "cpu", "precision": {"gemm": "bf16"}}
        times = {}
        for flag in ("1", "0"):
            with mock.patch.dict(os.environ, {"DSHAL_CHECK_FINITE": flag}):
                times[flag] = _median_s(lambda: from_pretrained(folder, config), max(3, repeats // 10))
    return [("from_pretrained tiny (hidden 512, vocab 4096)", times["1"], times["0"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    opts = parser.parse_args()
    dshal.use(backend="cpu")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':48} {'checked ms':>11} {'unchecked ms':>13} {'ratio':>6}")
    for name, checked, bare in attention_rows(opts.repeats) + load_rows(opts.repeats):
        print(f"{name:48} {checked * 1e3:11.3f} {bare * 1e3:13.3f} {checked / bare:6.2f}")
    print(f"{'case':48} {'every key seen ms':>17} {'general ms':>11} {'saved':>6}")
    for name, visible, general in device_guard_rows(opts.repeats):
        print(f"{name:48} {visible * 1e3:17.3f} {general * 1e3:11.3f} {general / visible:5.1f}x")


if __name__ == "__main__":
    main()
