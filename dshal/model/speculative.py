"""Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) layer.

DeepSeek-V3 is trained with an MTP module (the checkpoint's layer ``num_hidden_layers``,
loaded with ``ModelArgs.mtp_layers=1``) that predicts the token after the next one. At
inference it drafts one token per step, and the main model checks the draft in the same
forward that produces its own next token:

1. the main model runs ``[token, draft]`` at positions ``n, n + 1`` and returns its own
   choice for positions ``n + 1`` and ``n + 2``;
2. if its choice for ``n + 1`` is the draft, both are kept (two tokens from one forward);
   otherwise only its own choice for ``n + 1`` is, and the cache slot the draft wrote at
   ``n + 1`` is overwritten by the next step;
3. the MTP layer reads the main model's final hidden states of the kept positions and the
   tokens that follow them, and drafts the next token.

Greedy, the result is the main model's greedy output whatever the drafts are: a draft only
decides how many tokens a forward yields. Sampled, a draft is kept with probability
``min(1, p / q)`` and otherwise replaced by a draw from what ``p`` has beyond ``q``
(speculative sampling, :class:`DraftVerifier`): every token is distributed as plain
sampling's. DeepSeek-V3's report measures 85-90 % of drafts accepted (about 1.8x the tokens
per second); a random MTP layer's greedy drafts are almost never right, and each step then
costs a two-token forward and an MTP forward for one token.

Several sequences (prompts of any lengths) run together, each at its own positions and
keeping its own drafts (:func:`dshal.model.decode.positioned_step`). Not with an attention
window (a ring cache cannot take back a rejected draft). The tests check greedy results
against :func:`dshal.model.generate.generate` token for token, and sampled ones against the
exact distribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dshal.errors import ArgumentError
from dshal.model.cache import KVCache
from dshal.model.decode import GraphStep, agreed, graph_capture_unsupported, positioned_step, static_cache_unsupported
from dshal.model.generate import check_cache_reuse, check_generate_args, stop_list
from dshal.model.prefill import (
    DEFAULT_PREFILL_CHUNK,
    check_callbacks,
    check_input_ids,
    check_prefill_chunk,
    check_prompt_lens,
    mask_padding,
    own_dtypes,
)
from dshal.model.sampling import TokenChooser, check_cuts
from dshal.runtime import current


@dataclass
class SpeculativeStats:
    """What the drafts bought: ``steps`` sequence-steps after the prefill (a main-model forward
    per step, counted once for each sequence still generating), each checking one draft, of
    which ``accepted`` were kept."""

    steps: int = 0
    accepted: int = 0
    #: With a ``graph`` hook: whether the steps ran as a captured graph (None: not asked), and
    #: why capture failed.
    captured: bool | None = None
    capture_error: str = ""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.steps if self.steps else None

    @property
    def tokens_per_step(self) -> float | None:
        """New tokens per sequence and step after the prefill (1 + acceptance rate; a last
        step cut short by the token budget or a stop id counts its kept draft too)."""
        return (self.steps + self.accepted) / self.steps if self.steps else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "mtp",
            "steps": self.steps,
            "drafted": self.steps,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
            "captured": self.captured,
            "capture_error": self.capture_error,
        }


def mtp_layers_for(method: str | None) -> int:
    """Multi-token-prediction layers to load for a ``--speculative`` choice (None: none)."""
    return 1 if method == "mtp" else 0


def speculative_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode speculatively with its MTP layer, or None."""
    if not len(getattr(model, "mtp", ())):
        return (
            "the model has no multi-token-prediction layer: load it with mtp_layers=1 "
            "(dshal run --speculative mtp) from a checkpoint whose config.json has num_nextn_predict_layers >= 1"
        )
    if model.args.attention_window is not None:
        return "an attention window is set: its ring cache cannot take back a rejected draft"
    return None


class DraftVerifier(TokenChooser):
    """How a step's tokens are chosen: greedy (argmax; a draft is kept when it is the argmax),
    or sampled with speculative sampling (Leviathan et al., 2023; Chen et al., 2023): the
    draft ``d``, drawn from the MTP layer's distribution ``q``, is kept with probability
    ``min(1, p(d) / q(d))`` under the main model's ``p``; otherwise the token is drawn from
    ``max(p - q, 0)`` normalized. Each kept or redrawn token is then distributed as ``p``
    exactly, so the output is distributed as plain sampling's. Both ``p`` and ``q`` are cut as
    plain sampling cuts (temperature, top-k, top-p, min-p:
    :func:`~dshal.model.sampling.sampling_probs`): ``p`` is then what plain sampling draws from,
    and the rule is exact for any ``q``. NaN logits under greedy are caught as
    :class:`~dshal.model.sampling.TokenChooser` says."""

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = self.probs(logits)
        return probs / probs.sum(dim=-1, keepdim=True)


    def token(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, V]`` logits -> the tokens ``[B]`` and the distributions they were drawn from
        (None: greedy)."""
        if self.temperature == 0:
            return self.argmax(logits), None
        probs = self._probs(logits)
        return self.draw(probs), probs

    def draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`token`, for the MTP layer's proposal, whose NaN / Inf logits are not an error:
        verification rejects a wrong draft. Greedy, they are not marked; sampled, such a row
        proposes from the uniform distribution (speculative sampling is exact for any proposal),
        with no host sync."""
        if self.temperature == 0:
            return logits.argmax(dim=-1), None
        finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
        return self.token(torch.where(finite, logits, torch.zeros_like(logits)))

    def check(self, logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """``logits [B, 2, V]`` of the main model at [last token, draft] per row, ``draft [B]``
        drawn from ``q [B, V]``: ``[B, 3]`` ids on the device, per row ``(token for the draft's
        position, the token after it, 1 if the draft is kept else 0)``."""
        if self.temperature == 0:
            chosen = self.argmax(logits)  # [B, 2]
            return torch.cat((chosen, (chosen[:, :1] == draft[:, None]).long()), dim=1)
        p = self._probs(logits)  # [B, 2, V]
        drafted = draft[:, None]
        u = torch.rand(drafted.shape, generator=self.generator, device=p.device)
        # [B, 1]: with probability min(1, p(d) / q(d)) for u in [0, 1); strict, so u = 0 never
        # keeps a draft the cuts removed (p(d) = 0)
        kept = u * q.gather(1, drafted) < p[:, 0].gather(1, drafted)
        residual = (p[:, 0] - q).clamp(min=0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p[:, 0])  # p == q: always kept
        first = torch.where(kept, drafted, self.draw(residual)[:, None])
        return torch.cat((first, self.draw(p[:, 1])[:, None], kept.long()), dim=1)


def _prefill(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, mtp_cache: KVCache, cached: int, prefill_chunk: int | None,
    verifier: DraftVerifier,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prefill one sequence ``ids [1, T]`` from position ``cached``, chunk by chunk: the main
    model, then the MTP layer on the chunk's hidden states, each with the token after it (the
    prompt's next id; after the last, the first new token). Returns the first new token
    ``[1]``, the first draft ``[1]`` and its distribution (None: greedy)."""
    width = ids.shape[1]
    chunk = width - cached if prefill_chunk is None else prefill_chunk
    for start in range(cached, width, chunk):
        end = min(start + chunk, width)
        # Logits of the last position only ([B, C, vocab] twice was ~1 GB a 2048-token chunk).
        logits, hidden = model(ids[:, start:end], start, cache, last_only=True, return_hidden=True)
        next_ids = ids[:, start + 1 : end + 1]
        if end == width:
            token = agreed(model, verifier.token(logits[:, -1])[0])  # [1]: position `width`
            next_ids = torch.cat((next_ids, token[:, None]), dim=1)
        draft_logits = model.draft(hidden, next_ids, start, mtp_cache, last_only=True)
    draft, q = verifier.draft(draft_logits[:, -1])  # for position `width + 1`
    return token, agreed(model, draft), q


def _positioned_draft(
    model: nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, mtp_cache: KVCache
) -> torch.Tensor:
    """The MTP layer's logits ``[B, T, V]`` at per-row ``positions [B, T]`` (decode: none is 0)."""
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # [B, T, rope / 2]
    mtp_cache.begin_at(positions)
    layer = next(iter(model.mtp.values()))
    return layer.predict(hidden, model.embed(next_ids), cos, sin, mtp_cache.layers[0])


class SpeculativeStep:
    """One step of every row on static buffers, as two forwards each run through a
    :class:`~dshal.model.decode.GraphStep` (captured with ``graph``, e.g. a CUDA graph; pass
    ``lambda fn: fn`` to run them eagerly), and the choices between them:

    1. the main model at [last token, draft] per row (:func:`~dshal.model.decode.positioned_step`);
    2. the verdict (:meth:`DraftVerifier.check`), eager;
    3. the MTP layer at both positions of every row, the logits of each row's last kept one;
    4. the next draft (:meth:`DraftVerifier.token`), eager.

    The choices stay outside the graphs (as vLLM keeps its sampler outside them): a sampling
    verifier's random draws then come from its generator on every step, not a captured replay
    of the first step's, and greedy and sampled steps are captured alike. No step reads the
    device on the host.

    ``step(last [B], draft [B], q [B, V] or None, positions [B, 2])`` returns ``(verdict
    [B, 3], last, draft, q)`` for the next call. ``positions`` may be a host tensor (pinned:
    ``Backend.pinned_empty``): it is copied without waiting, as the caller writes it again only
    after reading the verdict, which waits for the step."""

    def __init__(
        self, model: nn.Module, cache: KVCache, mtp_cache: KVCache, verifier: DraftVerifier,
        graph: Callable[[Callable[..., Any]], Callable[..., Any]],
    ):
        for name, given in (("cache", cache), ("mtp_cache", mtp_cache)):
            why = static_cache_unsupported(given)
            if why:
                raise ArgumentError(f"SpeculativeStep: argument '{name}' {why}")
        device, batch = model.rope_cos.device, cache.batch
        self.model, self.cache, self.mtp_cache, self.verifier, self.graph = model, cache, mtp_cache, verifier, graph
        self.tokens = torch.zeros(batch, 2, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, 2, dtype=torch.int64, device=device)
        unsupported = graph_capture_unsupported(model, 2 * batch)  # a token and its draft per row
        self.main = GraphStep(lambda tokens, positions: positioned_step(model, tokens, positions, cache), graph,
                              unsupported)
        self.mtp = GraphStep(functools.partial(_kept_draft_logits, model, mtp_cache), graph, unsupported)

    @property
    def captured(self) -> bool:
        """Whether both forwards run as captured graphs."""
        return self.main.captured and self.mtp.captured

    @property
    def capture_error(self) -> str:
        """Why a forward's capture failed (it then runs eagerly), or ""."""
        return self.main.capture_error or self.mtp.capture_error

    def __call__(
        self, last: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        model = self.model
        self.tokens[:, 0].copy_(last)
        self.tokens[:, 1].copy_(draft)
        self.positions.copy_(positions, non_blocking=True)
        logits, hidden = self.main(self.tokens, self.positions)  # [B, 2, V], [B, 2, D]
        verdict = agreed(model, self.verifier.check(logits, draft, q))  # [B, 3]
        kept = verdict[:, 2]  # [B]: 1 where the draft is kept
        last = verdict[:, :2].gather(1, kept[:, None])[:, 0]  # each row's last kept token
        draft, q = self.verifier.draft(self.mtp(hidden, verdict[:, :2], self.positions, kept))
        return verdict, last, agreed(model, draft), q


@own_dtypes
def _kept_draft_logits(
    model: nn.Module, mtp_cache: KVCache, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """The MTP layer at both positions of every row (``hidden [B, 2, D]``, each position's
    next token in ``next_ids [B, 2]``): the logits ``[B, V]`` of each row's last kept position
    (``kept [B]``: 1 where the draft was kept). A row whose draft was rejected drafts from its
    first position; its second slot is overwritten next step."""
    logits = _positioned_draft(model, hidden, next_ids, positions, mtp_cache)  # [B, 2, V]
    return logits.gather(1, kept[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]


@torch.inference_mode()
def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    *,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    prompt_lens: Sequence[int] | None = None,
    cache: KVCache | None = None,
    mtp_cache: KVCache | None = None,
    cached: int = 0,
    graph: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    step: SpeculativeStep | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generation with MTP drafts: ``[B, T + new]`` ids and the :class:`SpeculativeStats`.
    Greedy (``temperature == 0``), the ids are exactly those of ``model.generate(input_ids,
    max_new_tokens, eos_token_id=..., prompt_lens=...)``; sampled (``temperature``, ``top_p``,
    ``top_k``, ``min_p``, ``generator`` as in :func:`~dshal.model.generate.generate`), they are
    distributed as its samples (speculative sampling, the drafts cut as the model's tokens are),
    not the same draws.

    One sequence runs as the module docstring says. Several (``input_ids [B, T]``, right-padded
    with ``prompt_lens`` as ``generate`` takes them) are each prefilled alone into their row of
    the caches; then every step runs all rows together, each at its own positions (the static
    step's key mask, :func:`dshal.model.decode.positioned_step`), each keeping its own draft or
    not. Row b's new tokens follow its prompt; what follows them is padding (the first stop
    id, else 0); :func:`~dshal.model.generate.completions` cuts them.

    ``on_token(i)`` is called when the new tokens up to the i-th (0-based, counted over all
    rows) are written: after each token for one sequence, after the prefill and each step for
    several. ``stream(ids [1])`` (one sequence) gets each new token. The prompt is prefilled
    in forwards of at most ``prefill_chunk`` tokens (None: one).

    ``cache`` (``model.new_cache(1, max_len)``) and ``mtp_cache`` (``model.new_cache(1,
    max_len, mtp=True)``), both holding the prompt's first ``cached`` positions, e.g. from an
    earlier turn of a conversation: only the rest is prefilled (one sequence). The MTP layer's
    entry at position ``i`` was made with token ``i + 1`` too: where that token has changed,
    pass ``cached`` one less (as the chat does), or the drafts read a stale entry (slower, never
    other tokens: the model verifies every draft). Afterwards
    ``cache`` holds every token but the last; ``mtp_cache`` its first ``mtp_cache.length``
    positions (the MTP layer skips the last step's kept positions when no draft follows).

    ``graph`` (a backend's :meth:`~dshal.Backend.graph` hook): each step's two forwards run as
    captured graphs, its choices (greedy or sampled) between them (:class:`SpeculativeStep`),
    one sequence included (it then takes the several-sequence path, its caches, when given, in
    the "absorb" layout: ``model.new_cache(1, max_len, "absorb", static=True)``);
    ``stats.captured`` says whether capture worked. ``step``: a :class:`SpeculativeStep` built
    on ``cache`` and ``mtp_cache`` with this call's sampling (``DraftVerifier(temperature,
    top_p, generator, top_k, min_p)``) and a graph hook, whose captured forwards this call
    replays instead of capturing its own: a conversation that keeps caches and step captures once."""
    check_input_ids("generate_speculative", input_ids, model.rope_cos.device)
    check_generate_args(model, input_ids, max_new_tokens, temperature, eos_token_id)
    check_prefill_chunk("generate_speculative", prefill_chunk)
    check_callbacks("generate_speculative", generator=generator, on_token=on_token, stream=stream)
    check_cuts("generate_speculative", temperature, top_p, top_k, min_p)
    lens = check_prompt_lens("generate_speculative", prompt_lens, *input_ids.shape)
    why = speculative_unsupported(model)
    if why:
        raise ArgumentError(f"generate_speculative: argument 'model': {why}")
    if input_ids.shape[0] > 1 and (cache is not None or mtp_cache is not None or cached or stream is not None):
        raise ArgumentError(
            f"generate_speculative: 'cache', 'mtp_cache', 'cached' or 'stream' is given with {input_ids.shape[0]} "
            "sequences, expected one sequence for them"
        )
    if step is not None:
        _check_step(step, cache, mtp_cache, DraftVerifier(temperature, top_p, generator, top_k, min_p))
        graph = step.graph
    reused = cache is not None or mtp_cache is not None or cached
    if reused:
        for name, given in (("cache", cache), ("mtp_cache", mtp_cache)):
            check_cache_reuse(given, cached, input_ids[:, : lens[0]], max_new_tokens, False, "generate_speculative", name)
            why = static_cache_unsupported(given) if graph is not None else None
            if why:
                raise ArgumentError(f"generate_speculative: argument '{name}' {why} (with 'graph')")
    stops = [] if eos_token_id is None else stop_list(eos_token_id)
    verifier = DraftVerifier(temperature, top_p, generator, top_k, min_p) if step is None else step.verifier
    verifier.forget_nan()  # a reused step's verifier: a turn that ended in Ctrl-C or OOM may have marked one
    if input_ids.shape[0] > 1 or graph is not None:
        caches = (cache, mtp_cache, cached) if reused else None
        out, stats = _generate_rows(model, input_ids, lens, max_new_tokens, verifier, stops, on_token, prefill_chunk,
                                    graph, caches, stream, step)
    else:
        out, stats = _generate_one(model, input_ids[:, : lens[0]], max_new_tokens, verifier, set(stops), on_token,
                                   stream, prefill_chunk, cache, mtp_cache, cached)
    verifier.raise_if_nan("generate_speculative", lambda flag: agreed(model, flag))
    return out, stats


def _check_step(step: Any, cache: KVCache | None, mtp_cache: KVCache | None, wanted: DraftVerifier) -> None:
    """``generate_speculative(..., step=)``: ArgumentError unless ``step`` is a SpeculativeStep
    on the caches given with it, sampling as the call asks (``wanted``: the call's verifier)."""
    if not isinstance(step, SpeculativeStep):
        raise ArgumentError(f"generate_speculative: argument 'step' is {step!r}, expected a SpeculativeStep")
    if cache is None or step.cache is not cache or step.mtp_cache is not mtp_cache:
        raise ArgumentError("generate_speculative: argument 'step' is built on other KV caches than arguments 'cache' "
                            "and 'mtp_cache', expected the same ones")
    settings = ("temperature", "top_p", "top_k", "min_p")

    def said(verifier: DraftVerifier) -> str:
        return ", ".join(f"{name} {getattr(verifier, name)}" for name in settings)

    same = all(getattr(step.verifier, name) == getattr(wanted, name) for name in settings)
    if not same or step.verifier.generator is not wanted.generator:
        raise ArgumentError(f"generate_speculative: argument 'step' samples with {said(step.verifier)} and its own "
                            f"generator, expected this call's ({said(wanted)}, 'generator')")


def _generate_one(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, verifier: DraftVerifier, stops: set[int],
    on_token: Callable[[int], None] | None, stream: Callable[[torch.Tensor], None] | None,
    prefill_chunk: int | None, cache: KVCache | None, mtp_cache: KVCache | None, cached: int,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """:func:`generate_speculative` for one sequence ``input_ids [1, T]``."""
    width = input_ids.shape[1]
    total = width + max_new_tokens
    out = torch.empty(1, total, dtype=torch.int64, device=input_ids.device)
    out[:, :width] = input_ids
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return out, stats
    cache = model.new_cache(1, total) if cache is None else cache
    mtp_cache = model.new_cache(1, total, mtp=True) if mtp_cache is None else mtp_cache
    token, draft, q = _prefill(model, input_ids, cache, mtp_cache, cached, prefill_chunk, verifier)

    # Decode: write the tokens known so far, then one main-model step checks the draft.
    pos, new, new_host = width, token, token.tolist()  # `new` goes to positions pos, pos + 1 ...
    while True:
        for i, value in enumerate(new_host):
            out[:, pos] = new[i]
            if stream is not None:
                stream(new[i : i + 1])
            if on_token is not None:
                on_token(pos - width)
            if pos + 1 == total or value in stops:
                cache.length = pos  # what it holds: every token but the last (not a rejected draft's slot)
                return out[:, : pos + 1], stats
            pos += 1
        # The main model at [last token, draft] (positions pos - 1, pos): its tokens for pos, pos + 1.
        step = torch.stack((new[-1:], draft), dim=1)
        cache.vouch_for(step)  # the model's own tokens: no id range check
        logits, hidden = model(step, pos - 1, cache, return_hidden=True)
        # The draft's slot (pos) is held only once the verdict keeps it: stopped before (Ctrl-C
        # at the host sync, in `stream`), the cache must not claim a rejected draft's entry.
        cache.length = pos
        verdict = agreed(model, verifier.check(logits, draft, q)[0])  # [3]
        picked = verdict.tolist()  # the step's one host sync
        kept = 1 + picked[2]  # a rejected draft's cache slot (pos) is overwritten next step
        cache.length = pos - 1 + kept
        stats.steps += 1
        stats.accepted += kept - 1
        new, new_host = verdict[:kept], picked[:kept]
        if pos + kept < total and not stops.intersection(new_host):
            # The MTP layer at the kept positions, each with the token after it: the next draft.
            mtp_ids = new[None]
            mtp_cache.vouch_for(mtp_ids)
            draft, q = verifier.draft(model.draft(hidden[:, :kept], mtp_ids, pos - 1, mtp_cache)[:, -1])
            draft = agreed(model, draft)


def _generate_rows(
    model: nn.Module, input_ids: torch.Tensor, lens: list[int], max_new_tokens: int, verifier: DraftVerifier,
    stops: list[int], on_token: Callable[[int], None] | None, prefill_chunk: int | None,
    graph: Callable[[Callable[..., Any]], Callable[..., Any]] | None,
    reuse: tuple[KVCache, KVCache, int] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    step: SpeculativeStep | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """:func:`generate_speculative` for several sequences (or one, with ``graph``), each at its
    own positions, the steps through a :class:`SpeculativeStep`. ``reuse``: one sequence's
    ``(cache, mtp_cache, cached)``, prefilled from ``cached`` and left as
    :func:`generate_speculative` says; ``stream``: one sequence's tokens as they are written;
    ``step``: the caller's step on those caches (else one is made)."""
    bsz, width = input_ids.shape
    total = width + max_new_tokens
    out, _ = mask_padding(input_ids, lens, stops[0] if stops else 0)
    out = torch.cat((out, out.new_full((bsz, max_new_tokens), stops[0] if stops else 0)), dim=1)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return out[:, :width], stats
    if reuse is not None:  # one sequence, continued in the caller's caches
        cache, mtp_cache, cached = reuse
        firsts = [_prefill(model, input_ids[:, : lens[0]], cache, mtp_cache, cached, prefill_chunk, verifier)]
    else:
        cache = model.new_cache(bsz, total, "absorb", static=True)
        mtp_cache = model.new_cache(bsz, total, "absorb", mtp=True, static=True)
        firsts = []
        for row, length in enumerate(lens):  # each prompt alone, then into its row of the caches
            alone, mtp_alone = model.new_cache(1, length, "absorb"), model.new_cache(1, length, "absorb", mtp=True)
            firsts.append(_prefill(model, input_ids[row : row + 1, :length], alone, mtp_alone, 0, prefill_chunk, verifier))
            for batch_buf, row_buf in [*cache.buffer_pairs(alone), *mtp_cache.buffer_pairs(mtp_alone)]:
                batch_buf[row, :length] = row_buf[0]
    last = torch.cat([token for token, _, _ in firsts])  # [B]
    draft = torch.cat([d for _, d, _ in firsts])
    q = None if firsts[0][2] is None else torch.cat([p for _, _, p in firsts])

    pos, done, written = list(lens), [False] * bsz, 0  # row b's next position; whether it is done
    # Positions go to the device from a pinned host buffer: a tensor made from a list each step was a
    # blocking copy (a stream sync on CUDA) besides the verdict's one read.
    staged = current().backend.pinned_empty((bsz, 2), torch.int64)
    pending = [[token] for token in last.tolist()]  # each row's tokens to write
    step = step or SpeculativeStep(model, cache, mtp_cache, verifier, graph or (lambda fn: fn))
    while True:
        for row, tokens in enumerate(pending):
            for value in tokens if not done[row] else ():
                out[row, pos[row]] = value
                if stream is not None:
                    stream(out[row, pos[row] : pos[row] + 1])
                written += 1
                pos[row] += 1
                if value in stops or pos[row] == lens[row] + max_new_tokens:
                    done[row] = True
                    break
        if on_token is not None:
            on_token(written - 1)
        if all(done):
            stats.captured, stats.capture_error = (step.captured, step.capture_error) if graph else (None, "")
            if reuse is not None:  # what the static steps left valid: every token but the last, and one
                cache.length = pos[0] - 1  # fewer in the MTP cache (its last entry may have been made for
                mtp_cache.length = max(pos[0] - 2, 0)  # a draft that was not kept)
            # generate's width: the longest prompt plus the most tokens a row made (not the furthest row end)
            return out[:, : max(lens) + max(p - n for p, n in zip(pos, lens, strict=True))], stats
        # Every row at [last token, draft] (positions pos - 1, pos); a done row repeats a slot of its own.
        at = [min(p, total - 1) for p in pos]
        staged.copy_(torch.tensor([[p - 1, p] for p in at]))
        verdict, last, draft, q = step(last, draft, q, staged)
        pending = []
        for row, (first, second, keep) in enumerate(verdict.tolist()):  # the step's one host read
            pending.append([first, second] if keep else [first])
            if not done[row]:
                stats.steps += 1
                stats.accepted += keep


__all__ = ["DraftVerifier", "SpeculativeStats", "SpeculativeStep", "generate_speculative", "mtp_layers_for", "speculative_unsupported"]
