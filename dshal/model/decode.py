"""Decode steps captured as device graphs (CUDA/HIP graphs through the backend's ``graph()`` hook).

One decode step of a small batch launches hundreds of small kernels; on a GPU the host
spends longer issuing them than the device computing them. A captured graph replays all
of them with one launch. Capture needs a step whose every shape and address is fixed:

- the token and the position live in static device buffers (``[B, 1]`` and ``[1]``),
  written before each replay; the position is never read on the host;
- RoPE angles are gathered with the position tensor, the KV cache is written at it
  (``index_copy_``) and attention covers the whole cache buffer, its slots past the
  position masked by a score bias (:meth:`dshal.model.cache.KVCache.begin_at`);
- every op runs inside :func:`dshal.ops.trusted`: no Python input checks, id range checks
  on the device, and collectives without a host wait: nothing reads the device on the host.

:func:`generate_with_graphs` is generation (greedy or sampled) with such steps, and
:class:`StaticDecoder` is the step itself. The first step runs once eagerly with the ops'
input checks on (outside the graph, as the model core's first decode step does) before it
is captured. On a backend without device graphs (``graph(fn)`` returns ``fn``) the same
static step runs eagerly: it is what a graph would replay, which is how the CPU tests
check it. It uses the "absorb" KV cache layout whatever ``mla_mode`` says, and needs a
model without an attention window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dshal import comm, ops
from dshal.errors import ArgumentError
from dshal.model.cache import KVCache
from dshal.model.prefill import (
    DEFAULT_PREFILL_CHUNK,
    check_callbacks,
    check_input_ids,
    check_prefill_chunk,
    check_prompt_lens,
    check_token_ids,
    mask_padding,
    own_dtypes,
    prefill,
)
from dshal.model.sampling import TokenChooser, check_cuts, check_temperature


def agreed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` (a step's chosen tokens, or a speculative step's verdict) as the job's first rank
    chose them. The ranks of a split model can differ in the last bits of their logits (kernels
    whose reduction order varies, e.g. split-K or atomics), and at a near tie choose different
    tokens; they would then feed different tokens to their shards, or stop at different steps
    and hang in the next collective. One small broadcast a step keeps them in step (as
    SGLang's ``SYNC_TOKEN_IDS_ACROSS_TP`` does); an unsplit model skips it. Trusted: every
    rank builds ``ids`` alike, so the cross-rank agreement check would only add a collective."""
    if model.parallel.tp_size * model.parallel.ep_size == 1:
        return ids
    with ops.trusted():
        return comm.broadcast(ids.contiguous(), src=0)


@own_dtypes
def static_decode_step(model: nn.Module, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per sequence at ``position`` (int64 device tensor: ``[1]``, or ``[B]`` with
    each sequence at its own position) -> logits ``[B, V]``.

    The same layers as ``model(token, pos, cache)``, with every shape fixed and no value
    read on the host, so the step can be captured once and replayed at any position.
    """
    check_token_ids("static_decode_step", token, model.args.vocab_size)  # device-side inside ops.trusted()
    cos = model.rope_cos.index_select(0, position)  # [1, rope / 2]
    sin = model.rope_sin.index_select(0, position)
    if position.shape[0] > 1:  # each row its own angle: [B, T=1, rope / 2]
        cos, sin = cos[:, None], sin[:, None]
    cache.begin_at(position)
    return model.lm_head(_through_layers(model, token, cos, sin, cache))[:, -1]  # [B, V]


@own_dtypes
def positioned_step(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, T]`` at ``positions [B, T]`` (int64 device tensor: each row's own, e.g. a
    token and its speculative draft) -> ``(logits [B, T, V], hidden [B, T, D])``, ``hidden``
    the final norm's output. The static step's cache plan (:meth:`KVCache.begin_at`): each
    token sees the slots up to its own position, and nothing is read on the host."""
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # [B, T, rope / 2]
    cache.begin_at(positions)
    hidden = _through_layers(model, tokens, cos, sin, cache)
    return model.lm_head(hidden), hidden


def _through_layers(
    model: nn.Module, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """Embedding, every layer on its cache, final norm: ``[B, T, D]``."""
    h, residual = model.embed(tokens), None  # [B, T, D]
    selection: dict[str, torch.Tensor | None] = {}  # GLM-5: the keys a full layer kept, for shared ones
    for layer, layer_cache in zip(model.layers, cache.layers):
        h, residual = layer(h, residual, cos, sin, layer_cache, False, selection)
    h, _ = model.norm(h, residual)
    return h


def static_decode_unsupported(model: nn.Module) -> str | None:
    """Why ``model``'s decode steps cannot be made static (then they run as usual), or None."""
    if model.args.attention_window is not None:
        return "an attention window is set; static decode steps need one cache slot per position"
    return None


def static_cache_unsupported(cache: KVCache) -> str | None:
    """Why static steps cannot run on ``cache`` (said after the argument that names it), or None."""
    if cache.mode != "absorb":
        return (f"has the {cache.mode!r} layout, expected 'absorb' for static steps "
                "(model.new_cache(batch, max_len, 'absorb', static=True))")
    return None


def graph_capture_unsupported(model: nn.Module, tokens: int) -> str | None:
    """Why ``model``'s decode steps of ``tokens`` tokens (all rows) cannot be captured as device
    graphs, or None. A module declares it: ``RoutedExperts.graph_capture_unsupported``, and
    ``RoutedExperts.graph_capture_max_slots`` (the (token, expert) slots a call keeps fixed
    shapes for), which a replacement may set."""
    slots = tokens * model.args.num_experts_per_tok
    for module in model.modules():
        why = getattr(module, "graph_capture_unsupported", None)  # declared by RoutedExperts, None there
        if why:
            return why
        limit = getattr(module, "graph_capture_max_slots", None)
        if limit is not None and slots > limit:
            return (f"a step of {tokens} tokens routes {slots} (token, expert) slots, past the {limit} its "
                    f"{type(module).__name__} keeps fixed shapes for: it reads the host past them")
    return None


class GraphStep:
    """A step over static input buffers: its first call runs ``step`` with the ops' input
    checks, eagerly, then captures it with ``graph`` (a backend's :meth:`~dshal.Backend.graph`
    hook) inside :func:`dshal.ops.trusted`; later calls replay the capture (a hook that returns
    the step itself captures nothing: later calls run it eagerly, trusted). Where capture fails
    (an op reads the device on the host) the step runs eagerly, and ``capture_error`` says why;
    where the step is known not to be capturable (``unsupported``: why) capture is not tried,
    since a failed capture may leave collectives enqueued on some ranks' streams.
    A replay's outputs are the graph's static buffers, overwritten by the next call."""

    def __init__(self, step: Callable[..., Any], graph: Callable[[Callable[..., Any]], Callable[..., Any]],
                 unsupported: str | None = None):
        self._step, self._graph, self._unsupported = step, graph, unsupported
        self._replay: Callable[..., Any] | None = None
        #: Seconds the first call took (checked eager step + warm-up + capture).
        self.capture_s = 0.0
        #: Whether the step runs as a captured graph (the backend captures, and capture worked).
        self.captured = False
        #: Why capture failed (the step then runs eagerly), or "".
        self.capture_error = ""

    def _trusted(self, *inputs: Any) -> Any:
        with ops.trusted():
            return self._step(*inputs)

    def __call__(self, *inputs: Any) -> Any:
        if self._replay is not None:
            return self._replay(*inputs)
        start = time.perf_counter()
        out = self._step(*inputs)  # checked (Python input checks and host-side id checks), outside any graph
        replay = self._graph(self._trusted)
        if not callable(replay):
            raise ArgumentError(f"argument 'graph': the hook returned a {type(replay).__name__}, expected a callable "
                                "(the captured step, or the step itself where nothing is captured)")
        if replay == self._trusted:  # the backend captures nothing: later calls run the step eagerly
            self._replay, self.capture_s = replay, time.perf_counter() - start
            return out
        if self._unsupported:  # the backend would capture (on its first call): not this step
            self._replay, self.capture_error = self._trusted, f"not captured: {self._unsupported}"
            self.capture_s = time.perf_counter() - start
            return out
        try:
            out = replay(*inputs)  # captures, then replays this step
            self.captured = replay != self._trusted  # bound methods: equal, not identical
        except RuntimeError as err:  # an op that reads the device on the host cannot be captured
            replay, self.captured = self._trusted, False
            self.capture_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        self._replay = replay
        self.capture_s = time.perf_counter() - start
        return out


class StaticDecoder:
    """Decode steps of ``model`` on ``cache`` through static buffers, captured with
    ``graph`` (a backend's :meth:`~dshal.Backend.graph` hook) on the first call.

    ``decoder(token [B], pos)`` returns logits ``[B, V]``: the graph's static output,
    overwritten by the next call (read it before). With ``per_row``, ``pos`` is an int64
    device tensor ``[B]``: each sequence's own position (prompts of different lengths).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: KVCache,
        graph: Callable[[Callable[..., Any]], Callable[..., Any]],
        per_row: bool = False,
    ):
        why = static_decode_unsupported(model)
        if why:
            raise ArgumentError(f"StaticDecoder: argument 'model': {why}")
        model.check_cache(cache)  # a KVCache of this model (not another's, not another type)
        why = static_cache_unsupported(cache)
        if why:
            raise ArgumentError(f"StaticDecoder: argument 'cache' {why}")
        device = model.rope_cos.device
        self.model, self.cache, self.per_row = model, cache, per_row
        self.token = torch.zeros(cache.batch, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(cache.batch if per_row else 1, dtype=torch.int64, device=device)
        self._run = GraphStep(lambda token, position: static_decode_step(model, token, position, cache), graph,
                              graph_capture_unsupported(model, cache.batch))

    @property
    def capture_s(self) -> float:
        """Seconds the first call took (checked eager step + warm-up + capture)."""
        return self._run.capture_s

    @property
    def captured(self) -> bool:
        """Whether the step runs as a captured graph (the backend captures, and capture worked)."""
        return self._run.captured

    @property
    def capture_error(self) -> str:
        """Why capture failed (the step then runs eagerly), or ""."""
        return self._run.capture_error

    def __call__(self, token: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        batch = self.cache.batch
        if not isinstance(token, torch.Tensor) or token.numel() != batch:
            got = list(token.shape) if isinstance(token, torch.Tensor) else type(token).__name__
            raise ArgumentError(f"StaticDecoder: argument 'token' is {got}, expected {batch} token id(s), one per row")
        if token.dtype.is_floating_point or token.dtype.is_complex or token.dtype == torch.bool:
            raise ArgumentError(f"StaticDecoder: argument 'token' has dtype {token.dtype}, expected integer token ids")
        self.token.copy_(token.reshape(-1, 1))
        if isinstance(pos, torch.Tensor):
            if (pos.numel() != self.position.numel() or pos.dtype.is_floating_point or pos.dtype.is_complex
                    or pos.dtype == torch.bool):
                raise ArgumentError(f"StaticDecoder: argument 'pos' is a {pos.dtype} tensor of shape {list(pos.shape)}, "
                                    f"expected {self.position.numel()} integer position(s)")
            if pos.is_cpu:  # host memory: checked at no device cost (a device tensor is the caller's to keep in range)
                message = f"StaticDecoder: argument 'pos' holds a position outside [0, {self.cache.max_len - 1}] (slots of the cache)"
                try:  # not a Python read of the values: the host-sync count of a step stays 0
                    torch._assert_async(((pos >= 0) & (pos < self.cache.max_len)).all(), message)
                except RuntimeError:
                    raise ArgumentError(message) from None
            self.position.copy_(pos.reshape(self.position.shape))
        else:
            if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < self.cache.max_len:
                raise ArgumentError(f"StaticDecoder: argument 'pos' is {pos!r}, expected an int in "
                                    f"[0, {self.cache.max_len - 1}] (a slot of the cache)")
            self.position.fill_(pos)  # a host-to-device write, no sync
        return self._run(self.token, self.position)


def generate_with_graphs(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    graph: Callable[[Callable[..., Any]], Callable[..., Any]],
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    prompt_lens: Sequence[int] | None = None,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
) -> tuple[torch.Tensor, StaticDecoder | None]:
    """Generation (as ``model.generate(input_ids, max_new_tokens, temperature, top_p=..., top_k=...,
    min_p=..., generator=..., prefill_chunk=..., prompt_lens=...)``: greedy by default) whose decode steps go
    through a :class:`StaticDecoder` captured with ``graph``. The graph returns the logits; the
    token is chosen from them outside it (:class:`dshal.model.sampling.TokenChooser`), so a
    sampled step's draws come from ``generator`` every step. Returns the ids ``[B, T + new]``
    and the decoder (None when no decode step runs)."""
    where = "generate_with_graphs"
    check_input_ids(where, input_ids, model.rope_cos.device)
    check_prefill_chunk(where, prefill_chunk)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ArgumentError(f"{where}: argument 'max_new_tokens' is {max_new_tokens!r}, expected an int >= 0")
    check_temperature(temperature, where)
    check_cuts(where, temperature, top_p, top_k, min_p)
    check_callbacks(where, generator=generator, on_token=on_token, graph=graph)
    if graph is None:
        raise ArgumentError(f"{where}: argument 'graph' is None, expected a backend's graph hook (runtime.backend.graph)")
    why = static_decode_unsupported(model)
    if why:  # before generate_rows, whose message would name it instead of this function
        raise ArgumentError(f"{where}: argument 'model': {why}")
    lens = check_prompt_lens(where, prompt_lens, *input_ids.shape)
    chooser = TokenChooser(temperature, top_p, generator, top_k, min_p)
    out, decoder = generate_rows(model, input_ids, lens, max_new_tokens, chooser, graph=graph, on_token=on_token,
                                 prefill_chunk=prefill_chunk)
    chooser.raise_if_nan(where, lambda flag: agreed(model, flag))
    return out, decoder


def prefill_rows(
    model: nn.Module, input_ids: torch.Tensor, prompt_lens: Sequence[int], cache: KVCache, prefill_chunk: int | None
) -> torch.Tensor:
    """Each row's prompt (its first ``prompt_lens[b]`` ids) into its row of ``cache``, at its
    own positions from 0; returns each row's last logits ``[B, vocab]``. The shortest prompt's
    length is prefilled for all rows at once; each longer prompt's rest then runs alone, on a
    batch-1 cache holding its row's prefix, and is copied into its row."""
    shortest = min(prompt_lens)
    logits = prefill(model, input_ids[:, :shortest], cache, prefill_chunk)
    if shortest == max(prompt_lens):
        return logits
    rows = list(logits)
    for row, length in enumerate(prompt_lens):
        if length == shortest:
            continue
        alone = model.new_cache(1, length, cache.mode)
        for buf, row_buf in cache.buffer_pairs(alone):
            row_buf[0, :shortest] = buf[row, :shortest]
        alone.length = shortest
        rows[row] = prefill(model, input_ids[row : row + 1, shortest:length], alone, prefill_chunk, shortest)[0]
        for buf, row_buf in cache.buffer_pairs(alone):
            buf[row, shortest:length] = row_buf[0, shortest:]
    cache.length = max(prompt_lens)
    return torch.stack(rows)


@torch.inference_mode()
def generate_rows(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lens: Sequence[int],
    max_new_tokens: int,
    next_token: Callable[[torch.Tensor], torch.Tensor],
    *,
    graph: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda fn: fn,
    eos_token_id: Sequence[int] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> tuple[torch.Tensor, StaticDecoder | None]:
    """Generation with each sequence at its own positions: every prompt is prefilled into its
    row of one cache (:func:`prefill_rows`), then each step decodes all rows together,
    row b at position ``prompt_lens[b] + i`` (:class:`StaticDecoder` with per-row positions:
    the cache slots past a row's position are masked). ``next_token`` turns logits ``[B, V]``
    into ids ``[B]`` (a :class:`~dshal.model.sampling.TokenChooser`, whose NaN check its caller
    runs when this returns); in a split model every rank takes the first rank's (:func:`agreed`).

    Returns ``[B, L + new]`` with L the longest prompt (shorter when every row stopped at a
    stop id) and the decoder (None when no decode step runs). Row b holds its prompt, its new
    tokens from ``prompt_lens[b]`` on, then padding: the first stop id of ``eos_token_id``,
    else 0. A row that stopped is padded the same way.
    """
    why = static_decode_unsupported(model)
    if why:
        raise ArgumentError(f"generate_rows: argument 'model': {why}")
    bsz, width = input_ids.shape
    device = input_ids.device
    stops = None if eos_token_id is None else torch.tensor(list(eos_token_id), device=device)
    pad = 0 if eos_token_id is None else int(eos_token_id[0])
    lengths = torch.tensor(list(prompt_lens), device=device)
    out = torch.full((bsz, width + max_new_tokens), pad, dtype=torch.int64, device=device)
    out[:, :width] = mask_padding(input_ids, prompt_lens, pad)[0]
    if max_new_tokens == 0:
        return out, None
    longest = max(prompt_lens)
    cache = model.new_cache(bsz, longest + max_new_tokens, "absorb", static=True)
    per_row = len(set(prompt_lens)) > 1  # else one position for all rows: the step as it always was
    decoder = StaticDecoder(model, cache, graph, per_row) if max_new_tokens > 1 else None
    logits = prefill_rows(model, input_ids, prompt_lens, cache, prefill_chunk)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = agreed(model, next_token(logits))  # [B]
        if stops is not None:
            token = torch.where(done, stops[0], token)
            done |= torch.isin(token, stops)
        out.scatter_(1, (lengths + i)[:, None], token[:, None])
        if stream is not None:
            stream(token)
        if on_token is not None:
            on_token(i)
        if i + 1 == max_new_tokens or (stops is not None and bool(done.all())):
            return out[:, : longest + i + 1], decoder
        logits = decoder(token, lengths + i if per_row else longest + i)  # type: ignore[misc]
    return out, decoder


__all__ = [
    "GraphStep",
    "StaticDecoder",
    "agreed",
    "generate_rows",
    "generate_with_graphs",
    "positioned_step",
    "prefill_rows",
    "static_cache_unsupported",
    "static_decode_step",
    "static_decode_unsupported",
]
