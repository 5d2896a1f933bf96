"""``<op>/bad_input/spoiled``: every argument of every op spoiled one at a time must give a
``DshalError`` or the reference's answer (``dshal_conformance.cases.spoiled``).

The cpu, emulated nvidia and emulated amd backends run these cases in their conformance legs
(``test_conformance_cpu.py``, ``test_conformance_legs.py``). Here: they fail where they should
(a crash, a wrong answer), and the Ascend plugin's own op code runs them on CPU tensors with
its torch_npu calls bound against a release's recorded signatures (a stand-in, not an NPU).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dshal.ops.catalogue import SPECS
from dshal_conformance import runner
from dshal_conformance.cases.base import Context
from dshal_conformance.cases.spoiled import run_spoiled
from dshal_conformance.spoilers import differs, routing_differs, spoiled_calls


def _by_id(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["cases"]}


def test_a_crash_on_an_accepted_input_fails_the_case(fragile_backend_installed) -> None:  # noqa: ANN001
    options = runner.Options(ops=["silu_and_mul", "rms_norm"], cases=["*/spoiled"], progress=False)
    with fragile_backend_installed():
        report = runner.run(runner.resolve("fragile"), options)
    cases = _by_id(report)
    fragile = cases["silu_and_mul/bad_input/spoiled"]
    assert fragile["status"] == "fail" and fragile["kind"] == "bad_input"
    assert "crash(es) outside DshalError" in fragile["reason"] and "x transposed: RuntimeError" in fragile["reason"]
    assert fragile["details"]["crashes"] and fragile["value"] >= 1 and fragile["threshold"] == 0
    assert cases["rms_norm/bad_input/spoiled"]["status"] == "pass"  # the cpu backend's own


def test_a_wrong_answer_to_an_accepted_input_fails_the_case(wrong_backend_installed) -> None:  # noqa: ANN001
    options = runner.Options(ops=["fp8_gemm", "moe_gate"], cases=["*/spoiled"], progress=False)
    with wrong_backend_installed():
        report = runner.run(runner.resolve("wrong"), options)
    cases = _by_id(report)
    gemm, gate = cases["fp8_gemm/bad_input/spoiled"], cases["moe_gate/bad_input/spoiled"]
    assert gemm["status"] == "fail" and ": valid: accepted, but values differ" in gemm["reason"]  # its scales ignored
    assert gate["status"] == "fail" and "at a decisive margin" in gate["reason"]  # its bias ignored


def test_a_routing_difference_only_at_a_near_tie_is_no_finding() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    kwargs = {"logits": logits, "bias": None, "top_k": 2, "n_group": 1, "topk_group": 1}
    weights = torch.full((2, 2), 0.5)
    want = (weights, torch.tensor([[0, 1], [0, 1]]))
    tie = (weights, torch.tensor([[2, 0], [1, 0]]))  # token 0 took expert 2, tied with 1; order differs
    assert routing_differs(tie, want, kwargs) is None
    decisive = (weights, torch.tensor([[0, 1], [0, 2]]))  # token 1 took expert 2 at a margin of 1.0
    assert "1 token(s) routed to other experts at a decisive margin" in routing_differs(decisive, want, kwargs)
    assert differs(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")])) is None  # both non-finite
    assert "finite where the reference is not" in differs(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]))


def test_every_op_gets_the_valid_row_first_and_spoils_each_argument() -> None:
    for op in SPECS:
        calls = list(spoiled_calls(op, 1))
        assert calls[0][0].endswith(": valid") and calls[0][2] is None, op
        spoiled_args = {name.split(": ", 1)[1].split(" ", 1)[0] for name, _, _ in calls[1:]}
        assert spoiled_args == set(calls[0][1]), op  # every argument of the row, none missed


def _ascend_standin_context(release: str) -> tuple[Context, Any]:
    pytest.importorskip("dshal_ascend", reason="the dshal-ascend plugin is not installed")
    from dshal_ascend.npu_ops import AscendOps
    from dshal_ascend.releases import kernel_features
    from dshal_ascend.schema import recorded_signatures
    from dshal_ascend.standin import SignatureCheckingStandIn

    table = AscendOps(kernel_features(release), SignatureCheckingStandIn(recorded_signatures(release))).ops()
    checked = {op: SPECS[op].checked(fn, "cpu") for op, fn in table.items()}
    ctx = Context(table=checked, provided=frozenset(checked), device=torch.device("cpu"), native_e4m3="e4m3fn",
                  fp8_formats=("e4m3fn",), seed=0)
    return ctx, table


#: Ascend kernels whose NaN / Inf handling is not documented, by the dshal op they serve: the
#: stand-in does what torch does (npu_dynamic_quant takes them into the amax; torch.topk ranks a
#: NaN score first), the ops' rules say otherwise. For the conformance-ascend leg on a 910B.
UNDOCUMENTED_NONFINITE = {"quantize_int8": "npu_dynamic_quant", "indexer_topk": "npu_lightning_indexer"}


def _undocumented_nonfinite(op: str, bad: Any) -> str | None:
    nonfinite = isinstance(bad, torch.Tensor) and bad.is_floating_point() and not bad.is_meta and not bool(bad.isfinite().all())
    return f"{UNDOCUMENTED_NONFINITE[op]}: non-finite input" if op in UNDOCUMENTED_NONFINITE and nonfinite else None


@pytest.mark.parametrize("release", ["6.0.0", "7.3.0", "26.1.0"])  # the oldest and newest recorded (7.3.0: the last with ScalarType? output_dtype)
@pytest.mark.parametrize("op", sorted(SPECS))
def test_the_ascend_plugins_code_on_the_stand_in_handles_every_spoiled_argument(release, op) -> None:
    ctx, table = _ascend_standin_context(release)
    if op not in table:
        pytest.skip(f"the ascend plugin does not serve {op}")
    (outcome,) = run_spoiled(ctx, op, exempt=_undocumented_nonfinite)
    verdict = outcome.verdict
    assert verdict.status == "pass", f"{op} on the ascend stand-in {release} (not an NPU): {verdict.details}"
    assert verdict.details["refused"] and verdict.details["accepted"]


def test_an_indexer_selection_is_compared_as_a_set_per_query() -> None:
    """indexer_topk's order is free: the same keys in another order are the oracle's answer
    (entry by entry they differed, and the ascend stand-in's sorted output failed), another
    key at a decisive margin is not."""
    from dshal_conformance.spoilers import selection_differs

    torch.manual_seed(0)
    kwargs = {"q": torch.randn(1, 4, 2, 8), "weights": torch.rand(1, 4, 2), "k": torch.randn(1, 8, 8), "topk": 3,
              "visible": None}
    want = SPECS["indexer_topk"].reference_impl(**kwargs)
    assert selection_differs(want.flip(-1), want, kwargs) is None
    assert differs(want.flip(-1), want) == "integer outputs differ"
    from dshal.ops.sparse_attention import index_scores

    scores = index_scores(kwargs["q"], kwargs["weights"], kwargs["k"])  # [B, T, S]
    worst = scores[0, 3].argmin()  # query 3 sees keys 0..7; its lowest score is never picked
    wrong = want.clone()
    wrong[0, 3, 0] = worst
    assert "differ from the oracle's beyond a near-tie" in selection_differs(wrong, want, kwargs)
