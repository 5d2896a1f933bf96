"""The indexer_topk selection judge: the oracle's own choice passes; a key off the oracle's
choice fails, counted, unless it ties the topk-th score within float32 rounding; selections
of the wrong shape (a key twice, a hidden key, too few keys) fail whatever the scores."""

from __future__ import annotations

import pytest
import torch

from dshal.ops import SPECS
from dshal.ops.examples import Draw
from dshal.ops.sparse_attention import index_scores
from dshal_conformance.cases.sparse_attention import judge_indexer_topk

ROW = next(r for r in SPECS["indexer_topk"].rows if r.name.startswith("f32/prefill-with-cache"))


def _example():
    inputs = SPECS["indexer_topk"].example_inputs(Draw(torch.Generator().manual_seed(4)), ROW)
    return inputs, SPECS["indexer_topk"].run_oracle(**inputs.kwargs)


def _judge(out, ref, inputs):
    (check,) = judge_indexer_topk(None, ROW.params, out, ref, inputs)
    return check


def test_the_oracles_choice_in_any_order_passes():
    inputs, ref = _example()
    check = _judge(ref.flip(-1), ref, inputs)
    assert check.ok and check.metric == "index_selection_mismatch" and check.value == 0


def test_a_far_key_instead_of_a_chosen_one_fails_naming_the_count():
    inputs, ref = _example()
    kw = inputs.kwargs
    scores = index_scores(kw["q"].double(), kw["weights"].double(), kw["k"].double())[0, -1]  # the last query sees all 40
    worst = int(scores.argmin())
    out = ref.clone()
    out[0, -1, 0] = worst
    check = _judge(out, ref, inputs)
    assert not check.ok and check.value == 2  # one key picked, one missing
    assert "2 of 128 selected keys differ from the oracle's beyond a near-tie" in check.detail
    assert f"picked [{worst}]" in check.detail


@pytest.mark.parametrize("apart, passes", [(0.0, True), (2.0**-21, True), (1e-3, False)])
def test_a_key_tied_with_the_topk_th_within_float32_rounding_may_replace_it(apart, passes):
    """A copy of the topk-th key scaled by ``1 + apart`` scores that much apart: either may be
    picked while that is within the float32 rounding bound (here ~1.5e-6 relative), not past it."""
    inputs, _ = _example()
    kw = inputs.kwargs
    ref = SPECS["indexer_topk"].run_oracle(**kw)
    scores = index_scores(kw["q"].double(), kw["weights"].double(), kw["k"].double())[0, -1]
    chosen = ref[0, -1]
    last = int(chosen[scores[chosen].argmin()])
    other = next(j for j in range(40) if j not in chosen.tolist())
    kw["k"][0, other] = kw["k"][0, last] * (1 + apart)
    ref = SPECS["indexer_topk"].run_oracle(**kw)
    out = ref.clone()
    row = out[0, -1]
    was_last, was_other = row == last, row == other
    row[was_last], row[was_other] = other, last  # whichever of the two the oracle took, the other one
    assert bool(was_last.any()) != bool(was_other.any())
    check = _judge(out, ref, inputs)
    if passes:
        assert check.ok and check.value == 0 and "2 more differ within float32 rounding" in check.detail
    else:  # the key picked in its place is off; the one left out is the topk-th itself
        assert not check.ok and check.value == 1 and "1 of 128 selected keys differ" in check.detail


def test_malformed_selections_fail_whatever_the_scores():
    inputs, ref = _example()
    twice = ref.clone()
    twice[0, 0, 1] = twice[0, 0, 0]
    hidden = ref.clone()
    hidden[0, 0, 0] = 39  # query 0 sits at position 32: key 39 is in its future
    short = ref.clone()
    short[0, 0, 0] = -1
    for out, words in ((twice, "names a key twice"), (hidden, "keys it does not see: [39]"), (short, "names 15 keys, expected 16")):
        check = _judge(out, ref, inputs)
        assert not check.ok and check.metric == "indices.invalid" and words in check.detail, check.detail
