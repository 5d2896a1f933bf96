"""KV cache paths of the model core: naive and absorbed MLA agree with the cache-free
forward, dynamic attention keeps only window + global tokens, generate's contract."""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal.config import PrecisionConfig
from dshal.model import DictReader, KVCache, build_model, random_model, tiny_args
from dshal.model.cache import check_cache_fits
from dshal.model.checkpoint import random_checkpoint
from dshal.runtime import free_memory

HIGH = PrecisionConfig(gemm="bf16")


def _model(seed: int = 0, **changes):
    dshal.use(backend="cpu")
    args = tiny_args(**changes)
    return build_model(args, DictReader(random_checkpoint(args, seed, std=0.1)), HIGH)


def _ids(vocab: int, length: int, batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _stepwise_logits(model, ids: torch.Tensor, prefill: int, mode: str) -> torch.Tensor:
    """Logits of every position: a prefill of ``prefill`` tokens, then one token per step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], mode)
    out = [model(ids[:, :prefill], 0, cache)]
    for pos in range(prefill, ids.shape[1]):
        out.append(model(ids[:, pos : pos + 1], pos, cache))
    return torch.cat(out, dim=1)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_model_cached_decode_matches_full_forward(mode):
    model = _model()
    ids = _ids(model.args.vocab_size, 20)
    full = model(ids)
    assert _rel_err(_stepwise_logits(model, ids, 6, mode), full) <= 1e-5


@pytest.mark.parametrize("mode", [None, "naive", "absorb", "absorb-window"])
def test_model_last_only_matches_the_full_forward_and_fills_the_same_cache(mode):
    window = {"attention_window": 4, "attention_global_tokens": 2} if mode == "absorb-window" else {}
    model = _model(seed=2, **window)
    ids = _ids(model.args.vocab_size, 9, seed=5)
    full = model(ids)
    if mode is None:  # no cache
        assert _rel_err(model(ids, last_only=True), full[:, -1:]) <= 1e-6
        return
    mode = mode.removesuffix("-window")
    caches = [model.new_cache(2, 12, mode) for _ in range(2)]
    last = model(ids[:, :8], 0, caches[0], last_only=True)
    assert last.shape == (2, 1, model.args.vocab_size)
    assert _rel_err(last, model(ids[:, :8], 0, caches[1])[:, -1:]) <= 1e-6
    # The skipped rows of the last layer do not change what it cached for the next step.
    steps = [model(ids[:, 8:], 8, cache) for cache in caches]
    assert _rel_err(steps[0], steps[1]) <= 1e-6
    assert _rel_err(steps[0], full[:, 8:]) <= 1e-5


def test_model_absorbed_attention_matches_naive_on_prefill_and_decode():
    model = _model(seed=1)
    ids = _ids(model.args.vocab_size, 16, seed=3)
    naive = _stepwise_logits(model, ids, 10, "naive")
    for layer in model.layers:  # run the multi-token prefill absorbed too
        layer.self_attn.expand_prefill = False
    absorbed = _stepwise_logits(model, ids, 10, "absorb")
    assert _rel_err(absorbed, naive) <= 1e-5


def test_model_cache_sizes_absorbed_vs_naive():
    model = _model()
    a = model.args
    absorbed, naive = model.new_cache(1, 8, "absorb"), model.new_cache(1, 8, "naive")
    assert absorbed.bytes_per_token == a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    assert naive.bytes_per_token == a.num_hidden_layers * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * 4
    kv = model.describe()["kv_cache"]
    assert kv["bytes_per_token"] == absorbed.bytes_per_token and kv["bytes_per_token_naive"] == naive.bytes_per_token


def _allocated_bytes(cache) -> int:
    return sum(b.untyped_storage().nbytes() for layer in cache.buffers for b in layer)  # views: their whole allocation


@pytest.mark.parametrize("changes", [{}, {"attention_window": 6, "attention_global_tokens": 2}])
@pytest.mark.parametrize("mode", ["naive", "absorb", "absorb-static"])
def test_model_cache_bytes_is_what_new_cache_allocates(mode, changes):
    model = _model(**changes)
    mode, static = mode.removesuffix("-static"), mode.endswith("-static")
    for batch, max_len in ((1, 1), (3, 5), (2, 40)):
        cache = model.new_cache(batch, max_len, mode, static=static)
        assert model.cache_bytes(batch, max_len, mode, static=static) == _allocated_bytes(cache)
        assert cache.bytes_per_token * cache.capacity * batch == _allocated_bytes(cache)


def test_model_static_cache_takes_the_key_mask_in_place():
    """A cache for static steps (``new_cache(..., static=True)``) holds 8 spare columns after
    each latent: a static step writes its key mask there instead of copying the cache with
    the mask appended, per layer and step, and the keys stay a multiple of 8 wide. Its steps give the logits of the same steps on a
    plain cache (one position for all rows, one per row, two tokens per row)."""
    from dshal.model.decode import positioned_step, static_decode_step

    model = _model()
    a = model.args
    width = a.kv_lora_rank + a.qk_rope_head_dim
    ids = _ids(a.vocab_size, 5)
    static, plain = model.new_cache(2, 12, "absorb", static=True), model.new_cache(2, 12, "absorb")
    assert static.bias_columns == 8 and plain.bias_columns == 0
    assert static.buffers[0][0].shape == plain.buffers[0][0].shape == (2, 12, width)
    model(ids, 0, static), model(ids, 0, plain)
    with dshal.ops.trusted():
        for position in (torch.tensor([5]), torch.tensor([5, 3])):
            token = torch.tensor([7, 9])[:, None]
            want, got = (static_decode_step(model, token, position, c) for c in (plain, static))
            assert _rel_err(got, want) < 1e-5
        positions = torch.tensor([[6, 7], [4, 5]])
        tokens = _ids(a.vocab_size, 2, seed=3)
        (want, _), (got, _) = (positioned_step(model, tokens, positions, c) for c in (plain, static))
        assert _rel_err(got, want) < 1e-5
    # The keys a step attends over are the cache's own memory, the mask in its spare columns.
    layer = static.layers[0]
    latent = static.buffers[0][0]
    columns = torch.full((2, 12, 2), -3.0)
    keys = layer.biased_keys(latent, columns)
    assert keys.shape == (2, 12, width + 8) and keys.shape[-1] % 8 == 0 and keys.data_ptr() == latent.data_ptr()
    assert torch.equal(keys[..., width : width + 2], columns) and torch.equal(keys[..., :width], latent)
    assert plain.layers[0].biased_keys(plain.buffers[0][0], columns) is None  # no spare columns: the caller copies
    with pytest.raises(dshal.DshalError, match="argument 'static' is given with mode 'naive', expected 'absorb'"):
        model.new_cache(1, 4, "naive", static=True)


def test_model_a_cache_larger_than_free_memory_is_refused_before_any_allocation():
    model = _model()
    free = free_memory("cpu")
    if free is None:
        pytest.skip("the cpu backend reports no free memory here (no /proc/meminfo): nothing to check against")
    per_sequence = model.cache_bytes(1, 64)
    # Four times what is free now: the host's free memory moves between this read and new_cache's
    # own, and a request that then fitted would be allocated for real.
    batch = 4 * free // per_sequence
    with pytest.raises(dshal.ArgumentError, match=rf"new_cache: batch {batch} x max_len 64 needs a KV cache of .* GiB, "
                       r"expected at most the .* GiB free on cpu(, held to the container's memory limit .*)?: lower 'batch' or 'max_len'"):
        model.new_cache(batch, 64)  # had it allocated, zeroing that many bytes would exhaust the host
    assert free_memory("meta") is None  # meta (dshal plan) holds no bytes: never refused
    assert model.to("meta").new_cache(batch, 64).batch == batch


def test_check_cache_fits_refuses_one_byte_past_free_and_never_checks_an_unknown():
    cpu = torch.device("cpu")
    check_cache_fits(100, 100, cpu, "a cache", "'batch'")  # exactly what is free: fits
    check_cache_fits(10**30, None, cpu, "a cache", "'batch'")  # the backend does not say: no check
    with pytest.raises(dshal.ArgumentError, match=r"^a cache needs a KV cache of 0.00 GiB, expected at most the "
                       r"0.00 GiB free on cpu: lower 'batch'$"):
        check_cache_fits(101, 100, cpu, "a cache", "'batch'")


def test_check_cache_fits_gives_each_rank_sharing_the_memory_its_share():
    """Ranks on one host each allocate a cache from the same free memory (``dshal run --tp N``
    on cpu): each may take 1/N of it."""
    cpu, gib = torch.device("cpu"), 2**30
    check_cache_fits(5 * gib, 10 * gib, cpu, "a cache", "'batch'", sharing=2)
    with pytest.raises(dshal.ArgumentError, match=r"needs a KV cache of 6.00 GiB, expected at most the 5.00 GiB free "
                       r"on cpu \(the 2 ranks on it share 10.00 GiB\): lower 'batch'$"):
        check_cache_fits(6 * gib, 10 * gib, cpu, "a cache", "'batch'", sharing=2)


def test_host_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from dshal.plugin import host_available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    assert host_available_memory(str(meminfo), str(tmp_path / "no-cgroup")) == 20000000 * 1024
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert host_available_memory(str(meminfo), str(cgroup)) == 20000000 * 1024  # no cgroup limit
    (cgroup / "memory.max").write_text(f"{8 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{3 * 2**30}\n")
    assert host_available_memory(str(meminfo), str(cgroup)) == 5 * 2**30  # the container's headroom is less
    assert host_available_memory(str(tmp_path / "none"), str(tmp_path / "none")) is None
    v1 = tmp_path / "cgroup-v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    assert host_available_memory(str(meminfo), str(v1)) == 20000000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{4 * 2**30}\n")
    assert host_available_memory(str(meminfo), str(v1)) == 3 * 2**30


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_model_dynamic_attention_cache_keeps_window_and_global_tokens(mode):
    window, global_tokens = 6, 2
    model = _model(attention_window=window, attention_global_tokens=global_tokens)
    ids = _ids(model.args.vocab_size, 24)
    full = model(ids)  # cache-free: the attention op masks to the window + global tokens
    cache = model.new_cache(2, 24, mode)
    assert cache.capacity == window + global_tokens
    assert all(b.shape[1] == window + global_tokens for layer in cache.buffers for b in layer)
    # prefill longer than the ring, then decode past it several times over
    stepwise = [model(ids[:, :11], 0, cache)]
    stepwise += [model(ids[:, p : p + 1], p, cache) for p in range(11, 20)]
    stepwise.append(model(ids[:, 20:], 20, cache))  # a multi-token chunk after the ring wrapped
    assert _rel_err(torch.cat(stepwise, dim=1), full) <= 1e-5
    # and the window matters: without it the logits differ
    unwindowed = _model()
    assert _rel_err(unwindowed(ids), full) > 1e-3


def test_model_forward_refuses_to_restart_inside_a_wrapped_ring():
    """``model(ids, start, cache)`` at a start before the cache's length, on a ring that has
    wrapped, read slots that later positions overwrote and returned wrong logits without a
    word (generate() refused it; the forward did not). It is refused, the cache untouched;
    a restart at 0 and a step at the length still match the cache-free forward."""
    model = _model(attention_window=4, attention_global_tokens=1)
    ids = _ids(model.args.vocab_size, 10, batch=1)
    cache = model.new_cache(1, 16)
    model(ids[:, :8], 0, cache)  # 8 positions in 5 slots: wrapped
    for start in (7, 3):  # inside the ring's span, and before it (slots = positions no more)
        with pytest.raises(dshal.ShapeError, match=f"start_pos is {start}, expected 0 or 8: the attention window's ring"):
            model(ids[:, start : start + 1], start, cache)
        assert cache.length == 8
    assert _rel_err(model(ids[:, 8:], 8, cache), model(ids)[:, 8:]) <= 1e-5
    assert _rel_err(model(ids[:, :3], 0, cache), model(ids[:, :3])) <= 1e-5


@pytest.mark.parametrize("window", [{}, {"attention_window": 4, "attention_global_tokens": 1}])
def test_model_cache_reuse_matches_a_fresh_run_through_random_rewinds_and_stopped_steps(window):
    """A seeded random walk over one cache (a ring of 5 slots that wraps, or none): steps of
    1-6 tokens, restarts at an earlier position where ``can_rewind_to`` allows one (and the
    forward's refusal where it does not), a step stopped by an error in a random layer, and
    ``generate(cache=, cached=)``. After each, the logits match the cache-free forward of the
    tokens the cache should hold, and ``cache.length`` says how many that is."""
    import random

    model = _model(first_k_dense_replace=3, **window)  # dense: no expert-routing near-ties between paths
    vocab, max_len = model.args.vocab_size, 40
    walk = random.Random(5)
    cache = model.new_cache(1, max_len)
    held: list[int] = []  # the tokens the cache must hold
    ops = {"step": 0, "rewind": 0, "refused": 0, "stopped": 0, "ring reset": 0, "generate": 0}

    def step(start: int, tokens: list[int]) -> None:
        got = model(torch.tensor([tokens]), start, cache)
        held[start:] = tokens
        assert _rel_err(got, model(torch.tensor([held]))[:, start:]) <= 1e-5 and cache.length == len(held)

    def fail(*_):
        raise RuntimeError("stopped")

    for _ in range(40):
        room, op = max_len - len(held), walk.choice(["step", "rewind", "stopped", "generate"])
        new = [walk.randrange(vocab) for _ in range(walk.randint(1, min(6, room - 2)))] if room > 3 else []
        if not new:
            op = "rewind"
        if op == "step":
            step(len(held), new)
        elif op == "rewind":
            start = walk.randint(0, len(held))
            if cache.can_rewind_to(start):
                step(start, new or [walk.randrange(vocab)])
            else:  # a wrapped ring: refused, the cache as it was
                op = "refused"
                with pytest.raises(dshal.ShapeError, match="the attention window's ring holds only the last"):
                    model(torch.tensor([[0]]), start, cache)
                assert cache.length == len(held)
        elif op == "stopped":
            hook = model.layers[walk.randrange(3)].register_forward_hook(fail)
            try:
                with pytest.raises(RuntimeError, match="stopped"):
                    model(torch.tensor([new]), len(held), cache)
            finally:
                hook.remove()
            assert cache.length in (0, len(held))  # 0: the step wrote over a wrapped ring's slots
            ops["ring reset"] += cache.length < len(held)
            del held[cache.length :]
        else:
            prompt = torch.tensor([held + new])
            fresh = model.generate(prompt, 2)
            cached = len(held) if cache.can_rewind_to(len(held)) else 0
            assert torch.equal(model.generate(prompt, 2, cache=cache, cached=cached), fresh)
            held[:] = fresh[0, :-1].tolist()
            assert cache.length == len(held)
        ops[op] += 1
    assert all(ops[op] for op in ("step", "rewind", "stopped", "generate"))
    assert (ops["refused"] > 0) == bool(window) == (ops["ring reset"] > 0)  # only a wrapped ring refuses, or resets


def test_model_describe_reports_dynamic_attention_saving():
    model = _model(attention_window=64, attention_global_tokens=16, max_position_embeddings=1024)
    kv = model.describe()["kv_cache"]
    assert kv["max_cached_tokens"] == 80 and kv["context"] == 1024
    assert kv["bytes_per_token_at_context"] == pytest.approx(kv["bytes_per_token"] * 80 / 1024)
    assert kv["bytes_saved_per_token"] == pytest.approx(kv["bytes_per_token"] - kv["bytes_per_token_at_context"])


@pytest.mark.parametrize(
    ("mode", "changes", "chunk"),
    [("absorb", {}, 5), ("naive", {}, 7), ("absorb", {"attention_window": 8, "attention_global_tokens": 2}, 12),
     ("naive", {"attention_window": 8, "attention_global_tokens": 2}, 3)],
)
def test_model_generate_prefills_a_long_prompt_in_chunks_with_the_same_result(mode, changes, chunk):
    """``prefill_chunk`` bounds each prefill forward to that many tokens (what ``dshal plan``
    plans the activation peak for); the tokens are those of one forward over the prompt,
    with and without an attention window shorter than a chunk."""
    from dshal.model.decode import generate_with_graphs

    model = _model(mla_mode=mode, **changes)
    ids = _ids(model.args.vocab_size, 23)
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[1]))
    try:
        chunked = model.generate(ids, 6, prefill_chunk=chunk)
    finally:
        hook.remove()
    prefill_lengths = seen[: -(-23 // chunk)]
    assert prefill_lengths == [min(chunk, 23 - s) for s in range(0, 23, chunk)] and seen[len(prefill_lengths):] == [1] * 5
    torch.testing.assert_close(chunked, model.generate(ids, 6, prefill_chunk=None), rtol=0, atol=0)
    if mode == "absorb" and not changes:  # the static (graph) decode path prefills the same way
        graphs, _ = generate_with_graphs(model, ids, 6, lambda fn: fn, prefill_chunk=chunk)
        torch.testing.assert_close(graphs, chunked, rtol=0, atol=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(dshal.ArgumentError, match=f"generate: argument 'prefill_chunk' is {bad!r}, expected None or an int >= 1"):
            model.generate(ids, 2, prefill_chunk=bad)


def test_model_generate_default_prefill_chunk_is_the_one_dshal_plan_plans():
    from dshal.model.generate import DEFAULT_PREFILL_CHUNK
    from dshal.plan.plan import PlanRequest, default_config, with_defaults

    assert with_defaults(PlanRequest(config=default_config())).prefill_chunk == DEFAULT_PREFILL_CHUNK == 2048


def test_model_generate_contract():
    model = _model()
    ids = _ids(model.args.vocab_size, 5)
    out = model.generate(ids, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], ids)
    # greedy = argmax of the cache-free forward at every step
    assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])
    assert torch.equal(model.generate(ids, 0), ids)
    seen, streamed = [], []
    model.generate(ids, 3, on_token=seen.append, stream=streamed.append)
    assert seen == [0, 1, 2] and torch.equal(torch.stack(streamed, dim=1), out[:, 5:8])  # each step's ids as they come
    eos = int(out[0, 5])
    stopped = model.generate(ids[:1], 7, eos_token_id=eos)
    assert stopped.shape == (1, 6) and int(stopped[0, -1]) == eos
    unused = next(i for i in range(model.args.vocab_size) if i not in out.tolist()[0])
    assert torch.equal(model.generate(ids[:1], 7, eos_token_id=[unused, eos]), stopped)  # several stop ids
    # an integer tensor, as transformers takes it (it was refused): 0-d and 1-D
    assert torch.equal(model.generate(ids[:1], 7, eos_token_id=torch.tensor(eos)), stopped)
    assert torch.equal(model.generate(ids[:1], 7, eos_token_id=torch.tensor([unused, eos])), stopped)
    assert model.generate(ids[:1], 7, eos_token_id=[unused]).shape == (1, 12)
    for bad in ([], [model.args.vocab_size], [eos, 1.5], (True,), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.int64)):
        with pytest.raises(dshal.ArgumentError, match="argument 'eos_token_id' is .*, expected None, a token id"):
            model.generate(ids[:1], 2, eos_token_id=bad)
    sampled = model.generate(ids, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    again = model.generate(ids, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again)
    # top_p = 1 is plain sampling; a nucleus too small for a second token is greedy
    whole = model.generate(ids, 4, temperature=1.0, generator=torch.Generator().manual_seed(0), top_p=1.0)
    assert torch.equal(whole, sampled)
    narrow = model.generate(ids, 7, temperature=5.0, generator=torch.Generator().manual_seed(0), top_p=1e-9)
    assert torch.equal(narrow, out)
    for bad in (0, 1.5, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(dshal.ArgumentError, match=r"argument 'top_p' is .*, expected a number in \(0, 1\]"):
            model.generate(ids, 2, temperature=1.0, top_p=bad)


def _right_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, list[int]]:
    width = max(map(len, prompts))
    return torch.tensor([p + [pad] * (width - len(p)) for p in prompts]), [len(p) for p in prompts]


WINDOW = {"attention_window": 6, "attention_global_tokens": 1}


@pytest.mark.parametrize(("mode", "changes"), [("absorb", {}), ("naive", {}), ("absorb", WINDOW)])
def test_model_generate_prompts_of_different_lengths_as_each_prompt_alone(mode, changes):
    """A batch of prompts of 3, 11 and 7 tokens (right-padded, ``prompt_lens``) gives each
    prompt the tokens it gets alone; the padding is never read (-1 or an id past the
    vocabulary change nothing). Without an attention window the shortest prompt's length is
    prefilled for all rows, each longer prompt's rest alone (batch-1 forwards), and the rows
    then decode together, each at its own position, one step per new token; the static (graph) decode path gives the same ids. With a window the
    longer prompts' rest is fed by one-token steps of the batch (DeepSeek-V3's scheme), and a
    shorter prompt steps on to the common end."""
    from dshal.model.decode import generate_with_graphs
    from dshal.model.generate import completions

    model = _model(mla_mode=mode, **changes)
    vocab = model.args.vocab_size
    prompts = [_ids(vocab, n, batch=1, seed=n)[0].tolist() for n in (3, 11, 7)]
    ids, lens = _right_padded(prompts, pad=-1)
    forwards: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: forwards.append(tuple(inputs[0].shape)))
    try:
        out = model.generate(ids, 6, prompt_lens=lens, prefill_chunk=4)
    finally:
        hook.remove()
    for row, prompt in zip(out.tolist(), prompts):
        assert row[: len(prompt)] == prompt  # the prompt, then its own continuation
    alone = [model.generate(torch.tensor([p]), 6)[0, len(p):].tolist() for p in prompts]
    assert completions(out, lens, 6) == alone
    past_vocab, _ = _right_padded(prompts, pad=vocab + 5)
    assert torch.equal(model.generate(past_vocab, 6, prompt_lens=lens), out)
    if changes:  # fed: one prefill of the shortest prompt, then 11 + 6 - 3 - 1 one-token steps of all rows
        assert forwards == [(3, 3)] + [(3, 1)] * 13
        assert model.generate(torch.tensor([prompts[0]]), 14)[0].tolist() == out[0].tolist()
        return
    # the shortest prompt's 3 tokens for all rows, then each longer prompt's rest alone in chunks
    # of 4 (8 = 4 + 4; 4); the decode steps are static (no model forward)
    assert forwards == [(3, 3), (1, 4), (1, 4), (1, 4)]
    assert out.shape == (3, 11 + 6) and out[0, 3 + 6 :].eq(0).all()  # padding after a row's new tokens
    graphs, _ = generate_with_graphs(model, ids, 6, lambda fn: fn, prompt_lens=lens)
    torch.testing.assert_close(graphs, out, rtol=0, atol=0)


@pytest.mark.parametrize("changes", [{}, WINDOW])
def test_model_generate_ragged_prompts_stop_per_row_and_never_inside_a_prompt(changes):
    """With ``eos_token_id``, a row stops at a stop id it generates, not at one inside its own
    prompt (prefilled, or fed one step at a time); ``completions`` cuts each row after its stop."""
    from dshal.model.generate import completions

    model = _model(**changes)
    vocab = model.args.vocab_size
    short = _ids(vocab, 2, batch=1, seed=1)[0].tolist()
    free = model.generate(torch.tensor([short]), 4)[0, 2:].tolist()
    eos = free[1]  # the short prompt's second new token
    long = _ids(vocab, 6, batch=1, seed=2)[0].tolist()
    long[4] = eos  # inside the long prompt: a prompt id, not a stop
    ids, lens = _right_padded([short, long], pad=0)
    out = model.generate(ids, 4, prompt_lens=lens, eos_token_id=eos)
    got = completions(out, lens, 4, eos_token_id=eos)
    assert got[0] == free[:2]  # stopped at its eos
    assert got[1] == completions(model.generate(torch.tensor([long]), 4, eos_token_id=eos), [6], 4, eos)[0]
    assert out[1, :6].tolist() == long
    if not changes:
        assert out[0, 4:].eq(eos).all()  # a stopped row is padded with the stop id


def test_model_generate_continues_in_a_cache_that_holds_the_prompts_start():
    """``cache=`` / ``cached=``: only the prompt's rest is prefilled (the forwards say so) and
    the tokens are those of a fresh generate; bad reuse is an ArgumentError naming why."""
    model = _model()
    ids = _ids(model.args.vocab_size, 9, batch=1)
    fresh = model.generate(ids, 5)
    cache = model.new_cache(1, 40)
    model.generate(ids[:, :4], 3, cache=cache)  # an earlier turn: holds ids[:, :4] and 2 new tokens
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].shape[1]))
    try:
        assert torch.equal(model.generate(ids, 5, cache=cache, cached=4), fresh)
    finally:
        hook.remove()
    assert seen == [5, 1, 1, 1, 1]  # the prompt's last 5 tokens, then 4 decode steps
    window = _model(attention_window=4, attention_global_tokens=1)
    bad = [
        (dict(cached=2), "argument 'cached' is 2, expected 0 without a 'cache'"),
        (dict(cache=cache, cached=9), r"argument 'cached' is 9, expected an int in \[0, 8\]"),
        (dict(cache=cache, cached=True), "argument 'cached' is True"),
        (dict(cache=model.new_cache(2, 40)), "argument 'cache' has batch 2, expected 1"),
        (dict(cache=model.new_cache(1, 10)), "argument 'cache' has max_len 10, expected at least 14"),
        (dict(cache=model.new_cache(1, 40), cached=3), "argument 'cached' is 3, expected at most the 0 positions"),
    ]
    for kwargs, said in bad:
        with pytest.raises(dshal.ArgumentError, match=said):
            model.generate(ids, 5, **kwargs)
    ring = window.new_cache(1, 40)
    window.generate(ids[:, :6], 2, cache=ring)  # the ring holds 7 positions now
    with pytest.raises(dshal.ArgumentError, match="0 or exactly them in a cache whose attention window's ring has wrapped"):
        window.generate(ids, 5, cache=ring, cached=4)
    ragged = torch.cat((ids, ids))
    with pytest.raises(dshal.ArgumentError, match="'cache' is given with prompts of different lengths"):
        model.generate(ragged, 2, prompt_lens=[9, 5], cache=model.new_cache(2, 40))


@pytest.mark.parametrize("window", [{}, {"attention_window": 4, "attention_global_tokens": 1}])
def test_model_step_stopped_midway_leaves_the_cache_without_it(window):
    """Ctrl-C (or an error) inside a forward, after some layers wrote the step and before
    the others did: the cache must not claim the step's positions, so a later
    ``generate(cache=, cached=cache.length)`` (a notebook cell run again) gets a fresh run's
    tokens, and a continuation past what it holds is refused."""
    model = _model(**window)
    ids = _ids(model.args.vocab_size, 9, batch=1)
    fresh = model.generate(ids, 3)
    cache = model.new_cache(1, 40)
    model(ids[:, :6], 0, cache)

    def interrupt(*_):
        raise KeyboardInterrupt

    hook = model.layers[1].register_forward_hook(interrupt)  # layer 0 writes position 6, layers 1-2 never do
    try:
        with pytest.raises(KeyboardInterrupt):
            model(ids[:, 6:7], 6, cache)
    finally:
        hook.remove()
    wrapped = bool(window)  # the ring (1 + 4 slots) had wrapped: position 6 went over an older one's slot
    assert cache.length == (0 if wrapped else 6)
    assert f": {cache.length} of 40 positions held" in repr(cache)  # what a notebook shows of the cache
    if wrapped:
        with pytest.raises(dshal.ShapeError, match="start_pos is 6, expected at most 0"):
            model(ids[:, 6:7], 6, cache)
    assert torch.equal(model.generate(ids, 3, cache=cache, cached=cache.length), fresh)


def test_model_generate_refuses_bad_prompt_lens():
    model = _model()
    ids = _ids(model.args.vocab_size, 5)
    for bad in ([5], [0, 5], [5, 6], [5, 2.0], [True, 5], 5, "55"):
        with pytest.raises(dshal.ArgumentError, match=r"argument 'prompt_lens' is .*, expected None or 2 ints in \[1, 5\]"):
            model.generate(ids, 2, prompt_lens=bad)
    assert torch.equal(model.generate(ids, 2, prompt_lens=torch.tensor([5, 5])), model.generate(ids, 2))


def test_top_p_samples_only_the_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.6 keeps the first two (0.5 alone does not
    reach it), top_p 0.5 only the first; both kept tokens are drawn."""
    from dshal.model.sampling import TokenChooser

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(400, 4)
    gen = torch.Generator().manual_seed(3)
    assert set(TokenChooser(1.0, 0.6, gen)(logits).tolist()) == {0, 1}
    assert set(TokenChooser(1.0, 0.5, gen)(logits).tolist()) == {0}
    assert set(TokenChooser(1.0, 1.0, gen)(logits).tolist()) == {0, 1, 2, 3}


def _kept(probs: torch.Tensor) -> set[int]:
    return set(probs.nonzero().flatten().tolist())


def test_top_k_keeps_the_k_most_likely_and_ties_at_the_kth():
    """Probabilities 0.4, 0.2, 0.2, 0.1, 0.1: top_k 2 keeps the tie at the second place too
    (as transformers' TopKLogitsWarper), renormalized over what it keeps; 0 or >= V cuts nothing."""
    from dshal.model.sampling import sampling_probs

    probs = torch.tensor([0.4, 0.2, 0.2, 0.1, 0.1])
    logits = probs.log()
    assert _kept(sampling_probs(logits, 1.0, top_k=1)) == {0}
    assert _kept(sampling_probs(logits, 1.0, top_k=2)) == _kept(sampling_probs(logits, 1.0, top_k=3)) == {0, 1, 2}
    assert _kept(sampling_probs(logits, 1.0, top_k=4)) == {0, 1, 2, 3, 4}
    kept = sampling_probs(logits, 1.0, top_k=3)
    assert torch.allclose(kept / kept.sum(), torch.tensor([0.5, 0.25, 0.25, 0.0, 0.0]))
    for no_cut in (0, 5, 1000):
        assert torch.allclose(sampling_probs(logits, 1.0, top_k=no_cut), probs)
    # on the scaled logits: a temperature changes the probabilities, not which k are kept
    assert _kept(sampling_probs(logits, 7.0, top_k=1)) == {0}


def test_top_p_after_top_k_sees_the_renormalized_distribution():
    """Probabilities 0.3, 0.25, 0.2, 0.15, 0.1. top_k 2 leaves 0.545, 0.455: top_p 0.5 then
    keeps the first alone (top-p on the mass before the cut, 0.3 < 0.5, would keep two, and so
    would top-p before top-k)."""
    from dshal.model.sampling import sampling_probs

    logits = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]).log()
    assert _kept(sampling_probs(logits, 1.0, top_p=0.5)) == {0, 1}
    assert _kept(sampling_probs(logits, 1.0, top_p=0.5, top_k=2)) == {0}
    assert _kept(sampling_probs(logits, 1.0, top_p=0.6, top_k=2)) == {0, 1}


def test_min_p_drops_the_tokens_far_less_likely_than_the_most_likely():
    """Probabilities 0.5, 0.3, 0.1, 0.06, 0.04: min_p 0.25 keeps those >= 0.125 (two), 0.1 those
    >= 0.05 (four), 1 the most likely alone. All cuts at once: top_k 4, then top_p 0.85 (of the
    four renormalized, drops the fourth), then min_p 0.25 (drops the third)."""
    from dshal.model.sampling import sampling_probs

    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    assert _kept(sampling_probs(logits, 1.0, min_p=0.25)) == {0, 1}
    assert _kept(sampling_probs(logits, 1.0, min_p=0.1)) == {0, 1, 2, 3}
    assert _kept(sampling_probs(logits, 1.0, min_p=1.0)) == {0}
    assert torch.allclose(sampling_probs(logits, 1.0, min_p=0.0), torch.softmax(logits, -1))
    assert _kept(sampling_probs(logits, 1.0, top_p=0.85, top_k=4)) == {0, 1, 2}
    both = sampling_probs(logits, 1.0, top_p=0.85, top_k=4, min_p=0.25)
    assert torch.allclose(both / both.sum(), torch.tensor([0.625, 0.375, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "temperature, top_p, top_k, min_p",
    [(1.0, 1.0, 20, 0.0), (0.7, 0.9, 50, 0.0), (1.3, 0.8, 0, 0.05), (0.6, 0.95, 20, 0.1), (1.0, 0.5, 5, 0.3),
     (2.0, 1.0, 0, 0.2), (1.0, 0.99, 150, 0.01)],
)
def test_sampling_cuts_match_transformers_warpers(temperature, top_p, top_k, min_p):
    """The same tokens kept, with the same renormalized probabilities, as transformers'
    temperature, top-k, top-p and min-p warpers applied in its order, then softmax."""
    warpers = pytest.importorskip("transformers.generation.logits_process")
    from dshal.model.sampling import sampling_probs

    logits = torch.randn(8, 200, generator=torch.Generator().manual_seed(top_k)) * 2
    scores = warpers.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = warpers.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = warpers.TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = warpers.MinPLogitsWarper(min_p)(None, scores)
    want = torch.softmax(scores, dim=-1)
    got = sampling_probs(logits, temperature, top_p, top_k, min_p)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got / got.sum(-1, keepdim=True), want, atol=1e-6)
    assert 1 < int((want > 0).sum(-1).max()) < 200  # the case cuts something, not everything


def test_top_p_keeps_the_tokens_transformers_keeps_among_ties_at_the_boundary():
    """Same kept count, another subset: of tokens tied at the top-p boundary dshal kept the
    lowest ids, transformers' TopPLogitsWarper (and vLLM) the highest. bf16 logits over a 129k
    vocabulary tie at the boundary in most rows."""
    from dshal.model.sampling import sampling_probs

    assert (sampling_probs(torch.zeros(1, 5), 1.0, 0.3) > 0).tolist() == [[False, False, False, True, True]]
    kept = sampling_probs(torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0]]), 1.0, 0.7) > 0
    assert kept.nonzero()[:, 1].tolist() == [0, 2, 3]
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, -1.0], [0.0] * 6])
    for top_p in (0.3, 0.5, 0.7, 0.9):
        want = torch.softmax(warpers.TopPLogitsWarper(top_p)(None, logits.clone()), dim=-1)
        assert torch.equal(sampling_probs(logits, 1.0, top_p) > 0, want > 0), top_p


def test_sampling_cuts_read_nothing_on_the_host():
    """A captured decode step chooses its token outside the graph every step: the cuts must not
    sync (no ``.item()``, no data-dependent shapes)."""
    from dshal.model.sampling import sampling_probs
    from dshal.perf.syncs import HostSyncCounter

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as syncs:
        sampling_probs(logits, 0.7, 0.9, 5, 0.1)
        sampling_probs(logits, 1e-30, 0.9, 5, 0.1)
    assert syncs.count == 0, syncs.where


def test_token_chooser_draws_from_the_cut_distribution():
    """Probabilities 0.4, 0.3, 0.2, 0.1: top_k 2 draws the first two as 4 : 3, min_p 0.4 the
    first three as 4 : 3 : 2; the positional arguments stay (temperature, top_p, generator)."""
    from dshal.model.sampling import TokenChooser

    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(5)
    counts = torch.bincount(TokenChooser(1.0, 1.0, gen, top_k=2)(logits), minlength=4) / 4000
    assert counts[2:].sum() == 0 and abs(float(counts[0]) - 4 / 7) < 0.03
    counts = torch.bincount(TokenChooser(1.0, 1.0, gen, min_p=0.4)(logits), minlength=4) / 4000
    assert counts[3] == 0 and abs(float(counts[0]) - 4 / 9) < 0.03 and abs(float(counts[2]) - 2 / 9) < 0.03
    assert set(TokenChooser(1.0, 0.5, gen, top_k=3)(logits).tolist()) == {0, 1}  # 0.4 / 0.9 < 0.5: two


def test_model_generate_samples_among_the_top_k():
    """``generate(..., top_k=1)`` is greedy at any temperature; with top_k 3 every sampled token
    is among its step's 3 most likely (recomputed with the cache-free forward), where plain
    sampling at that temperature leaves them; bad top_k / min_p are refused by name."""
    model = _model()
    ids = _ids(model.args.vocab_size, 5)
    greedy = model.generate(ids, 7)
    assert torch.equal(model.generate(ids, 7, temperature=5.0, generator=torch.Generator().manual_seed(0), top_k=1), greedy)

    def ranks(out: torch.Tensor) -> torch.Tensor:
        """Each new token's rank among its step's logits (0: the most likely)."""
        logits = model(out[:, :-1])[:, 4:].float()
        chosen = logits.gather(-1, out[:, 5:, None])
        return (logits > chosen + 1e-4).sum(-1)

    top3 = model.generate(ids, 12, temperature=3.0, generator=torch.Generator().manual_seed(1), top_k=3)
    assert int(ranks(top3).max()) < 3
    plain = model.generate(ids, 12, temperature=3.0, generator=torch.Generator().manual_seed(1))
    assert int(ranks(plain).max()) >= 3
    for name, bad, expected in (("top_k", -1, r"an int >= 0"), ("top_k", 2.0, r"an int >= 0"), ("top_k", True, "an int >= 0"),
                                ("min_p", -0.1, r"a number in \[0, 1\]"), ("min_p", 1.5, r"a number in \[0, 1\]"),
                                ("min_p", float("nan"), r"a number in \[0, 1\]"), ("min_p", True, r"a number in \[0, 1\]"),
                                ("min_p", "0.1", r"a number in \[0, 1\]")):
        with pytest.raises(dshal.ArgumentError, match=f"generate: argument '{name}' is .*, expected {expected}"):
            model.generate(ids, 2, temperature=1.0, **{name: bad})


def test_model_generate_warns_that_cuts_are_moot_when_greedy():
    """top_p / top_k / min_p at temperature 0 were ignored in silence by the Python API (``dshal
    run`` refuses the flags; HF's generate warns); the tokens stay greedy's."""
    import warnings

    model = _model()
    ids = _ids(model.args.vocab_size, 5)
    with pytest.warns(UserWarning, match=r"generate: top_p=0.1, top_k=5 with temperature 0 \(greedy\) has no effect") as said:
        out = model.generate(ids, 3, top_p=0.1, top_k=5)
    # At the caller's line, not torch's inference_mode wrapper (which also merged every call site into one).
    assert [w.filename for w in said] == [__file__]
    assert torch.equal(out, model.generate(ids, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, 2)  # no cut: no warning
        model.generate(ids, 2, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))


def test_model_bad_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(dshal.DTypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(dshal.ShapeError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(dshal.ShapeError, match="max_position_embeddings"):
        model(torch.zeros(1, 2, dtype=torch.int64), start_pos=model.args.max_position_embeddings - 1)
    cache = model.new_cache(1, 4)
    with pytest.raises(dshal.ShapeError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.int64), 0, cache)
    with pytest.raises(dshal.ShapeError, match="start_pos is 3"):
        model(torch.zeros(1, 1, dtype=torch.int64), 3, cache)
    with pytest.raises(dshal.DshalError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.int64), -1)


def test_model_decode_checks_the_op_inputs_of_a_caches_first_step_only():
    """A prefill and the first one-token step of a cache run the ops' input checks; later
    decode steps repeat those calls inside ``ops.trusted()``."""
    from dshal.runtime import op_hook

    other = _model(seed=1)  # same shapes, other weights
    model = _model()
    ids = _ids(model.args.vocab_size, 6, batch=1)
    checked_fns = set(dshal.current().table.values())
    steps: list[set[bool]] = []  # per forward: were its op calls checked?

    def tagging(name, fn):
        def call(*args, **kwargs):
            steps[-1].add(fn in checked_fns)
            return fn(*args, **kwargs)

        return call

    def forward(*args, by=model):
        steps.append(set())
        return by(*args)

    with op_hook(tagging):
        cache = model.new_cache(1, 8)
        forward(ids[:, :4], 0, cache)
        assert not cache.decode_checked_for(model)
        # A broken weight is caught by the first decode step's checks, with a clear error.
        good = model.norm.weight
        model.norm.weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        with pytest.raises(dshal.ShapeError, match="rms_norm: argument 'weight' has size 3"):
            forward(ids[:, 4:5], 4, cache)
        model.norm.weight = good
        assert not cache.decode_checked_for(model)
        forward(ids[:, 4:5], 4, cache)
        assert cache.decode_checked_for(model)
        forward(ids[:, 5:6], 5, cache)
        with pytest.raises(dshal.ShapeError, match="made by another model's new_cache"):
            forward(ids[:, 1:2], 6, cache, by=other)  # another model's keys are not this one's: refused
        forward(ids[:, :1], 0, model.new_cache(1, 8))  # a new cache is checked again
        forward(ids[:, 1:2], 1, None)  # and so is a forward without a cache
    assert steps == [{True}, {True}, {True}, {False}, set(), {True}, {True}]


def test_model_token_ids_outside_the_vocabulary_raise_a_clear_error():
    model = _model()
    vocab = model.args.vocab_size
    for bad, shown in ((vocab, vocab), (-1, -1)):
        ids = torch.tensor([[1, bad, 2]])
        with pytest.raises(dshal.ShapeError, match=rf"input_ids' holds token id {shown}, expected ids in \[0, {vocab}\)"):
            model(ids)
        with pytest.raises(dshal.ShapeError, match=f"token id {shown}"):
            model.generate(ids, 2)
        cache = model.new_cache(1, 8)
        model(torch.tensor([[1, 2]]), 0, cache)
        with pytest.raises(dshal.ShapeError, match=f"token id {shown}"):  # a cache's first decode step
            model(ids[:, 1:2], 2, cache)


def test_model_cache_refuses_another_batch_size():
    """The cache's batch is fixed: a step with another batch size is an input error, caught
    before any op runs (a decode step's op checks may be skipped)."""
    model = _model()
    ids = _ids(model.args.vocab_size, 4, batch=2)
    cache = model.new_cache(2, 8)
    model(ids, 0, cache)
    model(ids[:, :1], 4, cache)  # the first decode step: checked
    with pytest.raises(dshal.ShapeError, match="the input has 1 sequences, expected 2"):
        model(ids[:1, 1:2], 5, cache)
    with pytest.raises(dshal.ShapeError, match="the input has 3 sequences, expected 2"):
        model(torch.cat([ids, ids[:1]])[:, 1:2], 5, cache)


def test_model_input_ids_on_another_device_raise_device_error():
    model = _model()
    ids = torch.zeros(1, 3, dtype=torch.int64, device="meta")  # any device but the model's
    with pytest.raises(dshal.DeviceError, match="argument 'input_ids' is on meta, expected cpu"):
        model(ids)


def test_model_cache_is_freed_at_once_and_holds_its_model_weakly():
    """A dropped cache frees its buffers without waiting for the garbage collector (no
    reference cycle), and a cache never keeps the model that used it alive (a model holds
    its process groups: kept until interpreter exit, they made gloo abort)."""
    import gc
    import weakref

    model = _model()
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2, 3]]), 0, cache)
    model(torch.tensor([[4]]), 3, cache)
    assert cache.decode_checked_for(model)
    assert model not in gc.get_referents(*gc.get_referents(cache))  # nothing in it points at the model
    cache_ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert cache_ref() is None
    finally:
        gc.enable()


def test_sampling_at_extreme_temperature_and_top_p_stays_a_distribution():
    """A tiny positive temperature or top_p passes the checks and must sample, not crash:
    `logits / 1e-300` was inf - inf = NaN in softmax, and a top_p that rounds to 0 in float32
    masked every token ("probability tensor contains either inf, nan or element < 0"). In the
    limit both are the most likely token; a temperature past float's range is an ArgumentError."""
    from dshal.errors import ArgumentError
    from dshal.model.sampling import TokenChooser, sampling_probs

    logits = torch.tensor([[3.0, 1.0, 2.5, -1.0], [0.0, 0.0, 5.0, 1.0]]) * 40
    for temperature, top_p in ((1e-300, 1.0), (1e-30, 1.0), (1.0, 1e-300), (1e-300, 1e-300)):
        probs = sampling_probs(logits, temperature, top_p)
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert torch.equal(probs.argmax(-1), logits.argmax(-1))
        gen = torch.Generator().manual_seed(0)
        assert torch.equal(TokenChooser(temperature, top_p, gen)(logits), logits.argmax(-1))
    # ordinary temperatures: the plain softmax(logits / T), unchanged
    assert torch.equal(sampling_probs(logits, 0.7), torch.softmax(logits / 0.7, dim=-1))
    model = build_model(tiny_args(), DictReader(random_checkpoint(tiny_args())))
    with pytest.raises(ArgumentError, match="argument 'temperature' is 1000.*expected a finite number >= 0"):
        model.generate(torch.tensor([[1, 2]]), 2, 10**400)


def test_completions_refuses_lengths_that_do_not_match_the_rows() -> None:
    from dshal.errors import ArgumentError, ShapeError
    from dshal.model.generate import completions

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert completions(ids, [2, 1], 2) == [[3, 4], [6, 7]]
    assert completions(ids, torch.tensor([2, 1]), 2) == [[3, 4], [6, 7]]
    with pytest.raises(ShapeError, match=r"'prompt_lens' has 1 entries, expected 2"):
        completions(ids, [2], 2)  # zip() used to drop the second row
    with pytest.raises(ShapeError, match=r"'prompt_lens' has 3 entries, expected 2"):
        completions(ids, [2, 1, 1], 2)
    with pytest.raises(ArgumentError, match=r"'prompt_lens' holds 5, expected ints in \[0, 4\]"):
        completions(ids, [2, 5], 2)
    with pytest.raises(ArgumentError, match=r"'max_new_tokens' is -1"):
        completions(ids, [2, 1], -1)
    with pytest.raises(ShapeError, match=r"'ids' is shape \(4,\), expected a \[batch, length\] tensor"):
        completions(ids[0], [2], 2)


def test_kv_cache_refuses_what_its_static_steps_cannot_do():
    """Spare key-bias columns exist only in the absorb layout without a window; a static step
    (begin_at) needs a slot per position; a layer kept past its cache says what to keep."""
    with pytest.raises(dshal.DshalError, match=r"KVCache: bias_columns need the 'absorb' layout without an attention window"):
        KVCache(1, 1, 8, [(4,), (4,)], "naive", torch.float32, "cpu", bias_columns=8)
    with pytest.raises(dshal.DshalError, match=r"KVCache: bias_columns need the 'absorb' layout without an attention window"):
        KVCache(1, 1, 8, [(4,)], "absorb", torch.float32, "cpu", window=4, bias_columns=8)
    windowed = random_model(tiny_args(attention_window=4), seed=0).new_cache(1, 16)
    with pytest.raises(dshal.DshalError, match="KVCache.begin_at: static decode steps need a cache without an attention window"):
        windowed.begin_at(torch.tensor([3]))
    layer = random_model(tiny_args(), seed=0).new_cache(1, 8).layers[1]  # the cache itself is dropped at once
    with pytest.raises(dshal.DshalError, match=r"LayerCache 1: its KVCache no longer exists \(keep the KVCache, not only a layer\)"):
        layer.cache  # noqa: B018 - the property raises
