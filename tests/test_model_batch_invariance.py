"""Batch and chunk invariance of the model core's numbers: what README's "Batch and chunk
invariance" section guarantees, pinned (``benchmarks/batch_invariance.py`` measures the rest,
per backend, with the magnitudes RESULTS.md records).

- cpu backend with its C kernels, float32: a decode step gives a row the same logits, bit for
  bit, in a batch of up to 8 rows as alone (same cache), through the plain step and through
  the static step with each row at its own position;
- ``determinism: strict``: a prompt's prefill and decode logits are the same bits alone and in
  a batch of prompts of its length;
- everywhere: the tiny float32 model's greedy tokens are the same alone and batched, and a
  prefill in chunks leaves the KV cache (and the last logits) of one forward up to float32
  rounding (within 1e-5 of the largest entry)."""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal.kernels import cpu as cpu_kernels
from dshal.model import random_model, tiny_args
from dshal.model.decode import StaticDecoder
from dshal.model.prefill import prefill

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.status().available, reason=f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}"
)


def _ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, tiny_args().vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


def rows_prefilled_alone(model, ids: torch.Tensor, steps: int, static: bool = False):
    """A cache for ``ids [B, L]`` whose row b holds row b's prompt prefilled alone (so every row's
    cache is the bits it has alone), and each row's last prefill logits."""
    batch, length = ids.shape
    cache = model.new_cache(batch, length + steps, "absorb", static=static)
    logits = []
    for b in range(batch):
        alone = model.new_cache(1, length + steps, "absorb")
        logits.append(prefill(model, ids[b : b + 1], alone, None)[0])
        for big, small in cache.buffer_pairs(alone):
            big[b, :length] = small[0, :length]
    cache.length = length
    return cache, torch.stack(logits)


@needs_kernels
@pytest.mark.parametrize("rows", [3, 8])
def test_a_decode_step_gives_a_row_its_own_logits_in_a_batch_bit_for_bit(rows):
    """Every op of a float32 decode step of up to 8 rows runs per row on the cpu backend's C
    kernels (GEMVs, RMSNorm, rotary, router, the experts of all rows in one call), and the
    attention and the absorbed MLA products are per row too: row 0 decoded with 2 or 7 other
    rows gets its logits alone, bit for bit, step after step. (The experts of 3 to 8 tokens
    took torch's grouped GEMM before, ~1e-7 apart.)"""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=0)
    ids, steps = _ids(rows, 6), 3
    with torch.inference_mode():
        batch_cache, logits = rows_prefilled_alone(model, ids, steps)
        alone_cache, _ = rows_prefilled_alone(model, ids[:1], steps)
        token = logits.argmax(-1)
        for i in range(steps):
            batched = model(token[:, None], 6 + i, batch_cache, last_only=True)[:, -1]
            alone = model(token[:1, None], 6 + i, alone_cache, last_only=True)[:, -1]
            assert torch.equal(batched[0], alone[0]), i
            token = batched.argmax(-1)


@needs_kernels
def test_the_per_row_static_step_gives_a_row_its_logits_alone_bit_for_bit():
    """The static step with each row at its own position (prompts of different lengths, what
    ``generate_rows`` decodes with) gives row 0 the bits of the same static step run on row 0
    alone, whatever the other rows' positions and tokens."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=0)
    ids = _ids(4, 6, seed=3)
    with torch.inference_mode():
        batch_cache, logits = rows_prefilled_alone(model, ids, 3, static=True)
        alone_cache, _ = rows_prefilled_alone(model, ids[:1], 3, static=True)
        together = StaticDecoder(model, batch_cache, lambda fn: fn, per_row=True)
        alone = StaticDecoder(model, alone_cache, lambda fn: fn, per_row=True)
        token, start = logits.argmax(-1), torch.tensor([6, 2, 4, 5])  # rows 1-3 as if their prompts were shorter
        for i in range(3):
            got = together(token, start + i).clone()
            assert torch.equal(got[0], alone(token[:1], start[:1] + i)[0]), i
            token = got.argmax(-1)


@needs_kernels
def test_deepseek_v32_decode_steps_give_a_row_its_logits_alone_bit_for_bit():
    """DeepSeek-V3.2 past ``index_topk`` (4 keys kept of 6 and more): the indexer's scores and
    its choice are per row too, so row 0 gets its logits alone, bit for bit, from the plain
    decode step (each row's kept keys gathered) and the per-row static step (a key mask)."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(index_n_heads=8, index_head_dim=32, index_topk=4), seed=0)
    ids = _ids(3, 6, seed=3)
    with torch.inference_mode():
        for static in (False, True):
            batch_cache, logits = rows_prefilled_alone(model, ids, 2, static=static)
            alone_cache, _ = rows_prefilled_alone(model, ids[:1], 2, static=static)
            token = logits.argmax(-1)
            if static:
                together = StaticDecoder(model, batch_cache, lambda fn: fn, per_row=True)
                alone = StaticDecoder(model, alone_cache, lambda fn: fn, per_row=True)
                start = torch.tensor([6, 2, 5])  # rows 1, 2 as if their prompts were shorter
            for i in range(2):
                if static:
                    got, want = together(token, start + i).clone(), alone(token[:1], start[:1] + i)
                else:
                    got = model(token[:, None], 6 + i, batch_cache, last_only=True)[:, -1]
                    want = model(token[:1, None], 6 + i, alone_cache, last_only=True)[:, -1]
                assert torch.equal(got[0], want[0]), (static, i)
                token = got.argmax(-1)


def test_strict_determinism_gives_a_prompt_its_logits_alone_in_a_batch():
    """``determinism: strict`` serves every batch-sensitive op row by row, so a prompt's
    prefill (every position) and decode logits are the same bits alone and as row 0 of a batch
    of prompts of its length (the default runtime: ~1e-7 apart, from the experts' grouped GEMM)."""
    dshal.use(backend="cpu", determinism="strict")
    try:
        model = random_model(tiny_args(num_hidden_layers=2), seed=0)
        ids = _ids(3, 5)
        with torch.inference_mode():
            assert torch.equal(model(ids)[0], model(ids[:1])[0])
            caches = [model.new_cache(n, 8) for n in (3, 1)]
            logits = [prefill(model, ids[:n], cache, None) for n, cache in zip((3, 1), caches)]
            for i in range(2):
                token = logits[0].argmax(-1)
                logits = [model(token[:n, None], 5 + i, cache, last_only=True)[:, -1] for n, cache in zip((3, 1), caches)]
                assert torch.equal(logits[0][0], logits[1][0]), i
    finally:
        dshal.use(backend="cpu")


@pytest.mark.parametrize("kernels", ["c-kernels", "torch-only"])
def test_greedy_tokens_are_a_prompts_own_alone_and_batched(kernels, monkeypatch):
    """The tiny float32 model's greedy tokens for a prompt are the same alone and in a batch
    (of its length, and of different lengths: each row at its own positions), on the cpu
    backend with and without its C kernels: the logits differ by ~3e-7 at most there, under
    the margin between this model's top two logits. (generate's other ragged path, a model
    with an attention window: test_model_cache.py.)"""
    if kernels == "torch-only":
        monkeypatch.setenv("DSHAL_CPU_KERNELS", "0")
    elif not cpu_kernels.status().available:
        pytest.skip(f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
    cpu_kernels.reload()
    try:
        dshal.use(backend="cpu")
        model = random_model(tiny_args(num_hidden_layers=2), seed=0)
        prompt, others = _ids(1, 8), _ids(2, 10, seed=2)
        alone = model.generate(prompt, 5)[0]
        assert torch.equal(model.generate(torch.cat((prompt, others[:, :8])), 5)[0], alone)
        ragged = torch.cat((torch.cat((prompt, others[:1, :2]), dim=1), others))  # lengths 8, 5, 10
        assert torch.equal(model.generate(ragged, 5, prompt_lens=[8, 5, 10])[0, :13], alone)
    finally:
        monkeypatch.undo()
        cpu_kernels.reload()


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_a_chunked_prefill_leaves_one_forwards_cache_up_to_rounding(chunk):
    """A prompt prefilled in chunks of 1 (every token a decode-style absorbed step), 7 (the C
    GEMVs) or 16 tokens (torch's GEMMs, attention after the cached keys) leaves every layer's
    KV cache entries and the last logits of one forward within 1e-5 of their largest value
    (float32; measured ~5e-7). Not bit for bit: the chunk's row count picks the GEMM and the
    attention is split at the chunk's start (README, "Batch and chunk invariance")."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=0)
    ids = _ids(1, 24, seed=5)
    with torch.inference_mode():
        whole, chunked = model.new_cache(1, 24), model.new_cache(1, 24)
        want, got = prefill(model, ids, whole, None), prefill(model, ids, chunked, chunk)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        for layer, (a, b) in enumerate(whole.buffer_pairs(chunked)):
            assert (b - a).abs().max().item() <= 1e-5 * a.abs().max().item(), layer
        assert chunked.length == whole.length == 24
