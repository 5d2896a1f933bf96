"""Conformance of DeepSeek Sparse Attention's two ops: the judging (rows and inputs are the ops'
own examples, in :mod:`dshal.ops.sparse_attention`: DeepSeek-V3.2's indexer and absorbed MLA
dims in the full tier, queries with fewer visible keys than topk, -1 indices, NaN rows).

``indexer_topk`` is judged by its selection: a provider's keys may differ from the oracle's
only at near-ties, keys whose float64 scores are within the float32 rounding bound of a score
of the ``topk``-th oracle score (:func:`score_rounding`); anything else is a different model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dshal.errors import ShapeError
from dshal.ops.examples import Example
from dshal.ops.sparse_attention import causal_visible, index_scores
from dshal_conformance.cases.base import BadInput, Case, Context, op_cases, replace_arg, standard_bad_inputs, to_cpu
from dshal_conformance.judge import Check, close, failed, threshold_check
from dshal_conformance.tolerances import composite

#: Unit roundoff of the scores' accumulation: float32 (float64 for float64 inputs).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53}
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def score_rounding(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, T, S]``: how far a correct float32 score may sit from the exact one, by the
    standard bound for a sum of products, ``gamma_n * sum |terms|`` with ``gamma_n = n u / (1 - n u)``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1): ``n = Di + Hi + 1``
    roundings (the dot product, the head weight, the sum over heads) and the terms'
    magnitude ``sum_h |w_h| (|q_h| . |k|)``. Inputs of a narrower dtype are exact in float32."""
    unit = UNIT_ROUNDOFF.get(q.dtype, FLOAT32_UNIT_ROUNDOFF)
    n = q.shape[-1] + q.shape[-2] + 1
    gamma = n * unit / (1 - n * unit)
    return gamma * index_scores(q.abs().double(), weights.abs().double(), k.abs().double())


def judge_indexer_topk(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return [failed("indices.shape", f"indices: got {got}, expected {list(ref.shape)}")]
    if out.dtype != torch.int64:
        return [failed("indices.dtype", f"indices: dtype {out.dtype}, expected torch.int64")]
    kw = {name: to_cpu(value) for name, value in inputs.kwargs.items()}
    if out.numel() == 0:
        return [threshold_check("index_selection_mismatch", 0.0, "no query")]
    problem, n_bad, detail = compare_selection(out.detach().cpu(), ref.detach().cpu(), kw["q"], kw["weights"], kw["k"], kw["visible"])
    if problem:
        return [failed("indices.invalid", problem)]
    return [threshold_check("index_selection_mismatch", float(n_bad), detail)]


def compare_selection(
    got: torch.Tensor, want: torch.Tensor, q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor,
    visible: torch.Tensor | None,
) -> tuple[str | None, int, str]:
    """``got`` against the oracle's selection ``want`` (CPU ``[B, T, topk]``, same shape and
    dtype): (what breaks the contract's shape of a selection or None, how many selected keys
    differ beyond a near-tie of the topk-th score, the detail line)."""
    batch, tq, _ = got.shape
    slen = k.shape[1]
    seen = causal_visible(tq, slen, torch.device("cpu")).expand(batch, tq, slen) if visible is None else visible
    problem = _invalid_selection(got, seen)
    if problem:
        return problem, 0, ""
    picked, chosen = _members(got, slen), _members(want, slen)
    scores = index_scores(q.double(), weights.double(), k.double()).nan_to_num(nan=-torch.inf)  # a NaN ranks last
    slack = score_rounding(q, weights, k).nan_to_num(nan=0.0, posinf=0.0)
    # the topk-th oracle score of each query, and its own rounding slack
    last = scores.masked_fill(~chosen, torch.inf).min(dim=-1, keepdim=True)
    at_last = slack.gather(-1, last.indices)
    extra, missing = picked & ~chosen, chosen & ~picked
    near = (scores - last.values).abs() <= slack + at_last
    near |= scores == last.values  # both -inf: NaN scores, tied last
    far = (extra | missing) & ~near
    n_bad, n_tie = int(far.sum()), int(((extra | missing) & near).sum())
    total = int(chosen.sum())
    detail = f"{n_bad} of {total} selected keys differ from the oracle's beyond a near-tie"
    if n_tie:
        detail += f" ({n_tie} more differ within float32 rounding of the topk-th score)"
    if n_bad:
        b, t = (int(i) for i in far.any(dim=-1).nonzero()[0])
        extra_keys = extra[b, t].nonzero().flatten().tolist()
        missing_keys = missing[b, t].nonzero().flatten().tolist()
        detail += f"; row {b} query {t}: picked {extra_keys[:8]} instead of {missing_keys[:8]}"
    return None, n_bad, detail


def _members(indices: torch.Tensor, slen: int) -> torch.Tensor:
    """``[B, T, S]`` bool: the keys ``indices`` names (its -1 entries name none)."""
    slot = torch.where(indices >= 0, indices, slen)
    out = torch.zeros(*indices.shape[:2], slen + 1, dtype=torch.bool)
    return out.scatter_(-1, slot, True)[..., :slen]


def _invalid_selection(got: torch.Tensor, seen: torch.Tensor) -> str | None:
    """What breaks the contract's shape of a selection, whatever the scores: entries outside
    ``[-1, S)``, a key named twice, a key the query does not see, or a count of keys other
    than ``min(topk, keys it sees)``."""
    slen, topk = seen.shape[-1], got.shape[-1]
    outside = (got < -1) | (got >= slen)
    if bool(outside.any()):
        return f"{int(outside.sum())} entries outside [-1, {slen}), e.g. {int(got[outside][0])}"
    named = got >= 0
    ordered = got.sort(dim=-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if bool(twice.any()):
        b, t = (int(i) for i in twice.any(dim=-1).nonzero()[0])
        return f"row {b} query {t} names a key twice: {got[b, t].tolist()}"
    hidden = named & ~seen.gather(-1, got.clamp(min=0))
    if bool(hidden.any()):
        b, t = (int(i) for i in hidden.any(dim=-1).nonzero()[0])
        return f"row {b} query {t} picked keys it does not see: {got[b, t][hidden[b, t]].tolist()}"
    count, want = named.sum(dim=-1), seen.sum(dim=-1).clamp(max=topk)
    if bool((count != want).any()):
        b, t = (int(i) for i in (count != want).nonzero()[0])
        return f"row {b} query {t} names {int(count[b, t])} keys, expected {int(want[b, t])} (min(topk, the keys it sees))"
    return None


def judge_sparse_mla_attention(ctx: Context, row: Mapping[str, Any], out: Any, ref: Any, inputs: Example) -> list[Check]:
    # As attention: softmax averages, so atol is not scaled by the keys' count.
    return close("out", out, ref, composite(row["dtype"], ref, 1, stages=2), row["dtype"])


def _past_the_last_row(indices: torch.Tensor) -> torch.Tensor:
    spoiled = indices.clone()
    spoiled.view(-1)[0] = 10**6
    return spoiled


def cases() -> list[Case]:
    return [
        *op_cases(
            "indexer_topk", judge_indexer_topk,
            standard_bad_inputs(dtype=("k", torch.float32), shape=("weights", lambda t: t[..., :-1], "'weights' with fewer heads than 'q'"),
                                device="k"),
        ),
        *op_cases(
            "sparse_mla_attention", judge_sparse_mla_attention,
            standard_bad_inputs(
                dtype=("indices", torch.int32), shape=("kv", lambda t: t[..., :-1], "'kv' narrower than 'q'"), device="indices",
                extra=[BadInput("index-out-of-range", replace_arg("indices", _past_the_last_row), ShapeError, "an index past the rows of 'kv'")],
            ),
        ),
    ]
