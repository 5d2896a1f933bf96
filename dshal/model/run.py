"""``dshal run``: the model core on the selected backend, with tokens/s.

By default a tiny DeepSeek-V3-shaped model with random weights is built on the fly
(:func:`dshal.model.args.tiny_args`: first layer dense, grouped MoE with a correction
bias, q LoRA, YaRN); ``--checkpoint DIR`` loads a Hugging Face checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dshal.errors import DshalError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="F", help="dshal config file (default: DSHAL_CONFIG or the built-in defaults)"
    )
    parser.add_argument(
        "--checkpoint", metavar="DIR", help="Hugging Face DeepSeek-V3 checkpoint (default: a tiny random model)"
    )
    parser.add_argument(
        "--prompt-len", type=int, default=32, metavar="N", help="prompt tokens (random ids; default 32)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=32, metavar="N", help="tokens to generate greedily (default 32)"
    )
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="sequences generated together (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    parser.add_argument(
        "--mla-mode", choices=("absorb", "naive"), default=None, help="KV cache layout (default: absorb)"
    )
    parser.add_argument("--json", metavar="F", help="also write the results as JSON to F")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from dshal.parallel import run as parallel_run

    parallel_run.add_arguments(parser)  # --tp / --ep (dshal.parallel.run)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise DshalError(f"dshal run: {name} is {value}, expected an integer >= 1")


def main(args: argparse.Namespace) -> int:
    import dshal
    from dshal.model import from_pretrained, random_model, tiny_args

    _positive("--prompt-len", args.prompt_len)
    _positive("--new-tokens", args.new_tokens)
    _positive("--batch", args.batch)
    from dshal.parallel import run as parallel_run

    parallel = parallel_run.wanted(args)
    if parallel and parallel_run.relaunch_needed():
        return parallel_run.relaunch(args)
    runtime = dshal.use(args.config)
    groups = parallel_run.setup(args) if parallel else None
    started = time.perf_counter()
    if groups is not None:
        model, source = parallel_run.load(args, groups)
    elif args.checkpoint:
        model = from_pretrained(args.checkpoint, mla_mode=args.mla_mode)
        source = str(args.checkpoint)
    else:
        model_args = tiny_args(mla_mode=args.mla_mode or "absorb")
        model = random_model(model_args, seed=args.seed)
        source = f"built-in tiny DeepSeek-V3 (random weights, seed {args.seed})"
    load_s = time.perf_counter() - started
    vocab = model.args.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen).to(runtime.device)
    model.generate(prompt[:, : min(4, args.prompt_len)], 2)  # warm-up: first-call costs out of the timings

    result, start, stamps = _timed_generate(
        model, prompt, args.new_tokens, runtime.backend.synchronize, not args.no_progress
    )
    prefill_s = stamps[0] - start  # the first new token comes out of the prefill
    decode_s = stamps[-1] - stamps[0]
    decode_tokens = args.batch * (args.new_tokens - 1)
    report: dict[str, Any] = {
        "backend": runtime.backend.name,
        "device": str(runtime.device),
        "emulated": runtime.emulated,
        "model": source,
        "load_s": round(load_s, 3),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_tokens_per_s": args.batch * args.prompt_len / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        "providers": {op: {"provider": p, "kind": runtime.provider_kind(op)} for op, p in runtime.providers.items()},
        "model_description": model.describe(),
        "output_ids": result[0, args.prompt_len :].tolist(),
    }
    if groups is not None:
        report = parallel_run.report(report, groups)
    if groups is None or parallel_run.is_reporting_rank():
        _print(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if groups is not None:
        parallel_run.finish()
    return 0


def _timed_generate(
    model: Any, prompt: torch.Tensor, new_tokens: int, sync: Any, show: bool
) -> tuple[torch.Tensor, float, list[float]]:
    """Generate with a progress bar; returns (ids, start time, time at which each new token was ready)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stamps: list[float] = []
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show, transient=True) as progress:
        task = progress.add_task("generate", total=new_tokens)

        def on_token(i: int) -> None:
            sync()
            stamps.append(time.perf_counter())
            progress.advance(task)

        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, on_token=on_token)
    return out, start, stamps


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    emulated = " (emulated)" if report["emulated"] else ""
    console.print(f"[bold]dshal run[/bold]: backend [cyan]{report['backend']}[/cyan] on {report['device']}{emulated}")
    console.print(f"model: {report['model']} (loaded in {report['load_s']:.2f} s)")
    ops = Table(title="op providers", show_edge=False)
    ops.add_column("op")
    ops.add_column("provider")
    ops.add_column("kind")
    for op, p in report["providers"].items():
        ops.add_row(op, p["provider"], p["kind"])
    console.print(ops)
    desc = report["model_description"]
    from dshal.model.precision import precision_summary

    console.print(precision_summary(desc["precision"]))
    prec = Table(
        title=f"precision per layer group ({desc['layers_total']} layers, {desc['dense_layers']} dense)",
        show_edge=False,
    )
    prec.add_column("group")
    prec.add_column("weights")
    for group, label in desc["precision_groups"].items():
        prec.add_row(group, label)
    console.print(prec)
    kv = desc["kv_cache"]
    line = f"KV cache ({kv['mode']}): {kv['bytes_per_token']} bytes/token (naive MLA: {kv['bytes_per_token_naive']})"
    if kv.get("window"):
        line += (
            f"; window {kv['window']} + {kv['global_tokens']} global tokens: "
            f"{kv['bytes_per_token_at_context']:.1f} bytes/token at {kv['context']} tokens of context"
        )
    console.print(line)
    fmt = lambda v: "n/a" if v is None else f"{v:,.1f}"  # noqa: E731
    batch, prefill, decode = report["batch"], report["prefill_tokens_per_s"], report["decode_tokens_per_s"]
    console.print(
        f"prefill: [bold]{fmt(prefill)}[/bold] tokens/s ({batch} x {report['prompt_len']} tokens); "
        f"decode: [bold]{fmt(decode)}[/bold] tokens/s ({batch} x {report['new_tokens']} new tokens)"
    )


__all__ = ["add_arguments", "main"]
