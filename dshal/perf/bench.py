"""``dshal bench``: per-op latency, achieved FLOP/s and bytes/s against the device roofline.

For every case (op x shape) it times, side by side in one run:

- ``backend``   -- ``dshal.ops.<op>`` on the selected backend (what the model core calls);
- ``reference`` -- ``dshal.ops.reference.<op>``, the checked reference, on the same device;
- ``torch``     -- a direct torch call computing the same thing, where one exists
  (``F.linear``, ``F.rms_norm``, ``F.scaled_dot_product_attention``...).

Cases are the ops' own ``bench`` shape rows (``SPECS[op].rows``, declared next to each op's
spec in :mod:`dshal.ops`; ``--shapes ci`` small, seconds on 2 CPU cores; ``full``
DeepSeek-V3's real dimensions, ci rows included) or a YAML file of rows in the same
parameters, validated with file:line errors by the config's YAML loader::

    cases:
      - {op: linear, m: 64, n: 7168, k: 2048, dtype: bfloat16, weight: fp8-block}
      - op: attention
        b: 1
        hq: 16
        tq: 512
        d: 128

Each is warmed up, then timed call by call (``perf_counter_ns`` on CPU devices, the
backend's timer -- device events -- elsewhere) over several input sets cycled in turn so
caches do not flatter the result, and summarized by the median and the p10/p90 spread.
FLOP/s and bytes/s come from the op spec's cost model; the roofline bound from the peaks
in ``capabilities()``, measured once when the backend does not declare them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dshal
from dshal import ops
from dshal.config import read_yaml
from dshal.errors import ConfigError, DshalError
from dshal.ops.attention import sdpa as attention_sdpa, visible_keys
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import TIERS, Draw, ShapeRow, plain
from dshal.ops.spec import Cost
from dshal.perf.bench_command import (  # its options, importable without torch (dshal bench --help)
    DEFAULT_MIN_RUNS,
    ROTATE_MAX_SETS,
    ROTATE_SINGLE_BYTES,
    ROTATE_TARGET_BYTES,
    add_arguments,
)
from dshal.perf.measure import Inputs, Peaks, Repeats, backend_clock, peak_key, place, resolve_peaks, time_calls
from dshal.perf.report import (
    HtmlReport,
    RooflineMark,
    Table,
    console,
    duration,
    json_path,
    machine_text,
    new_figure,
    percent,
    platform_info,
    roofline_figure,
    si,
    start,
    write_json,
)

SCHEMA = "dshal.bench/1"
PROVIDERS = ("backend", "reference", "torch")
# ---------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One op at one shape: a ``bench`` row of the op's examples, or a row of a shapes file."""

    row: ShapeRow

    @property
    def op(self) -> str:
        return self.row.op

    @property
    def params(self) -> Mapping[str, Any]:
        return self.row.params

    @property
    def label(self) -> str:
        """The row's id, ``op/name``."""
        return self.row.id

    def inputs(self, device: torch.device, seed: int, native_e4m3: str = "e4m3fn") -> Inputs:
        """The op's arguments for this row, drawn on ``device`` from ``seed``."""
        draw = Draw(torch.Generator(device=device).manual_seed(seed), device, native_e4m3)
        return (), SPECS[self.op].example_inputs(draw, self.row).kwargs


def shape_cases(shapes: str, op_names: Sequence[str] | None = None) -> list[Case]:
    """The cases of shape set ``shapes`` (``ci``, ``full`` or a YAML path), limited to ``op_names``."""
    if shapes in TIERS:
        cases = [Case(row) for spec in SPECS.values() for row in spec.rows if row.kind == "bench" and shapes in row.tiers]
    elif shapes.endswith((".yaml", ".yml")) or os.path.exists(shapes):
        cases = load_shapes_file(shapes)
    else:
        raise ConfigError(f"--shapes: got {shapes!r}, expected ci, full, or a YAML file of cases")
    if op_names:
        unknown = [op for op in op_names if op not in SPECS]
        if unknown:
            raise ConfigError(f"--ops: got {unknown[0]!r}, expected op names from: {', '.join(SPECS)}")
        cases = [c for c in cases if c.op in op_names]
        if not cases:
            raise ConfigError(f"--ops: none of {', '.join(op_names)} has a case in shape set {shapes!r}")
    return cases


def load_shapes_file(path: str | os.PathLike) -> list[Case]:
    """Cases from a YAML file (``cases:`` list, or a top-level list, of ``{op: ..., <params>}``,
    the parameters of the op's own shape rows); every error names ``file:line``."""
    doc = read_yaml(path, "shapes file")
    data, root = doc.data, ()
    if isinstance(data, Mapping):
        unknown = [k for k in data if k != "cases"]
        if unknown:
            raise doc.error((str(unknown[0]),), "unknown key, expected 'cases' (a list of {op: NAME, <shape params>})")
        data, root = data.get("cases"), ("cases",)
    if not isinstance(data, list) or not data:
        raise doc.error(root, f"got {data!r}, expected a non-empty list of cases, each {{op: NAME, <shape params>}}")
    cases = []
    for index, item in enumerate(data):
        at = root + (f"[{index}]",)
        if not isinstance(item, Mapping) or "op" not in item:
            raise doc.error(at, f"got {item!r}, expected a mapping with an 'op' key and shape parameters")
        op = item["op"]
        if op not in SPECS or not SPECS[op].rows:
            raise doc.error(at + ("op",), f"got {op!r}, expected one of: {', '.join(n for n, s in SPECS.items() if s.rows)}")
        given = {k: v for k, v in item.items() if k != "op"}
        params = _checked_params(op, given, lambda key, msg, at=at: doc.error(at + key, msg))
        name = ", ".join(f"{k}={_show(v)}" for k, v in given.items())
        cases.append(Case(ShapeRow(op, name, params, frozenset(TIERS), "bench")))
    return cases


def _show(v: Any) -> str:
    return "null" if v is None else str(list(v)) if isinstance(v, (list, tuple)) else str(v).lower() if isinstance(v, bool) else str(v)


def _checked_params(op: str, given: Mapping[str, Any], error: Callable[[tuple[str, ...], str], ConfigError]) -> dict[str, Any]:
    """``given`` checked against the op's own rows: every key one they use, every value of a
    kind they use (dtype names become torch dtypes, lists tuples), and every key that all of
    them give (except ``dtype``, bfloat16 by default) present."""
    rows = [r.params for r in SPECS[op].rows]
    seen: dict[str, list[Any]] = {}
    for p in rows:
        for k, v in p.items():
            seen.setdefault(k, []).append(v)
    params: dict[str, Any] = {}
    for key, value in given.items():
        if key not in seen:
            raise error((str(key),), f"unknown parameter of {op}, expected one of: {', '.join(seen)}")
        params[key] = _checked_value(key, value, seen[key], error)
    missing = [k for k in seen if k != "dtype" and k not in params and all(k in p for p in rows)]
    if missing:
        raise error((), f"{op} needs parameter {missing[0]!r} (parameters: {', '.join(seen)})")
    return params


def _checked_value(key: str, value: Any, examples: list[Any], error: Callable[[tuple[str, ...], str], ConfigError]) -> Any:
    """``value`` as the rows' ``examples`` of ``key`` have it, or a file:line error."""
    if value is None:
        if None in examples:
            return None
    elif any(isinstance(e, torch.dtype) for e in examples):
        names = sorted({str(e).replace("torch.", "") for e in examples if isinstance(e, torch.dtype)})
        if value in names:
            return getattr(torch, value)
        raise error((key,), f"got {value!r}, expected one of: {', '.join(names)}")
    elif any(isinstance(e, bool) for e in examples):
        if isinstance(value, bool):
            return value
        raise error((key,), f"got {value!r}, expected true or false")
    elif any(isinstance(e, int) and not isinstance(e, bool) for e in examples):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise error((key,), f"got {value!r}, expected an integer >= 0")
    elif any(isinstance(e, float) for e in examples):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise error((key,), f"got {value!r}, expected a number")
    elif any(isinstance(e, str) for e in examples):
        choices = sorted({e for e in examples if isinstance(e, str)})
        if value in choices:
            return value
        raise error((key,), f"got {value!r}, expected one of: {', '.join(choices)}")
    elif any(isinstance(e, (tuple, list)) for e in examples):
        # -1 only where the rows use it ("the whole dim", as block (1, -1)); a size is never negative
        minus_one = any(-1 in e for e in examples if isinstance(e, (tuple, list)))
        low = "-1" if minus_one else "0"
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and (v >= 0 or (minus_one and v == -1)) for v in value
        ):
            return tuple(value)
        raise error((key,), f"got {value!r}, expected a list of integers >= {low}, e.g. {list(next(e for e in examples if e))}")
    what = "null or " if None in examples else ""
    raise error((key,), f"got {value!r}, expected {what}a value like {examples[0]!r}")


# ---------------------------------------------------------------- the torch rivals
def torch_rival(case: Case) -> tuple[str, Callable[..., Any]] | None:
    """A direct torch call computing what ``case``'s op computes on its inputs (same keyword
    arguments), and its name; None where torch has no such call."""
    p, op = case.params, case.op
    if op == "linear":
        if p.get("weight", "float") != "float":
            return None
        return "F.linear", lambda x, weight, bias=None, weight_scale=None: F.linear(x, weight, bias)
    if op == "fp8_gemm":
        if p.get("granularity", "block") == "block":
            return None  # torch has no portable 1x128 / 128x128 block-scaled GEMM
        return "torch._scaled_mm", _scaled_mm
    if op == "int8_gemm":
        return "torch._int_mm", _int_mm
    return {
        "rms_norm": ("F.rms_norm", _rms_norm),
        "silu_and_mul": ("F.silu(gate) * up", _silu_and_mul),
        "rotary_embedding": ("torch.view_as_complex rotation", _rotary_complex),
        "attention": ("F.scaled_dot_product_attention", _sdpa()),
    }.get(op)


def _scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    # _scaled_mm wants b column-major ([K, N] view of b [N, K]) and b's scales as [1, N].
    return torch._scaled_mm(a, b.t(), a_scale, b_scale.t() if b_scale.dim() == 2 else b_scale, out_dtype=out_dtype)


def _int_mm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return (torch._int_mm(a, b.t()).float() * a_scale * b_scale.t()).to(out_dtype)


def _rms_norm(x, weight, eps=1e-6, residual=None):
    if residual is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), weight, eps), s


def _silu_and_mul(x):
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def _rotary_complex(x, cos, sin, interleaved=True):
    # DeepSeek-V3's own formulation: pairs as complex numbers times e^{i theta}.
    turn = torch.complex(cos.float(), sin.float())
    if interleaved:
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * turn).flatten(-2).to(x.dtype)
    xc = torch.complex(*x.float().chunk(2, dim=-1))
    r = xc * turn
    return torch.cat((r.real, r.imag), dim=-1).to(x.dtype)


def _sdpa() -> Callable[..., Any]:
    masks: dict[tuple[Any, ...], torch.Tensor | None] = {}

    def sdpa(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        tq, tk = q.shape[2], k.shape[2]
        if causal and window is None and tq == tk:
            return attention_sdpa(q, k, v, is_causal=True, scale=scale)
        key = (q.device, tq, tk, causal, window, global_tokens)
        if key not in masks:  # the mask is shape-only: built once, outside the timed calls after warm-up
            mask = visible_keys(tq, tk, causal, window, global_tokens, q.device)
            masks[key] = None if mask is None or bool(mask.all()) else mask  # all visible: SDPA's fast path
        return attention_sdpa(q, k, v, attn_mask=masks[key], scale=scale)

    return sdpa


# ---------------------------------------------------------------- timing
def _tensor_bytes(inputs: Inputs) -> int:
    args, kwargs = inputs
    return sum(v.numel() * v.element_size() for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))


def input_set_count(set_bytes: int, requested: int | None = None) -> int:
    """How many input sets to cycle (``requested`` wins when given)."""
    if requested is not None:
        if requested < 1:
            raise DshalError(f"--rotate: got {requested}, expected an integer >= 1")
        return requested
    if set_bytes >= ROTATE_SINGLE_BYTES:
        return 1
    return max(2, min(ROTATE_MAX_SETS, math.ceil(ROTATE_TARGET_BYTES / max(set_bytes, 1))))


def _candidates(case: Case, with_reference: bool, with_torch: bool) -> list[tuple[str, str, Callable[..., Any] | None]]:
    """(column, callable's name, callable) to time for ``case``; callable None = no such provider."""
    out: list[tuple[str, str, Callable[..., Any] | None]] = [("backend", f"dshal.ops.{case.op}", getattr(ops, case.op))]
    if with_reference:
        out.append(("reference", f"dshal.ops.reference.{case.op}", getattr(ops.reference, case.op, None)))
    if with_torch:
        direct = torch_rival(case)
        out.append(("torch", direct[0] if direct else "none", direct[1] if direct else None))
    return out


def bench_case(
    case: Case,
    device: torch.device,
    clock: Any,
    repeats: Repeats,
    peaks: Peaks,
    *,
    rotate: int | None = None,
    seed: int = 0,
    with_reference: bool = True,
    with_torch: bool = True,
    native_e4m3: str = "e4m3fn",
    need_peak: Callable[[str], None] = lambda key: None,
) -> dict[str, Any]:
    """Time one case on every provider; the JSON-ready result. ``need_peak(key)`` is called
    with the case's roofline key (see :func:`~dshal.perf.measure.peak_key`) before ``peaks``
    is read, so a caller can resolve peaks as cases need them."""
    result: dict[str, Any] = {"id": case.label, "op": case.op, "params": plain(case.params)}
    try:
        first = case.inputs(device, seed, native_e4m3)
        set_bytes = _tensor_bytes(first)
        sets = [first] + [case.inputs(device, seed + i, native_e4m3) for i in range(1, input_set_count(set_bytes, rotate))]
    except Exception as err:  # noqa: BLE001 - e.g. out of device memory at `full` shapes: report, go on
        error = f"building inputs failed: {type(err).__name__}: {err}"
        result.update(providers={"backend": {"name": f"dshal.ops.{case.op}", "error": error}}, speedup={})
        return result
    args, kwargs = first
    try:  # a row the op refuses has no cost to model and nothing to time
        SPECS[case.op].check(*args, **kwargs)
    except DshalError as err:
        result.update(providers={"backend": {"name": f"dshal.ops.{case.op}", "error": f"{type(err).__name__}: {err}"}}, speedup={})
        return result
    key = result["peak_key"] = peak_key(case.op, args, kwargs)
    need_peak(key)
    cost: Cost = SPECS[case.op].cost_of(*args, **kwargs)
    result.update(
        cost={"flops": cost.flops, "bytes": cost.bytes, "intensity": cost.intensity},
        input_sets=len(sets),
        input_set_bytes=set_bytes,
        providers={},
    )
    for column, name, fn in _candidates(case, with_reference, with_torch):
        entry: dict[str, Any] = {"name": name}
        if fn is None:
            entry["error"] = "no such provider for this case"
        else:
            try:
                stats = time_calls(fn, sets, clock, repeats)
            except Exception as err:  # noqa: BLE001 - a provider failing on one case is a result, not a crash
                entry["error"] = f"{type(err).__name__}: {err}"
            else:
                point = place(cost, stats.median, peaks.flops.get(key), peaks.bandwidth)
                entry.update(stats.to_dict())
                entry.update(point.to_dict())
        result["providers"][column] = entry
    base = result["providers"]["backend"].get("median_s")
    result["speedup"] = {
        column: (entry["median_s"] / base) if base and "median_s" in entry else None
        for column, entry in result["providers"].items()
        if column != "backend"
    }
    return result


def run_bench(
    runtime: Any,
    cases: Sequence[Case],
    repeats: Repeats,
    *,
    rotate: int | None = None,
    seed: int = 0,
    with_reference: bool = True,
    with_torch: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Bench ``cases`` on ``runtime``; the JSON-ready report (schema ``dshal.bench/1``).
    Peaks are resolved (declared, or measured once) as the cases need them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    backend, device = runtime.backend, runtime.device
    started = time.time()
    clock, clock_name = backend_clock(backend)
    peaks = Peaks()

    def need_peak(key: str) -> None:
        if key not in peaks.flops:
            resolve_peaks(backend, device, {key}, into=peaks)

    results = []
    columns = (TextColumn("bench {task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("", total=len(cases))
        for case in cases:
            bar.update(task, description=case.label[:40])
            results.append(
                bench_case(
                    case,
                    device,
                    clock,
                    repeats,
                    peaks,
                    rotate=rotate,
                    seed=seed,
                    with_reference=with_reference,
                    with_torch=with_torch,
                    native_e4m3=backend.native_e4m3(),
                    need_peak=need_peak,
                )
            )
            bar.advance(task)
    return {
        "schema": SCHEMA,
        "dshal_version": dshal.__version__,
        "backend": backend.name,
        "device": str(device),
        "device_name": runtime.capabilities.device_name,
        "emulated": runtime.emulated,
        "platform": platform_info(),
        "timer": clock_name,
        "torch_threads": torch.get_num_threads(),
        "repeats": {
            "warmup": repeats.warmup,
            "min_runs": repeats.min_runs,
            "max_runs": repeats.max_runs,
            "budget_s": repeats.budget_s,
        },
        "peaks": peaks.to_dict(),
        "providers": {op: runtime.provider_entry(op) for op in runtime.providers},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
        "cases": results,
    }


# ---------------------------------------------------------------- report
def _cell(entry: dict[str, Any], what: str) -> str:
    if "error" in entry:
        return "—"
    return {
        "median": duration(entry.get("median_s")),
        "spread": f"{duration(entry.get('p10_s'))} – {duration(entry.get('p90_s'))}",
        "flops": si(entry.get("flops_per_s"), "FLOP/s"),
        "bytes": si(entry.get("bytes_per_s"), "B/s"),
        "roofline": percent(entry.get("roofline_percent")),
    }[what]


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


def result_rows(report: dict[str, Any]) -> list[list[str]]:
    """One table row per case (the HTML table and the console table)."""
    rows = []
    for c in report["cases"]:
        b = c["providers"]["backend"]
        ref, tch = c["providers"].get("reference", {}), c["providers"].get("torch", {})
        rows.append(
            [
                c["id"],
                _cell(b, "median") if "error" not in b else f"error: {b['error']}",
                _cell(b, "spread"),
                _cell(b, "flops"),
                _cell(b, "bytes"),
                _cell(b, "roofline"),
                b.get("bound", "—"),
                _cell(ref, "median") if ref else "—",
                _ratio(c["speedup"].get("reference")),
                f"{tch.get('name')}: {_cell(tch, 'median')}" if tch and "error" not in tch else "—",
                _ratio(c["speedup"].get("torch")),
            ]
        )
    return rows


HEADERS = [
    "case",
    "median",
    "p10 – p90",
    "FLOP/s",
    "bytes/s",
    "% roofline",
    "bound",
    "reference median",
    "speed-up vs reference",
    "torch direct median",
    "speed-up vs torch",
]


def _peak_note(peaks: dict[str, Any]) -> str:
    measured = sorted(k for k, s in peaks["sources"].items() if "measured" in s)
    return f"measured peaks: {', '.join(measured)}" if measured else "peaks from capabilities()"


def latency_figure(report: dict[str, Any]) -> Any:
    """Horizontal latency bars per case, one per provider, with p10–p90 whiskers (log scale)."""
    cases = report["cases"]
    fig, ax = new_figure(10, max(3.0, 0.42 * len(cases) * 1.5 + 1))
    width = 0.8 / len(PROVIDERS)
    colours = {"backend": "#4e79a7", "reference": "#f28e2b", "torch": "#59a14f"}
    for pi, column in enumerate(PROVIDERS):
        ys, meds, lo, hi = [], [], [], []
        for ci, c in enumerate(cases):
            e = c["providers"].get(column)
            if e and "median_s" in e:
                ys.append(ci + (pi - 1) * width)
                meds.append(e["median_s"] * 1e6)
                lo.append((e["median_s"] - e["p10_s"]) * 1e6)
                hi.append((e["p90_s"] - e["median_s"]) * 1e6)
        if ys:
            ax.barh(ys, meds, height=width, xerr=[lo, hi], color=colours[column], label=column, error_kw={"lw": 0.8})
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([c["id"] for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median latency (µs), whiskers p10–p90")
    ax.grid(True, axis="x", which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:  # every case failed: no bars, and matplotlib warns on stderr
        ax.legend(fontsize=8)
    return fig


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    """The self-contained HTML report: roofline plot, latency bars, results table."""
    peaks = report["peaks"]
    plat = report["platform"]
    meta = {
        "backend": f"{report['backend']} on {report['device']} ({report['device_name']})"
        + (" — emulated" if report["emulated"] else ""),
        "machine": f"{machine_text(plat)}, Python {plat['python']}",
        "timer": f"{report['timer']}; torch threads {report['torch_threads']}",
        "repeats": ", ".join(f"{k} {v}" for k, v in report["repeats"].items()),
        "peak compute": ", ".join(
            f"{k} {si(v, 'FLOP/s')} ({peaks['sources'][k]})" for k, v in sorted(peaks["flops"].items())
        ),
        "peak bandwidth": f"{si(peaks['bandwidth'], 'B/s')} ({peaks['sources'].get('bandwidth', 'n/a')})",
        "started": report["started"],
        "duration": f"{report['duration_s']:.1f} s",
        "schema": report["schema"],
    }
    doc = HtmlReport(f"dshal bench — {report['backend']}", meta)
    marks = [
        RooflineMark(c["id"], c["cost"]["intensity"], e["flops_per_s"], column)
        for c in report["cases"]
        for column, e in c["providers"].items()
        if "flops_per_s" in e
    ]
    used = {c.get("peak_key") for c in report["cases"]}
    roof = doc.section("Roofline")
    doc.add_figure(
        roof,
        roofline_figure(
            marks,
            {k: v for k, v in peaks["flops"].items() if k in used},
            peaks["bandwidth"],
            f"{report['backend']} on {report['device_name']}",
            _peak_note(peaks),
        ),
        "Achieved FLOP/s against arithmetic intensity (op cost models); roofs from the device peaks.",
    )
    if any("measured" in s for s in peaks["sources"].values()):
        doc.add_note(
            roof,
            "Peaks marked 'measured' were timed here with a short matmul and copy (the backend declares "
            "none): they are what torch achieves on this device, not datasheet figures.",
        )
    lat = doc.section("Latency per op")
    doc.add_figure(lat, latency_figure(report), "Median latency per case and provider; whiskers span p10–p90.")
    table = doc.section("Results")
    doc.add_table(table, Table(HEADERS, result_rows(report), text_columns=(0, 6, 9)))
    doc.add_note(
        table,
        "Speed-up = that provider's median / the backend's median (> 1: the backend is faster). "
        "Inputs are cycled between calls over several sets (see the JSON's input_sets).",
    )
    prov = doc.section("Op providers")
    doc.add_table(
        prov,
        Table(
            ["op", "provider", "kind"],
            [[op, p["provider"], p["kind"]] for op, p in report["providers"].items()],
            text_columns=(0, 1, 2),
        ),
    )
    return doc.write(path)


def print_summary(report: dict[str, Any]) -> None:
    """A compact console table (the HTML and JSON hold every column)."""
    from rich.table import Table as RichTable

    out = console()
    emulated = " (emulated)" if report["emulated"] else ""
    out.print(
        f"[bold]dshal bench[/bold]: backend [cyan]{report['backend']}[/cyan] on {report['device']}{emulated}; "
        f"timer {report['timer']}; {_peak_note(report['peaks'])}"
    )
    t = RichTable(show_edge=False)
    for h in ("case", "median (p10 – p90)", "FLOP/s", "bytes/s", "% roofline", "× ref", "× torch"):
        t.add_column(h, no_wrap=h == "case")
    for row in result_rows(report):
        t.add_row(row[0], f"{row[1]} ({row[2]})", row[3], row[4], f"{row[5]} {row[6]}", row[8], row[10])
    out.print(t)
    noisy = noisy_cases(report)
    if noisy:
        out.print(f"note: {len(noisy)} case(s) with a p10–p90 spread over {NOISY_SPREAD:.0%} of the median "
                  f"({', '.join(noisy)}): the machine was busy or the runs too few; their ratios are rough. "
                  "Rerun on a quiet machine, or raise --runs / --time-per-case", highlight=False)
    above = above_roofline(report)
    if above:
        out.print(f"note: {len(above)} case(s) above 100 % of roofline ({', '.join(above)}): their inputs stayed in "
                  f"cache between calls, or the peak ({_peak_note(report['peaks'])}) is low; --rotate N cycles more "
                  "input sets", highlight=False)


#: Relative p10–p90 spread (of the median) past which a case's figures and ratios are rough.
NOISY_SPREAD = 0.5


def noisy_cases(report: dict[str, Any]) -> list[str]:
    """The cases where any provider's p10–p90 spread exceeds ``NOISY_SPREAD`` of its median:
    a ratio between two such columns can be off by that much."""
    def noisy(entry: dict[str, Any]) -> bool:
        median = entry.get("median_s")
        return bool(median) and (entry["p90_s"] - entry["p10_s"]) / median > NOISY_SPREAD

    return [c["id"] for c in report["cases"] if any(noisy(e) for e in c["providers"].values() if e)]


def above_roofline(report: dict[str, Any]) -> list[str]:
    """The cases whose backend column claims more than its roofline: a figure not to trust as
    is (a cache-resident working set, or a measured peak below the device's real one)."""
    return [c["id"] for c in report["cases"]
            if (c["providers"]["backend"].get("roofline_percent") or 0) > 100]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    # `--runs 3` alone is three timed calls: the default floor follows it (it refused, naming
    # --min-runs, a flag the user never gave).
    min_runs = min(DEFAULT_MIN_RUNS, args.runs) if args.min_runs is None else args.min_runs
    for flag, value, low in (  # flags first: before the backend loads and the cases draw inputs
        ("--warmup", args.warmup, 0),
        ("--runs", args.runs, 1),
        ("--min-runs", min_runs, 1),
        ("--time-per-case", args.time_per_case, 0),
        ("--rotate", 1 if args.rotate is None else args.rotate, 1),
    ):
        if not low <= value < float("inf"):  # NaN and inf fail too
            raise DshalError(f"{flag}: got {value}, expected a number >= {low}")
    if min_runs > args.runs:
        raise DshalError(f"--min-runs: got {min_runs}, expected at most --runs ({args.runs})")
    if args.ops is not None and not args.ops.strip(", "):
        raise DshalError(f"--ops: got {args.ops!r}, expected op names separated by commas")
    runtime = start(args)
    op_names = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    cases = shape_cases(args.shapes, op_names)
    repeats = Repeats(warmup=args.warmup, min_runs=min_runs, max_runs=args.runs, budget_s=args.time_per_case)
    report = run_bench(
        runtime,
        cases,
        repeats,
        rotate=args.rotate,
        seed=args.seed,
        with_reference=not args.no_reference,
        with_torch=not args.no_torch,
        progress=not args.no_progress,
    )
    report["shapes"] = args.shapes
    html_path = write_html(report, args.output)
    json_file = write_json(json_path(args), report)
    print_summary(report)
    print(f"report: {html_path}\njson:   {json_file}")
    failed = [c["id"] for c in report["cases"] if "error" in c["providers"]["backend"]]
    if failed:
        print(f"dshal bench: {len(failed)} case(s) failed on the backend: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


__all__ = [
    "SCHEMA", "Case", "add_arguments", "bench_case", "input_set_count", "load_shapes_file", "main", "run_bench",
    "shape_cases", "torch_rival", "write_html",
]
