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

The result is the main model's greedy output whatever the drafts are: a draft only decides
how many tokens a forward yields. DeepSeek-V3's report measures 85-90 % of drafts accepted
(about 1.8x the tokens per second); a random MTP layer's drafts are almost never accepted,
and each step then costs a two-token forward and an MTP forward for one token.

Greedy only, one sequence at a time, without an attention window (a ring cache cannot take
back a rejected draft). The tests check the result against :func:`dshal.model.generate.generate`
token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dshal.errors import ArgumentError
from dshal.model.generate import check_generate_args, stop_list
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


@torch.inference_mode()
def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    stream: Callable[[torch.Tensor], None] | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy generation of one sequence ``input_ids [1, T]`` with MTP drafts: the ids
    ``[1, T + new]`` that ``model.generate(input_ids, max_new_tokens, eos_token_id=...)``
    returns, and the :class:`SpeculativeStats`. ``on_token(i)`` is called after the i-th new
    token (the first call marks the end of the prefill) and ``stream(ids [1])`` gets each new
    token, as in :func:`~dshal.model.generate.generate`; the prompt is prefilled in forwards
    of at most ``prefill_chunk`` tokens (None: one)."""
    check_input_ids("generate_speculative", input_ids, model.rope_cos.device)
    check_generate_args(model, input_ids, max_new_tokens, 0.0, eos_token_id)
    check_prefill_chunk("generate_speculative", prefill_chunk)
    why = speculative_unsupported(model)
    if why:
        raise ArgumentError(f"generate_speculative: {why}")
    if input_ids.shape[0] != 1:
        raise ArgumentError(
            f"generate_speculative: argument 'input_ids' has {input_ids.shape[0]} sequences, expected 1 "
            "(each sequence accepts its own drafts; run the prompts one at a time)"
        )
    stops = set() if eos_token_id is None else set(stop_list(eos_token_id))
    width = input_ids.shape[1]
    total = width + max_new_tokens
    out = torch.empty(1, total, dtype=torch.int64, device=input_ids.device)
    out[:, :width] = input_ids
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return out, stats
    cache, mtp_cache = model.new_cache(1, total), model.new_cache(1, total, mtp=True)

    # Prefill, chunk by chunk: the main model, then the MTP layer on the chunk's hidden states,
    # each with the token after it (the prompt's next id; after the last, the first new token).
    chunk = width if prefill_chunk is None else prefill_chunk
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        logits, hidden = model(input_ids[:, start:end], start, cache, return_hidden=True)
        next_ids = input_ids[:, start + 1 : end + 1]
        if end == width:
            token = logits[:, -1].argmax(dim=-1)  # [1]: position `width`
            next_ids = torch.cat((next_ids, token[:, None]), dim=1)
        draft = model.draft(hidden, next_ids, start, mtp_cache)[:, -1].argmax(dim=-1)  # the last: position `width + 1`

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
                return out[:, : pos + 1], stats
            pos += 1
        # The main model at [last token, draft] (positions pos - 1, pos): its own tokens for pos, pos + 1.
        step = torch.stack((new[-1:], draft), dim=1)
        cache.vouch_for(step)  # the model's own tokens: no id range check
        logits, hidden = model(step, pos - 1, cache, return_hidden=True)
        chosen = logits[0].argmax(dim=-1)  # [2]
        picked = torch.cat((chosen, draft)).tolist()  # the step's one host sync
        stats.steps += 1
        kept = 2 if picked[0] == picked[2] else 1  # a wrong draft's cache slot (pos) is overwritten next step
        stats.accepted += kept - 1
        new, new_host = chosen[:kept], picked[:kept]
        if pos + kept < total and not stops.intersection(new_host):
            # The MTP layer at the kept positions, each with the token after it: the next draft.
            mtp_ids = new[None]
            mtp_cache.vouch_for(mtp_ids)
            draft = model.draft(hidden[:, :kept], mtp_ids, pos - 1, mtp_cache)[:, -1].argmax(dim=-1)


__all__ = ["SpeculativeStats", "generate_speculative", "mtp_layers_for", "speculative_unsupported"]
