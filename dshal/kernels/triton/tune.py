"""``dshal tune``: write the block-FP8 GEMM's tuned table for this GPU.

For every (N, K) and every power-of-two M bucket, each tile of the target's space
(:meth:`~dshal.kernels.triton.target.KernelTarget.gemm_space`) is checked against the
reference and timed on the device (``triton.testing.do_bench``); the fastest is written
as a table entry. :func:`~dshal.kernels.triton.gemm.select_tile` reads the shipped tables
(``dshal/kernels/triton/tuned/<target>.json``) and then the user's
(``$DSHAL_CACHE_DIR/gemm-tuning/<target>.json``, this command's default output).

``--budget-s S`` starts no new entry after S seconds and marks the table ``complete: false``;
the table is rewritten after every entry, so a run cut short keeps what it measured.

Timings need the GPU. Without one, ``--dry-run --target T`` runs every candidate tile of
``T`` once under the Triton interpreter on tiny shapes and checks its result: it proves the
tiles and the table format, not their speed, and its table is marked ``dry_run`` so that it
can never choose a tile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dshal.backends.triton_gpu import TorchGpuBackend
from dshal.errors import ArgumentError, BackendUnavailableError
from dshal.kernels.triton import ensure_interpreter_if_cpu, require_triton
from dshal.kernels.triton.crosscompile import COMPILE_TARGETS
from dshal.kernels.triton.target import TUNING_SCHEMA, KernelTarget, TileConfig, m_bucket, user_tuning_dir
from dshal.kernels.tune_command import (  # without torch (--help)
    DRY_RUN_M,
    DRY_RUN_SHAPES,
    add_arguments as add_arguments,
)
from dshal.ops import reference
from dshal.outputs import atomic_write, check_writable
from dshal.runtime import use_for_command
from dshal.versions import installed

#: DeepSeek-V3's FP8 linear shapes (N, K), unsharded: fused q/kv down-projection, q up,
#: kv up, attention output, dense MLP up/down, shared expert up/down.
DEEPSEEK_V3_SHAPES = (
    (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384),
    (36864, 7168), (7168, 18432), (4096, 7168), (7168, 2048),
)  # fmt: skip
DEFAULT_M = tuple(2**i for i in range(13))  # 1 .. 4096


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ArgumentError(f"dshal tune: argument '--shapes' is {text!r}, expected 'N,K;N,K...' with positive sizes")
    return shapes  # type: ignore[return-value]


def _parse_m(text: str) -> list[int]:
    try:
        ms = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise ArgumentError(f"dshal tune: argument '--m' is {text!r}, expected comma-separated positive row counts")
    return ms


def _operands(m: int, n: int, k: int, target: KernelTarget, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(m * 1_000_003 + n * 1009 + k)
    kb = math.ceil(k / 128)
    a = torch.randn(m, k, generator=g, device=device).to(target.fp8_e4m3)
    b = torch.randn(n, k, generator=g, device=device).to(target.fp8_e4m3)
    sa = torch.rand(m, kb, generator=g, device=device) + 0.5
    sb = torch.rand(math.ceil(n / 128), kb, generator=g, device=device) + 0.5
    return a, sa, b, sb


def _similarity_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp_min(1e-300))


def tune(
    target: KernelTarget,
    device: torch.device,
    shapes: list[tuple[int, int]],
    ms: list[int],
    time_tiles: bool,
    log: Any = print,
    budget_s: float | None = None,
    on_entry: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One entry per (N, K, M bucket): each tile of the space checked against the reference
    (DeepGEMM similarity < 1e-3) and, when ``time_tiles``, timed in microseconds.

    Entries come M bucket by M bucket, smallest first. With ``budget_s``, no new (N, K, M
    bucket) is started once that many seconds have passed: the entries so far are returned
    (fewer than asked). ``on_entry(entries)`` is called after
    each one, so a caller can save the table as it grows."""
    from dshal.kernels.triton import gemm  # lazy: imports triton, after the caller chose the interpreter or not

    deadline = None if budget_s is None else time.monotonic() + budget_s
    entries: list[dict[str, Any]] = []
    for m in sorted(dict.fromkeys(m_bucket(m) for m in ms)):  # small M (decode) first: a budget cuts the large
        for n, k in shapes:
            if deadline is not None and time.monotonic() >= deadline:
                log(f"  budget of {budget_s:.0f} s spent: stopped before N={n} K={k} M<={m}")
                return entries
            a, sa, b, sb = _operands(m, n, k, target, device)
            want = reference.fp8_gemm(a, sa, b, sb, torch.float32)
            timings: dict[TileConfig, float | None] = {}
            for tile in target.gemm_space(m):
                got = gemm.fp8_block_gemm(a, sa, b, sb, torch.bfloat16, target=target, tile=tile)
                gap = _similarity_gap(got.float(), want)
                if not gap < 1e-3:
                    log(f"  N={n} K={k} M={m}: tile {tile} is wrong (1 - similarity = {gap:.2e}); skipped")
                    continue
                if time_tiles:
                    from triton.testing import do_bench  # lazy: the vendor runtime

                    def call(tile: TileConfig = tile, ops: tuple = (a, sa, b, sb)) -> torch.Tensor:
                        return gemm.fp8_block_gemm(*ops, target=target, tile=tile)

                    timings[tile] = do_bench(call, warmup=10, rep=50) * 1e3
                else:
                    timings[tile] = None
            if not timings:
                raise RuntimeError(f"dshal tune: no tile of {target.name} computes N={n} K={k} M={m} correctly")
            best = min(timings, key=lambda t: timings[t] if timings[t] is not None else 0.0)
            tile_dict = {key: v for key, v in dataclasses.asdict(best).items() if key != "spill_ok"}
            entries.append({
                "N": n, "K": k, "M": m, "tile": tile_dict, "us": timings[best],
                "candidates": {_label(t): us for t, us in timings.items()},
            })  # fmt: skip
            shown = f"{timings[best]:.1f} us" if timings[best] is not None else "not timed"
            log(f"  N={n:6d} K={k:6d} M<={m:5d}: {_label(best)} ({shown}, {len(timings)} tiles)")
            if on_entry is not None:
                on_entry(entries)
    return entries


def _label(t: TileConfig) -> str:
    return f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages} sk{t.split_k}"


def main(args: argparse.Namespace) -> int:
    require_triton("dshal tune")
    # before the tiles are timed (minutes), not after; the default folder does not depend on the target
    if args.output:
        check_writable(args.output, "--output")
    elif not args.dry_run:
        check_writable(user_tuning_dir(), "dshal tune: the default output folder (no --output; in dshal's cache, which DSHAL_CACHE_DIR sets)",
                       directory=True)  # fmt: skip
    if args.dry_run:
        if not args.target:
            raise ArgumentError(f"dshal tune: --dry-run needs --target {'|'.join(COMPILE_TARGETS)}")
        if args.backend:
            raise ArgumentError(f"dshal tune: --backend {args.backend} with --dry-run: a dry run uses no backend, "
                              "expected --target alone")
        ensure_interpreter_if_cpu("cpu")  # before the kernel modules are imported
        target, device = COMPILE_TARGETS[args.target].kernel_target(), torch.device("cpu")
        where = "CPU, Triton interpreter (dry run: no timings)"
        shapes = _parse_shapes(args.shapes) if args.shapes else list(DRY_RUN_SHAPES)
        ms = _parse_m(args.m) if args.m else list(DRY_RUN_M)
    else:
        runtime = use_for_command(None, args.backend)
        backend = runtime.backend
        if runtime.emulated or not isinstance(backend, TorchGpuBackend) or runtime.device.type != "cuda":
            raise BackendUnavailableError(
                f"dshal tune: backend {backend.name!r} on {runtime.device} has no GPU to time kernels on "
                "(emulated or not a Triton GPU backend); use --dry-run --target T to check the tiles without one"
            )
        target, device = backend.kernel_target(), runtime.device
        where = f"{torch.cuda.get_device_name(device)}"
        shapes = _parse_shapes(args.shapes) if args.shapes else list(DEEPSEEK_V3_SHAPES)
        ms = _parse_m(args.m) if args.m else list(DEFAULT_M)
    buckets = list(dict.fromkeys(m_bucket(m) for m in ms))
    if args.budget_s is not None and args.budget_s < 0:
        raise ArgumentError(f"dshal tune: argument '--budget-s' is {args.budget_s}, expected seconds >= 0")
    print(f"dshal tune: target {target.name} on {where}; {len(shapes)} (N, K) x {len(buckets)} M buckets", flush=True)
    out = Path(args.output) if args.output else (None if args.dry_run else user_tuning_dir() / f"{target.name}.json")
    header = {
        "schema": TUNING_SCHEMA,
        "target": target.name,
        "source": f"dshal tune on {where}",
        "device": None if args.dry_run else where,
        "dry_run": bool(args.dry_run),
        "triton": installed("triton"),  # pytorch-triton-rocm on ROCm
        "torch": torch.__version__,
    }

    previous = _previous_entries(out, header)
    retuned = [0]

    def write(entries: list[dict[str, Any]], complete: bool) -> None:
        if out is None:
            return
        done = {_entry_key(e) for e in entries}  # a cut or interrupted re-tune keeps what it has not redone
        kept = [e for e in previous if _entry_key(e) not in done]
        table = {**header, "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "complete": complete, "entries": entries + kept}
        # a table in dshal's cache is read and trusted by every later run: not writable by others
        atomic_write(out, json.dumps(table, indent=1), private=not args.output)
        retuned[0] = len(entries)

    total = len(shapes) * len(buckets)
    try:
        entries = tune(target, device, shapes, ms, time_tiles=not args.dry_run, budget_s=args.budget_s,
                       on_entry=lambda so_far: write(so_far, complete=False))
    except KeyboardInterrupt:
        if out is not None and retuned[0]:
            print(f"table: {out} (interrupted: {retuned[0]} of {total} entries written"
                  + (", the others kept from the table before)" if previous else ")"), flush=True)
        raise
    complete = len(entries) == total
    write(entries, complete)
    if out is not None:
        print(f"table: {out}" + (" (dry run: select_tile refuses it)" if args.dry_run else "")
              + ("" if complete else f" (incomplete: {len(entries)} of {total} entries)"))
    return 0


def _entry_key(entry: dict[str, Any]) -> tuple[int, int, int]:
    return int(entry["N"]), int(entry["K"]), m_bucket(int(entry["M"]))


#: What a kept entry must share with this run: timings from another device (H100, H200 and GH200
#: share one target), Triton or torch are not this run's.
SAME_RUN_KEYS = ("schema", "target", "dry_run", "device", "triton", "torch")


def _previous_entries(out: Path | None, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of the table already at ``out`` when it was tuned as this run is (same
    target, kind, device, Triton and torch: :data:`SAME_RUN_KEYS`); none otherwise, or when
    there is none or it cannot be read."""
    if out is None or not out.is_file():
        return []
    try:
        data = json.loads(out.read_text())
        if any(data.get(key) != header.get(key) for key in SAME_RUN_KEYS):
            return []
        return [e for e in data["entries"] if isinstance(e, dict) and _entry_key(e)]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


__all__ = ["DEEPSEEK_V3_SHAPES", "tune"]
