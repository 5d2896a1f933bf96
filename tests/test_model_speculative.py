"""Speculative decoding with the multi-token-prediction (MTP) layer.

The oracle is plain greedy generation: whatever the drafts are, speculative decoding must
give its tokens exactly. The random MTP layer's drafts are mostly wrong; drafts from the
known continuation (every one right, or every other one) check the accepted path's
bookkeeping with the real main model.
"""

from __future__ import annotations

import math

import pytest
import torch

import dshal
from dshal.config import PrecisionConfig
from dshal.errors import ArgumentError, CheckpointError, ConfigError, ShapeError
from dshal.model import DictReader, build_model, random_model, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint
from dshal.model.generate import completions, sampling_probs
from dshal.model.speculative import DraftVerifier, SpeculativeStep, generate_speculative
from dshal.perf.syncs import HostSyncCounter


def _mtp_args(**changes):
    return tiny_args(num_nextn_predict_layers=1, mtp_layers=1, **changes)


def _prompt(args, length=7, seed=0, batch=1):
    return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mtp_model():
    return random_model(_mtp_args(), seed=3)


def _repeating_mtp_model(args, seed):
    """A random model whose MTP layer drafts the token it is given (the next one) again: the
    layer adds nothing to ``eh_proj``'s copy of the normalized embedding, and its head is the
    embedding. Right wherever the model repeats a token, which random models do."""
    tensors = random_checkpoint(args, seed)
    layer, d = f"model.layers.{args.num_hidden_layers}", args.hidden_size
    tensors[f"{layer}.eh_proj.weight"] = torch.cat((torch.eye(d), torch.zeros(d, d)), 1).to(args.dtype)
    for name in tensors:
        if name.startswith(layer) and name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = torch.zeros_like(tensors[name])
    tensors[f"{layer}.shared_head.head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return build_model(args, DictReader(tensors))


@pytest.mark.parametrize("mla_mode", ["absorb", "naive"])
@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_speculative_gives_the_greedy_tokens(mla_mode, prefill_chunk):
    accepted = rejected = 0
    args = _mtp_args(mla_mode=mla_mode)
    for make, seed in ((random_model, 0), (random_model, 1), (_repeating_mtp_model, 0), (_repeating_mtp_model, 3)):
        model = make(args, seed=seed)
        prompt = _prompt(args, seed=seed)
        want = model.generate(prompt, 24)
        got, stats = generate_speculative(model, prompt, 24, prefill_chunk=prefill_chunk)
        assert torch.equal(got, want), f"seed {seed}"
        assert stats.steps >= 12 and stats.steps + stats.accepted == 23  # one token from the prefill
        accepted, rejected = accepted + stats.accepted, rejected + stats.steps - stats.accepted
    assert accepted >= 10 and rejected >= 10  # both paths ran


def test_the_mtp_layer_is_built_only_when_asked_and_does_not_change_the_main_weights():
    with_mtp = random_model(_mtp_args(), seed=1)
    without = random_model(tiny_args(), seed=1)
    assert len(with_mtp.mtp) == 1 and len(without.mtp) == 0
    assert not any(name.startswith("mtp.") for name, _ in without.named_parameters())
    main = dict(without.named_parameters())
    for name, p in with_mtp.named_parameters():
        if not name.startswith("mtp."):
            assert torch.equal(p, main[name]), name
    # A checkpoint with an MTP layer loads without it unless asked (its tensors are skipped).
    skipped = random_model(tiny_args(num_nextn_predict_layers=1), seed=1)
    assert len(skipped.mtp) == 0
    assert "mtp" in with_mtp.describe()["precision_groups"]


class _Oracle:
    """Drafts from the known greedy continuation ``ids [1, N]``: right, or (``wrong_every``)
    wrong at every n-th call. Counts the calls."""

    def __init__(self, ids: torch.Tensor, vocab: int, wrong_every: int = 0):
        self.ids, self.vocab, self.wrong_every, self.calls = ids[0].tolist(), vocab, wrong_every, 0

    def __call__(self, hidden, next_ids, start_pos, cache=None, last_only=False):
        self.calls += 1
        last = start_pos + next_ids.shape[1] - 1  # the draft is for position last + 2
        token = self.ids[last + 2] if last + 2 < len(self.ids) else 0
        if self.wrong_every and self.calls % self.wrong_every == 0:
            token = (token + 1) % self.vocab
        logits = torch.zeros(1, 1 if last_only else next_ids.shape[1], self.vocab)
        logits[0, -1, token] = 1.0
        return logits


@pytest.mark.parametrize("wrong_every, steps", [(0, 12), (2, 16)])
def test_speculative_with_drafts_that_are_right_gives_two_tokens_a_step(mtp_model, monkeypatch, wrong_every, steps):
    prompt = _prompt(mtp_model.args, length=6, seed=5)
    want = mtp_model.generate(prompt, 25)
    monkeypatch.setattr(mtp_model, "draft", _Oracle(want, mtp_model.args.vocab_size, wrong_every))
    got, stats = generate_speculative(mtp_model, prompt, 25)
    assert torch.equal(got, want)
    assert stats.steps == steps  # 24 tokens after the prefill's: 2 a step, or 2 and 1 in turn
    assert stats.accepted == 24 - steps
    assert math.isclose(stats.tokens_per_step, 24 / steps)


def test_each_draft_is_the_mtp_layers_prediction_from_the_whole_sequence(mtp_model, monkeypatch):
    """The loop feeds the MTP layer each kept position's hidden state with the token after it,
    in its own cache: every draft equals the one computed from scratch on the final sequence."""
    drafts = []
    real = mtp_model.draft

    def spy(hidden, next_ids, start_pos, cache=None, last_only=False):
        logits = real(hidden, next_ids, start_pos, cache, last_only)
        drafts.append((start_pos + next_ids.shape[1] - 1, logits[0, -1]))
        return logits

    prompt = _prompt(mtp_model.args, length=9, seed=2)
    monkeypatch.setattr(mtp_model, "draft", spy)
    ids, stats = generate_speculative(mtp_model, prompt, 20, prefill_chunk=4)
    _, hidden = mtp_model(ids, return_hidden=True)
    full = real(hidden[:, :-1], ids[:, 1:], 0)[0]  # [N - 1, V]: position p's guess for p + 2
    assert len(drafts) == 3 + stats.steps - 1  # 3 prefill chunks, then one per step but the last
    for pos, logits in drafts:
        torch.testing.assert_close(logits, full[pos], atol=1e-4, rtol=1e-4)


def test_the_prefill_computes_the_logits_of_its_last_position_only(mtp_model, monkeypatch):
    """Speculative prefill used the last row of the main and MTP logits but computed every
    position's: [C, 129280] twice per chunk (~1 GB for a 2048-token chunk; 16 GB for a 32k
    prompt in one forward, more than 2**31 elements). The hidden states stay whole (the MTP
    layer reads every position), and the tokens are generate()'s."""
    heads = []
    for module in (mtp_model.lm_head, mtp_model.mtp["3"].shared_head.head):
        monkeypatch.setattr(module, "forward", lambda x, real=module.forward: (heads.append(x.shape[1]), real(x))[1])
    prompt = _prompt(mtp_model.args, length=9, seed=2)
    ids, _ = generate_speculative(mtp_model, prompt, 6, prefill_chunk=4)
    assert heads[:6] == [1] * 6  # 3 chunks, each one main and one MTP position
    assert torch.equal(ids, mtp_model.generate(prompt, 6))


def test_the_mtp_layer_reads_its_inputs_as_deepseek_v3s_weights_expect(mtp_model):
    """``eh_proj([enorm(embedding); hnorm(hidden)])`` (the embedding zero at position 0), the
    layer, then ``shared_head``'s norm and head: each step written out in torch."""
    layer = mtp_model.mtp["3"]
    hidden = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    next_ids = _prompt(mtp_model.args, length=5, seed=4)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mtp_model.args.rms_norm_eps) * weight

    embedded = mtp_model.embed.weight[next_ids].clone()
    embedded[:, 0] = 0
    x = torch.cat((rms(embedded, layer.enorm.weight), rms(hidden, layer.hnorm.weight)), -1) @ layer.eh_proj.weight.T
    with torch.inference_mode():
        y, residual = layer(x, None, mtp_model.rope_cos[:5], mtp_model.rope_sin[:5], None)
    want = rms(y + residual, layer.shared_head.norm.weight) @ layer.shared_head.head.weight.T
    torch.testing.assert_close(mtp_model.draft(hidden, next_ids, 0), want, atol=1e-4, rtol=1e-4)
    # Past position 0 the embedding is kept: the same rows drafted from position 1 differ.
    assert not torch.allclose(mtp_model.draft(hidden, next_ids, 1)[:, 0], want[:, 0], atol=1e-3)


def test_speculative_stops_at_a_stop_id_as_generate_does(mtp_model):
    prompt = _prompt(mtp_model.args, length=6, seed=7)
    free = mtp_model.generate(prompt, 16)
    stop = int(free[0, 6 + 5])  # the sixth new token
    want = mtp_model.generate(prompt, 16, eos_token_id=[stop])
    got, _ = generate_speculative(mtp_model, prompt, 16, eos_token_id=[stop])
    assert torch.equal(got, want) and int(got[0, -1]) == stop
    one, stats = generate_speculative(mtp_model, prompt, 1)
    assert torch.equal(one, free[:, :7]) and stats.steps == 0
    none, _ = generate_speculative(mtp_model, prompt, 0)
    assert torch.equal(none, prompt)


@pytest.mark.slow
@pytest.mark.needs_interpreter
def test_a_speculative_step_syncs_the_host_once_on_a_gpu_plugin():
    """Checking a draft reads one small tensor on the host per step (the accept decision):
    the ids' range checks and the ops' input checks run on the first step of each length
    only. On the emulated nvidia plugin's own ops (on CPU tensors the cpu backend may read
    values on the host where that costs nothing). Dense layers, as the decode-step test."""
    if not any(info.name == "nvidia" for info in dshal.backends()):
        pytest.skip("the dshal-nvidia plugin is not installed")
    try:
        assert dshal.use(backend="nvidia", emulate=True).emulated
        args = _mtp_args(num_hidden_layers=2, first_k_dense_replace=3)  # the MTP layer (layer 2) dense too
        model = random_model(args, seed=0, precision=PrecisionConfig(gemm="fp8-block"))
        prompt = _prompt(args, length=6, seed=1)
        generate_speculative(model, prompt, 4)  # the first steps of each length: checked
        seen = []
        with HostSyncCounter(dispatch=False) as counter:  # value reads: SDPA's causal bias is a subclass
            ids, stats = generate_speculative(model, prompt, 6, on_token=lambda i: seen.append(counter.count))
        # Its two-token steps on the plugin's kernels give the plugin's own greedy tokens.
        assert torch.equal(ids, model.generate(prompt, 6))
        # Several rows at their own positions (the static step's plan): one host read a step too.
        rows, lens = _prompt(args, length=6, seed=2, batch=2), [6, 3]
        generate_speculative(model, rows, 3, prompt_lens=lens)
        row_reads = []
        with HostSyncCounter(dispatch=False) as row_counter:
            together, _ = generate_speculative(model, rows, 5, prompt_lens=lens,
                                               on_token=lambda i: row_reads.append(row_counter.count))
        assert completions(together, lens, 5) == [model.generate(rows[b : b + 1, :n], 5)[0, n:].tolist()
                                                  for b, n in enumerate(lens)]
    finally:
        dshal.use(backend="cpu")
    per_step = [b - a for a, b in zip(seen[1:], seen[2:]) if b != a]
    assert stats.steps >= 3 and per_step == [1] * len(per_step) and len(per_step) >= 3, counter.where
    row_steps = [b - a for a, b in zip(row_reads, row_reads[1:])]
    assert len(row_steps) >= 3 and row_steps == [1] * len(row_steps), row_counter.where


def test_speculative_refuses_what_it_cannot_serve(mtp_model):
    prompt = _prompt(mtp_model.args)
    with pytest.raises(ArgumentError, match=r"'stream' is given with 2 sequences, expected one sequence"):
        generate_speculative(mtp_model, _prompt(mtp_model.args, batch=2), 4, stream=print)
    with pytest.raises(ArgumentError, match=r"argument 'prompt_lens' is \[3\], expected None or 2 ints"):
        generate_speculative(mtp_model, _prompt(mtp_model.args, batch=2), 4, prompt_lens=[3])
    with pytest.raises(ArgumentError, match="no multi-token-prediction layer.*mtp_layers=1"):
        generate_speculative(random_model(tiny_args()), prompt, 4)
    windowed = random_model(_mtp_args(attention_window=8, attention_global_tokens=2))
    with pytest.raises(ArgumentError, match="attention window"):
        generate_speculative(windowed, prompt, 4)
    with pytest.raises(ArgumentError, match="max_new_tokens"):
        generate_speculative(mtp_model, prompt, -1)
    for name, bad, expected in (("top_p", 0, r"a number in \(0, 1\]"), ("top_k", -1, "an int >= 0"),
                                ("top_k", 3.0, "an int >= 0"), ("min_p", 1.5, r"a number in \[0, 1\]"),
                                ("min_p", False, r"a number in \[0, 1\]")):
        with pytest.raises(ArgumentError, match=f"generate_speculative: argument '{name}' is .*, expected {expected}"):
            generate_speculative(mtp_model, prompt, 4, 1.0, **{name: bad})
    with pytest.raises(ShapeError, match=r"'hidden' has shape \[1, 3, 128\], expected \[1, 7, 128\]"):
        mtp_model.draft(torch.zeros(1, 3, 128), prompt, 0)
    with pytest.raises(ShapeError, match="made for another model or layer"):
        mtp_model.draft(torch.zeros(1, 7, 128), prompt, 0, mtp_model.new_cache(1, 16))
    with pytest.raises(ConfigError, match=r"mtp_layers is 1, expected an integer in \[0, 0\]"):
        tiny_args(mtp_layers=1)


def test_the_loader_reads_the_mtp_layer_under_the_checkpoints_names():
    args = _mtp_args(num_hidden_layers=2)
    tensors = random_checkpoint(args, seed=2)
    assert "model.layers.2.eh_proj.weight" in tensors and "model.layers.2.shared_head.head.weight" in tensors
    model = build_model(args, DictReader(tensors))
    state = dict(model.named_parameters())
    for ours, theirs in (("mtp.2.eh_proj.weight", "model.layers.2.eh_proj.weight"),
                         ("mtp.2.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.kv_b_proj.weight"),
                         ("mtp.2.shared_head.head.weight", "model.layers.2.shared_head.head.weight"),
                         ("mtp.2.enorm.weight", "model.layers.2.enorm.weight")):
        assert torch.equal(state[ours], tensors[theirs]), ours
    missing = {k: v for k, v in tensors.items() if k != "model.layers.2.hnorm.weight"}
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.2.hnorm.weight'"):
        build_model(args, DictReader(missing))


def test_an_fp8_checkpoints_mtp_layer_keeps_its_projection_and_head_unquantized():
    args = _mtp_args(num_hidden_layers=2, hidden_size=256, moe_intermediate_size=128, intermediate_size=256)
    tensors = quantize_checkpoint_fp8(random_checkpoint(args, seed=4))
    assert tensors["model.layers.2.eh_proj.weight"].dtype == args.dtype
    assert tensors["model.layers.2.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    model = build_model(args.with_(weight_block_size=(128, 128)), DictReader(tensors))
    layer = model.mtp["2"]
    assert layer.self_attn.o_proj.weight_scale is not None and layer.eh_proj.weight_scale is None
    prompt = _prompt(args, length=5)
    got, _ = generate_speculative(model, prompt, 8)
    assert torch.equal(got, model.generate(prompt, 8))


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Total variation distance between the empirical distribution of ``counts`` and ``probs``."""
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def test_draft_verifier_never_keeps_a_draft_the_cuts_removed_even_when_u_is_zero():
    """``torch.rand`` draws 0.0 about once in 2**24: ``u * q(d) <= p(d)`` then kept a draft with
    p(d) = 0 (outside top-k), a token plain sampling never gives. Replays a generator state
    whose next draw is exactly 0.0."""
    gen = torch.Generator().manual_seed(0)
    chunk, drawn = 1 << 24, 0
    for _ in range(8):
        zeros = (torch.rand(chunk, generator=gen) == 0).nonzero()
        if len(zeros):
            drawn += int(zeros[0])
            break
        drawn += chunk
    gen = torch.Generator().manual_seed(0)
    for size in [chunk] * (drawn // chunk) + [drawn % chunk]:
        torch.rand(size, generator=gen)
    state = gen.get_state()
    assert float(torch.rand(1, generator=gen)) == 0.0
    gen.set_state(state)
    logits = torch.tensor([[[3.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    verifier = DraftVerifier(1.0, 1.0, gen, top_k=2)  # p keeps tokens 0 and 1
    first, _bonus, kept = verifier.check(logits, torch.tensor([3]), torch.tensor([[0.1, 0.1, 0.1, 0.7]]))[0].tolist()
    assert kept == 0 and first in (0, 1)


def test_draft_verifier_keeps_or_redraws_so_each_token_is_distributed_as_the_model_says():
    """Speculative sampling's step: whatever the draft distribution q, the token for the draft's
    position is distributed as p[0], and the next one (when the draft is kept) as p[1]. Always
    keeping the draft would give q instead (checked to be far from p: 10x the tolerance)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 0.0], [0.0, 0.0, 3.0, 1.0, 0.0, -2.0]])
    q = torch.softmax(torch.tensor([[-1.0, 0.5, 2.0, 0.0, 0.0, 1.0]]), dim=-1)
    verifier = DraftVerifier(temperature=1.0, top_p=1.0, generator=gen)
    p = torch.softmax(logits, dim=-1)
    first, bonus, kept_n = torch.zeros(6), torch.zeros(6), 0
    n = 8000
    for _ in range(n):
        draft = torch.multinomial(q, 1, generator=gen)[0]
        (a, b, kept), = verifier.check(logits[None], draft, q).tolist()
        first[a] += 1
        if kept:
            bonus[b] += 1
            kept_n += 1
    assert _tv(first, p[0]) < 0.03 and _tv(bonus, p[1]) < 0.04
    assert abs(kept_n / n - float(torch.minimum(p[0], q[0]).sum())) < 0.02  # P(keep) = sum min(p, q)
    assert 0.5 * float((q[0] - p[0]).abs().sum()) > 0.3
    # Greedy: the argmax of each position; the draft kept when it is the first argmax.
    greedy = DraftVerifier(0.0, 1.0, None)
    assert greedy.check(logits[None], torch.tensor([0]), None).tolist() == [[0, 2, 1]]
    assert greedy.check(logits[None], torch.tensor([3]), None).tolist() == [[0, 2, 0]]
    # Rows at once: each row checked against its own draft and distribution.
    rows = verifier.check(torch.stack((logits, logits.flip(0))), torch.tensor([0, 2]), torch.cat((q, q)))
    assert rows.shape == (2, 3) and set(rows[:, 2].tolist()) <= {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("temperature, cuts", [(1.0, {}), (2.5, {"top_k": 3, "min_p": 0.3})])
def test_sampled_speculative_tokens_follow_the_models_distribution(temperature, cuts):
    """End to end with the random MTP layer's sampled drafts (kept about 2 times in 3 here):
    the second new token's distribution is the exact one, summed over the first token's. With
    top-k and min-p cuts too (on both the model's p and the drafts' q; here each cuts what the
    other leaves): the cut distribution, far from the uncut one, and no token outside it."""
    args = _mtp_args(vocab_size=8)
    model = random_model(args, seed=0, std=0.2)
    prompt = _prompt(args, length=5)

    def exact(**cuts) -> torch.Tensor:
        with torch.inference_mode():
            first = sampling_probs(model(prompt)[0, -1], temperature, **cuts)
            extended = torch.cat((prompt.repeat(8, 1), torch.arange(8)[:, None]), dim=1)
            then = sampling_probs(model(extended)[:, -1], temperature, **cuts)
        return (first[:, None] / first.sum() * then / then.sum(dim=-1, keepdim=True)).sum(dim=0)

    second = exact(**cuts)
    gen = torch.Generator().manual_seed(0)
    counts, kept, steps = torch.zeros(8), 0, 0
    for _ in range(400):
        ids, stats = generate_speculative(model, prompt, 2, temperature, generator=gen, **cuts)
        counts[ids[0, 6]] += 1
        kept, steps = kept + stats.accepted, steps + stats.steps
    assert _tv(counts, second) < 0.08, (counts / 400, second)
    assert 0.3 < kept / steps < 0.95
    if cuts:
        assert counts[second == 0].sum() == 0 and 0.5 * float((second - exact()).abs().sum()) > 0.25


def test_sampled_speculative_is_reproducible_and_keeps_to_the_nucleus():
    args = _mtp_args(vocab_size=8)
    model = random_model(args, seed=0, std=0.2)
    prompt = _prompt(args, length=5)
    again = [generate_speculative(model, prompt, 6, 0.7, generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(again[0], again[1])
    gen = torch.Generator().manual_seed(0)
    nucleus, _ = generate_speculative(model, prompt, 6, 1.0, top_p=1e-6, generator=gen)
    assert torch.equal(nucleus, model.generate(prompt, 6))  # only the most likely token is left: greedy
    top_1, _ = generate_speculative(model, prompt, 6, 5.0, top_k=1, generator=gen)
    assert torch.equal(top_1, model.generate(prompt, 6))


def test_speculative_continues_in_caches_that_hold_the_prompts_start(mtp_model):
    """As ``generate(..., cache=, cached=)``: a second call on the same caches prefills only
    what the first did not hold, and gives the fresh tokens."""
    prompt = _prompt(mtp_model.args, length=20, seed=6)
    cache, mtp_cache = mtp_model.new_cache(1, 64), mtp_model.new_cache(1, 64, mtp=True)
    first, _ = generate_speculative(mtp_model, prompt[:, :12], 8, cache=cache, mtp_cache=mtp_cache)
    assert cache.length == first.shape[1] - 1 and mtp_cache.length <= cache.length  # all but the last token
    longer = torch.cat((first, prompt[:, 12:]), dim=1)
    held = min(first.shape[1] - 2, mtp_cache.length)  # the MTP entry of a position was made with the next token
    second, _ = generate_speculative(mtp_model, longer, 8, cache=cache, mtp_cache=mtp_cache, cached=held)
    assert torch.equal(second, mtp_model.generate(longer, 8))
    with pytest.raises(ArgumentError, match="generate_speculative: argument 'cached' is 3, expected 0 without a 'mtp_cache'"):
        generate_speculative(mtp_model, longer, 4, cache=cache, cached=3)
    with pytest.raises(ArgumentError, match=r"'mtp_cache' has max_len 64, expected at least 66"):
        generate_speculative(mtp_model, torch.cat((longer, longer, longer[:, :6]), 1), 4, cache=mtp_model.new_cache(1, 80),
                             mtp_cache=mtp_cache)


@pytest.mark.parametrize("mla_mode", ["absorb", "naive"])
def test_several_prompts_each_get_their_greedy_tokens(mla_mode):
    """Prompts of different lengths in one batch: each row at its own positions, keeping its own
    drafts; each row's tokens are those of the prompt alone (stop ids included)."""
    args = _mtp_args(mla_mode=mla_mode)
    lens = [7, 4, 9, 6]
    kept = 0
    for seed in (0, 3):
        model = _repeating_mtp_model(args, seed)
        ids = _prompt(args, length=9, seed=seed, batch=4)
        alone = [model.generate(ids[b : b + 1, :n], 20)[0, n:].tolist() for b, n in enumerate(lens)]
        out, stats = generate_speculative(model, ids, 20, prompt_lens=lens)
        assert completions(out, lens, 20) == alone
        stop = alone[0][5]
        stopped, _ = generate_speculative(model, ids, 20, prompt_lens=lens, eos_token_id=[stop])
        assert completions(stopped, lens, 20, [stop]) == [row[: row.index(stop) + 1] if stop in row else row for row in alone]
        kept += stats.accepted
        assert stats.steps + stats.accepted >= 4 * 19  # every row's tokens after the prefill's first
    assert kept >= 10


def test_several_prompts_report_their_tokens_as_they_come_and_sample():
    args = _mtp_args()
    model = random_model(args, seed=2)
    ids, lens = _prompt(args, length=6, batch=3), [6, 2, 4]
    written = []
    out, _ = generate_speculative(model, ids, 5, prompt_lens=lens, on_token=written.append)
    assert written[0] == 2 and written[-1] == 3 * 5 - 1 and written == sorted(written)  # prefill: a token per row
    sampled = [generate_speculative(model, ids, 5, 0.8, prompt_lens=lens, generator=torch.Generator().manual_seed(1))[0]
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (3, 11)


def test_the_steps_go_through_the_backends_graph_hook():
    """With ``graph`` (a backend's ``graph()`` hook) each step's two forwards (the main model,
    the MTP layer) run as captured callables: their first calls checked and eager, then what
    the hook returned, replayed every step. Here the hook is a stand-in that wraps the forward
    (not a device graph; the CPU has none); one that fails at capture leaves the steps eager,
    and says why. The tokens stay the greedy ones. A sampled run is captured too (its draws
    are made between the forwards), and draws what the eager run draws. One sequence is
    continued in its caches through the hook too (streamed), turn after turn."""
    args = _mtp_args()
    model = _repeating_mtp_model(args, 0)
    prompt = _prompt(args, seed=0)
    want = model.generate(prompt, 16)
    replays = []

    def capture(step):
        def replay(*inputs):
            replays.append(1)
            return step(*inputs)
        return replay

    got, stats = generate_speculative(model, prompt, 16, graph=capture)
    assert torch.equal(got, want) and stats.captured is True and stats.accepted > 0
    assert len(replays) == 2 * stats.steps  # the first step's captures replay it, then two replays a step

    def refuse(step):
        def replay(*inputs):
            raise RuntimeError("operation not permitted when stream is capturing")
        return replay

    got, stats = generate_speculative(model, prompt, 16, graph=refuse)
    assert torch.equal(got, want) and stats.captured is False
    assert stats.capture_error == "RuntimeError: operation not permitted when stream is capturing"
    rows, lens = _prompt(args, length=7, seed=1, batch=2), [7, 4]
    together, stats = generate_speculative(model, rows, 10, prompt_lens=lens, graph=capture)
    assert completions(together, lens, 10) == [model.generate(rows[b : b + 1, :n], 10)[0, n:].tolist() for b, n in enumerate(lens)]
    replays.clear()
    sampled, stats = generate_speculative(model, prompt, 12, 0.5, graph=capture, generator=torch.Generator().manual_seed(0))
    assert stats.captured is True and len(replays) == 2 * stats.steps
    eager, _ = generate_speculative(model, prompt, 12, 0.5, graph=lambda fn: fn, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, eager)
    # One sequence continued in its caches through the hook (a conversation's turns, as
    # `dshal run --interactive --speculative mtp` runs them): tokens streamed as they are
    # written, the caches left for the next turn, every turn's tokens greedy's.
    cache = model.new_cache(1, 48, "absorb", static=True)
    mtp_cache = model.new_cache(1, 48, "absorb", mtp=True, static=True)
    streamed = []
    first, _ = generate_speculative(model, prompt, 9, graph=capture, cache=cache, mtp_cache=mtp_cache,
                                    stream=lambda t: streamed.append(int(t[0])))
    assert torch.equal(first, model.generate(prompt, 9)) and streamed == first[0, prompt.shape[1]:].tolist()
    assert cache.length == first.shape[1] - 1 and mtp_cache.length == first.shape[1] - 2
    follow = torch.cat((first, _prompt(args, length=3, seed=4)), dim=1)
    again, stats = generate_speculative(model, follow, 9, graph=capture, cache=cache, mtp_cache=mtp_cache,
                                        cached=mtp_cache.length)
    assert torch.equal(again, model.generate(follow, 9)) and stats.captured is True
    # A step kept with the caches: its forwards captured once for every later call.
    hooked = []

    def counting(fn):
        hooked.append(fn)
        return capture(fn)

    cache = model.new_cache(1, 64, "absorb", static=True)
    mtp_cache = model.new_cache(1, 64, "absorb", mtp=True, static=True)
    step = SpeculativeStep(model, cache, mtp_cache, DraftVerifier(0.0, 1.0, None), counting)
    turn = prompt
    for seed in (5, 6):
        got, _ = generate_speculative(model, turn, 6, cache=cache, mtp_cache=mtp_cache, cached=mtp_cache.length, step=step)
        assert torch.equal(got, model.generate(turn, 6))
        turn = torch.cat((got, _prompt(args, length=3, seed=seed)), dim=1)
    assert len(hooked) == 2
    # A chat turn that ended in an exception (Ctrl-C, out of memory) after the verifier marked a
    # NaN: the next, healthy turn on the same step raised the stale "logits hold NaN".
    step.verifier.argmax(torch.tensor([[float("nan"), 0.0]]))
    got, _ = generate_speculative(model, turn, 2, cache=cache, mtp_cache=mtp_cache, cached=mtp_cache.length, step=step)
    assert torch.equal(got, model.generate(turn, 2))
    with pytest.raises(ArgumentError, match="'step' is built on other KV caches than arguments 'cache' and 'mtp_cache'"):
        generate_speculative(model, prompt, 4, cache=model.new_cache(1, 48, "absorb"), mtp_cache=mtp_cache, step=step)
    with pytest.raises(ArgumentError, match=r"'step' samples with temperature 0.0, top_p 1.0, top_k 0, min_p 0.0 and its "
                                            r"own generator, expected this call's \(temperature 0.5"):
        generate_speculative(model, prompt, 4, 0.5, cache=cache, mtp_cache=mtp_cache, step=step)
    for other in ({"top_k": 5}, {"min_p": 0.1}):  # every cut must be the step's: its choices are made between its graphs
        with pytest.raises(ArgumentError, match=rf"expected this call's \(temperature 0.0, top_p 1.0, "
                                                rf"top_k {other.get('top_k', 0)}, min_p {other.get('min_p', 0.0)}, 'generator'\)"), \
                pytest.warns(UserWarning, match="with temperature 0 \\(greedy\\) has no effect"):
            generate_speculative(model, prompt, 4, cache=cache, mtp_cache=mtp_cache, step=step, **other)
    cut = SpeculativeStep(model, cache, mtp_cache, DraftVerifier(0.0, 1.0, None, 5, 0.1), counting)
    with pytest.warns(UserWarning, match="top_k=5, min_p=0.1 with temperature 0 \\(greedy\\) has no effect"):
        got, _ = generate_speculative(model, prompt, 4, cache=cache, mtp_cache=mtp_cache, step=cut, top_k=5, min_p=0.1)
    assert torch.equal(got, model.generate(prompt, 4))
    with pytest.raises(ArgumentError, match="SpeculativeStep: argument 'mtp_cache' has the 'naive' layout"):
        SpeculativeStep(model, cache, model.new_cache(1, 16, "naive", mtp=True), DraftVerifier(0.0, 1.0, None), capture)
    with pytest.raises(ArgumentError, match="argument 'cache' has the 'naive' layout, expected 'absorb' for static steps"):
        generate_speculative(model, prompt, 4, graph=capture, cache=model.new_cache(1, 16, "naive"),
                             mtp_cache=model.new_cache(1, 16, "absorb", mtp=True))


def test_greedy_speculative_returns_generates_tensor_exactly_with_ragged_prompts_and_a_stop(mtp_model):
    """The docstring promises generate's ids. With ragged prompts where the longest row stops
    first, speculative cut its result at the furthest row end ([2, 11]) where generate keeps
    the longest prompt plus the most tokens any row made ([2, 17])."""
    args = mtp_model.args
    ids = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    lens = [9, 3]
    free = mtp_model.generate(ids, 8, prompt_lens=lens)
    stop = int(free[0, 10])  # the longest row's second new token
    want = mtp_model.generate(ids, 8, prompt_lens=lens, eos_token_id=[stop])
    got, _ = generate_speculative(mtp_model, ids, 8, prompt_lens=lens, eos_token_id=[stop])
    assert got.shape == want.shape and torch.equal(got, want)


def test_sampling_from_non_finite_logits_is_a_dshal_error():
    """torch.multinomial's bare RuntimeError ended an --interactive chat (it catches DshalError),
    and on CUDA recent torch refuses such weights with a device-side assert (``_assert_async``),
    which ends the process's CUDA context: multinomial never sees the row now. It is marked on
    the device and raised where the generation ends, as greedy does; the row draws uniformly."""
    from dshal.model.sampling import TokenChooser

    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0], [0.0, float("inf"), 1.0]])
    chooser = TokenChooser(1.0, generator=torch.Generator().manual_seed(0))
    ids = chooser(logits)  # no error at the step: no host read
    assert ids.shape == (3,) and bool(((ids >= 0) & (ids < 3)).all())
    with pytest.raises(dshal.DshalError, match=r"generate: the model's logits hold NaN \(or Inf\) at a step"):
        chooser.raise_if_nan("generate")
    chooser.raise_if_nan("generate")  # reset by the raise
    clean = TokenChooser(1.0, generator=torch.Generator().manual_seed(0))
    assert clean(logits[1:2]).shape == (1,)
    clean.raise_if_nan("generate")  # finite logits: nothing to say


def test_greedy_generation_from_nan_logits_is_a_dshal_error(mtp_model):
    """argmax of a NaN row is the NaN's index: greedy generation returned tokens the model never
    chose, with no word. Every greedy and sampled loop now ends in a DshalError (no host sync
    per step)."""
    from dshal.model.decode import generate_with_graphs

    ids = _prompt(mtp_model.args, batch=2)
    clean = mtp_model.generate(ids, 4)
    norm = mtp_model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm[0] = float("nan")  # every logit NaN from the first step on
    try:
        runs = {
            "generate": lambda: mtp_model.generate(ids, 4),
            "generate (ragged rows)": lambda: mtp_model.generate(ids, 4, prompt_lens=[7, 3]),
            "generate_with_graphs": lambda: generate_with_graphs(mtp_model, ids, 4, lambda fn: fn),
            "generate_speculative": lambda: generate_speculative(mtp_model, ids[:1], 4),
            "generate_speculative (rows)": lambda: generate_speculative(mtp_model, ids, 4, prompt_lens=[7, 3]),
        }
        seeded = {"generator": torch.Generator().manual_seed(0)}
        runs |= {  # sampled: the same, through the draw (no multinomial of a NaN row)
            "generate sampled": lambda: mtp_model.generate(ids, 4, temperature=0.8, **seeded),
            "generate_with_graphs sampled": lambda: generate_with_graphs(mtp_model, ids, 4, lambda fn: fn,
                                                                         temperature=0.8, **seeded),
            "generate_speculative sampled": lambda: generate_speculative(mtp_model, ids[:1], 4, 0.8, **seeded),
            "generate_speculative sampled (rows)": lambda: generate_speculative(mtp_model, ids, 4, 0.8,
                                                                                prompt_lens=[7, 3], **seeded),
        }
        for name, run in runs.items():
            try:
                run()
            except dshal.DshalError as err:
                assert "logits hold NaN (or Inf) at a step" in str(err), name
            else:
                pytest.fail(f"{name}: no DshalError from NaN logits")
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert torch.equal(mtp_model.generate(ids, 4), clean)  # the flag does not outlive its generation


def test_nan_in_the_mtp_drafts_alone_is_not_an_error(mtp_model):
    """A draft is a proposal that verification rejects: NaN MTP logits (greedy) must not stop a
    generation whose tokens are all the main model's (they raised with the first version)."""
    ids = _prompt(mtp_model.args)
    norm = mtp_model.mtp["3"].shared_head.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm[0] = float("nan")
    try:
        got, stats = generate_speculative(mtp_model, ids, 6)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert torch.equal(got, mtp_model.generate(ids, 6)) and stats.accepted == 0
    with torch.no_grad():
        norm[0] = float("nan")
    try:  # sampled: such drafts come from the uniform distribution, and the tokens stay p's
        sampled, _ = generate_speculative(mtp_model, ids, 6, 0.8, generator=torch.Generator().manual_seed(1))
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert sampled.shape == (1, ids.shape[1] + 6) and bool(((sampled >= 0) & (sampled < mtp_model.args.vocab_size)).all())


def test_a_split_model_raises_on_nan_as_its_first_rank_says():
    """Each rank marks its own logits, which can differ in the last bits: one rank raising while
    another went on to its next collective would hang the job. Every rank takes rank 0's flag."""
    from dshal.model.sampling import TokenChooser

    chooser = TokenChooser(0.0)
    chooser(torch.tensor([[float("nan"), 1.0]]))
    chooser.raise_if_nan("generate", agree=lambda flag: torch.zeros_like(flag))  # rank 0 saw none: no raise
    chooser(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(dshal.DshalError, match="logits hold NaN"):
        chooser.raise_if_nan("generate", agree=lambda flag: torch.ones_like(flag))  # rank 0 saw one


def test_moot_cuts_are_warned_about_at_the_callers_line(mtp_model):
    """generate_speculative runs under ``@torch.inference_mode()``: its warning pointed at
    torch's ``_contextlib`` wrapper, not at the line that passed the cut."""
    with pytest.warns(UserWarning, match=r"generate_speculative: top_k=5 with temperature 0 \(greedy\) has no effect") as said:
        generate_speculative(mtp_model, _prompt(mtp_model.args), 2, top_k=5)
    assert [w.filename for w in said] == [__file__]


def test_a_speculative_run_stopped_between_steps_leaves_no_rejected_draft_in_the_cache():
    """Ctrl-C lands after a step's host sync (the verdict) or in ``stream``: the cache said it
    held the step's draft slot even when the verdict rejected the draft, so a notebook cell
    continuing in it (``generate(cache=, cached=cache.length)``, the streamed tokens and more)
    read the rejected token's keys at that position and gave other tokens than a fresh run."""
    args = _mtp_args()
    model = random_model(args, seed=0)
    prompt = _prompt(args, seed=0)
    for stop_at in range(2, 8):
        cache, mtp_cache = model.new_cache(1, 64), model.new_cache(1, 64, mtp=True)
        seen: list[int] = []

        def stream(token, stop_at=stop_at, seen=seen):
            seen.append(int(token[0]))
            if len(seen) == stop_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            generate_speculative(model, prompt, 24, cache=cache, mtp_cache=mtp_cache, stream=stream)
        tokens = torch.cat((prompt, torch.tensor([seen]), torch.tensor([[5, 9, 11]])), dim=1)  # the next cell's input
        assert cache.length <= prompt.shape[1] + len(seen)
        got = model.generate(tokens, 4, cache=cache, cached=cache.length)
        assert torch.equal(got, model.generate(tokens, 4)), f"stopped at streamed token {stop_at}"
