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

One sequence at a time, without an attention window (a ring cache cannot take back a
rejected draft). The tests check greedy results against :func:`dshal.model.generate.generate`
token for token, and sampled ones against the exact distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dshal.errors import ArgumentError
from dshal.model.cache import KVCache
from dshal.model.generate import check_cache_reuse, check_generate_args, check_top_p, sampling_probs, stop_list
from dshal.model.prefill import DEFAULT_PREFILL_CHUNK, check_input_ids, check_prefill_chunk


@dataclass
class SpeculativeStats:
    """What the drafts bought: ``steps`` main-model forwards after the prefill, each checking
    one draft, of which ``accepted`` were right."""

    steps: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.steps if self.steps else None

    @property
    def tokens_per_step(self) -> float | None:
        """New tokens per main-model forward after the prefill (1 + acceptance rate, but for
        a last step cut short)."""
        return (self.steps + self.accepted) / self.steps if self.steps else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "mtp",
            "steps": self.steps,
            "drafted": self.steps,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "tokens_per_step": self.tokens_per_step,
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


class DraftVerifier:
    """How a step's tokens are chosen: greedy (argmax; a draft is kept when it is the argmax),
    or sampled with speculative sampling (Leviathan et al., 2023; Chen et al., 2023): the
    draft ``d``, drawn from the MTP layer's distribution ``q``, is kept with probability
    ``min(1, p(d) / q(d))`` under the main model's ``p``; otherwise the token is drawn from
    ``max(p - q, 0)`` normalized. Each kept or redrawn token is then distributed as ``p``
    exactly, so the output is distributed as plain sampling's."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator | None):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = sampling_probs(logits, self.temperature, self.top_p)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def token(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[1, V]`` logits -> the token ``[1]`` and the distribution it was drawn from (None: greedy)."""
        if self.temperature == 0:
            return logits.argmax(dim=-1), None
        probs = self._probs(logits)
        return self._sample(probs), probs

    def check(self, logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """``logits [2, V]`` of the main model at [last token, draft], ``draft [1]`` drawn from
        ``q [1, V]``: ``[3]`` ids on the device, ``(token for the draft's position, the
        position after it, 1 if the draft is kept else 0)``."""
        if self.temperature == 0:
            chosen = logits.argmax(dim=-1)  # [2]
            return torch.cat((chosen, (chosen[:1] == draft).long()))
        p = self._probs(logits)  # [2, V]
        u = torch.rand(1, generator=self.generator, device=p.device)
        kept = u * q[0, draft] <= p[0, draft]  # [1]: with probability min(1, p(d) / q(d))
        residual = (p[0] - q[0]).clamp(min=0)
        residual = torch.where(residual.sum() > 0, residual, p[0])  # p == q: the draft is always kept
        first = torch.where(kept, draft, self._sample(residual[None]))
        return torch.cat((first, self._sample(p[1:]), kept.long()))


@torch.inference_mode()
def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    *,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    cache: KVCache | None = None,
    mtp_cache: KVCache | None = None,
    cached: int = 0,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generation of one sequence ``input_ids [1, T]`` with MTP drafts: ``[1, T + new]`` ids
    and the :class:`SpeculativeStats`. Greedy (``temperature == 0``), the ids are exactly
    those of ``model.generate(input_ids, max_new_tokens, eos_token_id=...)``; sampled
    (``temperature``, ``top_p``, ``generator`` as in :func:`~dshal.model.generate.generate`),
    they are distributed as its samples (speculative sampling), not the same draws.
    ``on_token(i)`` is called after the i-th new token (the first call marks the end of the
    prefill) and ``stream(ids [1])`` gets each new token, as in ``generate``; the prompt is
    prefilled in forwards of at most ``prefill_chunk`` tokens (None: one).

    ``cache`` (``model.new_cache(1, max_len)``) and ``mtp_cache`` (``model.new_cache(1,
    max_len, mtp=True)``), both holding the prompt's first ``cached`` positions, e.g. from an
    earlier turn of a conversation: only the rest is prefilled. Afterwards ``cache`` holds
    every token but the last; ``mtp_cache`` its first ``mtp_cache.length`` positions (the MTP
    layer skips the last step's kept positions when no draft follows)."""
    check_input_ids("generate_speculative", input_ids, model.rope_cos.device)
    check_generate_args(model, input_ids, max_new_tokens, temperature, eos_token_id)
    check_prefill_chunk("generate_speculative", prefill_chunk)
    check_top_p(top_p)
    why = speculative_unsupported(model)
    if why:
        raise ArgumentError(f"generate_speculative: {why}")
    if input_ids.shape[0] != 1:
        raise ArgumentError(
            f"generate_speculative: argument 'input_ids' has {input_ids.shape[0]} sequences, expected 1 "
            "(each sequence accepts its own drafts; run the prompts one at a time)"
        )
    if cache is not None or mtp_cache is not None or cached:
        for name, given in (("cache", cache), ("mtp_cache", mtp_cache)):
            check_cache_reuse(given, cached, input_ids, max_new_tokens, False, "generate_speculative", name)
    stops = set() if eos_token_id is None else set(stop_list(eos_token_id))
    verifier = DraftVerifier(temperature, top_p, generator)
    width = input_ids.shape[1]
    total = width + max_new_tokens
    out = torch.empty(1, total, dtype=torch.int64, device=input_ids.device)
    out[:, :width] = input_ids
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return out, stats
    cache = model.new_cache(1, total) if cache is None else cache
    mtp_cache = model.new_cache(1, total, mtp=True) if mtp_cache is None else mtp_cache

    # Prefill, chunk by chunk: the main model, then the MTP layer on the chunk's hidden states,
    # each with the token after it (the prompt's next id; after the last, the first new token).
    chunk = width - cached if prefill_chunk is None else prefill_chunk
    for start in range(cached, width, chunk):
        end = min(start + chunk, width)
        logits, hidden = model(input_ids[:, start:end], start, cache, return_hidden=True)
        next_ids = input_ids[:, start + 1 : end + 1]
        if end == width:
            token, _ = verifier.token(logits[:, -1])  # [1]: position `width`
            next_ids = torch.cat((next_ids, token[:, None]), dim=1)
        draft_logits = model.draft(hidden, next_ids, start, mtp_cache)
    draft, q = verifier.token(draft_logits[:, -1])  # for position `width + 1`

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
        verdict = verifier.check(logits[0], draft, q)  # [3]
        picked = verdict.tolist()  # the step's one host sync
        kept = 1 + picked[2]  # a rejected draft's cache slot (pos) is overwritten next step
        stats.steps += 1
        stats.accepted += kept - 1
        new, new_host = verdict[:kept], picked[:kept]
        if pos + kept < total and not stops.intersection(new_host):
            # The MTP layer at the kept positions, each with the token after it: the next draft.
            mtp_ids = new[None]
            mtp_cache.vouch_for(mtp_ids)
            draft, q = verifier.token(model.draft(hidden[:, :kept], mtp_ids, pos - 1, mtp_cache)[:, -1])


__all__ = ["DraftVerifier", "SpeculativeStats", "generate_speculative", "mtp_layers_for", "speculative_unsupported"]
