"""The ``model`` family: the model core on the suite's fixed tiny checkpoint, in every
precision mode the backend declares, against the float64 reference model.

Per mode one case, ``model/<mode>`` (ci: high and fp8-block on the 3-layer checkpoint;
full: every mode, and ``model/deep/<mode>`` on a 6-layer one), with two judgements:

- ``/drift``: relative L2 drift ``||out - ref|| / ||ref||`` of the logits and of every
  top-level layer's output; the report's ``details`` lists the drift per layer and names
  the first layer over the tolerance. A token whose reference routing is a near-tie
  (within what the tolerance could move) and whose backend routing differs gets the
  reference's experts (:class:`~dshal_conformance.modelcheck.RouterTies`): a tie is no
  finding; ``details["routing"]`` counts those tokens and any decisive mismatch;
- ``/tokens``: greedy-token agreement over N steps, teacher-forced: the reference
  generates N tokens greedily, the backend runs one forward pass over that sequence, and
  each position's argmax must match the reference's next token (positions where the
  reference's own top-1 margin is within reach of the measured drift, capped by the
  tolerance, are not counted).

The reference is the same model core on :func:`~dshal_conformance.modelcheck.reference_runtime`
(every op its reference implementation) with float64 weights and activations, the same
precision mode and the same FP8 format (the router and the RoPE tables compute in float32
in both, as the model core does). Tolerances: ``tolerances.MODEL_TOLERANCES``.

A partial plugin (one that provides only some ops) is judged too: each op it does not
provide is served by the op's reference on its device
(:func:`~dshal_conformance.modelcheck.with_reference_stand_ins`), the judgements' detail
and ``details["reference_served"]`` name those ops, and a backend that provides none of the
ops the model calls gets ``unsupported``. A precision mode still needs its own ops
(``MODE_OPS``) from the backend.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dshal.errors import UnsupportedOpError
from dshal.runtime import current
from dshal_conformance import modelcheck as mc
from dshal_conformance.cases.base import Case, Context, Outcome, crashed, unsupported_outcomes
from dshal_conformance.judge import Check, verdict
from dshal_conformance.tolerances import model_tolerance

SUFFIXES = ("/drift", "/tokens")
#: Modes run in the ci tier (the rest run in full).
CI_MODES = ("high", "fp8-block")


def _fmt(v: float) -> str:
    return f"{v:.2e}" if math.isfinite(v) else str(v)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def run_mode(ctx: Context, mode: str, size: str) -> list[Outcome]:
    """Build both models, trace both, judge drift and tokens (see the module docstring)."""
    runtime = current()  # the backend under test (the runner activated it)
    why = mc.mode_unsupported(mode, runtime, ctx.provided)
    if why:
        return unsupported_outcomes(SUFFIXES, why)
    args = mc.suite_args(size)
    checkpoint = mc.suite_checkpoint(args)
    prompt = mc.suite_prompt(args, mc.PROMPT_LEN[size])
    steps = mc.STEPS[size]
    tol = model_tolerance(mode, args.dtype)
    precision = mc.precision_for(mode, runtime)
    try:
        ref_model = mc.build(mc.reference_runtime(), args, checkpoint, precision, torch.float64)
        sequence = mc.greedy_reference(ref_model, prompt, steps)
        ref = mc.trace(ref_model, sequence, keep_inputs=frozenset({"moe_gate"}))
        del ref_model
        model_runtime, stand_ins = mc.with_reference_stand_ins(runtime, ctx.provided)
        model = mc.build(model_runtime, args, checkpoint, precision)
        ties = mc.RouterTies(ref.calls, tol.drift)
        try:
            out = mc.trace(model, sequence, route=ties)
        except UnsupportedOpError as err:
            return unsupported_outcomes(SUFFIXES, f"the model core needs an op the backend does not provide: {err}")
    finally:
        runtime.activate()
    called = {c.op for c in out.calls}
    by_reference = sorted(called & set(stand_ins))
    if not called - set(stand_ins):
        return unsupported_outcomes(SUFFIXES, f"the backend provides none of the ops the model calls ({', '.join(sorted(called))})")
    served = f"; served by the reference (the backend does not provide them): {', '.join(by_reference)}" if by_reference else ""
    drifts = mc.layer_drifts(out, ref)
    logit_drift = mc.rel_drift(out.logits, ref.logits)
    first = mc.first_over(drifts, tol.drift)
    per_layer = ", ".join(f"{name} {_fmt(d)}" for name, d in drifts.items())
    where = f"first layer over {tol.drift:g}: {first}" if first else "no layer over the tolerance"
    details: dict[str, Any] = {
        "mode": mode,
        "precision": precision.gemm,
        "fp8_format": precision.fp8_format,
        "layer_drift": {k: _finite(v) for k, v in drifts.items()},
        "logit_drift": _finite(logit_drift),
        "first_layer_over": first,
        "tolerance": tol.drift,
        "origin": tol.origin,
        "routing": ties.summary(),
        "reference_served": by_reference,
    }
    routing = (
        f"; routing: {ties.resolved} near-tie token(s) given the reference's experts, {ties.mismatched} decisive "
        f"mismatch(es) of {ties.tokens} routed"
    )
    drift_checks = [
        Check("logit_rel_drift", logit_drift, tol.drift, detail=f"logits against the float64 reference model; {where}{routing}{served}", origin=tol.origin),
        Check("max_layer_rel_drift", max(drifts.values(), default=0.0), tol.drift, detail=f"per layer: {per_layer}", origin=tol.origin),
    ]
    drift = verdict(drift_checks, ctx.overrides("/drift"))
    drift.details = details
    agreement = mc.token_agreement(out.logits, ref.logits, prompt.shape[1], mc.ambiguity_basis(logit_drift, tol.drift))
    detail = (
        f"{agreement.agreed} of {agreement.decisive} decisive positions agree over {steps} greedy steps "
        f"(teacher-forced; {agreement.ambiguous} ambiguous on the reference)"
        + (f"; first mismatch at step {agreement.first_mismatch}" if agreement.first_mismatch is not None else "")
        + served
    )
    tokens = verdict([Check("token_agreement", agreement.value, tol.tokens, at_least=True, detail=detail, origin=tol.origin)], ctx.overrides("/tokens"))
    tokens.details = {
        "steps": steps,
        "agreed": agreement.agreed,
        "decisive": agreement.decisive,
        "ambiguous": agreement.ambiguous,
        "first_mismatch": agreement.first_mismatch,
        "reference_served": by_reference,
    }
    return [Outcome("/drift", drift), Outcome("/tokens", tokens)]


def _case(mode: str, size: str, tiers: frozenset[str]) -> Case:
    args = mc.suite_args(size)

    def body(ctx: Context) -> list[Outcome]:
        try:
            return run_mode(ctx, mode, size)
        except Exception as err:  # noqa: BLE001 - a crash in the model core is a finding
            return crashed(SUFFIXES, f"the model core in mode {mode}", err)

    case_id = f"model/{mode}" if size == "ci" else f"model/deep/{mode}"
    params = {
        "mode": mode,
        "layers": args.num_hidden_layers,
        "prompt_len": mc.PROMPT_LEN[size],
        "steps": mc.STEPS[size],
        "checkpoint_seed": mc.CHECKPOINT_SEED,
    }
    return Case(case_id, "model", "model", "float32", params, tiers, body, SUFFIXES)


def cases() -> list[Case]:
    out = []
    for mode in mc.mode_labels():
        out.append(_case(mode, "ci", frozenset({"ci", "full"}) if mode in CI_MODES else frozenset({"full"})))
    out += [_case(mode, "full", frozenset({"full"})) for mode in mc.mode_labels()]
    return out
