"""Greedy / temperature sampling with the KV cache: the prompt's prefill (in chunks of at most
:data:`DEFAULT_PREFILL_CHUNK` tokens), then one step per token.

Prompts of different lengths share a batch (right-padded, with ``prompt_lens``) in one of two
ways:

- each at its own positions (:func:`dshal.model.decode.generate_rows`): every prompt is
  prefilled into its row of the cache (the shortest length for all rows at once, each longer
  prompt's rest alone), then each decode step runs all rows, row b at
  its own position, the cache slots past it masked (the static decode step's key mask);
- on a model with an attention window, whose cache cannot mask per row, the way DeepSeek-V3's
  ``generate.py`` runs them: prefilled up to the shortest prompt, then one step per position
  for every sequence, where a sequence still inside its prompt is fed its own next prompt
  token instead of the sampled one (:class:`PromptBatch`). All sequences are then at the
  same position, so the causal attention needs no mask; the longer prompts' rest costs
  one-token steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dshal.errors import ArgumentError, ShapeError
from dshal.model import decode
from dshal.model.cache import KVCache
from dshal.model.prefill import (
    DEFAULT_PREFILL_CHUNK,
    check_callbacks,
    check_input_ids,
    check_prefill_chunk,
    check_prompt_lens,
    check_token_ids,
    mask_padding,
    prefill,
)
from dshal.model.sampling import (
    TokenChooser,
    check_cuts,
    check_min_p,
    check_temperature,
    check_top_k,
    check_top_p,
    sampling_probs,
)


class PromptBatch:
    """The prompts of one generation: ``input_ids [B, T]``, each row's prompt its first
    ``prompt_lens[b]`` ids (None: all T). Ids past a row's prompt (its padding) are never
    read: they are replaced by 0 here and by the sampled tokens during generation.

    ``start`` is the shortest prompt's length: the prefill covers ``ids[:, :start]``, and
    :meth:`force` feeds each longer prompt's remaining ids one step at a time.
    """

    def __init__(self, where: str, input_ids: torch.Tensor, prompt_lens: Sequence[int] | None):
        width = input_ids.shape[1]
        self.start = min(check_prompt_lens(where, prompt_lens, input_ids.shape[0], width))
        self.ids = input_ids
        #: ``[B, T]`` True where a row's prompt is; None when every prompt fills the width.
        self.in_prompt: torch.Tensor | None = None
        if self.start < width:
            self.ids, self.in_prompt = mask_padding(input_ids, prompt_lens, 0)

    def force(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """``token [B]`` sampled for position ``pos``, with the prompt's own id where a row's
        prompt still covers ``pos`` (device-side: no host sync)."""
        if self.in_prompt is None or pos >= self.ids.shape[1]:
            return token
        return torch.where(self.in_prompt[:, pos], self.ids[:, pos], token)

    def sampled(self, pos: int) -> torch.Tensor | bool:
        """Which rows' token at ``pos`` was sampled (not forced from the prompt): ``[B]`` bool or True."""
        if self.in_prompt is None or pos >= self.ids.shape[1]:
            return True
        return ~self.in_prompt[:, pos]


def completions(
    ids: torch.Tensor, prompt_lens: Sequence[int], max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None
) -> list[list[int]]:
    """Each row's new tokens in :func:`generate`'s result ``ids``: the at most ``max_new_tokens``
    ids after its prompt (``prompt_lens[b]`` ids), up to and including the first stop id of
    ``eos_token_id``. (On a model with an attention window, a row whose prompt is shorter than
    the longest runs on past ``max_new_tokens``; those extra tokens are dropped here.)"""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        seen = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else f"a {type(ids).__name__}"
        raise ShapeError(f"completions: argument 'ids' is {seen}, expected a [batch, length] tensor (generate's result)")
    lens = prompt_lens.tolist() if isinstance(prompt_lens, torch.Tensor) else list(prompt_lens)
    if len(lens) != ids.shape[0]:
        raise ShapeError(f"completions: argument 'prompt_lens' has {len(lens)} entries, expected {ids.shape[0]} (one per row of 'ids')")
    bad = next((n for n in lens if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= ids.shape[1]), None)
    if bad is not None:
        raise ArgumentError(f"completions: argument 'prompt_lens' holds {bad!r}, expected ints in [0, {ids.shape[1]}] (the width of 'ids')")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ArgumentError(f"completions: argument 'max_new_tokens' is {max_new_tokens!r}, expected an int >= 0")
    stops = set() if eos_token_id is None else set(stop_list(eos_token_id))
    rows = []
    for row, length in zip(ids.tolist(), lens):
        new = row[length : length + max_new_tokens]
        cut = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
        rows.append(new[:cut])
    return rows


def stop_list(eos_token_id: Any) -> list[Any]:
    """``eos_token_id`` (one id, a list of them, or an integer tensor of them as transformers
    takes it) as a list."""
    if isinstance(eos_token_id, torch.Tensor) and not eos_token_id.is_floating_point() and eos_token_id.dim() <= 1:
        return eos_token_id.reshape(-1).tolist()  # once, before generating: one host read
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]


def check_cache_reuse(
    cache: Any, cached: Any, input_ids: torch.Tensor, max_new_tokens: int, ragged: bool,
    caller: str = "generate", name: str = "cache",
) -> None:
    """``generate(..., cache=, cached=)``: ArgumentError unless ``cache`` is a KV cache of the
    batch with room for the prompt and the new tokens, holding at least ``cached`` positions
    (an int in [0, T - 1]: one prompt token at least is prefilled, for the first logits).
    ``caller`` and ``name``: the function and argument the messages name."""
    bsz, width = input_ids.shape
    where = f"{caller}: argument 'cached'"
    if isinstance(cached, bool) or not isinstance(cached, int) or not 0 <= cached < width:
        raise ArgumentError(f"{where} is {cached!r}, expected an int in [0, {width - 1}] (prompt tokens already in '{name}')")
    if cache is None:
        raise ArgumentError(f"{where} is {cached}, expected 0 without a '{name}' that holds them")
    if ragged:
        raise ArgumentError(f"{caller}: argument '{name}' is given with prompts of different lengths, expected one length")
    if not isinstance(cache, KVCache):
        raise ArgumentError(f"{caller}: argument '{name}' is a {type(cache).__name__}, expected a KVCache (model.new_cache)")
    if cache.batch != bsz:
        raise ArgumentError(f"{caller}: argument '{name}' has batch {cache.batch}, expected {bsz} (input_ids' rows)")
    if cache.max_len < width + max_new_tokens:
        raise ArgumentError(f"{caller}: argument '{name}' has max_len {cache.max_len}, expected at least "
                            f"{width + max_new_tokens} (the prompt and the new tokens)")
    if not cache.can_rewind_to(cached):
        raise ArgumentError(
            f"{where} is {cached}, expected at most the {cache.length} positions '{name}' holds "
            "(0 or exactly them in a cache whose attention window's ring has wrapped: it cannot rewind)"
        )


def check_generate_args(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: Any, temperature: Any, eos_token_id: Any
) -> None:
    """Raise ArgumentError up front for a generation request that cannot be served: a
    ``max_new_tokens`` that is not an int >= 0 or runs past the model's positions, a
    ``temperature`` that is not a finite number >= 0, an ``eos_token_id`` outside the vocabulary."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ArgumentError(f"generate: argument 'max_new_tokens' is {max_new_tokens!r}, expected an int >= 0")
    args = getattr(model, "args", None)
    limit = getattr(args, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] > limit:
        raise ShapeError(
            f"generate: argument 'input_ids' has {input_ids.shape[1]} tokens, expected at most "
            f"max_position_embeddings ({limit})"
        )
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ArgumentError(
            f"generate: argument 'max_new_tokens' is {max_new_tokens}, expected at most {limit - input_ids.shape[1]}: "
            f"the prompt ({input_ids.shape[1]} tokens) plus new tokens must fit max_position_embeddings ({limit})"
        )
    check_temperature(temperature)
    vocab = getattr(args, "vocab_size", None)
    ids = stop_list(eos_token_id)
    if eos_token_id is not None and (
        not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (vocab or 2**63) for i in ids)
    ):
        raise ArgumentError(
            f"generate: argument 'eos_token_id' is {eos_token_id!r}, expected None, a token id in [0, {vocab}) "
            "or a non-empty list (or 1-D integer tensor) of them"
        )


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    prompt_lens: Sequence[int] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    cache: Any = None,
    cached: int = 0,
    decoder: decode.StaticDecoder | None = None,
) -> torch.Tensor:
    """Continue ``input_ids [B, T]`` by ``max_new_tokens`` tokens; returns ``[B, T + new]``.

    ``temperature=0`` is greedy (what transformers' ``do_sample=False`` does). With
    ``eos_token_id`` (one id, or a list or integer tensor: e.g. a chat model's end-of-turn token besides its EOS),
    generation stops once every sequence has produced one (the result is then shorter); a
    sequence that finished earlier is padded with the first. ``on_token(i)`` is called
    after the i-th step (0-based), e.g. for a progress bar; the first call marks the
    end of the prefill. The prompt is prefilled in forwards of at most ``prefill_chunk``
    tokens (None: one forward), which bounds the activations of a long prompt. Sampled, the
    distribution is cut as transformers' warpers cut it, in this order
    (:func:`~dshal.model.sampling.sampling_probs`): ``top_k >= 1`` keeps the k most likely
    tokens (0: all), ``top_p < 1`` the smallest set of most likely tokens whose probabilities
    reach it, ``min_p > 0`` the tokens at least ``min_p`` times as likely as the most likely.
    ``stream(token)`` gets each step's ids ``[B]`` (on the device) as they come, e.g. to print
    the text while it is generated.

    Prompts of different lengths: right-pad them to ``T`` and give each row's length in
    ``prompt_lens``; the padding is never read. Row b then holds its prompt, then its new
    tokens from ``prompt_lens[b]`` on; :func:`completions` cuts each row's. Each row runs at
    its own positions (see the module docstring), and what follows its tokens is padding (the
    first stop id, else 0); on a model with an attention window every row steps to
    ``T + max_new_tokens`` instead, so a shorter prompt gets more tokens.

    ``cache`` (a ``model.new_cache(B, max_len)`` with ``max_len >= T + max_new_tokens``) whose
    first ``cached`` positions hold ``input_ids[:, :cached]`` already, e.g. an earlier turn of a
    conversation: only the rest of the prompt is prefilled. Afterwards the cache holds the
    prompt and every new token but the last. Prompts of one length only.

    ``decoder`` (a :class:`~dshal.model.decode.StaticDecoder` built on ``cache``): the decode
    steps go through it, captured as a device graph by its ``graph`` hook, the token chosen
    outside the graph. Its capture is kept, so a conversation that reuses the cache and the
    decoder turn after turn captures once. Prompts of one length only.

    In a split model (TP/EP) every rank takes rank 0's tokens (:func:`~dshal.model.decode.agreed`).
    """
    check_input_ids("generate", input_ids)
    check_generate_args(model, input_ids, max_new_tokens, temperature, eos_token_id)
    check_prefill_chunk("generate", prefill_chunk)
    check_cuts("generate", temperature, top_p, top_k, min_p)
    check_callbacks("generate", generator=generator, on_token=on_token, stream=stream)
    lens = check_prompt_lens("generate", prompt_lens, *input_ids.shape)
    if cache is not None or cached:
        check_cache_reuse(cache, cached, input_ids, max_new_tokens, len(set(lens)) > 1)
    if decoder is not None:
        check_decoder(decoder, cache)
    chooser = TokenChooser(temperature, top_p, generator, top_k, min_p)
    if len(set(lens)) > 1 and max_new_tokens > 0 and decode.static_decode_unsupported(model) is None:
        out, _ = decode.generate_rows(  # each row at its own positions
            model, input_ids, lens, max_new_tokens, chooser,
            eos_token_id=None if eos_token_id is None else stop_list(eos_token_id),
            stream=stream, on_token=on_token, prefill_chunk=prefill_chunk,
        )
        chooser.raise_if_nan("generate", lambda flag: decode.agreed(model, flag))
        return out
    prompts = PromptBatch("generate", input_ids, lens)  # one length, or fed into one position
    bsz, width = input_ids.shape
    total = width + max_new_tokens
    out = torch.empty(bsz, total, dtype=torch.int64, device=input_ids.device)
    out[:, :width] = prompts.ids
    if max_new_tokens == 0:
        return out
    if prompts.in_prompt is not None:  # the forced prompt ids are fed as vouched steps: check them now
        check_token_ids("generate", prompts.ids, model.args.vocab_size)
    cache = model.new_cache(bsz, total) if cache is None else cache
    done = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
    stops = None if eos_token_id is None else torch.tensor(stop_list(eos_token_id), device=input_ids.device)
    logits = prefill(model, prompts.ids[:, cached : prompts.start], cache, prefill_chunk, cached)
    for pos in range(prompts.start, total):
        token = prompts.force(decode.agreed(model, chooser(logits)), pos)
        if stops is not None:
            token = torch.where(done, stops[0], token)  # a finished sequence is padded with the first stop id
            done |= torch.isin(token, stops) & prompts.sampled(pos)
        out[:, pos] = token
        if stream is not None:
            stream(token)
        if on_token is not None:
            on_token(pos - prompts.start)
        if pos + 1 == total or (stops is not None and bool(done.all())):
            if decoder is not None:
                cache.length = pos  # what its steps wrote: every token but the last
            chooser.raise_if_nan("generate", lambda flag: decode.agreed(model, flag))
            return out[:, : pos + 1]
        if decoder is not None:
            logits = decoder(token, pos)  # static buffers: read before the next step
            continue
        step = token[:, None]
        cache.vouch_for(step)  # the model's own sample, or a checked prompt id: no host sync for its range
        logits = model(step, pos, cache, last_only=True)[:, -1]
    return out


def check_decoder(decoder: Any, cache: Any) -> None:
    """``generate(..., decoder=)``: ArgumentError unless ``decoder`` is a StaticDecoder of one
    position for all rows, built on the ``cache`` given with it (which takes prompts of one
    length only: :func:`check_cache_reuse`)."""
    if not isinstance(decoder, decode.StaticDecoder) or decoder.per_row:
        raise ArgumentError(f"generate: argument 'decoder' is {decoder!r}, expected a StaticDecoder(model, cache, graph) "
                            "of one position for all rows")
    if cache is None or decoder.cache is not cache:
        raise ArgumentError("generate: argument 'decoder' is built on another KV cache than argument 'cache', "
                            "expected the same one (pass the decoder's cache as 'cache')")


__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "PromptBatch",
    "check_prompt_lens",
    "completions",
    "check_cache_reuse",
    "check_decoder",
    "check_generate_args",
    "check_input_ids",
    "check_prefill_chunk",
    "check_token_ids",
    "check_min_p",
    "check_top_k",
    "check_top_p",
    "generate",
    "sampling_probs",
    "stop_list",
    "prefill",
]
