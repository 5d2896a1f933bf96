"""``dshal profile``: the model core's time per layer and per op, memory, and bottlenecks.

It builds the model exactly as ``dshal run`` does (the tiny built-in DeepSeek-V3-shaped
model by default, or ``--checkpoint DIR``, or a Hugging Face model id in the local cache),
warms it up, then generates once with the instrumentation of :mod:`dshal.perf.measure`
attached (prefill + decode), and reports:

- time per layer (``embed``, ``layers.N``, ``norm``, ``lm_head``) split by op type, with
  the time outside ops ("torch glue") and the profiler's own bookkeeping shown apart;
- time, FLOP/s, bytes/s and % of roofline per op type;
- peak memory (the backend's ``memory_stats()``, else the process's peak RSS) and the KV
  cache's bytes;
- the top 5 bottlenecks, named ("layers.2 moe_experts: 31 % of time, memory-bound at 12 %
  of roofline");
- the profiling-off overhead: forward passes of a model that was never instrumented vs.
  one instrumented and then detached, interleaved in one run (and the profiling-on cost).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dshal
import dshal.ops
from dshal.backend import host_peak_rss
from dshal.errors import DshalError
from dshal.hub import hub_provenance, hub_provenance_text
from dshal.model import from_pretrained, random_model, tiny_args
from dshal.model.args import checkpoint_folder
from dshal.model.precision import precision_summary
from dshal.model.run import check_run_fits, load_progress_bar, out_of_memory_in_flags
from dshal.ops.spec import Cost
from dshal.perf.measure import GLUE, OUTSIDE, PROFILER, Peaks, Recorder, gc_paused, has_hooks, place, resolve_peaks
from dshal.perf.profile_command import add_arguments  # its options, importable without torch (--help)
from dshal.perf.report import (
    PALETTE,
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
from dshal.runtime import current

SCHEMA = "dshal.profile/1"
PHASES = ("prefill", "decode")


def _positive(name: str, value: int, low: int = 1) -> None:
    if value < low:
        raise DshalError(f"dshal profile: {name} is {value}, expected an integer >= {low}")


# ---------------------------------------------------------------- measuring
def peak_memory(backend: Any) -> dict[str, Any]:
    """Peak memory: the backend's allocator statistics, else this process's peak RSS."""
    stats = backend.memory_stats()
    for key in ("peak_allocated", "peak_rss"):
        if stats.get(key):
            return {"bytes": int(stats[key]), "source": f"{backend.name}.memory_stats()['{key}']", "stats": dict(stats)}
    peak = host_peak_rss()
    if peak is None:
        return {"bytes": None, "source": "unknown (no getrusage on this OS)", "stats": dict(stats)}
    return {"bytes": peak, "source": "process peak RSS (getrusage)", "stats": dict(stats)}


def kv_cache_bytes(model: Any, batch: int, length: int) -> dict[str, Any]:
    """Bytes of the KV cache ``generate`` allocates for ``batch`` x ``length`` tokens
    (built once more here and measured, then freed)."""
    cache = model.new_cache(batch, length)
    total = sum(b.numel() * b.element_size() for layer in cache.buffers for b in layer)
    out = {
        "bytes": total,
        "bytes_per_token": cache.bytes_per_token,
        "mode": cache.mode,
        "capacity": cache.capacity,
        "batch": batch,
        "tokens": length,
    }
    del cache
    return out


def _shared_tensors(model: Any) -> dict[int, Any]:
    """A deepcopy memo that makes a copy of ``model`` share every tensor it holds
    (parameters, buffers, and tensors cached as plain attributes), so the copy costs
    module objects only."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in (*module.parameters(recurse=False), *module.buffers(recurse=False), *vars(module).values()):
            for t in value if isinstance(value, tuple) else (value,):
                if isinstance(t, torch.Tensor):
                    memo[id(t)] = t
    return memo


def measure_off_overhead(model: Any, ids: torch.Tensor, sync: Callable[[], None], pairs: int) -> dict[str, Any]:
    """Profiling-off overhead, measured in one run.

    A twin of ``model`` that shares its tensors but is never instrumented ("never") is
    timed against ``model`` after a recorder was attached and detached again ("detached"),
    and against ``model`` with the recorder attached ("on"); the three take turns, cycling
    through every order, so drift and after-effects hit them alike. Each pass is timed in wall time and in
    process CPU time (steadier on a busy machine: time other processes take the CPU for
    does not count). Returns the medians and, in percent, (detached - never) / never and
    (on - never) / never for both clocks.
    """
    twin = copy.deepcopy(model, memo=_shared_tensors(model))

    def one_pass(m: Any) -> tuple[float, float]:
        sync()
        wall, cpu = time.perf_counter_ns(), time.process_time_ns()
        m(ids)
        sync()
        return (time.perf_counter_ns() - wall) * 1e-9, (time.process_time_ns() - cpu) * 1e-9

    def profiled_pass() -> tuple[float, float]:
        with Recorder(sync).attached(model):
            return one_pass(model)

    samples: dict[str, list[tuple[float, float]]] = {"never": [], "detached": [], "on": []}
    one_pass(twin), profiled_pass(), one_pass(model)  # warm-up
    orders = list(itertools.permutations(samples))  # every order in turn: no kind always follows another
    for i in range(pairs):
        order = orders[i % len(orders)]
        with gc_paused():
            for kind in order:
                samples[kind].append(
                    one_pass(twin) if kind == "never" else profiled_pass() if kind == "on" else one_pass(model)
                )
    bare = all(dshal.ops.DISPATCHER.provider(name) is fn for name, fn in current().table.items())
    wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
    pct = lambda d, k: 100.0 * (d[k] - d["never"]) / d["never"] if d["never"] > 0 else math.nan  # noqa: E731
    return {
        "pairs": pairs,
        "median_s": wall,
        "median_cpu_s": cpu,
        "off_overhead_percent": pct(wall, "detached"),
        "on_overhead_percent": pct(wall, "on"),
        "off_overhead_percent_cpu": pct(cpu, "detached"),
        "on_overhead_percent_cpu": pct(cpu, "on"),
        "dispatch_table_bare_when_off": bare,
        "module_hooks_left": has_hooks(model),
    }


def _load_model(args: argparse.Namespace) -> tuple[Any, str]:
    if args.checkpoint:
        with load_progress_bar(not args.no_progress) as progress:
            return from_pretrained(args.checkpoint, progress=progress), str(args.checkpoint)
    return random_model(tiny_args(), seed=args.seed), f"built-in tiny DeepSeek-V3 (random weights, seed {args.seed})"


def profile_model(
    model: Any, runtime: Any, prompt: torch.Tensor, new_tokens: int, *, overhead_pairs: int = 7, progress: bool = False
) -> dict[str, Any]:
    """Profile ``model.generate(prompt, new_tokens)`` on ``runtime``; the JSON-ready report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    backend = runtime.backend
    sync = backend.synchronize
    model.generate(prompt[:, : min(4, prompt.shape[1])], 2)  # warm-up: first-call costs out of the profile
    overhead = measure_off_overhead(model, prompt, sync, overhead_pairs) if overhead_pairs > 0 else None

    recorder = Recorder(sync)
    columns = (TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("generate", total=new_tokens)
        stamps: list[float] = []

        def on_token(i: int) -> None:
            sync()
            stamps.append(time.perf_counter())
            recorder.phase = "decode"
            bar.advance(task)

        with recorder.attached(model), gc_paused():
            sync()
            start = time.perf_counter()
            model.generate(prompt, new_tokens, on_token=on_token)
            sync()
            wall = time.perf_counter() - start
    recorder.finish()
    phase_wall = {"prefill": stamps[0] - start, "decode": wall - (stamps[0] - start)}

    needed = {t.peak_key for t in recorder.ops.values() if t.peak_key}
    peaks = resolve_peaks(backend, runtime.device, needed)
    report = _summarize(recorder, peaks, wall, phase_wall)
    report.update(
        {
            "memory": {
                "peak": peak_memory(backend),
                "kv_cache": kv_cache_bytes(model, prompt.shape[0], prompt.shape[1] + new_tokens),
            },
            "overhead": overhead,
            "peaks": peaks.to_dict(),
            "hooks_removed": not has_hooks(model),
        }
    )
    return report


def _roof(flops: float, nbytes: float, seconds: float, key: str, peaks: Peaks) -> dict[str, Any]:
    if not flops and not nbytes or seconds <= 0:
        return {}
    return place(Cost(flops, nbytes), seconds, peaks.flops.get(key), peaks.bandwidth).to_dict()


def _summarize(rec: Recorder, peaks: Peaks, wall: float, phase_wall: dict[str, float]) -> dict[str, Any]:
    layers = []
    for name in rec.layer_order:
        per_phase = {p: rec.layers.get((p, name)) for p in PHASES}
        ops: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "calls": 0})
        for (_, lay, op), t in rec.ops.items():
            if lay == name:
                ops[op]["seconds"] += t.seconds
                ops[op]["calls"] += t.calls
        total = sum(t.seconds for t in per_phase.values() if t)
        layers.append(
            {
                "layer": name,
                "seconds": total,
                "percent_of_wall": 100.0 * total / wall,
                "phases": {p: (t.seconds if t else 0.0) for p, t in per_phase.items()},
                "forward_calls": sum(t.calls for t in per_phase.values() if t),
                "ops": {op: v for op, v in sorted(ops.items(), key=lambda kv: -kv[1]["seconds"])},
            }
        )
    layer_sum = sum(lay["seconds"] for lay in layers)

    op_types: dict[str, dict[str, Any]] = {}
    for (_, _, op), t in rec.ops.items():
        e = op_types.setdefault(
            op, {"op": op, "calls": 0, "seconds": 0.0, "flops": 0.0, "bytes": 0.0, "peak_key": t.peak_key}
        )
        e["calls"] += t.calls
        e["seconds"] += t.seconds
        e["flops"] += t.flops
        e["bytes"] += t.bytes
    for e in op_types.values():
        e["percent_of_wall"] = 100.0 * e["seconds"] / wall
        e["mean_s"] = e["seconds"] / e["calls"] if e["calls"] else 0.0
        e.update(_roof(e["flops"], e["bytes"], e["seconds"], e["peak_key"], peaks))
    op_list = sorted(op_types.values(), key=lambda e: -e["seconds"])

    merged: dict[tuple[str, str], dict[str, Any]] = {}  # (layer, op) over both phases
    for (_, lay, op), t in rec.ops.items():
        e = merged.setdefault(
            (lay, op), {"layer": lay, "op": op, "seconds": 0.0, "flops": 0.0, "bytes": 0.0, "peak_key": t.peak_key}
        )
        e["seconds"] += t.seconds
        e["flops"] += t.flops
        e["bytes"] += t.bytes
    ranked = sorted(merged.values(), key=lambda e: -e["seconds"])[:5]
    bottlenecks = []
    for e in ranked:
        share = 100.0 * e["seconds"] / wall
        roof = _roof(e["flops"], e["bytes"], e["seconds"], e["peak_key"], peaks)
        if roof and math.isfinite(roof.get("roofline_percent", math.nan)):
            how = f"{roof['bound']}-bound at {percent(roof['roofline_percent'])} of roofline"
        elif e["op"] == GLUE:
            how = "time in torch glue outside dshal ops (views, cat, einsum, indexing)"
        elif e["op"] == PROFILER:
            how = "the profiler's own bookkeeping"
        else:
            how = "no cost model"
        bottlenecks.append(
            {
                **e,
                "percent_of_wall": share,
                **roof,
                "description": f"{e['layer']} {e['op']}: {share:.0f} % of time, {how}",
            }
        )
    return {
        "wall_s": wall,
        "phase_wall_s": phase_wall,
        "layer_sum_s": layer_sum,
        "unattributed_s": wall - layer_sum,
        "layers": layers,
        "op_types": op_list,
        "bottlenecks": bottlenecks,
        "outside_layers_ops": sorted({op for (_, lay, op) in rec.ops if lay == OUTSIDE}),
        "layer_ops": [
            {
                "phase": p,
                "layer": lay,
                "op": op,
                "calls": t.calls,
                "seconds": t.seconds,
                "flops": t.flops,
                "bytes": t.bytes,
            }
            for (p, lay, op), t in rec.ops.items()
        ],
    }


# ---------------------------------------------------------------- report
def _colours(names: list[str]) -> dict[str, str]:
    fixed = {GLUE: "#bbbbbb", PROFILER: "#555555"}
    others = [n for n in names if n not in fixed]
    return {**{n: PALETTE[i % len(PALETTE)] for i, n in enumerate(others)}, **fixed}


def timeline_figure(report: dict[str, Any]) -> Any:
    """Per-layer stacked bars (one panel per phase): each layer's time split by op type."""
    from matplotlib.figure import Figure

    layers = report["layers"]
    names = [e["op"] for e in report["op_types"]]
    seconds = {(e["phase"], e["layer"], e["op"]): e["seconds"] for e in report["layer_ops"]}
    colours = _colours(names)
    fig = Figure(figsize=(11, max(3.0, 0.35 * len(layers) + 1.5)), dpi=100)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, phase in zip(axes, PHASES):
        left = [0.0] * len(layers)
        for op in names:
            widths = [1e3 * seconds.get((phase, lay["layer"], op), 0.0) for lay in layers]
            if any(widths):
                ax.barh(range(len(layers)), widths, left=left, color=colours[op], label=op, height=0.7)
                left = [a + b for a, b in zip(left, widths)]
        ax.set_title(f"{phase} ({duration(report['phase_wall_s'][phase])} wall)", fontsize=10)
        ax.set_xlabel("time (ms)")
        ax.grid(True, axis="x", alpha=0.25)
    axes[0].set_yticks(range(len(layers)))
    axes[0].set_yticklabels([lay["layer"] for lay in layers], fontsize=8)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    h2, l2 = axes[1].get_legend_handles_labels()
    seen = dict(zip(labels + l2, handles + h2))
    fig.legend(
        list(seen.values()),
        list(seen.keys()),
        fontsize=7,
        loc="upper center",
        ncol=min(6, len(seen)),
        bbox_to_anchor=(0.5, 1.08),
    )
    return fig


def op_bars_figure(report: dict[str, Any]) -> Any:
    """Total time per op type (horizontal bars)."""
    ops = report["op_types"]
    colours = _colours([e["op"] for e in ops])
    fig, ax = new_figure(9, max(2.5, 0.32 * len(ops) + 1))
    ax.barh(range(len(ops)), [1e3 * e["seconds"] for e in ops], color=[colours[e["op"]] for e in ops])
    ax.set_yticks(range(len(ops)))
    ax.set_yticklabels([f"{e['op']} ({e['calls']} calls)" for e in ops], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("total time (ms)")
    ax.grid(True, axis="x", alpha=0.25)
    return fig


def write_html(report: dict[str, Any], path: str | Path) -> Path:
    mem, kv, plat = report["memory"], report["memory"]["kv_cache"], report["platform"]
    meta = {
        "backend": f"{report['backend']} on {report['device']}" + (" — emulated" if report["emulated"] else ""),
        "model": report["model"],
        **({"Hugging Face model": hub_provenance_text(report["checkpoint_hub"])} if report.get("checkpoint_hub") else {}),
        "run": f"batch {report['batch']}, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens",
        "precision": precision_summary(report["precision"]).removeprefix("precision: ") if "precision" in report else "n/a",
        "machine": f"{machine_text(plat)}, torch threads {report['torch_threads']}",
        "wall time": f"{duration(report['wall_s'])} (layers add up to {duration(report['layer_sum_s'])}, "
        f"{100 * report['layer_sum_s'] / report['wall_s']:.1f} %)",
        "peak memory": f"{si(mem['peak']['bytes'], 'B')} ({mem['peak']['source']})",
        "KV cache": f"{si(kv['bytes'], 'B')} ({kv['mode']}, {kv['bytes_per_token']} bytes/token over all layers, "
        f"{kv['batch']} x {kv['tokens']} tokens)",
        "started": report["started"],
        "schema": report["schema"],
    }
    ov = report.get("overhead")
    if ov:
        meta["profiling overhead"] = (
            f"off: {ov['off_overhead_percent']:+.2f} % wall, {ov['off_overhead_percent_cpu']:+.2f} % CPU time "
            f"(dispatch table bare: {ov['dispatch_table_bare_when_off']}, "
            f"module hooks left: {ov['module_hooks_left']}); "
            f"on: {ov['on_overhead_percent']:+.1f} % wall, {ov['on_overhead_percent_cpu']:+.1f} % CPU time "
            f"— medians of {ov['pairs']} interleaved forward passes each"
        )
    doc = HtmlReport(f"dshal profile — {report['backend']}", meta)
    bn = doc.section("Top bottlenecks")
    doc.add_table(
        bn,
        Table(
            ["#", "bottleneck"],
            [[i + 1, b["description"]] for i, b in enumerate(report["bottlenecks"])],
            text_columns=(1,),
        ),
    )
    tl = doc.section("Per-layer timeline")
    doc.add_figure(
        tl,
        timeline_figure(report),
        "Each layer's time, stacked by op type; 'torch glue' is time inside the layer "
        "outside dshal ops, 'profiler' the recorder's own bookkeeping.",
    )
    rows = []
    for lay in report["layers"]:
        top = next((op for op in lay["ops"] if op not in (GLUE, PROFILER)), "—")
        rows.append(
            [
                lay["layer"],
                duration(lay["phases"]["prefill"]),
                duration(lay["phases"]["decode"]),
                duration(lay["seconds"]),
                f"{lay['percent_of_wall']:.1f} %",
                lay["forward_calls"],
                top,
            ]
        )
    rows.append(
        [
            "(outside layers: sampling, cache planning)",
            "",
            "",
            duration(report["unattributed_s"]),
            f"{100 * report['unattributed_s'] / report['wall_s']:.1f} %",
            "",
            "",
        ]
    )
    doc.add_table(
        tl,
        Table(
            ["layer", "prefill", "decode", "total", "% of wall", "forward calls", "top op"], rows, text_columns=(0, 6)
        ),
    )
    ops = doc.section("Per op type")
    doc.add_figure(ops, op_bars_figure(report), "Total time per op type over the profiled generation.")
    marks = [
        RooflineMark(e["op"], e["intensity"], e["flops_per_s"], e["op"]) for e in report["op_types"] if "intensity" in e
    ]
    peaks = report["peaks"]
    used = {e["peak_key"] for e in report["op_types"] if e.get("peak_key")}
    measured = any("measured" in s for s in peaks["sources"].values())
    doc.add_figure(
        ops,
        roofline_figure(
            marks,
            {k: v for k, v in peaks["flops"].items() if k in used},
            peaks["bandwidth"],
            "op types",
            "measured peaks" if measured else "peaks from capabilities()",
        ),
        "Each op type's aggregate achieved FLOP/s against its arithmetic intensity.",
    )
    op_rows = [
        [
            e["op"],
            e["calls"],
            duration(e["seconds"]),
            f"{e['percent_of_wall']:.1f} %",
            duration(e["mean_s"]),
            si(e.get("flops_per_s"), "FLOP/s"),
            si(e.get("bytes_per_s"), "B/s"),
            percent(e.get("roofline_percent")),
            e.get("bound", "—"),
        ]
        for e in report["op_types"]
    ]
    doc.add_table(
        ops,
        Table(
            ["op", "calls", "total", "% of wall", "mean per call", "FLOP/s", "bytes/s", "% roofline", "bound"],
            op_rows,
            text_columns=(0, 8),
        ),
    )
    if measured:
        doc.add_note(ops, "Peaks marked measured were timed here (short matmul and copy): the backend declares none.")
    return doc.write(path)


def print_summary(report: dict[str, Any]) -> None:
    out = console()
    out.print(
        f"[bold]dshal profile[/bold]: backend [cyan]{report['backend']}[/cyan] on {report['device']}; {report['model']}"
    )
    if "precision" in report:
        out.print(precision_summary(report["precision"]))
    out.print(
        f"wall {duration(report['wall_s'])}; layers add up to {duration(report['layer_sum_s'])} "
        f"({100 * report['layer_sum_s'] / report['wall_s']:.1f} %); peak memory "
        f"{si(report['memory']['peak']['bytes'], 'B')}; KV cache {si(report['memory']['kv_cache']['bytes'], 'B')}"
    )
    ov = report.get("overhead")
    if ov:
        out.print(
            f"profiling overhead (medians of {ov['pairs']} interleaved passes, wall / CPU time): "
            f"off {ov['off_overhead_percent']:+.2f} % / {ov['off_overhead_percent_cpu']:+.2f} %, "
            f"on {ov['on_overhead_percent']:+.1f} % / {ov['on_overhead_percent_cpu']:+.1f} %"
        )
    out.print("[bold]top bottlenecks[/bold]")
    for i, b in enumerate(report["bottlenecks"], 1):
        out.print(f"  {i}. {b['description']}")


def main(args: argparse.Namespace) -> int:
    _positive("--prompt-len", args.prompt_len)
    _positive("--new-tokens", args.new_tokens)
    _positive("--batch", args.batch)
    _positive("--overhead-pairs", args.overhead_pairs, 0)
    given, hub = args.checkpoint, None
    if args.checkpoint:  # a Hub id: its snapshot folder, or the error naming the flag before the backend starts
        args.checkpoint = str(checkpoint_folder(args.checkpoint, "--checkpoint"))
        hub = hub_provenance(given, args.checkpoint)  # the id and revision asked, the commit found
    runtime = start(args)
    model, source = _load_model(args)
    check_run_fits(model, args, runtime.device)
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.args.vocab_size, (args.batch, args.prompt_len), generator=gen).to(runtime.device)
    started = time.time()
    with out_of_memory_in_flags(args, runtime.device):
        report = profile_model(
            model, runtime, prompt, args.new_tokens, overhead_pairs=args.overhead_pairs, progress=not args.no_progress
        )
    report = {
        "schema": SCHEMA,
        "dshal_version": dshal.__version__,
        "backend": runtime.backend.name,
        "device": str(runtime.device),
        "emulated": runtime.emulated,
        "model": source,
        "checkpoint_hub": hub,  # a Hugging Face id's: {id, revision, commit}; else None
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "platform": platform_info(),
        "torch_threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "providers": {op: runtime.provider_entry(op) for op in runtime.providers},
        "precision": model.describe()["precision"],
        **report,
    }
    html_path = write_html(report, args.output)
    json_file = write_json(json_path(args), report)
    print_summary(report)
    print(f"report: {html_path}\njson:   {json_file}")
    return 0


__all__ = [
    "SCHEMA",
    "add_arguments",
    "kv_cache_bytes",
    "main",
    "measure_off_overhead",
    "peak_memory",
    "profile_model",
    "write_html",
]
