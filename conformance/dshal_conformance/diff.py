"""``dshal diff --backend A --backend B [--checkpoint DIR] [--precision MODE] [--json F] [--html F]``.

Both backends run the model core on the same checkpoint and prompt, with hooks at every
op call and every top-level layer (:func:`dshal_conformance.modelcheck.trace`). Then:

1. **layer by layer** -- the relative drift ``||B - A|| / ||A||`` of each layer's output;
   the first layer over the model tolerance of the precision mode
   (``tolerances.MODEL_TOLERANCES``, the ``model`` family's bound) is *the first drifting
   layer*;
2. **op by op** -- each op call of B matched to A's (layer, op, n-th call there):
   * ``drift``: the two end-to-end outputs compared (errors carried in from earlier ops
     included): the first call over the tolerance is where the outputs first part;
   * ``local``: A's recorded inputs of that call replayed through B's provider and
     compared with A's output -- the op's own share, with nothing carried in;
   the op with the largest local drift in the first drifting layer is named as the
   likely cause, with both values at the element where the two differ most.

``--backend reference`` names the float64 oracle (every op's reference implementation
on a float64 model). The comparison is one prefill pass (no decode steps).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dshal.config import REFERENCE_PROVIDER as REFERENCE  # the float64 oracle's side: every op on its reference
from dshal.errors import ConfigError
from dshal.model import CheckpointReader, DictReader, ModelArgs, build_model
from dshal.perf.report import HtmlReport, Table, console, write_json
from dshal.runtime import reset
from dshal_conformance import modelcheck as mc
from dshal_conformance.tolerances import model_tolerance

SCHEMA = "dshal.diff/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", action="append", required=True, metavar="NAME",
                        help="a backend to compare; give it twice (A, then B). 'reference' is the float64 oracle")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="Hugging Face DeepSeek-V3 checkpoint (default: the conformance suite's seeded tiny one)")
    parser.add_argument("--precision", metavar="MODE", default="high",
                        help="precision mode of both models: high (the checkpoint's dtype) or a precision.gemm mode "
                             "(fp8-block, fp8-row, fp8-tensor, ...); default: high")
    parser.add_argument("--prompt-len", type=int, default=8, metavar="N", help="prompt tokens (seeded random ids; default 8)")
    parser.add_argument("--emulate", action="store_true", default=None,
                        help="run GPU plugins' own code on CPU tensors (same as DSHAL_EMULATE=1)")
    parser.add_argument("--json", metavar="F", help="write the comparison as JSON to F")
    parser.add_argument("--html", metavar="F", help="write an HTML report to F (the profile report's style)")
    parser.add_argument("--top", type=int, default=12, metavar="N", help="op calls shown in the terminal table (default 12)")


# ------------------------------------------------------------------ the comparison
def _side(name: str, emulate: bool | None) -> Any:

    return mc.reference_runtime() if name == REFERENCE else mc.backend_runtime(name, emulate)


def _common_precision(mode: str, a: Any, b: Any) -> Any:
    """``mode`` with one FP8 format both backends compute with (A's native E4M3 when B has it)."""


    precision = mc.precision_for(mode, a)
    if precision.fp8_format not in b.backend.fp8_formats():
        precision = replace(precision, fp8_format=b.backend.native_e4m3())
    return precision


def _load(checkpoint: str | None) -> tuple[Any, Any, str]:
    """ModelArgs, a reader factory and a label of the checkpoint."""

    if checkpoint:
        return ModelArgs.from_file(checkpoint), lambda: CheckpointReader(checkpoint), str(checkpoint)
    args = mc.suite_args("ci")
    tensors = mc.suite_checkpoint(args)
    return args, lambda: DictReader(tensors, path="<suite checkpoint>"), f"conformance suite tiny checkpoint (seed {mc.CHECKPOINT_SEED})"


def _model(runtime: Any, args: Any, reader: Any, precision: Any, oracle: bool) -> Any:


    runtime.activate()
    if oracle:
        args = replace(args, dtype=torch.float64)
    return build_model(args, reader, precision, runtime.device)


def _replay(runtime: Any, call: Any) -> tuple[torch.Tensor, ...]:
    """A's recorded inputs of ``call`` through ``runtime``'s provider of that op."""

    device = runtime.device
    place = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    args = tuple(place(a) for a in call.args)
    kwargs = {k: place(v) for k, v in call.kwargs.items()}
    return mc.output_tensors(runtime.table[call.op](*args, **kwargs))


def compare(backend_a: str, backend_b: str, *, checkpoint: str | None = None, precision: str = "high",
            prompt_len: int = 8, emulate: bool | None = None) -> dict[str, Any]:
    """Run both sides and return the comparison (the JSON ``dshal diff`` writes)."""

    a_rt, b_rt = _side(backend_a, emulate), _side(backend_b, emulate)
    args, reader, label = _load(checkpoint)
    prec = _common_precision(precision, a_rt, b_rt)
    tol = model_tolerance(precision, args.dtype)
    prompt = mc.suite_prompt(args, prompt_len)
    try:
        a_model = _model(a_rt, args, reader(), prec, backend_a == REFERENCE)
        a_trace = mc.trace(a_model, prompt, keep_inputs=True)
        del a_model
        b_model = _model(b_rt, args, reader(), prec, backend_b == REFERENCE)
        b_trace = mc.trace(b_model, prompt)
        del b_model
        b_rt.activate()  # replays of providers that call other ops reach B
        ops = _op_rows(a_trace, b_trace, b_rt, tol.drift)
    finally:

        reset()
    drifts = mc.layer_drifts(b_trace, a_trace)
    first_layer = mc.first_over(drifts, tol.drift)
    first_op = next((r for r in ops if not r["drift"] <= tol.drift), None)
    # The likely cause: the largest local drift in the first drifting layer (or, when only an
    # op's output is over, in that op's layer).
    where = first_layer or (first_op["layer"] if first_op else None)
    in_layer = [r for r in ops if r["layer"] == where]
    cause = max(in_layer, key=lambda r: _order(r["local_drift"]), default=None)
    logit_drift = mc.rel_drift(b_trace.logits, a_trace.logits)
    agreement = mc.token_agreement(b_trace.logits, a_trace.logits, 1, mc.ambiguity_basis(logit_drift, tol.drift))
    return {
        "schema": SCHEMA,
        "backends": [_describe(backend_a, a_rt), _describe(backend_b, b_rt)],
        "checkpoint": label,
        "precision": {"mode": precision, "gemm": prec.gemm, "fp8_format": prec.fp8_format},
        "prompt_len": prompt_len,
        "tolerance": {"drift": tol.drift, "origin": tol.origin},
        "layers": [{"layer": name, "drift": d, "over": not d <= tol.drift} for name, d in drifts.items()],
        "logit_drift": logit_drift,
        "argmax_agreement": {"agreed": agreement.agreed, "decisive": agreement.decisive, "ambiguous": agreement.ambiguous},
        "first_layer_over": first_layer,
        "first_op_over": first_op,
        "likely_cause": cause,
        "ops": ops,
        "unmatched_calls": len(a_trace.calls) + len(b_trace.calls) - 2 * len(ops),
    }


def _order(v: float) -> float:
    return math.inf if v != v else v


def _op_rows(a: Any, b: Any, b_rt: Any, tol: float) -> list[dict[str, Any]]:

    b_calls = b.by_key()
    rows = []
    for call in a.calls:
        other = b_calls.get(call.key)
        if other is None:
            continue
        try:
            replayed = _replay(b_rt, call)
            local = max((mc.rel_drift(x, y) for x, y in zip(replayed, call.outputs)), default=0.0)
        except Exception as err:  # noqa: BLE001 - shown in the row, the comparison goes on
            local, replayed = math.nan, ()
            note = f"replay failed: {type(err).__name__}: {err}"
        else:
            note = ""
        worst = mc.worst_element(other.outputs[0], call.outputs[0]) if call.outputs and other.outputs else {}
        drift = mc.call_drift(other, call)
        rows.append({
            "index": call.index, "layer": call.layer, "op": call.op, "nth": call.nth,
            "drift": drift, "local_drift": local, "over": not drift <= tol, "local_over": not local <= tol,
            "at": worst.get("index"), "a": worst.get("b"), "b": worst.get("a"), "note": note,
        })
    return rows


def _describe(name: str, rt: Any) -> dict[str, Any]:
    return {
        "name": name,
        "device": str(rt.device),
        "emulated": bool(rt.emulated) if name != REFERENCE else False,
        "providers": dict(rt.providers),
    }


# ------------------------------------------------------------------ output
def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        return f"{v:.3e}" if v and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.4g}"
    return str(v)


def headline(result: dict[str, Any]) -> str:
    """One sentence: where the two first part, and the likely cause."""
    a, b = (s["name"] for s in result["backends"])
    tol = result["tolerance"]["drift"]
    if result["first_layer_over"] is None and result["first_op_over"] is None:
        return f"{a} and {b} agree within {tol:g} at every layer and op (logit drift {_num(result['logit_drift'])})"
    parts = []
    if result["first_layer_over"]:
        d = next(r["drift"] for r in result["layers"] if r["layer"] == result["first_layer_over"])
        parts.append(f"first drifting layer: {result['first_layer_over']} (drift {_num(d)} > {tol:g})")
    op = result["first_op_over"]
    if op:
        parts.append(f"first op over: {op['layer']}: {op['op']}#{op['nth']} (drift {_num(op['drift'])}; "
                     f"at {op['at']}: {a} {_num(op['a'])}, {b} {_num(op['b'])})")
    cause = result["likely_cause"]
    if cause:
        parts.append(f"likely cause: {cause['op']} ({cause['layer']}, call #{cause['nth']}: local drift "
                     f"{_num(cause['local_drift'])} with {a}'s inputs)")
    return "; ".join(parts)


def _op_table_rows(result: dict[str, Any], top: int) -> list[list[str]]:
    ops = result["ops"]
    first = result["first_op_over"]
    chosen = sorted(ops, key=lambda r: -_order(r["local_drift"]))[:top]
    if first and first not in chosen:
        chosen.append(first)
    chosen.sort(key=lambda r: r["index"])
    return [[str(r["index"]), r["layer"], f"{r['op']}#{r['nth']}", _num(r["drift"]), _num(r["local_drift"]),
             "OVER" if r["over"] or r["local_over"] else "", str(r["at"]), _num(r["a"]), _num(r["b"])] for r in chosen]


OP_HEADERS = ["call", "layer", "op", "drift", "local drift", "", "worst at", "A value", "B value"]


def print_result(result: dict[str, Any], top: int) -> None:
    from rich.table import Table as RichTable


    out = console()
    a, b = (s["name"] for s in result["backends"])
    prec = result["precision"]
    out.print(f"[bold]dshal diff[/bold]: {a} vs {b}; {result['checkpoint']}; precision {prec['mode']} "
              f"(gemm {prec['gemm']}, {prec['fp8_format']}); tolerance {result['tolerance']['drift']:g}", highlight=False)
    layers = RichTable(title="layer drift ||B - A|| / ||A||", show_edge=False, title_justify="left")
    for h in ("layer", "drift", ""):
        layers.add_column(h)
    for r in result["layers"]:
        layers.add_row(r["layer"], _num(r["drift"]), "[red]OVER[/red]" if r["over"] else "")
    out.print(layers)
    ops = RichTable(title=f"op calls (the {top} with the largest local drift, and the first over)", show_edge=False)
    for h in OP_HEADERS:
        ops.add_column(h.replace("A value", f"{a} value").replace("B value", f"{b} value"))
    for row in _op_table_rows(result, top):
        ops.add_row(*row)
    out.print(ops)
    out.print(headline(result), highlight=False)


def write_html(result: dict[str, Any], path: str, top: int) -> Path:

    a, b = (s["name"] for s in result["backends"])
    prec = result["precision"]
    report = HtmlReport(f"dshal diff: {a} vs {b}", {
        "checkpoint": result["checkpoint"],
        "precision": f"{prec['mode']} (gemm {prec['gemm']}, {prec['fp8_format']})",
        "tolerance": f"{result['tolerance']['drift']:g}: {result['tolerance']['origin']}",
        "logit drift": _num(result["logit_drift"]),
        "finding": headline(result),
    })
    s = report.section("Layers")
    report.add_table(s, Table(["layer", "drift", ""], [[r["layer"], _num(r["drift"]), "OVER" if r["over"] else ""] for r in result["layers"]]))
    s = report.section("Op calls")
    report.add_note(s, "drift: the two end-to-end outputs; local drift: A's inputs replayed through B's provider.")
    headers = [h.replace("A value", f"{a} value").replace("B value", f"{b} value") for h in OP_HEADERS]
    report.add_table(s, Table(headers, _op_table_rows(result, top), text_columns=(1, 2, 5, 6)))
    return report.write(path)


def main(args: argparse.Namespace) -> int:

    if len(args.backend) != 2:
        raise ConfigError(f"--backend: given {len(args.backend)} time(s), expected exactly 2 (A and B)")
    if args.prompt_len < 1:
        raise ConfigError(f"--prompt-len: got {args.prompt_len}, expected an integer >= 1")
    _check_mode(args.precision)
    result = compare(args.backend[0], args.backend[1], checkpoint=args.checkpoint, precision=args.precision,
                     prompt_len=args.prompt_len, emulate=args.emulate)
    print_result(result, args.top)
    if args.json:
        print(f"json: {write_json(args.json, result)}")
    if args.html:
        print(f"html: {write_html(result, args.html, args.top)}")
    return 0


def _check_mode(mode: str) -> None:

    labels = mc.mode_labels()
    if mode not in labels and mode != "bf16":
        raise ConfigError(f"--precision: got {mode!r}, expected one of: {', '.join(labels)}")


__all__ = ["add_arguments", "compare", "headline", "main"]
