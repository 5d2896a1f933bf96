"""``dshal plan``: per rank, what a TP x EP job of a DeepSeek-V3 model holds and moves.

Every number comes from running dshal's own code on the meta device:

* the weights each rank holds: :func:`dshal.plan.simulate.build_rank` (the real loader, TP /
  EP transforms and precision policy, reading a checkpoint made of names and shapes);
* the KV cache: the model's own ``new_cache``;
* the activation peak and the collectives: one prefill chunk and one decode step of that
  model through ``dshal.ops`` (references on meta tensors, simulated groups logging each
  collective);
* that the ranks together hold every tensor exactly once: the transforms applied for
  *every* rank to a two-layer model of the same widths (one dense layer, one MoE layer),
  whose slices must tile each tensor (:func:`coverage`).

Ranks whose shards have the same shapes are built once and shown together (for
DeepSeek-V3 every rank of a layout is alike); the forward runs on the first EP rank,
which gets the most tokens of its EP group's slice.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dshal.config import GEMM_MODES, PrecisionConfig
from dshal.errors import ConfigError, ShapeError
from dshal.model.args import ModelArgs
from dshal.model.generate import DEFAULT_PREFILL_CHUNK
from dshal.model.model import MLA, Transformer
from dshal.model.precision import checkpoint_name
from dshal.model.speculative import mtp_layers_for
from dshal.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedExperts,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    split_range,
)
from dshal.parallel.transforms import sharded_skeletons, skeleton_args
from dshal.plan.names import TensorEntry, checkpoint_listing
from dshal.plan.simulate import SimulatedRank, build_rank, kv_cache_bytes, layout, run_steps
from dshal.redact import code_path, shareable_text

#: DeepSeek-V3's published parameter counts (README_WEIGHTS.md, see data/SOURCES.md):
#: 671B in the 61 main layers with embedding and head; 36.6B activated per token.
PUBLISHED = {"total": 671e9, "activated": 36.6e9}
#: With the MTP module: "685B, which includes 671B of the Main Model weights and 14B of the
#: Multi-Token Prediction (MTP) Module weights" (DeepSeek-V3's model card, README_WEIGHTS.md).
PUBLISHED_WITH_MTP = 685e9
GIB = 2**30


class PlanError(ConfigError):
    """A parallel layout that cannot work for this model on these devices."""


def default_config() -> Path:
    """DeepSeek-V3's published ``config.json``, kept as package data (see data/SOURCES.md)."""
    return Path(str(resources.files("dshal.plan") / "data" / "deepseek_v3_config.json"))


def config_label(path: str | Path) -> str:
    """How a plan names its config file: the built-in one as the package names it
    (``dshal/plan/data/deepseek_v3_config.json``, not where this machine installed dshal), a
    given one as given, a home folder written ``~``."""
    return code_path(str(path)) if Path(path) == default_config() else shareable_text(str(path))


#: Tokens per sequence planned when ``--context`` is not given (capped at the model's
#: ``max_position_embeddings``).
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class PlanRequest:
    """What ``dshal plan`` was asked (the command-line options)."""

    config: Path
    tp: int = 1
    ep: int = 1
    nodes: int | None = None
    gpus_per_node: int | None = None
    #: ``precision.gemm``: ``auto`` is the checkpoint's own format (FP8 blocks for DeepSeek-V3).
    precision: str = "auto"
    batch: int = 1
    #: None: ``min(DEFAULT_CONTEXT, max_position_embeddings)``.
    context: int | None = None
    #: None: ``min(DEFAULT_PREFILL_CHUNK, context - 1)``, the chunk ``model.generate`` uses.
    prefill_chunk: int | None = None
    device_memory_gib: float | None = None
    #: "mtp": ``dshal run --speculative mtp``, the checkpoint's MTP layer loaded too.
    speculative: str | None = None


# ---------------------------------------------------------------- what a rank holds
def weight_kind(path: str, dense_layer: bool) -> str:
    """Which group of the report a parameter belongs to."""
    leaf = path.rsplit(".", 1)[-1]
    if "scale" in leaf:
        return "FP8 scales"
    if path.startswith("mtp."):
        return "MTP layer"
    if path.startswith(("embed", "lm_head")):
        return "embed / lm_head"
    if ".self_attn." in path:
        return "attention"
    if ".mlp.experts." in path:
        return "routed experts"
    if ".mlp.shared_experts." in path:
        return "shared experts"
    if ".mlp.gate." in path or path.endswith("layernorm.weight") or path == "norm.weight":
        return "norms, router"
    return "dense MLP" if dense_layer else "norms, router"


KINDS = ("attention", "dense MLP", "routed experts", "shared experts", "embed / lm_head", "norms, router", "MTP layer",
         "FP8 scales")


def holdings(model: Any) -> dict[str, dict[str, int]]:
    """``{kind: {"params": n, "bytes": b}}`` of a (meta) model; scales count bytes, not params."""
    out = {k: {"params": 0, "bytes": 0} for k in KINDS}
    args = model.args
    for path, p in model.named_parameters():
        layer = int(path.split(".")[1]) if path.startswith("layers.") else None
        kind = weight_kind(path, layer is not None and not args.is_moe_layer(layer))
        out[kind]["bytes"] += p.numel() * p.element_size()
        if kind != "FP8 scales":
            out[kind]["params"] += p.numel()
    return out


def activated_params(model: Any, sim_world: int) -> float:
    """Parameters one token uses on this rank: everything but the embedding lookup, the
    routed experts scaled by the token's share of them (top_k / experts, even routing),
    and replicated tensors divided by how many ranks hold them (so the ranks sum to the model's).
    The MTP layer is left out, as the published count leaves it out."""
    args = model.args
    total = 0.0
    for path, p in model.named_parameters():
        leaf = path.rsplit(".", 1)[-1]
        if "scale" in leaf or path.startswith(("embed", "mtp.")):
            continue
        if ".mlp.experts." in path:
            total += p.numel() * args.num_experts_per_tok / args.n_routed_experts
        else:
            total += p.numel() / _replicas(model, path, p, sim_world)
    return total


def _replicas(model: Any, path: str, p: torch.Tensor, world: int) -> int:
    """How many ranks of the job hold the same slice as this rank (TP shards: one per EP rank)."""
    module = model.get_submodule(path.rsplit(".", 1)[0])
    sharded = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead)
    bias_of_row = isinstance(module, RowParallelLinear) and path.endswith(".bias")
    if isinstance(module, sharded) and not bias_of_row:
        return world // model.parallel.tp_size
    return world


# ---------------------------------------------------------------- every tensor exactly once
@dataclass
class Coverage:
    """Whether the ranks' slices tile every tensor, and the counts that follow."""

    total_params: int
    held_params: dict[int, int]  # rank -> parameters held (replicas included)
    experts_per_rank: int


def coverage(args: ModelArgs, tp: int, ep: int, gpus_per_node: int | None = None) -> Coverage:
    """Apply the TP / EP transforms for every rank to a two-layer meta model of ``args``' widths
    and check that the slices tile each tensor exactly (TP slices: each row / column once
    per EP group; experts: each once in the job). Raises ShapeError when they do not."""
    skeleton = skeleton_args(args)
    world = tp * ep
    plan = layout(world, tp, ep, gpus_per_node)
    with torch.device("meta"):
        full = Transformer(skeleton)
    full_shapes = {n: tuple(p.shape) for n, p in full.named_parameters()}
    moe_layers = args.num_hidden_layers - args.first_k_dense_replace

    def per_layer(name: str) -> int:
        """How many layers of the real model a skeleton parameter stands for."""
        if not name.startswith("layers."):
            return 1
        return moe_layers if skeleton.is_moe_layer(int(name.split(".")[1])) else args.first_k_dense_replace

    seen: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # name -> (dim, start, stop) per TP rank
    experts_held: dict[str, list[int]] = defaultdict(list)
    held: dict[int, int] = {}
    for rank, _, ep_rank, model in sharded_skeletons(args, plan):
        held[rank] = sum(p.numel() * per_layer(n) for n, p in model.named_parameters())
        for path, module in model.named_modules():
            if isinstance(module, ShardedExperts):
                experts_held[path].extend(module.held)
            shard = getattr(module, "shard", None)
            if shard is None or ep_rank:
                continue
            for p_name, _ in module.named_parameters(recurse=False):
                if p_name == "bias" and shard.dim == 1:
                    continue
                dim = shard.dim if p_name == "weight" else 0
                seen[f"{path}.{p_name}"].append((dim, shard.start, shard.stop))
    for name, pieces in seen.items():
        full_len = full_shapes[name][pieces[0][0]] // _parts(name)
        spans = sorted((a, b) for _, a, b in pieces)
        edge = 0
        for a, b in spans:
            if a != edge:
                raise ShapeError(
                    f"coverage: {name} slices {spans} leave a gap or overlap at {edge}, "
                    f"expected them to tile 0..{full_len}"
                )
            edge = b
        if edge != full_len:
            raise ShapeError(f"coverage: {name} slices {spans} end at {edge}, expected {full_len}")
    for path, ids in experts_held.items():
        if sorted(ids) != list(range(args.n_routed_experts)):
            raise ShapeError(
                f"coverage: {path} holds experts {sorted(ids)} over all ranks, "
                f"expected each of 0..{args.n_routed_experts - 1} once"
            )
    total = sum(math.prod(s) * per_layer(n) for n, s in full_shapes.items())
    per_rank = len(next(iter(experts_held.values()))) // world if experts_held else 0
    return Coverage(total, held, per_rank)


def _parts(name: str) -> int:
    """1, or 2 for ``gate_up_proj`` (a TP shard takes the same rows of its two halves)."""
    return 2 if ".gate_up_proj." in name else 1


# ---------------------------------------------------------------- where a shard cuts FP8 blocks
def block_cuts(sim: SimulatedRank, tensors: dict[str, TensorEntry], block: tuple[int, int]) -> list[dict[str, Any]]:
    """FP8-stored weights whose TP slices have a boundary inside a 128x128 block, per weight
    pattern: how many TP ranks are cut, the most bytes of neighbouring blocks one of them
    reads (whole blocks around its slice, summed over the pattern's tensors) and what the
    rank then holds. Every TP rank's slice has the size of this rank's (the transforms split
    heads and MLP rows evenly)."""
    tp = sim.groups.tp_size
    found: dict[str, dict[str, Any]] = {}
    for path, module in sim.model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead)):
            continue
        hf = checkpoint_name(path)
        parts = ("gate_proj", "up_proj")
        bases = [f"{hf[: -len('.gate_up_proj')]}.{n}" for n in parts] if path.endswith(".gate_up_proj") else [hf]
        shard = module.shard
        per = shard.stop - shard.start
        for base in bases:
            entry = tensors.get(f"{base}.weight")
            if entry is None or entry.dtype.itemsize != 1:
                continue
            size, edge = entry.shape[shard.dim], block[shard.dim]
            spans = [(r * per, min(size, (r + 1) * per)) for r in range(tp)]
            cut = [(a, b) for a, b in spans if a % edge or (b % edge and b != size)]
            if not cut:
                continue
            extra = max(_covering(a, b, size, edge) - (b - a) for a, b in cut)
            extra *= entry.shape[1 - shard.dim] * entry.dtype.itemsize
            key = re.sub(r"\.layers\.\d+\.", ".layers.*.", base)
            row = found.setdefault(
                key,
                {
                    "weight": key,
                    "dim": "rows" if shard.dim == 0 else "columns",
                    "slice_size": per,
                    "block": edge,
                    "tp_ranks_cut": len(cut),
                    "tensors": 0,
                    "extra_read_bytes": 0,
                    "held_as": str(module.weight.dtype).replace("torch.", ""),
                },
            )
            row["tensors"] += 1
            row["extra_read_bytes"] += extra
    return list(found.values())


def _covering(start: int, stop: int, size: int, block: int) -> int:
    """Length of the whole ``block``-sized blocks a slice ``start:stop`` of a ``size``-long
    dimension touches (the last block may be short)."""
    return min(size, math.ceil(stop / block) * block) - start // block * block


# ---------------------------------------------------------------- the whole plan
def _rank_classes(args: ModelArgs, tp: int, plan: Any) -> list[list[int]]:
    """Ranks grouped by the shapes of their shards (only the vocabulary split can differ)."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for rank in range(len(plan.tp_groups) * tp):
        tp_rank = plan.tp_group_of(rank).index(rank)
        start, stop = split_range(args.vocab_size, tp, tp_rank)
        by_size[stop - start].append(rank)
    return list(by_size.values())


def _traffic(step: Any) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for t in step.traffic:
        row = rows.setdefault(
            f"{t.group} {t.collective}", {"calls": 0, "payload_bytes_per_token": 0.0, "wire_bytes_per_token": 0.0}
        )
        row["calls"] += 1
        row["payload_bytes_per_token"] += t.payload / step.tokens
        row["wire_bytes_per_token"] += t.wire / step.tokens
    return rows


def _is_published_deepseek_v3(args: ModelArgs) -> bool:
    return args == ModelArgs.from_file(
        default_config(),
        **{k: getattr(args, k) for k in ("attention_window", "attention_global_tokens", "mla_mode", "mtp_layers")},
    )


def with_defaults(req: PlanRequest) -> PlanRequest:
    """``req`` with its context (capped at the model's ``max_position_embeddings``) and
    prefill chunk filled in where they were left to the defaults."""
    context = req.context
    if context is None:
        context = min(DEFAULT_CONTEXT, ModelArgs.from_file(req.config).max_position_embeddings)
    chunk = req.prefill_chunk
    if chunk is None and isinstance(context, int):
        chunk = max(1, min(DEFAULT_PREFILL_CHUNK, context - 1))
    return replace(req, context=context, prefill_chunk=chunk)


def resolved_precision(req: PlanRequest, args: ModelArgs) -> str:
    """The gemm mode the plan holds weights in: ``auto`` is the checkpoint's own format."""
    if req.precision != "auto":
        return req.precision
    # the loader dequantizes blocks other than 128 x 128 (dshal.model.precision): they run high
    return "fp8-block" if args.weight_block_size and tuple(args.weight_block_size) == (128, 128) else "high"


def _checked_request(req: PlanRequest) -> tuple[PlanRequest, ModelArgs]:
    """``req`` with its defaults filled in, and the model it plans; PlanError (ConfigError from
    the config.json) for a request that cannot work, naming the flag."""
    if isinstance(req.context, int) and not isinstance(req.context, bool) and req.context < 2:
        raise PlanError(f"dshal plan: --context is {req.context}, expected at least 2 (a prompt token, then the decode step)")
    if req.context is None or req.prefill_chunk is None:
        req = with_defaults(req)
    for name in ("tp", "ep", "batch", "context", "prefill_chunk"):
        value = getattr(req, name)
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"dshal plan: --{name.replace('_', '-')} is {value!r}, expected a positive integer")
    if req.prefill_chunk >= req.context:
        raise PlanError(
            f"dshal plan: --prefill-chunk is {req.prefill_chunk}, expected less than --context ({req.context}): "
            "the decode step after the prompt takes the last position"
        )
    if req.device_memory_gib is not None and not req.device_memory_gib > 0:
        raise PlanError(f"dshal plan: --device-memory-gib is {req.device_memory_gib!r}, expected a number > 0")
    args = ModelArgs.from_file(req.config, mtp_layers=mtp_layers_for(req.speculative))
    if req.context > args.max_position_embeddings:
        raise PlanError(
            f"dshal plan: --context is {req.context}, expected at most the model's max_position_embeddings "
            f"({args.max_position_embeddings})"
        )
    world = req.tp * req.ep
    if (req.nodes is None) != (req.gpus_per_node is None):
        raise PlanError("dshal plan: give --nodes and --gpus-per-node together")
    if req.nodes is not None and req.nodes * req.gpus_per_node != world:
        raise PlanError(
            f"dshal plan: --tp {req.tp} x --ep {req.ep} = {world} ranks, but --nodes {req.nodes} x --gpus-per-node "
            f"{req.gpus_per_node} = {req.nodes * req.gpus_per_node} devices; expected them equal. In dshal (as in "
            "`dshal run`) the ranks are TP x EP, and the TP group already spreads the routed experts over its ranks: "
            f"TP={req.gpus_per_node} on one {req.gpus_per_node}-device node holds "
            f"{args.n_routed_experts // max(req.gpus_per_node, 1)} experts per device (expert-parallel over the node); "
            "--ep M adds M such groups"
        )
    if req.precision not in GEMM_MODES:
        raise PlanError(f"dshal plan: --precision is {req.precision!r}, expected one of {', '.join(GEMM_MODES)}")
    return req, args


def _simulated_steps(req: PlanRequest, sim: SimulatedRank) -> tuple[Any, Any]:
    """The prefill chunk and the decode step of one rank class; PlanError where the batch's
    tensors pass torch's size limit."""
    try:
        return run_steps(sim, req.batch, req.context, req.prefill_chunk)
    except RuntimeError as err:  # torch's element count overflows int64 even on meta tensors
        if "overflow" not in str(err):
            raise
        raise PlanError(
            f"dshal plan: --batch {req.batch} x --context {req.context} (prefill chunks of {req.prefill_chunk}) "
            f"needs tensors past torch's size limit ({str(err).splitlines()[0]}); expected a smaller --batch "
            "or --prefill-chunk"
        ) from None


def _rank_entry(
    req: PlanRequest, args: ModelArgs, ranks: list[int], sim: SimulatedRank, steps: tuple[Any, Any],
    tensors: dict[str, TensorEntry], cover: Coverage,
) -> dict[str, Any]:
    """The plan of one rank class (``ranks``, simulated by ``sim``): what it holds, reads,
    sends and needs at its peak."""
    prefill, decode = steps
    per_token, kv_total = kv_cache_bytes(sim, req.batch, req.context, mtp=args.mtp_layers > 0)
    held = holdings(sim.model)
    weights = sum(k["bytes"] for k in held.values())
    # each attention layer's dequantized kv_b_proj, kept from the first absorbed step on
    absorbed = sum(m.cached_bytes() for m in sim.model.modules() if isinstance(m, MLA))
    # The attention NaN guard's temporaries on GPU providers, on top of the activations (an upper bound).
    guard = max(prefill.attention_guard_bytes, decode.attention_guard_bytes)
    need = weights + absorbed + kv_total + prefill.peak_bytes + guard
    read_bytes = sum(r.nbytes for r in sim.reads)
    # Quantize-then-shard (per-row / per-tensor / int8 scales, or a cut 128-block): the rank loads
    # the whole model first (dshal.parallel.loading.build_parallel); at least what it reads.
    whole_load = sim.model.shard_view is None and (sim.groups.tp_size > 1 or sim.groups.ep_size > 1)
    if whole_load:
        need = max(need, read_bytes)
    files = {r.file for r in sim.reads if r.file is not None}
    return {
        "ranks": ranks,
        "tp_rank": sim.tp_rank,
        "ep_rank": sim.ep_rank,
        "weights": held,
        "weight_bytes": weights,
        "params": sum(k["params"] for k in held.values()),
        "activated_params_per_token": activated_params(sim.model, req.tp * req.ep),
        "routed_experts_per_layer": cover.experts_per_rank or args.n_routed_experts,
        "kv_cache": {
            "bytes_per_token": per_token,
            "batch": req.batch,
            "context": req.context,
            "bytes": kv_total,
            "mode": args.mla_mode,
        },
        "activation_peak": {
            "prefill_chunk_tokens": req.batch * req.prefill_chunk,
            "bytes": prefill.peak_bytes,
            "largest": {
                "bytes": prefill.largest[0],
                "op": prefill.largest[1],
                "shape": list(prefill.largest[2]),
                "dtype": prefill.largest[3],
            },
            "eager_reference_bytes": prefill.eager_peak_bytes,
            "decode_bytes": decode.peak_bytes,
            "attention_guard_bytes": guard,
        },
        "logits": {"prefill": list(prefill.logits_shape), "decode": list(decode.logits_shape)},
        "communication": {"decode": _traffic(decode), "prefill": _traffic(prefill)},
        "reads": {"bytes": read_bytes, "tensors": len(sim.reads), "files": len(files)},
        "block_cuts": block_cuts(sim, tensors, tuple(args.weight_block_size or (128, 128))),
        "absorbed_kv_b_bytes": absorbed,
        "loads_whole_model": whole_load,
        "needs_bytes": need,
    }


def _memory_refusal(req: PlanRequest, ranks_out: list[dict[str, Any]], precision_mode: str) -> str | None:
    """Why the first rank class that needs more than ``--device-memory-gib`` cannot run
    (None: every class fits, or no budget was given)."""
    if req.device_memory_gib is None:
        return None
    budget = req.device_memory_gib * GIB
    over = [r for r in ranks_out if r["needs_bytes"] > budget]
    if not over:
        return None
    r = over[0]
    running = (r["weight_bytes"] + r["absorbed_kv_b_bytes"] + r["kv_cache"]["bytes"]
               + r["activation_peak"]["bytes"] + r["activation_peak"]["attention_guard_bytes"])
    if r["loads_whole_model"] and r["needs_bytes"] > running:  # the load, not the run, is too big
        return (
            f"ranks {_ranges(r['ranks'])} load the whole model before sharding it ({r['needs_bytes'] / GIB:.1f} GiB, "
            f"more than --device-memory-gib {req.device_memory_gib:g}): precision {precision_mode} with TP "
            "quantizes each weight whole; use --precision fp8-block with an FP8 checkpoint whose 128-blocks "
            "the shards do not cut (more ranks do not help here)"
        )
    return (
        f"ranks {_ranges(r['ranks'])} need {r['needs_bytes'] / GIB:.1f} GiB "
        f"(weights {r['weight_bytes'] / GIB:.1f} + "
        + (f"absorbed kv_b_proj copies {r['absorbed_kv_b_bytes'] / GIB:.1f} + " if r["absorbed_kv_b_bytes"] else "")
        + f"KV cache {r['kv_cache']['bytes'] / GIB:.1f} + "
        f"activations {r['activation_peak']['bytes'] / GIB:.1f} + "
        f"attention guard {r['activation_peak']['attention_guard_bytes'] / GIB:.1f}), "
        f"more than --device-memory-gib {req.device_memory_gib:g}; use more ranks (--tp / --ep) or a smaller "
        "--batch / --context / --prefill-chunk"
        + (", or --precision fp8-block" if req.precision == "bf16" else "")
    )


def make_plan(req: PlanRequest, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything ``dshal plan`` prints, as a JSON-friendly dict (raises PlanError for a
    layout that cannot work). ``on_stage(text)`` hears each long stage as it starts (loading
    a rank class on meta, running its steps: seconds each at DeepSeek-V3's size)."""
    stage = on_stage or (lambda text: None)
    req, args = _checked_request(req)
    world = req.tp * req.ep
    precision = PrecisionConfig(gemm=req.precision)
    plan = layout(world, req.tp, req.ep, req.gpus_per_node)
    tensors = checkpoint_listing(args)
    try:
        cover = coverage(args, req.tp, req.ep, req.gpus_per_node)
        classes = _rank_classes(args, req.tp, plan)
        sims = []
        for i, ranks in enumerate(classes):
            stage(f"rank class {i + 1}/{len(classes)} (ranks {_ranges(ranks)}): loading on meta")
            sims.append(
                build_rank(
                    args,
                    tensors,
                    req.tp,
                    req.ep,
                    ranks[0],
                    precision,
                    gpus_per_node=req.gpus_per_node,
                    path=str(req.config),
                )
            )
    except ShapeError as err:
        raise PlanError(f"dshal plan: TP={req.tp} x EP={req.ep} cannot shard this model: {err}") from err
    ranks_out = []
    for i, (ranks, sim) in enumerate(zip(classes, sims)):
        stage(
            f"rank class {i + 1}/{len(classes)} (ranks {_ranges(ranks)}): a prefill chunk of {req.batch} x "
            f"{req.prefill_chunk} tokens and a decode step"
        )
        ranks_out.append(_rank_entry(req, args, ranks, sim, _simulated_steps(req, sim), tensors, cover))
    activated = sum(len(r["ranks"]) * r["activated_params_per_token"] for r in ranks_out)
    result: dict[str, Any] = {
        "schema": "dshal.plan/1",
        "config": config_label(req.config),
        "model": {
            "layers": args.num_hidden_layers,
            "dense_layers": args.first_k_dense_replace,
            "hidden": args.hidden_size,
            "heads": args.num_attention_heads,
            "routed_experts": args.n_routed_experts,
            "experts_per_token": args.num_experts_per_tok,
            "vocab": args.vocab_size,
            "weight_block": list(args.weight_block_size) if args.weight_block_size else None,
            "mtp_layers": args.mtp_layers,  # counted: loaded for --speculative mtp
            "mtp_layers_not_counted": args.num_nextn_predict_layers - args.mtp_layers,
        },
        "layout": {
            "tp": req.tp,
            "ep": req.ep,
            "world": world,
            "nodes": req.nodes,
            "gpus_per_node": req.gpus_per_node,
            "expert_parallel_ranks": world if args.n_routed_experts else 0,
            "placement": plan.reason,
            "tp_groups": [list(g) for g in plan.tp_groups],
            "ep_groups": [list(g) for g in plan.ep_groups],
        },
        "precision": req.precision,
        "precision_mode": resolved_precision(req, args),
        "ranks": ranks_out,
        "totals": {
            "params_once": cover.total_params,
            "params_held_with_replicas": sum(cover.held_params.values()),
            "activated_per_token": activated,
        },
        "device_memory_gib": req.device_memory_gib,
    }
    if _is_published_deepseek_v3(args):
        published_total = PUBLISHED_WITH_MTP if args.mtp_layers else PUBLISHED["total"]
        result["totals"]["published"] = {
            "total": published_total,
            "total_diff": cover.total_params / published_total - 1,
            "activated": PUBLISHED["activated"],
            "activated_diff": activated / PUBLISHED["activated"] - 1,
        }
    refusal = _memory_refusal(req, ranks_out, result["precision_mode"])
    if refusal is not None:
        result["refusal"] = refusal
    return result


# ---------------------------------------------------------------- printing
def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _b(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:8.2f} MiB"


def format_plan(p: dict[str, Any]) -> str:
    """The text ``dshal plan`` prints."""
    m, lay, t = p["model"], p["layout"], p["totals"]
    where = f" on {lay['nodes']} node(s) x {lay['gpus_per_node']} devices" if lay["nodes"] else ""
    lines = [
        f"dshal plan: {p['config']}",
        f"model: {m['layers']} layers ({m['dense_layers']} dense), hidden {m['hidden']}, {m['heads']} heads, "
        f"{m['routed_experts']} routed experts (top {m['experts_per_token']}), vocab {m['vocab']}, "
        f"weights {'FP8 {}x{} blocks'.format(*m['weight_block']) if m['weight_block'] else 'high precision'}; "
        + (f"{m['mtp_layers']} MTP layer loaded (--speculative mtp)" if m["mtp_layers"]
           else f"{m['mtp_layers_not_counted']} MTP layer(s) not loaded"),
        f"layout: TP={lay['tp']} x EP={lay['ep']} = {lay['world']} ranks{where}; routed experts spread over "
        f"{lay['expert_parallel_ranks']} ranks ({p['ranks'][0]['routed_experts_per_layer']} per rank and layer); "
        f"{lay['placement']}",
        f"precision: {p['precision_mode']}" + (" (auto: the checkpoint's own)" if p["precision"] == "auto" else ""),
    ]
    for r in p["ranks"]:
        lines.append("")
        lines.append(
            f"ranks {_ranges(r['ranks'])} (TP rank {r['tp_rank']}, EP rank {r['ep_rank']}): "
            f"{r['params'] / 1e9:.2f}B parameters"
        )
        for kind, v in r["weights"].items():
            if v["bytes"]:
                count = f"{v['params'] / 1e9:7.2f}B params" if kind != "FP8 scales" else " " * 14
                lines.append(f"  {kind:<18} {_b(v['bytes'])}  {count}")
        lines.append(f"  {'weights total':<18} {_b(r['weight_bytes'])}")
        kv = r["kv_cache"]
        lines.append(
            f"  KV cache ({kv['mode']}): {kv['bytes_per_token']:,} B/token; "
            f"batch {kv['batch']} x context {kv['context']}: {_b(kv['bytes']).strip()}"
        )
        a = r["activation_peak"]
        lg = a["largest"]
        lines.append(
            f"  activation peak, prefill chunk of {a['prefill_chunk_tokens']} tokens: "
            f"{_b(a['bytes']).strip()} with one kernel "
            f"per dshal op (largest: {lg['op']} {lg['shape']} {lg['dtype']} {_b(lg['bytes']).strip()}); "
            f"{_b(a['eager_reference_bytes']).strip()} as the eager reference ops run; "
            f"decode step: {_b(a['decode_bytes']).strip()}; "
            f"attention NaN guard (GPU providers): {_b(a['attention_guard_bytes']).strip()} more"
        )
        parts = ("weights + " + ("absorbed kv_b_proj copies + " if r["absorbed_kv_b_bytes"] else "")
                 + "KV cache + activation peak + attention guard")
        if r["loads_whole_model"]:
            parts = f"the larger of {parts} and the whole model it loads before sharding"
        lines.append(
            f"  needs {_b(r['needs_bytes']).strip()} ({parts})"
            + (f" of {p['device_memory_gib']:g} GiB per device" if p["device_memory_gib"] else "")
        )
        if r["absorbed_kv_b_bytes"]:
            lines.append(f"  absorbed decode keeps each layer's kv_b_proj dequantized: {_b(r['absorbed_kv_b_bytes']).strip()}")
        if r["loads_whole_model"]:
            lines.append("  loads the whole model, then quantizes and shards it (per-row / per-tensor / int8 scales or a "
                         "cut 128-block: TP then computes what one process computes)")
        rd = r["reads"]
        files = f" from {rd['files']} shard files" if rd["files"] else ""
        lines.append(f"  reads {rd['bytes'] / 1e9:.1f} GB of the checkpoint in {rd['tensors']:,} tensor reads{files}")
        comm = r["communication"]
        keys = sorted(set(comm["decode"]) | set(comm["prefill"]))
        if keys:
            lines.append("  communication per token, bytes this rank sends (payload = tensor size):")
            lines.append(f"    {'':<24}{'decode wire':>14}{'payload':>14}{'prefill wire':>14}{'payload':>14}")
            for key in keys:
                d, f = comm["decode"].get(key, {}), comm["prefill"].get(key, {})
                cells = [
                    d.get("wire_bytes_per_token", 0),
                    d.get("payload_bytes_per_token", 0),
                    f.get("wire_bytes_per_token", 0),
                    f.get("payload_bytes_per_token", 0),
                ]
                lines.append(f"    {key:<24}" + "".join(f"{_human(c):>14}" for c in cells))
        else:
            lines.append("  communication: none (one rank)")
        if r["block_cuts"]:
            lines.append("  FP8 block cuts (a TP slice boundary inside a 128x128 scale block):")
            for c in r["block_cuts"]:
                fp8 = c["held_as"].startswith("float8")
                held = (
                    "re-quantizes it in its own 128x128 blocks (a second rounding)"
                    if fp8
                    else f"holds it as {c['held_as']} (more bytes than FP8) and quantizes its input as the whole "
                    "linear would, so TP computes what one process computes; every rank then reads the whole "
                    "checkpoint at load (dshal.parallel.build_parallel)"
                )
                lines.append(
                    f"    {c['weight']} x{c['tensors']}: {c['slice_size']} {c['dim']} per rank, {c['tp_ranks_cut']} of "
                    f"{p['layout']['tp']} TP ranks cut; a rank reads up to {_human(c['extra_read_bytes'])} of "
                    f"neighbouring blocks, dequantizes its slice and {held}"
                )
        elif not m["weight_block"]:  # nothing FP8 is read: cuts happen, if at all, after a whole-model quantization
            lines.append("  FP8 block cuts: none read (the checkpoint is not FP8)" + (
                "; every rank quantizes the whole model before sharding, and a shard that cuts a 128x128 block "
                "holds that weight dequantized (in 'weights' above)" if r["loads_whole_model"] else ""))
        else:
            lines.append("  FP8 block cuts: none (every shard boundary is on a 128x128 block edge)")
    lines.append("")
    lines.append(
        f"totals: {t['params_once'] / 1e9:.2f}B parameters, each slice once over the {lay['world']} ranks "
        f"({t['params_held_with_replicas'] / 1e9:.2f}B held with replicas); "
        f"activated per token {t['activated_per_token'] / 1e9:.2f}B"
    )
    pub = t.get("published")
    if pub:
        lines.append(
            f"published (DeepSeek-V3, 61 layers {'with' if m['mtp_layers'] else 'without'} the MTP layer and without "
            f"FP8 scales): {pub['total'] / 1e9:.0f}B total "
            f"({pub['total_diff']:+.2%}), {pub['activated'] / 1e9:.1f}B activated ({pub['activated_diff']:+.2%})"
            + (f"; dshal does not load the MTP layer's copy of the embedding ({m['vocab'] * m['hidden'] / 1e9:.2f}B)"
               if m["mtp_layers"] else "")
        )
    if p.get("refusal"):
        lines.append(f"refused: {p['refusal']}")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def to_json(p: dict[str, Any]) -> str:
    return json.dumps(p, indent=1)


__all__ = [
    "PUBLISHED",
    "PlanError",
    "PlanRequest",
    "block_cuts",
    "coverage",
    "config_label",
    "default_config",
    "format_plan",
    "holdings",
    "to_json",
    "make_plan",
]
