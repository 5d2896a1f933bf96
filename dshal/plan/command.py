"""``dshal plan``: per rank, the bytes a TP x EP job of a DeepSeek-V3 model holds and moves,
worked out on the meta device (no accelerator, no weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dshal.outputs import atomic_write, check_writable, console as output_console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="CONFIG.json",
        help="the model's Hugging Face config.json, its checkpoint folder, or its model id (org/name, "
        "org/name@REVISION) already in the local Hugging Face cache, never downloaded (default: DeepSeek-V3's "
        "published one)",
    )
    parser.add_argument(
        "--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (as `dshal run --tp`; default 1)"
    )
    parser.add_argument(
        "--ep",
        type=int,
        default=1,
        metavar="M",
        help="expert-parallel groups (as `dshal run --ep`): the job has TP x EP ranks and the routed "
        "experts are spread over all of them (default 1)",
    )
    parser.add_argument(
        "--nodes", type=int, default=None, metavar="N", help="nodes (with --gpus-per-node: must equal TP x EP devices)"
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, metavar="G", help="devices per node (places the TP groups)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        metavar="MODE",
        help="precision.gemm of the run: auto (default: the checkpoint's own format, FP8 blocks for DeepSeek-V3), "
        "high, fp8-block, fp8-row, fp8-tensor, int8 (bf16: the older name of high)",
    )
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default 1)")
    parser.add_argument("--context", type=int, default=None, metavar="T", help="tokens per sequence, prompt and generated together, up to the model's max_position_embeddings; the "
         "plan runs the prompt's last prefill chunk and the decode step at the last position (default 4096, or "
         "max_position_embeddings where that is less)")
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="C",
        help="tokens per sequence in one prefill chunk, less than --context (default min(2048, context - 1): the "
        "chunk model.generate and `dshal run --prefill-chunk` use by default)",
    )
    parser.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        metavar="G",
        help="memory per device; refuse a layout whose ranks need more",
    )
    parser.add_argument(
        "--speculative",
        choices=("mtp",),
        default=None,
        help="plan `dshal run --speculative mtp`: the checkpoint's multi-token-prediction layer held too (split "
        "like the other layers) and its KV cache",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="F", help="also write the plan as JSON to F")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress line (DeepSeek-V3 takes ~5 s per rank class)"
    )


def main(args: argparse.Namespace) -> int:
    from dshal.model.args import checkpoint_config_path  # lazy: start-up time (dshal plan --help loads no torch)
    from dshal.plan.plan import (  # lazy: start-up time (dshal plan --help loads no torch)
        PlanError,
        PlanRequest,
        default_config,
        format_plan,
        make_plan,
        to_json,
    )

    if args.json:
        check_writable(args.json, "--json")  # before the plan, not after it
    request = PlanRequest(
        # a Hub id: its config.json in the local Hugging Face cache's snapshot
        config=checkpoint_config_path(args.config, "--config") if args.config else default_config(),
        tp=args.tp,
        ep=args.ep,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        precision=args.precision,
        batch=args.batch,
        context=args.context,
        prefill_chunk=args.prefill_chunk,
        device_memory_gib=args.device_memory_gib,
        speculative=args.speculative,
    )
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    console = output_console(stderr=True)  # stdout carries the plan only
    show = not args.no_progress and console.is_terminal
    with Progress(*columns, console=console, disable=not show, transient=True) as progress:
        task = progress.add_task("reading the config", total=None)
        plan = make_plan(request, on_stage=lambda text: progress.update(task, description=text))
    print(format_plan(plan))
    if args.json:
        atomic_write(args.json, to_json(plan))
        print(f"wrote {args.json}")
    if plan.get("refusal"):
        raise PlanError(f"dshal plan: refused: {plan['refusal']}")
    return 0
