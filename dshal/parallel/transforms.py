"""Parallelism as transforms of a built model (gpt-fast style): the model core has no
``if tp:`` anywhere; these functions swap its modules for the ones in
:mod:`dshal.parallel.layers`.

* :func:`tensor_parallel` over a group of ``n`` ranks: MLA heads are split (``q_b_proj`` /
  ``q_proj`` and ``kv_b_proj`` column-parallel, ``o_proj`` row-parallel with an all-reduce),
  dense MLPs and shared experts are split by intermediate features (``gate_up_proj``
  column-parallel taking matching gate and up rows, ``down_proj`` row-parallel), embedding
  and ``lm_head`` are split by vocabulary rows (embedding: masked lookup + all-reduce;
  lm_head: all-gather of the logits). Routed experts are split *by expert*: each rank keeps
  ``1/n`` of them and the MoE's partial outputs (routed + shared) meet in one all-reduce;
  tokens are the same on every rank of a TP group, so no token exchange is needed.
* :func:`expert_parallel` over a group of ``m`` ranks: the routed experts (those this rank
  handles) are split into ``m`` blocks, one per rank; each rank serves its block's share of
  every token and an all-reduce sums them (decode steps), or tokens travel to their experts
  with ``all_to_all`` (long prefill chunks; see :class:`~dshal.parallel.layers.ShardedExperts`).

Both work on a model with weights (they slice them) or on one built on the meta device
(they record what each rank needs; :func:`dshal.parallel.loading.build_parallel` then reads
only those slices from the checkpoint). They compose in either order; TP x EP keeps
``E / (n * m)`` experts per rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from dshal import comm
from dshal.errors import ShapeError
from dshal.model.args import ModelArgs
from dshal.model.model import MLP, Embedding, Linear, MoE, RoutedExperts, Transformer
from dshal.model.weights import dequantize_weight, stored_mode
from dshal.ops.spec import FP8_FORMAT_OF
from dshal.parallel.groups import GroupPlan
from dshal.parallel.layers import (
    ActivationQuant,
    ColumnParallelLinear,
    ParallelMoE,
    RowParallelLinear,
    Shard,
    ShardedExperts,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    split_range,
)
from dshal.runtime import current


def _size_and_rank(group: Any) -> tuple[int, int]:
    return comm.get_world_size(group), comm.get_rank(group)


def _divide(total: int, parts: int, what: str, transform: str) -> int:
    if total % parts:
        raise ShapeError(f"{transform}: {what} is {total}, expected a multiple of the group size {parts}")
    return total // parts


# ---------------------------------------------------------------- slicing weights
def _slice(value: torch.Tensor | None, shard: Shard, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``shard`` of ``value`` (shape ``shape`` on the meta device when ``value`` is meta)."""
    if value is None:
        return None
    if value.is_meta:
        return torch.empty(shape, dtype=value.dtype, device="meta")
    return shard.take(value.data)


def exact_shard(mode: str, shard: Shard, full: int, row: bool) -> bool:
    """Whether a linear stored in gemm ``mode`` computes, on the ``shard`` of its weight
    (``full`` rows or columns along ``shard.dim``), exactly its part of the unsharded
    product when it slices the weight and its scales: the slice keeps whole 128x128
    blocks, and (for a row-parallel shard) no activation quantization group spans ranks.
    Otherwise the transform sets an :class:`ActivationQuant` on the shard."""
    if mode == "high":
        return True
    if mode == "fp8-block":
        part = full // shard.parts
        return shard.start % 128 == 0 and (shard.stop % 128 == 0 or shard.stop == part) and (shard.parts == 1 or part % 128 == 0)
    # fp8-row / int8 (per output channel) and fp8-tensor: the weight's scales need no cut,
    # but the activation's scale is per token (or tensor) over all K: whole only per column shard.
    return not row


def activation_quant_of(module: Linear) -> ActivationQuant | None:
    """The :class:`ActivationQuant` a parallel linear loaded with its shard already (a
    sliced read) needs, as :func:`_slice_scale` would have set it from the whole weight:
    None where slicing is exact."""
    if module.weight_scale is None or module.shard.total is None:
        return None
    mode = stored_mode(module.weight, module.weight_scale)
    row = isinstance(module, RowParallelLinear)
    if exact_shard(mode, module.shard, module.shard.total * module.shard.parts, row):
        return None
    return ActivationQuant(mode, "int8" if mode == "int8" else FP8_FORMAT_OF[module.weight.dtype])


def _slice_scale(
    weight: torch.Tensor, scale: torch.Tensor | None, shard: Shard, row: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, ActivationQuant | None]:
    """The weight shard, its scale shard, and the activation quantization the shard must
    reproduce (None when slicing is exact, see :func:`exact_shard`). A row-parallel shard of
    a per-channel / per-tensor weight keeps its quantized columns and the global scales
    (its input is quantized as a whole by the layer); a shard that cuts 128-blocks is held
    as its dequantized float32 slice. Either way it computes what the unsharded quantized
    linear computes, so TP equals the single process in every precision mode (quantize
    before sharding)."""
    full_shape = list(weight.shape)
    full_shape[shard.dim] = shard.size
    if scale is None:
        return _slice(weight, shard, tuple(full_shape)), None, None
    mode = stored_mode(weight, scale)
    if not exact_shard(mode, shard, weight.shape[shard.dim], row):
        act = ActivationQuant(mode, "int8" if mode == "int8" else FP8_FORMAT_OF[weight.dtype])
        if mode != "fp8-block" and shard.dim == 1:  # per-channel / tensor scales: columns keep them
            return shard.take(weight.data), scale, act
        dense = dequantize_weight(weight.data, scale.data, torch.float32)
        return shard.take(dense), None, act
    if mode == "fp8-tensor" or shard.dim == 1 and mode != "fp8-block":
        return shard.take(weight.data), scale, None
    if mode != "fp8-block":  # per output channel: the scale rows go with the weight rows
        return shard.take(weight.data), shard.take(scale.data), None
    scale_shard = Shard(shard.dim, shard.start // 128, math.ceil(shard.stop / 128), shard.parts)
    return shard.take(weight.data), scale_shard.take(scale.data), None


def _parallel_linear(old: Linear, shard: Shard, row: bool, group: Any = None, reduce: bool = True) -> Linear:
    """``old`` as a column- (``row=False``) or row-parallel linear holding ``shard``."""
    shard = replace(shard, total=old.weight.shape[shard.dim] // shard.parts)
    in_f, out_f = (shard.size, old.out_features) if row else (old.in_features, shard.size)
    has_bias = old.bias is not None
    with torch.device("meta"):
        if row:
            new: Linear = RowParallelLinear(in_f, out_f, shard, has_bias, old.weight.dtype, group, reduce)
        else:
            new = ColumnParallelLinear(in_f, out_f, shard, has_bias, old.weight.dtype)
    weight, scale, new.act_quant = _slice_scale(old.weight, old.weight_scale, shard, row)
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.weight_scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
    if has_bias:  # column-parallel: this rank's rows of the bias; row-parallel: the whole bias, added once
        bias = old.bias if row else _slice(old.bias, Shard(0, shard.start, shard.stop, shard.parts), (shard.size,))
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new


def _split_mlp(mlp: MLP, n: int, r: int, group: Any, reduce: bool, transform: str, what: str = "intermediate_size") -> MLP:
    """``mlp`` column/row-split over ``n`` ranks; ``what`` names its width's config key in errors."""
    inter = mlp.down_proj.in_features
    per = _divide(inter, n, f"the MLP's intermediate size ({what})", transform)
    mlp.gate_up_proj = _parallel_linear(mlp.gate_up_proj, Shard(0, r * per, (r + 1) * per, parts=2), row=False)
    mlp.down_proj = _parallel_linear(mlp.down_proj, Shard(1, r * per, (r + 1) * per), row=True, group=group, reduce=reduce)
    return mlp


# ---------------------------------------------------------------- experts
def _as_sharded(experts: nn.Module, n_experts: int) -> ShardedExperts:
    if isinstance(experts, ShardedExperts):
        return experts
    if not isinstance(experts, RoutedExperts):
        raise ShapeError(f"parallel transforms: MoE.experts is a {type(experts).__name__}, expected RoutedExperts")
    _, two_i, dim = experts.w13.shape
    with torch.device("meta"):
        sharded = ShardedExperts(n_experts, list(range(n_experts)), dim, two_i // 2, experts.w13.dtype)
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        setattr(sharded, name, getattr(experts, name))
    sharded.set_owners(sharded.owner, sharded.held)  # move the tables next to the weights
    return sharded


def _keep_experts(experts: ShardedExperts, owner: torch.Tensor, held: list[int]) -> None:
    """Keep only the weights of ``held`` (a subset of ``experts.held``) and set the tables."""
    positions = [experts.held.index(e) for e in held]
    for name in ("w13", "w2", "w13_scale", "w2_scale"):
        value = getattr(experts, name)
        if value is None:
            continue
        kept = torch.empty((len(held), *value.shape[1:]), dtype=value.dtype, device="meta") if value.is_meta else value.data[positions].contiguous()
        setattr(experts, name, nn.Parameter(kept, requires_grad=False))
    experts.set_owners(owner, held)


def _split_experts_tp(experts: ShardedExperts, n: int, r: int, transform: str) -> None:
    owner = experts.owner.clone()
    for ep_rank in range(experts.ep_size):
        members = (owner == ep_rank).nonzero().squeeze(1).tolist()
        what = "the number of routed experts (n_routed_experts)" if experts.ep_size == 1 else \
            f"the number of routed experts on EP rank {ep_rank} (n_routed_experts / the EP size)"
        per = _divide(len(members), n, what, transform)
        for i, e in enumerate(members):
            if i // per != r:
                owner[e] = -1
    held = [e for e in experts.held if owner[e] >= 0]
    _keep_experts(experts, owner, held)


def _check_same_experts(experts: ShardedExperts, group: Any, transform: str) -> None:
    """Every rank of an EP group must hold the same experts before they are spread over it
    (its ranks are in different TP groups, or in none)."""
    mask = (experts.owner >= 0).to(device=current().device, dtype=torch.int32)
    masks = comm.all_gather(mask[None], dim=0, group=group)
    if not bool((masks == masks[:1]).all()):
        raise ShapeError(
            f"{transform}: the ranks of the EP group handle different experts; an EP group must take one rank "
            "from each TP group with the same TP rank (use dshal.parallel.setup_groups)"
        )


def _split_experts_ep(experts: ShardedExperts, group: Any, m: int, r: int, transform: str) -> None:
    if experts.ep_size > 1:
        raise ShapeError(f"{transform}: the routed experts are already expert-parallel; apply expert_parallel once")
    owner = experts.owner.clone()
    members = list(experts.held)
    per = _divide(len(members), m, "the number of routed experts this rank handles", transform)
    for i, e in enumerate(members):
        owner[e] = i // per
    _keep_experts(experts, owner, members[r * per : (r + 1) * per])
    experts.ep_group, experts.ep_rank, experts.ep_size = group, r, m


# ---------------------------------------------------------------- the transforms
def blocks(model: Transformer) -> list[nn.Module]:
    """Every attention + FFN layer of ``model``: its layers, then its multi-token-prediction
    layers (split the same way)."""
    return [*model.layers, *model.mtp.values()]


def _vocab_parallel_head(head: nn.Module, shard: Shard, vocab: int, padded: int, group: Any) -> VocabParallelLMHead:
    """``head`` (a Linear onto the vocabulary) holding this rank's ``shard`` of its rows."""
    with torch.device("meta"):
        parallel = VocabParallelLMHead(head.in_features, shard, vocab, padded, head.weight.dtype, group)
    weight, scale, parallel.act_quant = _slice_scale(head.weight, head.weight_scale, shard)
    parallel.weight = nn.Parameter(weight, requires_grad=False)
    parallel.weight_scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
    return parallel


def tensor_parallel(model: Transformer, group: Any = None) -> Transformer:
    """Shard ``model`` in place over ``group`` (a ``dshal.comm`` process group; None = all
    ranks) and return it. Every rank of the group must call it, with the same model."""
    transform = "tensor_parallel"
    n, r = _size_and_rank(group)
    if model.parallel.tp_size > 1:
        raise ShapeError(f"{transform}: the model is already tensor-parallel over {model.parallel.tp_size} ranks")
    if n == 1:
        return model
    a = model.args
    heads = _divide(a.num_attention_heads, n, "num_attention_heads", transform)
    h0, h1 = r * heads, (r + 1) * heads

    vocab = a.vocab_size
    if split_range(vocab, n, n - 1)[0] >= vocab:  # ceil-sized chunks: the last rank may get none
        raise ShapeError(
            f"{transform}: vocab_size {vocab} in chunks of {math.ceil(vocab / n)} leaves the last of {n} ranks "
            "no vocabulary rows; use fewer tensor-parallel ranks"
        )
    start, stop = split_range(vocab, n, r)
    shard = Shard(0, start, stop, total=vocab)
    padded = math.ceil(vocab / n)
    old_embed: Embedding = model.embed
    with torch.device("meta"):
        model.embed = VocabParallelEmbedding(shard, a.hidden_size, old_embed.weight.dtype, group)
    model.embed.weight = nn.Parameter(_slice(old_embed.weight, shard, (stop - start, a.hidden_size)), requires_grad=False)
    model.lm_head = _vocab_parallel_head(model.lm_head, shard, vocab, padded, group)
    for mtp in model.mtp.values():  # the multi-token-prediction layers' own heads
        mtp.shared_head.head = _vocab_parallel_head(mtp.shared_head.head, shard, vocab, padded, group)

    for layer in blocks(model):
        attn = layer.self_attn
        q_name = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        qk, kv = attn.qk_head_dim, attn.nope + attn.v_dim
        setattr(attn, q_name, _parallel_linear(getattr(attn, q_name), Shard(0, h0 * qk, h1 * qk), row=False))
        attn.kv_b_proj = _parallel_linear(attn.kv_b_proj, Shard(0, h0 * kv, h1 * kv), row=False)
        attn.o_proj = _parallel_linear(attn.o_proj, Shard(1, h0 * attn.v_dim, h1 * attn.v_dim), row=True, group=group)
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            _split_mlp(mlp, n, r, group, reduce=True, transform=transform)
        elif isinstance(mlp, MoE):
            experts = _as_sharded(mlp.experts, a.n_routed_experts)
            _split_experts_tp(experts, n, r, transform)
            shared = _split_mlp(mlp.shared_experts, n, r, group, reduce=False, transform=transform,
                                what="the shared experts': moe_intermediate_size x n_shared_experts")
            layer.mlp = ParallelMoE(mlp.gate, experts, shared, group)
        else:
            raise ShapeError(f"{transform}: layer mlp is a {type(mlp).__name__}, expected MLP or MoE")
    model.parallel = replace(model.parallel, tp_group=group, tp_size=n, tp_rank=r)
    return model


def expert_parallel(model: Transformer, group: Any = None) -> Transformer:
    """Spread the routed experts of ``model`` over ``group`` (None = all ranks), in place;
    see :class:`~dshal.parallel.layers.ShardedExperts` for how tokens reach them. Every rank
    of the group must call it."""
    transform = "expert_parallel"
    m, r = _size_and_rank(group)
    if m == 1:
        return model
    a = model.args
    if not any(isinstance(layer.mlp, (MoE, ParallelMoE)) for layer in blocks(model)):
        raise ShapeError(
            f"{transform}: the model has no MoE layer (first_k_dense_replace={a.first_k_dense_replace}, "
            f"num_hidden_layers={a.num_hidden_layers}), expected at least one to spread over {m} ranks: "
            "each rank would compute the same dense model (use tensor parallelism alone)")
    for layer in blocks(model):
        mlp = layer.mlp
        if not isinstance(mlp, (MoE, ParallelMoE)):
            continue
        experts = _as_sharded(mlp.experts, a.n_routed_experts)
        _check_same_experts(experts, group, transform)
        _split_experts_ep(experts, group, m, r, transform)
        mlp.experts = experts
    model.parallel = replace(model.parallel, ep_group=group, ep_size=m, ep_rank=r)
    return model


def spread_experts(experts: nn.Module, group: Any = None) -> ShardedExperts:
    """One MoE's routed experts (a RoutedExperts or ShardedExperts) spread over ``group``
    as :func:`expert_parallel` does for a whole model; returns the ShardedExperts."""
    m, r = _size_and_rank(group)
    n_experts = experts.n_experts if isinstance(experts, ShardedExperts) else experts.w13.shape[0]
    sharded = _as_sharded(experts, n_experts)
    if m > 1:
        _split_experts_ep(sharded, group, m, r, "spread_experts")
    return sharded


# ---------------------------------------------------------------- every rank's sharding, without weights
def skeleton_args(args: ModelArgs) -> ModelArgs:
    """One dense layer and one MoE layer of ``args``' widths (each layer of a kind is sharded alike)."""
    dense, moe = args.first_k_dense_replace > 0, args.num_hidden_layers > args.first_k_dense_replace
    return args.with_(num_hidden_layers=int(dense) + int(moe), first_k_dense_replace=int(dense))


def sharded_skeletons(args: ModelArgs, plan: GroupPlan) -> Iterator[tuple[int, int, int, Transformer]]:
    """For each rank of ``plan``'s TP x EP job: ``(rank, tp_rank, ep_rank, model)``, the
    :func:`skeleton_args` model on the meta device after that rank's :func:`tensor_parallel`
    and :func:`expert_parallel` (over simulated groups). A split the model cannot take raises
    the ShapeError the rank's own transform would raise, in a second and without a process group."""
    tp, ep = len(plan.tp_groups[0]), len(plan.ep_groups[0])
    skeleton = skeleton_args(args)
    for rank in range(tp * ep):
        tp_rank, ep_rank = plan.tp_group_of(rank).index(rank), plan.ep_group_of(rank).index(rank)
        with torch.device("meta"):
            model = Transformer(skeleton)
        tensor_parallel(model, comm.SimulatedGroup(tp, tp_rank, "tp") if tp > 1 else None)
        expert_parallel(model, comm.SimulatedGroup(ep, ep_rank, "ep") if ep > 1 else None)
        yield rank, tp_rank, ep_rank, model


__all__ = ["activation_quant_of", "exact_shard", "expert_parallel", "sharded_skeletons", "skeleton_args", "spread_experts", "tensor_parallel"]
