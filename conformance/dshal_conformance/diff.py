"""``dshal diff --backend A --backend B [--checkpoint DIR|ID] [--precision MODE] [--decode N] [--decode-path P] [--json F] [--html F]``.

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

**Routing**: for each ``moe_gate`` call, the tokens the two sides sent to different experts,
and how many of those are near-ties on A (either choice is right). A gate that rerouted a
token in the first drifting layer is named as its likely cause.

``--backend reference`` names the float64 oracle (every op's reference implementation
on a float64 model).

**Decode steps** (``--decode N``, default 4): after the prefill, both sides run N greedy
decode steps on their own KV cache and the same comparison is made for every step. Both
are fed the SAME token ids (teacher forcing): A's greedy token, so one flipped argmax does
not make every later step incomparable; whether B's greedy token would have differed is
reported per step. ``--decode-path generate`` (default) is the model core's own decode
step as ``model.generate()`` runs it (the cache in the checkpoint's ``mla_mode``, the
absorbed MLA path for ``absorb``; step 1 with the ops' input checks, later steps in
trusted mode); ``static`` is :func:`dshal.model.decode.static_decode_step`, what a device
graph captures, run eagerly here (absorb cache, key-bias mask; step 1 checked, then
trusted). ``--decode 0`` is the prefill alone, without a cache, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dshal import ops
from dshal.config import REFERENCE_PROVIDER as REFERENCE  # the float64 oracle's side: every op on its reference
from dshal.errors import ConfigError
from dshal.hub import hub_provenance, hub_provenance_text
from dshal.model import CheckpointReader, DictReader, ModelArgs, build_model
from dshal.model.args import checkpoint_folder
from dshal.model.decode import static_decode_step, static_decode_unsupported
from dshal.outputs import check_writable
from dshal.perf.report import HtmlReport, Table, console, write_json
from dshal.runtime import active_kept
from dshal_conformance import modelcheck as mc
from dshal_conformance.diff_command import (  # its options, importable without torch (dshal diff --help)
    DECODE_PATHS,
    DEFAULT_DECODE,
    add_arguments,
)
from dshal_conformance.tolerances import model_tolerance

SCHEMA = "dshal.diff/1"


# ------------------------------------------------------------------ the comparison
def _side(name: str, emulate: bool | None) -> Any:
    return mc.reference_runtime() if name == REFERENCE else mc.backend_runtime(name, emulate, source="--backend")


def _common_precision(mode: str, a: Any, b: Any) -> Any:
    """``mode`` with one FP8 format both backends compute with (A's native E4M3 when B has it)."""


    precision = mc.precision_for(mode, a)
    if precision.fp8_format not in b.backend.fp8_formats():
        precision = replace(precision, fp8_format=b.backend.native_e4m3())
    return precision


def _load(checkpoint: str | None) -> tuple[Any, Any, str, dict[str, Any] | None]:
    """ModelArgs, a reader factory, a label of the checkpoint (a folder, its config.json, or
    a Hugging Face model id in the local cache) and, for an id, its :func:`~dshal.hub.hub_provenance`."""
    if checkpoint:
        folder = checkpoint_folder(checkpoint)
        return ModelArgs.from_file(folder), lambda: CheckpointReader(folder), str(folder), hub_provenance(checkpoint, folder)
    args = mc.suite_args("ci")
    tensors = mc.suite_checkpoint(args)
    label = f"conformance suite tiny checkpoint (seed {mc.CHECKPOINT_SEED})"
    return args, lambda: DictReader(tensors, path="<suite checkpoint>"), label, None


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
            prompt_len: int = 8, emulate: bool | None = None, decode: int = DEFAULT_DECODE,
            decode_path: str = "generate") -> dict[str, Any]:
    """Run both sides and return the comparison (the JSON ``dshal diff`` writes).

    The top-level keys from ``layers`` to ``unmatched_calls`` are the prefill's; ``steps``
    holds the same comparison for the prefill (step 0) and each decode step (1..N), and
    ``first_drift`` names the first step and op over the tolerance."""
    a_rt, b_rt = _side(backend_a, emulate), _side(backend_b, emulate)
    args, reader, label, hub = _load(checkpoint)
    prec = _common_precision(precision, a_rt, b_rt)
    tol = model_tolerance(precision, args.dtype)
    prompt = mc.suite_prompt(args, prompt_len)
    with active_kept():  # a caller's own dshal.use() holds again after
        a_model = _model(a_rt, args, reader(), prec, backend_a == REFERENCE)
        _check_decode(a_model, decode, decode_path, prompt_len)
        a_traces, fed = _run(a_model, prompt, decode, decode_path, keep_inputs=True)
        del a_model
        b_model = _model(b_rt, args, reader(), prec, backend_b == REFERENCE)
        b_traces, _ = _run(b_model, prompt, decode, decode_path, forced=fed)
        del b_model
        b_rt.activate()  # replays of providers that call other ops reach B
        steps = [_compare_pass(step, a, b, b_rt, tol.drift) for step, (a, b) in enumerate(zip(a_traces, b_traces))]
    prefill = {k: v for k, v in steps[0].items() if k not in ("step", "name", "tokens", "greedy")}
    first = next((s for s in steps if s["first_layer_over"] or s["first_op_over"]), None)
    return {
        "schema": SCHEMA,
        "backends": [_describe(backend_a, a_rt), _describe(backend_b, b_rt)],
        "checkpoint": label,
        "checkpoint_hub": hub,  # a Hugging Face id's: {id, revision, commit}; else None
        "precision": {"mode": precision, "gemm": prec.gemm, "fp8_format": prec.fp8_format},
        "prompt_len": prompt_len,
        "tolerance": {"drift": tol.drift, "origin": tol.origin},
        **prefill,
        "decode_steps": decode,
        "decode_path": decode_path if decode else None,
        "fed_tokens": fed,
        "steps": steps,
        "first_drift": None if first is None else {
            "step": first["step"], "name": first["name"], "layer": first["first_layer_over"],
            "op": first["first_op_over"], "likely_cause": first["likely_cause"]},
        "greedy_differs_at": [s["step"] for s in steps if s["greedy"]["differs"]],
        "routing": routing_summary(steps),
    }


def _check_decode(model: Any, decode: int, path: str, prompt_len: int) -> None:
    if path not in DECODE_PATHS:
        raise ConfigError(f"--decode-path: got {path!r}, expected one of: {', '.join(DECODE_PATHS)}")
    if not isinstance(decode, int) or isinstance(decode, bool) or decode < 0:
        raise ConfigError(f"--decode: got {decode!r}, expected an integer >= 0")
    limit = model.args.max_position_embeddings
    if prompt_len + decode > limit:
        raise ConfigError(f"--decode: prompt ({prompt_len}) plus {decode} decode steps exceed the model's "
                          f"max_position_embeddings ({limit})")
    why = static_decode_unsupported(model) if decode and path == "static" else None
    if why:
        raise ConfigError(f"--decode-path static: {why}")


def _run(model: Any, prompt: torch.Tensor, decode: int, path: str, keep_inputs: bool = False,
         forced: list[int] | None = None) -> tuple[list[mc.Trace], list[int]]:
    """The prefill and ``decode`` greedy steps of ``model``, each traced: the traces and the
    token ids fed to steps 1..N (``forced``, or this model's own greedy choices)."""
    if not decode:  # the prefill alone, without a cache
        return [mc.trace(model, prompt, keep_inputs)], []
    prompt_len = prompt.shape[1]
    static = path == "static"  # the cache the graph-run paths make: the key mask in spare columns
    cache = model.new_cache(1, prompt_len + decode, "absorb" if static else None, static=static)
    traces = [mc.trace(model, prompt, keep_inputs, forward=lambda ids: model(ids, 0, cache))]
    step = _decode_step(model, cache, path)
    fed: list[int] = []
    for i in range(decode):
        token = forced[i] if forced is not None else int(traces[-1].logits[0, -1].argmax())
        fed.append(token)
        ids = torch.tensor([[token]], device=model.rope_cos.device)
        cache.vouch_for(ids)  # as generate() does for its own samples: the id is in range
        traces.append(mc.trace(model, ids, keep_inputs, forward=lambda t, pos=prompt_len + i, n=i: step(t, pos, n)))
    return traces, fed


def _decode_step(model: Any, cache: Any, path: str) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """``step(ids [1, 1], pos, n)`` -> logits ``[1, 1, V]``: the n-th (0-based) decode step."""
    if path == "generate":
        return lambda ids, pos, n: model(ids, pos, cache)  # the model checks step 0 and trusts the rest

    def static(ids: torch.Tensor, pos: int, n: int) -> torch.Tensor:
        position = torch.tensor([pos], dtype=torch.int64, device=ids.device)
        # As StaticDecoder: the first step with the ops' input checks, the captured ones trusted.
        with ops.trusted() if n else contextlib.nullcontext():
            return static_decode_step(model, ids, position, cache)[:, None]

    return static


def _compare_pass(step: int, a: mc.Trace, b: mc.Trace, b_rt: Any, tol: float) -> dict[str, Any]:
    """One pass (the prefill, or decode step ``step``) of both sides compared layer by layer
    and op by op; the likely cause; whether B's greedy next token differs from A's."""
    ops_rows = _op_rows(step, a, b, b_rt, tol)
    drifts = mc.layer_drifts(b, a)
    first_layer = mc.first_over(drifts, tol)
    first_op = next((r for r in ops_rows if not r["drift"] <= tol), None)
    # The likely cause: the largest local drift in the first drifting layer (or, when only an
    # op's output is over, in that op's layer).
    where = first_layer or (first_op["layer"] if first_op else None)
    in_layer = [r for r in ops_rows if r["layer"] == where]
    # A token routed to other experts moves that layer's output more than any op's rounding.
    rerouted = [r for r in in_layer if r.get("routing") and r["routing"]["differ"]]
    cause = rerouted[0] if rerouted else max(in_layer, key=lambda r: _order(r["local_drift"]), default=None)
    logit_drift = mc.rel_drift(b.logits, a.logits)
    basis = mc.ambiguity_basis(logit_drift, tol)
    agreement = mc.token_agreement(b.logits, a.logits, 1, basis)
    a_next, b_next = int(a.logits[0, -1].argmax()), int(b.logits[0, -1].argmax())
    return {
        "step": step,
        "name": "prefill" if step == 0 else f"decode {step}",
        "tokens": int(a.logits.shape[1]),
        "layers": [{"layer": name, "drift": d, "over": not d <= tol, "step": step} for name, d in drifts.items()],
        "logit_drift": logit_drift,
        "argmax_agreement": {"agreed": agreement.agreed, "decisive": agreement.decisive, "ambiguous": agreement.ambiguous},
        # The greedy choice after this pass (the next token): A's is what both are fed next.
        "greedy": {"a": a_next, "b": b_next, "differs": a_next != b_next,
                   "ambiguous": mc.too_close_to_call(a.logits[0, -1], basis)},
        "first_layer_over": first_layer,
        "first_op_over": first_op,
        "likely_cause": cause,
        "ops": ops_rows,
        "unmatched_calls": len(a.calls) + len(b.calls) - 2 * len(ops_rows),
    }


def _order(v: float) -> float:
    return math.inf if v != v else v


def _op_rows(step: int, a: Any, b: Any, b_rt: Any, tol: float) -> list[dict[str, Any]]:
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
            "step": step, "index": call.index, "layer": call.layer, "op": call.op, "nth": call.nth,
            "drift": drift, "local_drift": local, "over": not drift <= tol, "local_over": not local <= tol,
            "at": worst.get("index"), "a": worst.get("b"), "b": worst.get("a"), "note": note,
            "routing": routing_difference(call, other, tol),
        })
    return rows


def routing_difference(a: mc.OpCall, b: mc.OpCall, tol: float) -> dict[str, int] | None:
    """For a ``moe_gate`` call (A's inputs kept): how many tokens the two sides routed to
    different experts, and how many of those are near-ties on A (a relative drift of ``tol``
    could swap them: :func:`~dshal_conformance.modelcheck.routing_too_close_to_call`), where
    either choice is right. None for other ops."""
    if a.op != "moe_gate" or len(a.args) < 5 or len(a.outputs) < 2 or len(b.outputs) < 2:
        return None
    ids_a, ids_b = a.outputs[1], b.outputs[1]
    if tuple(ids_a.shape) != tuple(ids_b.shape):
        return None
    differs = mc.routed_differently(ids_b, ids_a)
    close = mc.routing_too_close_to_call(*a.args[:5], tol)
    return {"tokens": int(ids_a.shape[0]), "differ": int(differs.sum()), "near_ties": int((differs & close).sum())}


def routing_summary(steps: list[dict[str, Any]]) -> dict[str, int]:
    """Tokens routed differently over every pass, and how many were near-ties on A."""
    rows = [r["routing"] for s in steps for r in s["ops"] if r.get("routing")]
    return {key: sum(r[key] for r in rows) for key in ("tokens", "differ", "near_ties")}


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
    """One sentence: where the two first part (which step, layer and op), the likely cause,
    and at which steps the greedy token would have differed."""
    a, b = (s["name"] for s in result["backends"])
    tol = result["tolerance"]["drift"]
    steps = result["steps"]
    n = result["decode_steps"]
    scope = "the prefill" + (f" and {n} decode step{'s' if n != 1 else ''}" if n else "")
    first = result["first_drift"]
    if first is None:
        worst = max((s["logit_drift"] for s in steps), key=_order)
        parts = [f"{a} and {b} agree within {tol:g} at every layer and op of {scope} (logit drift {_num(worst)})"]
    else:
        step = steps[first["step"]]
        where = step["name"] + (" (the earlier passes agree)" if first["step"] else "")
        parts = [f"first drift at {where}"]
        if step["first_layer_over"]:
            d = next(r["drift"] for r in step["layers"] if r["layer"] == step["first_layer_over"])
            parts.append(f"first drifting layer: {step['first_layer_over']} (drift {_num(d)} > {tol:g})")
        op = step["first_op_over"]
        if op:
            parts.append(f"first op over: {op['layer']}: {op['op']}#{op['nth']} (drift {_num(op['drift'])}; "
                         f"at {op['at']}: {a} {_num(op['a'])}, {b} {_num(op['b'])})")
        cause = step["likely_cause"]
        if cause and cause.get("routing") and cause["routing"]["differ"]:
            parts.append(f"likely cause: {cause['op']} ({cause['layer']}, call #{cause['nth']}: "
                         f"{cause['routing']['differ']} token(s) routed to other experts)")
        elif cause:
            parts.append(f"likely cause: {cause['op']} ({cause['layer']}, call #{cause['nth']}: local drift "
                         f"{_num(cause['local_drift'])} with {a}'s inputs)")
    routing = result.get("routing") or {}
    if routing.get("differ"):
        parts.append(f"the router picked other experts for {routing['differ']} of {routing['tokens']} token(s) "
                     f"({routing['near_ties']} near-tie(s) on {a}, where either choice is right and the drift that "
                     "follows is no finding)")
    differs = [s for s in steps if s["greedy"]["differs"]]
    if differs:
        parts.append("greedy next token differs after: " + ", ".join(
            f"{s['name']} ({a} {s['greedy']['a']}, {b} {s['greedy']['b']}"
            f"{', too close to call' if s['greedy']['ambiguous'] else ''})" for s in differs))
    else:
        parts.append(f"greedy next token the same after every pass ({len(steps)})")
    return "; ".join(parts)


def _op_table_rows(result: dict[str, Any], top: int) -> list[list[str]]:
    ops = [r for s in result["steps"] for r in s["ops"]]
    first = result["first_drift"]["op"] if result["first_drift"] else None
    chosen = sorted(ops, key=lambda r: -_order(r["local_drift"]))[:top]
    if first and first not in chosen:
        chosen.append(first)
    chosen.sort(key=lambda r: (r["step"], r["index"]))
    return [[_step_name(r["step"]), str(r["index"]), r["layer"], f"{r['op']}#{r['nth']}", _num(r["drift"]),
             _num(r["local_drift"]), "OVER" if r["over"] or r["local_over"] else "", str(r["at"]), _num(r["a"]),
             _num(r["b"])] for r in chosen]


def _step_name(step: int) -> str:
    return "prefill" if step == 0 else f"decode {step}"


OP_HEADERS = ["step", "call", "layer", "op", "drift", "local drift", "", "worst at", "A value", "B value"]
STEP_HEADERS = ["step", "tokens", "logit drift", "first layer over", "first op over", "A next", "B next", ""]


def _layer_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Layers down, passes across: each cell the layer's drift (``!`` when over)."""
    steps = result["steps"]
    names = [r["layer"] for r in steps[0]["layers"]]
    cells = {(s["step"], r["layer"]): r for s in steps for r in s["layers"]}
    rows = []
    for name in names:
        row = [name]
        for s in steps:
            r = cells.get((s["step"], name))
            row.append("-" if r is None else _num(r["drift"]) + (" OVER" if r["over"] else ""))
        rows.append(row)
    return ["layer"] + [s["name"] for s in steps], rows


def _step_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in result["steps"]:
        op = s["first_op_over"]
        g = s["greedy"]
        rows.append([s["name"], str(s["tokens"]), _num(s["logit_drift"]), s["first_layer_over"] or "",
                     f"{op['layer']}: {op['op']}#{op['nth']}" if op else "", str(g["a"]), str(g["b"]),
                     ("DIFFERS" + (" (too close to call)" if g["ambiguous"] else "")) if g["differs"] else ""])
    return rows


def _named(headers: list[str], a: str, b: str) -> list[str]:
    return [h.replace("A ", f"{a} ").replace("B ", f"{b} ") for h in headers]


def print_result(result: dict[str, Any], top: int) -> None:
    from rich.table import Table as RichTable


    out = console()
    a, b = (s["name"] for s in result["backends"])
    prec = result["precision"]
    decode = (f"; {result['decode_steps']} decode steps ({result['decode_path']}), fed {a}'s greedy tokens"
              if result["decode_steps"] else "; prefill only")
    out.print(f"[bold]dshal diff[/bold]: {a} vs {b}; {result['checkpoint']}; precision {prec['mode']} "
              f"(gemm {prec['gemm']}, {prec['fp8_format']}); tolerance {result['tolerance']['drift']:g}{decode}",
              highlight=False)
    for title, (headers, rows) in (("layer drift ||B - A|| / ||A||", _layer_table(result)),
                                   ("passes (next token: each side's greedy choice)", (_named(STEP_HEADERS, a, b), _step_rows(result))),
                                   (f"op calls (the {top} with the largest local drift, and the first over)",
                                    (_named(OP_HEADERS, a, b), _op_table_rows(result, top)))):
        table = RichTable(title=title, show_edge=False, title_justify="left")
        for h in headers:
            table.add_column(h)
        for row in rows:
            table.add_row(*(c.replace("OVER", "[red]OVER[/red]").replace("DIFFERS", "[red]DIFFERS[/red]") for c in row))
        out.print(table)
    out.print(headline(result), highlight=False)


def write_html(result: dict[str, Any], path: str, top: int) -> Path:
    a, b = (s["name"] for s in result["backends"])
    prec = result["precision"]
    report = HtmlReport(f"dshal diff: {a} vs {b}", {
        "checkpoint": result["checkpoint"],
        **({"Hugging Face model": hub_provenance_text(result["checkpoint_hub"])} if result.get("checkpoint_hub") else {}),
        "precision": f"{prec['mode']} (gemm {prec['gemm']}, {prec['fp8_format']})",
        "tolerance": f"{result['tolerance']['drift']:g}: {result['tolerance']['origin']}",
        "logit drift": _num(result["logit_drift"]),
        "decode steps": f"{result['decode_steps']} ({result['decode_path']}; both fed {a}'s greedy tokens)"
                        if result["decode_steps"] else "0 (prefill only)",
        "finding": headline(result),
    })
    s = report.section("Layers")
    headers, rows = _layer_table(result)
    report.add_table(s, Table(headers, rows, text_columns=tuple(range(len(headers)))))
    s = report.section("Passes")
    report.add_note(s, f"Decode steps are teacher-forced: both sides are fed {a}'s greedy token. "
                       "A next / B next: each side's greedy choice after the pass.")
    report.add_table(s, Table(_named(STEP_HEADERS, a, b), _step_rows(result), text_columns=(0, 3, 4, 7)))
    s = report.section("Op calls")
    report.add_note(s, "drift: the two end-to-end outputs; local drift: A's inputs replayed through B's provider.")
    report.add_table(s, Table(_named(OP_HEADERS, a, b), _op_table_rows(result, top), text_columns=(0, 2, 3, 6, 7)))
    return report.write(path)


def main(args: argparse.Namespace) -> int:
    if len(args.backend) != 2:
        raise ConfigError(f"--backend: given {len(args.backend)} time(s), expected exactly 2 (A and B)")
    if args.prompt_len < 1:
        raise ConfigError(f"--prompt-len: got {args.prompt_len}, expected an integer >= 1")
    if args.decode < 0:
        raise ConfigError(f"--decode: got {args.decode}, expected an integer >= 0")
    if args.top < 1:
        raise ConfigError(f"--top: got {args.top}, expected an integer >= 1")
    _check_mode(args.precision)
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path:
            check_writable(path, flag)  # before both model runs, not after them
    if args.checkpoint:  # a Hub id: its snapshot folder, or the error naming the flag before either backend starts
        checkpoint_folder(args.checkpoint, "--checkpoint")  # compare() reads the id again: the report names it
    result = compare(args.backend[0], args.backend[1], checkpoint=args.checkpoint, precision=args.precision,
                     prompt_len=args.prompt_len, emulate=args.emulate, decode=args.decode,
                     decode_path=args.decode_path)
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


__all__ = ["DEFAULT_DECODE", "add_arguments", "compare", "headline", "main"]
