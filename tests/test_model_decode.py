"""Static decode steps (what a CUDA/HIP graph captures) and host syncs in decode steps.

No GPU here: the static step runs eagerly on the cpu backend and on the emulated nvidia
plugin (its own Triton kernels in the interpreter). Host syncs are counted with
:class:`dshal.perf.syncs.HostSyncCounter` (value reads, data-dependent shapes, host
copies), which shows on CPU tensors what would make a GPU's host wait.
"""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal.config import PrecisionConfig
from dshal.errors import ArgumentError, ShapeError
from dshal.model import random_model, tiny_args
from dshal.model.decode import StaticDecoder, generate_rows, generate_with_graphs, positioned_step
from dshal.perf.syncs import HostSyncCounter


def _ids(args, batch=2, length=5):
    return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def _eager(backend: str):
    return lambda fn: fn  # no device graphs here: the static step runs as the graph would replay it


def test_host_sync_counter_sees_value_reads_and_dynamic_shapes():
    t = torch.arange(6)
    with torch.inference_mode(), HostSyncCounter() as syncs:
        int(t[1]), t.sum().item(), bool(t.any()), t.tolist(), t.nonzero(), t[t > 2]
        t[1:3], t + 1, t.index_select(0, torch.tensor([1]))  # none of these sync
    assert syncs.by_op == {
        "Tensor.__int__": 1, "Tensor.item": 1, "Tensor.__bool__": 1, "Tensor.tolist": 1,
        "aten::nonzero": 1, "boolean-mask indexing": 1,
    }
    with torch.inference_mode(), HostSyncCounter(dispatch=False) as reads:  # value reads only
        int(t[1]), t.tolist(), t.nonzero()
    assert reads.by_op == {"Tensor.__int__": 1, "Tensor.tolist": 1}


def test_static_decode_matches_the_model_decode():
    """The static step (position as a tensor, whole-cache attention with a key mask) gives
    the model's own decode logits, and greedy generation through it the same tokens."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    ids = _ids(model.args)
    want = model.generate(ids, 6)
    got, decoder = generate_with_graphs(model, ids, 6, _eager("cpu"))
    assert torch.equal(got, want) and decoder is not None and not decoder.captured

    cache, static_cache = model.new_cache(2, 12, "absorb"), model.new_cache(2, 12, "absorb")
    model(ids, 0, cache), model(ids, 0, static_cache)
    decoder = StaticDecoder(model, static_cache, _eager("cpu"))
    for pos, token in ((5, torch.tensor([7, 9])), (6, torch.tensor([1, 500]))):
        want_logits = model(token[:, None], pos, cache, last_only=True)[:, -1]
        got_logits = decoder(token, pos).clone()
        assert (got_logits - want_logits).abs().max().item() <= 1e-5 * want_logits.abs().max().item()


def test_static_decode_samples_outside_the_graph():
    """Sampled generation through the static step: the graph hook gets the forward only and the
    token is drawn after it, from the generator, each step. The draws are then the eager
    ``generate``'s with the same seed (one [B, V] draw a step on the same logits), for one
    length and for prompts of different lengths, with top-k and min-p cuts too; a one-token
    nucleus or top_k 1 is greedy."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    ids = _ids(model.args)
    hooked = []

    def stand_in(step):  # records what it is asked to capture; not a device graph
        hooked.append(step)
        return step

    for lens in (None, [ids.shape[1], 3]):
        want = model.generate(ids, 8, 1.5, prompt_lens=lens, generator=torch.Generator().manual_seed(3))
        got, decoder = generate_with_graphs(model, ids, 8, stand_in, prompt_lens=lens, temperature=1.5,
                                            generator=torch.Generator().manual_seed(3))
        assert torch.equal(got, want) and not torch.equal(got, model.generate(ids, 8, prompt_lens=lens))
    assert len(hooked) == 2  # one static step per generation, its logits out of the graph
    nucleus, _ = generate_with_graphs(model, ids, 8, stand_in, temperature=1.5, top_p=1e-9)
    assert torch.equal(nucleus, model.generate(ids, 8))
    # top_k and min_p reach the chooser: the eager draws with the same cuts, greedy at top_k 1
    cuts = dict(temperature=1.5, top_p=0.9, top_k=4, min_p=0.05)
    want = model.generate(ids, 8, generator=torch.Generator().manual_seed(4), **cuts)
    got, _ = generate_with_graphs(model, ids, 8, stand_in, generator=torch.Generator().manual_seed(4), **cuts)
    assert torch.equal(got, want)
    assert not torch.equal(want, model.generate(ids, 8, 1.5, top_p=0.9, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(generate_with_graphs(model, ids, 8, stand_in, temperature=1.5, top_k=1)[0], model.generate(ids, 8))
    with pytest.raises(ArgumentError, match="generate_with_graphs: argument 'temperature' is -1, expected a finite number >= 0"):
        generate_with_graphs(model, ids, 8, stand_in, temperature=-1)
    with pytest.raises(ArgumentError, match=r"generate_with_graphs: argument 'top_p' is 0, expected a number in \(0, 1\]"):
        generate_with_graphs(model, ids, 8, stand_in, temperature=1.0, top_p=0)
    with pytest.raises(ArgumentError, match=r"generate_with_graphs: argument 'top_k' is -2, expected an int >= 0"):
        generate_with_graphs(model, ids, 8, stand_in, temperature=1.0, top_k=-2)
    with pytest.raises(ArgumentError, match=r"generate_with_graphs: argument 'min_p' is 2, expected a number in \[0, 1\]"):
        generate_with_graphs(model, ids, 8, stand_in, temperature=1.0, min_p=2)


def test_generate_through_a_static_decoder_kept_with_its_cache():
    """``generate(..., cache=, decoder=)``: the decode steps through a StaticDecoder on the
    caller's cache give plain generate's tokens, leave the cache as plain generate does (every
    token but the last), and the same decoder serves the next call that reuses the cache; a
    decoder on another cache, with ragged prompts or one per row is refused."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    ids = _ids(model.args)
    cache = model.new_cache(2, 24, "absorb")
    decoder = StaticDecoder(model, cache, lambda fn: fn)
    first = model.generate(ids, 6, cache=cache, decoder=decoder)
    assert torch.equal(first, model.generate(ids, 6)) and cache.length == first.shape[1] - 1
    follow = torch.cat((first, _ids(model.args)[:, :3]), dim=1)  # the next turn: the cache holds all but 4 ids
    again = model.generate(follow, 5, cache=cache, cached=first.shape[1] - 1, decoder=decoder)
    assert torch.equal(again, model.generate(follow, 5))
    other = model.new_cache(2, 24, "absorb")
    with pytest.raises(ArgumentError, match="'decoder' is built on another KV cache than argument 'cache'"):
        model.generate(ids, 3, cache=other, decoder=decoder)
    with pytest.raises(ArgumentError, match="'cache' is given with prompts of different lengths"):
        model.generate(ids, 3, cache=cache, decoder=decoder, prompt_lens=[5, 3])
    with pytest.raises(ArgumentError, match="expected a StaticDecoder"):
        model.generate(ids, 3, cache=cache, decoder=StaticDecoder(model, cache, lambda fn: fn, per_row=True))
    with pytest.raises(ArgumentError, match="StaticDecoder: argument 'cache' has the 'naive' layout, expected 'absorb'"):
        StaticDecoder(model, model.new_cache(2, 24, "naive"), lambda fn: fn)


def _emulated_nvidia():
    if not any(info.name == "nvidia" for info in dshal.backends()):
        pytest.skip("the dshal-nvidia plugin is not installed")
    runtime = dshal.use(backend="nvidia", emulate=True)
    assert runtime.emulated
    return runtime


def _decoder_after_first_step(model):
    ids = _ids(model.args, batch=1)
    cache = model.new_cache(1, 10, "absorb")
    model(ids, 0, cache)
    decoder = StaticDecoder(model, cache, _eager("nvidia"))
    decoder(torch.tensor([3]), 5)  # the checked first step (host-side id checks) runs once
    return decoder


@pytest.mark.needs_interpreter
def test_decode_step_with_device_side_checks_does_no_host_sync():
    """Issue #18 item 2.9: the step a graph captures, with its id checks on (device-side),
    reads nothing on the host, on the emulated nvidia plugin's own ops. Dense layers only:
    the MoE layer is the next test."""
    _emulated_nvidia()
    args = tiny_args(first_k_dense_replace=3)  # every layer dense
    model = random_model(args, seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    decoder = _decoder_after_first_step(model)
    with HostSyncCounter() as syncs:
        decoder(torch.tensor([4]), 6)
    assert syncs.count == 0, syncs.where
    # The eager decode path too, once its first (checked) step has run, on an id generate()
    # made (vouched for): trusted, no host sync. An id the caller made is range-checked on
    # the host (issue #16: a typed error, not a device assert), so that step does sync.
    cache = model.new_cache(1, 10)
    model(_ids(model.args, batch=1), 0, cache)
    model(torch.tensor([[3]]), 5, cache)
    own = torch.tensor([[4]])
    cache.vouch_for(own)
    with HostSyncCounter() as syncs:
        model(own, 6, cache)
    assert syncs.count == 0, syncs.where
    with HostSyncCounter() as syncs:
        model(torch.tensor([[5]]), 7, cache)
    assert syncs.count > 0 and all("check_ids_in_range" in where for where in syncs.where), syncs.where


@pytest.mark.needs_interpreter
def test_decode_step_with_moe_layers_does_no_host_sync():
    """With MoE layers too: FP8 routed experts run the grouped Triton kernel (issue #18 item
    2.7), whose expert-id check is a device-side assertion inside a trusted step, and whose
    tile table is sized on the host from shapes only: the static step reads nothing."""
    _emulated_nvidia()
    model = random_model(tiny_args(), seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    decoder = _decoder_after_first_step(model)
    with HostSyncCounter(keep_stacks=100) as syncs:
        decoder(torch.tensor([4]), 6)
    assert syncs.count == 0, syncs.where


@pytest.mark.needs_interpreter
def test_deepseek_v32_decode_steps_attend_sparsely_with_no_host_sync(kernel_checks):
    """DeepSeek-V3.2 past index_topk (3 kept of 6 and more): the static step and a trusted eager
    step select with the plugin's indexer_topk kernel and attend with its sparse MLA kernel,
    whose indices' range check is a device-side assertion there: nothing read on the host."""
    runtime = _emulated_nvidia()
    assert {op: runtime.provider_kind(op) for op in ("indexer_topk", "sparse_mla_attention")} == {
        "indexer_topk": "triton", "sparse_mla_attention": "triton"}
    args = tiny_args(num_hidden_layers=1, first_k_dense_replace=1, index_n_heads=4, index_head_dim=32, index_topk=3)
    model = random_model(args, seed=0)
    decoder = _decoder_after_first_step(model)
    kernel_checks.clear()
    with HostSyncCounter() as syncs:
        decoder(torch.tensor([4]), 6)
    assert syncs.count == 0, syncs.where
    assert not kernel_checks, dict(kernel_checks)  # trusted: no wrapper input checks either
    cache = model.new_cache(1, 10)
    model(_ids(model.args, batch=1), 0, cache)
    model(torch.tensor([[3]]), 5, cache)
    own = torch.tensor([[4]])
    cache.vouch_for(own)
    with HostSyncCounter() as syncs:
        model(own, 6, cache)
    assert syncs.count == 0, syncs.where


@pytest.mark.needs_interpreter
def test_trusted_decode_step_runs_no_kernel_wrapper_checks(kernel_checks):
    """Inside dshal.ops.trusted() the Triton kernel wrappers skip their Python input checks,
    as the ops do (each check call cost ~0.3 µs, ~160 of them per step of this 3-layer FP8
    model): the checked first step runs them, the trusted steps after it (static and eager)
    none. The expert ids' range check stays (a device-side assert there)."""
    _emulated_nvidia()
    model = random_model(tiny_args(), seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    cache = model.new_cache(1, 10, "absorb")
    model(_ids(model.args, batch=1), 0, cache)
    decoder = StaticDecoder(model, cache, _eager("nvidia"))
    kernel_checks.clear()
    decoder(torch.tensor([3]), 5)  # the checked first step
    assert {"norm.check_tensor", "quant.check_tensor", "gemm.check_dim", "rotary.check_tensor",
            "activation._check_gated", "moe.check_tensor", "KernelTarget.check_fp8_dtype"} <= set(kernel_checks)
    kernel_checks.clear()
    decoder(torch.tensor([4]), 6)
    assert not kernel_checks, dict(kernel_checks)

    eager = model.new_cache(1, 10)
    model(_ids(model.args, batch=1), 0, eager)
    model(torch.tensor([[3]]), 5, eager)
    own = torch.tensor([[4]])
    eager.vouch_for(own)
    kernel_checks.clear()
    model(own, 6, eager)  # trusted eager step
    assert not kernel_checks, dict(kernel_checks)


def test_decode_id_checks_checked_on_host_trusted_on_device():
    """A bad token id: ShapeError in the checked first step, a device-side assertion (here a
    RuntimeError from torch._assert_async, no host read) inside the captured step."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=0)
    cache = model.new_cache(1, 10, "absorb")
    model(_ids(model.args, batch=1), 0, cache)
    decoder = StaticDecoder(model, cache, _eager("cpu"))
    with pytest.raises(ShapeError, match="token id 9999"):
        decoder(torch.tensor([9999]), 5)
    decoder(torch.tensor([3]), 5)
    with pytest.raises(RuntimeError, match=r"outside \[0, 512\)"):
        decoder(torch.tensor([9999]), 6)


def test_failed_capture_falls_back_to_the_eager_static_step():
    """A graph hook whose capture fails (as CUDA capture does on an op that reads the device
    on the host) leaves decoding correct, eager, with the reason recorded."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    ids = _ids(model.args)

    def failing_graph(fn):
        def capture(*args):
            raise RuntimeError("operation not permitted when stream is capturing")

        return capture

    got, decoder = generate_with_graphs(model, ids, 5, failing_graph)
    assert torch.equal(got, model.generate(ids, 5))
    assert not decoder.captured and "not permitted when stream is capturing" in decoder.capture_error


def _rows_decoder(model, prompts):
    """A per-row StaticDecoder over ``prompts``, each prefilled alone into its row."""
    cache = model.new_cache(len(prompts), 10, "absorb")
    for row, prompt in enumerate(prompts):
        row_cache = model.new_cache(1, prompt.shape[1], "absorb")
        model(prompt, 0, row_cache)
        for buffers, row_buffers in zip(cache.buffers, row_cache.buffers):
            buffers[0][row, : prompt.shape[1]] = row_buffers[0][0]
    return StaticDecoder(model, cache, _eager("cpu"), per_row=True), cache


def test_static_decode_with_each_row_at_its_own_position():
    """Rows at different positions in one static step (prompts of different lengths): each
    row's logits are those of that row decoded alone at its position."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    prompts = [_ids(model.args, batch=1, length=n) for n in (3, 6)]
    alone = []
    for prompt in prompts:  # each row's own cache and decode
        cache = model.new_cache(1, 10, "absorb")
        model(prompt, 0, cache)
        alone.append([model(torch.tensor([[t]]), prompt.shape[1] + i, cache, last_only=True)[0, -1]
                      for i, t in enumerate((7, 9))])
    decoder, cache = _rows_decoder(model, prompts)
    for i, t in enumerate((7, 9)):
        got = decoder(torch.tensor([t, t]), torch.tensor([3, 6]) + i)
        for row in range(2):
            want = alone[row][i]
            assert (got[row] - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    with pytest.raises(ShapeError, match=r"KVCache.begin_at: position has shape \[3\], expected \[1\], \[2\] or \[2, T\]"):
        cache.begin_at(torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match=r"position has shape \[3, 2\]"):
        cache.begin_at(torch.zeros(3, 2, dtype=torch.int64))


def test_positioned_step_runs_two_tokens_per_row_each_at_its_own_positions():
    """A token and the next (a speculative draft) per row, rows at different positions: each
    row's logits and hidden states are those of its two-token step alone."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(), seed=2)
    prompts = [_ids(model.args, batch=1, length=n) for n in (3, 6)]
    step = torch.tensor([[7, 9], [11, 5]])
    alone = []
    for row, prompt in enumerate(prompts):
        cache = model.new_cache(1, 10, "absorb")
        model(prompt, 0, cache)
        alone.append(model(step[row : row + 1], prompt.shape[1], cache, return_hidden=True))
    cache = model.new_cache(2, 10, "absorb")
    for row, prompt in enumerate(prompts):
        one = model.new_cache(1, prompt.shape[1], "absorb")
        model(prompt, 0, one)
        for batch_buf, row_buf in cache.buffer_pairs(one):
            batch_buf[row, : prompt.shape[1]] = row_buf[0]
    logits, hidden = positioned_step(model, step, torch.tensor([[3, 4], [6, 7]]), cache)
    for row, (want_logits, want_hidden) in enumerate(alone):
        torch.testing.assert_close(logits[row], want_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[row], want_hidden[0], atol=1e-5, rtol=1e-5)


@pytest.mark.needs_interpreter
def test_static_decode_with_rows_at_their_own_positions_does_no_host_sync():
    """The per-row step (per-row cache write, RoPE angle and key mask) reads nothing on the
    host after its checked first call, on the emulated nvidia plugin's own ops."""
    _emulated_nvidia()
    model = random_model(tiny_args(first_k_dense_replace=3), seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    decoder, _ = _rows_decoder(model, [_ids(model.args, batch=1, length=n) for n in (3, 6)])
    decoder(torch.tensor([3, 3]), torch.tensor([3, 6]))  # the checked first step
    with HostSyncCounter() as syncs:
        decoder(torch.tensor([4, 4]), torch.tensor([4, 7]))
    assert syncs.count == 0, syncs.where


@pytest.mark.needs_interpreter
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)])
def test_a_split_experts_decode_step_does_no_host_sync(tp: int, ep: int):
    """A tensor- or expert-parallel rank's FP8 experts (the emulated nvidia plugin's grouped
    Triton kernel) and its all-reduces read nothing on the host in a trusted step: the split
    experts' dispatch kept this rank's slots with ``torch.nonzero`` (a sync per MoE layer),
    and under EP read the all_to_all counts. The step also equals the same rank's step in
    checked mode."""
    from dshal.comm import SimulatedGroup
    from dshal.model.checkpoint import random_checkpoint
    from dshal.model.loader import DictReader
    from dshal.parallel.groups import ParallelGroups, plan_groups
    from dshal.parallel.loading import build_parallel

    _emulated_nvidia()
    args = tiny_args(first_k_dense_replace=1)
    groups = ParallelGroups(tp=SimulatedGroup(tp, tp - 1, "tp") if tp > 1 else None,
                            ep=SimulatedGroup(ep, ep - 1, "ep") if ep > 1 else None,
                            tp_size=tp, ep_size=ep, plan=plan_groups(tp * ep, tp, ep))
    model = build_parallel(args, DictReader(random_checkpoint(args, seed=3)), groups, precision=PrecisionConfig(gemm="fp8-block"))
    ids = _ids(args, batch=1)
    checked_cache, cache = model.new_cache(1, 16, "absorb"), model.new_cache(1, 16, "absorb")
    for c in (checked_cache, cache):
        model(ids, 0, c)
    n = ids.shape[1]
    for c in (checked_cache, cache):
        model(torch.tensor([[3]]), n, c)  # the checked first step of this length
    checked = model(torch.tensor([[4]]), n + 1, checked_cache)
    own = torch.tensor([[4]])
    cache.vouch_for(own)
    with HostSyncCounter() as syncs:
        trusted = model(own, n + 1, cache)
    assert syncs.count == 0, syncs.where
    assert torch.equal(trusted, checked)


def test_tensor_and_expert_parallel_experts_are_captured():
    """Split experts dispatch in fixed shapes (the other ranks' experts are NO_EXPERT slots
    the op skips; an EP group then sums its ranks' shares with an all-reduce), so their decode
    steps are captured as a whole model's are. Tensor-parallel ones dispatched with
    ``torch.nonzero`` (a host read per layer); expert-parallel ones sent each rank a
    data-dependent number of slots (all_to_all counts read on the host): neither was captured.
    A stand-in hook returning another callable (not a device graph) records who was asked."""
    from dshal.comm import SimulatedGroup
    from dshal.model.checkpoint import random_checkpoint
    from dshal.model.loader import DictReader
    from dshal.parallel.groups import ParallelGroups, plan_groups
    from dshal.parallel.loading import build_parallel
    from dshal.parallel.transforms import expert_parallel

    dshal.use(backend="cpu")
    args = tiny_args()
    groups = ParallelGroups(tp=SimulatedGroup(2, 0, "tp"), ep=None, tp_size=2, ep_size=1, plan=plan_groups(2, 2, 1))
    tensor_split = build_parallel(args, DictReader(random_checkpoint(args, seed=1)), groups)
    expert_split = expert_parallel(random_model(args, seed=1), SimulatedGroup(2, 0, "ep"))
    whole = random_model(args, seed=1)
    asked = []

    def capturing(step):  # as a CUDA hook: returns a new callable, which would capture on its first call
        asked.append(step)
        return lambda *inputs: step(*inputs)

    for model in (tensor_split, expert_split, whole):
        cache = model.new_cache(1, 16, "absorb", static=True)
        decoder = StaticDecoder(model, cache, capturing)
        ids = _ids(model.args, batch=1)
        logits = decoder(ids[:, 0], 0).clone()  # checked, eager
        again = decoder(ids[:, 1], 1)  # replayed
        assert decoder.captured and decoder.capture_error == ""
        assert torch.isfinite(logits).all() and torch.isfinite(again).all()
    assert len(asked) == 3  # the hook is still asked (it tells whether the backend captures at all)
    # A step past the slots a TP rank keeps fixed shapes for (a batch of 4097 at top-8) reads
    # the host: not captured either (it was declared capturable at any batch).
    from dshal.parallel.layers import ShardedExperts

    for model in (tensor_split, expert_split):
        for module in model.modules():
            if isinstance(module, ShardedExperts):
                module.FIXED_SHAPE_SLOTS = args.num_experts_per_tok - 1  # one token's slots are past it
        decoder = StaticDecoder(model, model.new_cache(1, 16, "absorb", static=True), capturing)
        decoder(_ids(args, batch=1)[:, 0], 0)
        decoder(_ids(args, batch=1)[:, 1], 1)
        assert not decoder.captured and "routes" in decoder.capture_error and "keeps fixed shapes for" in decoder.capture_error


@pytest.mark.needs_interpreter
def test_a_windowed_decode_step_past_the_ring_does_no_host_sync():
    """With an attention window the cache is a ring once positions pass global + window: the
    step's surviving tokens were picked with a boolean mask (``pos[keep]``, ``t[:, keep]``), a
    host read per step and per layer. They are index ranges worked out from the positions now."""
    _emulated_nvidia()
    args = tiny_args(first_k_dense_replace=3, attention_window=4, attention_global_tokens=2)
    model = random_model(args, seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    reference = random_model(args, seed=0, precision=PrecisionConfig(gemm="fp8-block"))
    ids = _ids(args, batch=1, length=9)  # past the ring's 6 slots at once
    cache, whole = model.new_cache(1, 16), reference.new_cache(1, 16)
    model(ids, 0, cache)
    model(torch.tensor([[3]]), 9, cache)  # the checked first step of this length
    own = torch.tensor([[4]])
    cache.vouch_for(own)
    with HostSyncCounter() as syncs:
        got = model(own, 10, cache)
    assert syncs.count == 0, syncs.where
    reference(torch.cat((ids, torch.tensor([[3]])), 1), 0, whole)  # the same positions in one forward, then the step
    assert torch.equal(got, reference(own, 10, whole))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strict_logits_of_a_row_do_not_depend_on_its_batch(dtype: torch.dtype) -> None:
    """determinism: strict made every op batch-invariant, but the absorbed MLA's per-head
    output product (``out @ w_uv.mT``, plain torch) took another GEMM layout once the batch
    grew: row 0's cached-step logits alone and in a batch of 4 differed in the last bits.
    Prefill (full and last-position), decode steps in both cache modes and the static step."""
    from dshal.model.decode import static_decode_step

    try:
        dshal.use(backend="cpu", determinism="strict")
        model = random_model(tiny_args(dtype=dtype), seed=0)
        ids = _ids(model.args, batch=4, length=24)

        def steps(x: torch.Tensor, mode: str, static: bool = False) -> list[torch.Tensor]:
            cache = model.new_cache(x.shape[0], x.shape[1] + 2, mode, static=static)
            out = [model(x, 0, cache, last_only=True)[:, -1]]
            for i in range(2):
                token = torch.full((x.shape[0], 1), 5 + i)
                pos = x.shape[1] + i
                out.append(static_decode_step(model, token, torch.tensor([pos]), cache)[:, None] if static
                           else model(token, pos, cache, last_only=True))
            return [o.reshape(x.shape[0], -1) for o in out]

        for what, run in (("no cache", lambda x: [model(x)]), ("naive", lambda x: steps(x, "naive")),
                          ("absorb", lambda x: steps(x, "absorb")), ("absorb, 2-token prefill", lambda x: steps(x[:, :2], "absorb")),
                          ("static", lambda x: steps(x, "absorb", static=True))):
            for i, (alone, batch) in enumerate(zip(run(ids[:1]), run(ids), strict=True)):
                assert torch.equal(alone[0], batch[0]), (what, i, (alone[0].float() - batch[0].float()).abs().max().item())
    finally:
        dshal.runtime.reset()


def test_static_decode_entry_points_refuse_a_windowed_model_and_bad_arguments_naming_themselves():
    """A model with an attention window has no slot per position: each entry point says so under
    its own name (generate_with_graphs said generate_rows, which the caller never called), as an
    ArgumentError naming 'model' as generate_speculative's refusal does (was a plain DshalError)."""
    windowed = random_model(tiny_args(attention_window=8), seed=0)
    ids = _ids(windowed.args)
    with pytest.raises(ArgumentError, match="^StaticDecoder: argument 'model': an attention window is set; static decode "
                                            "steps need one cache slot"):
        StaticDecoder(windowed, windowed.new_cache(2, 16), _eager("cpu"))
    with pytest.raises(ArgumentError, match="^generate_with_graphs: argument 'model': an attention window is set"):
        generate_with_graphs(windowed, ids, 4, _eager("cpu"))
    with pytest.raises(ArgumentError, match="^generate_rows: argument 'model': an attention window is set"):
        generate_rows(windowed, ids, [5, 5], 4, lambda logits: logits.argmax(-1))
    model = random_model(tiny_args(), seed=0)
    for new_tokens in (-1, 2.0, True):
        with pytest.raises(ArgumentError, match=rf"generate_with_graphs: argument 'max_new_tokens' is {new_tokens!r}, "
                                                r"expected an int >= 0"):
            generate_with_graphs(model, ids, new_tokens, _eager("cpu"))
    with pytest.raises(ArgumentError, match=r"generate_with_graphs: argument 'graph' is None, expected a backend's graph hook"):
        generate_with_graphs(model, ids, 4, None)
