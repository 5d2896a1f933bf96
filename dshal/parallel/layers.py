"""The modules the parallel transforms swap into a model.

Each one keeps the call signature and the checkpoint path of the module it replaces, so
the model core runs unchanged and the loader fills it by name. What part of the full
tensor a module holds is recorded in its :class:`Shard` (or, for experts, in ``held``),
which is all :mod:`dshal.parallel.loading` needs to read just that part of a checkpoint.

Communication goes through :mod:`dshal.comm` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dshal import comm, ops
from dshal.model.model import Embedding, Linear, RoutedExperts
from dshal.model.weights import WEIGHT_BLOCKS
from dshal.runtime import current


@dataclass(frozen=True)
class Shard:
    """Which slice of a full weight a rank holds: ``[start, stop)`` along ``dim`` (0 = rows,
    1 = columns) of each of ``parts`` equal stacked parts (``gate_up_proj`` has two: the gate
    rows then the up rows, so a column split takes the same rows of each)."""

    dim: int
    start: int
    stop: int
    parts: int = 1
    #: The full weight's extent along ``dim``, per part (None: not recorded). The sliced
    #: loader checks a checkpoint tensor against it: a slice alone fits many wrong tensors.
    total: int | None = None

    @property
    def size(self) -> int:
        return (self.stop - self.start) * self.parts

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of ``full`` (a copy, so the full tensor can be freed)."""
        part = full.shape[self.dim] // self.parts
        pieces = [full.narrow(self.dim, p * part + self.start, self.stop - self.start) for p in range(self.parts)]
        return torch.cat(pieces, dim=self.dim).contiguous() if self.parts > 1 else pieces[0].contiguous()


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``total`` items are cut into ``parts`` chunks
    of ``ceil(total / parts)`` (the last ones may be shorter or empty)."""
    per = math.ceil(total / parts)
    start = min(total, index * per)
    return start, min(total, start + per)


@dataclass(frozen=True)
class ActivationQuant:
    """How the full (unsharded) quantized linear quantizes its input: FP8 ``fmt`` per
    ``block`` (``(1, 128)``, ``(1, -1)`` or None = per tensor), or int8 per token
    (``fmt="int8"``). A shard whose slice cuts the weight's quantization groups, or whose
    activation groups span ranks, holds its slice of the globally quantized weight
    dequantized and applies this to the (gathered) input, so it computes what the single
    process computes, up to summation order."""

    mode: str  # the weight's gemm mode: fp8-block | fp8-row | fp8-tensor | int8
    fmt: str

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """``(q, scale, block)``: ``x [..., K]`` as ``[M, K]`` rows, quantized as the full linear does."""
        rows = x.reshape(-1, x.shape[-1])
        if self.mode == "int8":
            q, s = ops.quantize_int8(rows)
            return q, s, (1, -1)
        block = {(128, 128): (1, 128), (1, -1): (1, -1), None: None}[WEIGHT_BLOCKS[self.mode]]
        q, s = ops.quantize_fp8(rows, block, self.fmt)
        return q, s, block

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` quantized and dequantized again, in float32."""
        q, s, block = self.quantize(x)
        dense = q.to(torch.float32) * s if self.mode == "int8" else ops.dequantize_fp8(q, s, block, torch.float32)
        return dense.reshape(x.shape)

    def partial_product(self, x_full: torch.Tensor, cols: slice, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A row-parallel rank's partial sum, float32 ``[M, N]``, with its weight columns still
        quantized (per output channel or per tensor): the gathered input ``x_full [M, K]`` is
        quantized per token (or tensor) as a whole, and this rank's columns are multiplied
        by its weight columns with the global scales, so the ranks' partials add up to the
        unsharded product (up to summation order)."""
        q, s, _ = self.quantize(x_full)
        q = q[:, cols].contiguous()
        if self.mode == "int8":
            return ops.int8_gemm(q, s, weight, scale, torch.float32)
        return ops.fp8_gemm(q, s, weight, scale, torch.float32)


def _emulated_linear(module: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s product for an input already in full (see :class:`ActivationQuant`)."""
    y = ops.linear(module.act_quant.apply(x), module.weight, None if bias is None else bias.float())
    return y.to(x.dtype)


class ColumnParallelLinear(Linear):
    """A linear holding a slice of the output features (rows of ``weight``); its output is
    this rank's slice of the features, no communication. ``act_quant`` (set by the
    transform when the slice cuts the weight's quantization blocks): see
    :class:`ActivationQuant`."""

    def __init__(self, in_features: int, out_features: int, shard: Shard, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.shard = shard
        self.act_quant: ActivationQuant | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            return _emulated_linear(self, x, self.bias)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rows [{self.shard.start}, {self.shard.stop}) x {self.shard.parts}"


class RowParallelLinear(Linear):
    """A linear holding a slice of the input features (columns of ``weight``): each rank
    computes a partial sum, all-reduced over ``group`` (unless ``reduce`` is False, when
    the caller sums several partials in one all-reduce). The bias is added once, after."""

    def __init__(self, in_features: int, out_features: int, shard: Shard, bias: bool, dtype: torch.dtype, group: object, reduce: bool = True):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.shard, self.group, self.reduce = shard, group, reduce
        #: Set when the full linear's activation quantization groups span ranks: the input
        #: is all-gathered, quantized as a whole, and this rank's columns used (with the
        #: quantized weight slice for per-channel / per-tensor scales, dequantized for a cut
        #: 128-block).
        self.act_quant: ActivationQuant | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            full = comm.all_gather(x.contiguous(), dim=-1, group=self.group)
            cols = slice(self.shard.start, self.shard.stop)
            if self.weight_scale is not None:  # per-token / per-tensor scales: the weight stays quantized
                rows = self.act_quant.partial_product(full, cols, self.weight, self.weight_scale)
                y = rows.reshape(*x.shape[:-1], -1).to(x.dtype)
            else:  # a cut 128-block: the dequantized slice times the dequantized input columns
                y = ops.linear(self.act_quant.apply(full)[..., cols], self.weight).to(x.dtype)
        else:
            y = ops.linear(x, self.weight, None, self.weight_scale)
        if self.reduce:
            y = comm.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", cols [{self.shard.start}, {self.shard.stop}), reduce={self.reduce}"


class VocabParallelEmbedding(Embedding):
    """Rows ``[start, stop)`` of the vocabulary: ids outside give zeros, and an all-reduce
    over ``group`` completes every row (adding zeros, so the result is exact)."""

    def __init__(self, shard: Shard, dim: int, dtype: torch.dtype, group: object):
        super().__init__(shard.stop - shard.start, dim, dtype)
        self.shard, self.group = shard, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = super().forward(local.masked_fill(outside, 0))
        h = h.masked_fill(outside[..., None], 0)
        return comm.all_reduce(h, group=self.group)


class VocabParallelLMHead(Linear):
    """The output projection over vocabulary rows ``[start, stop)``; the logits of all
    ranks are all-gathered along the last dim (shards padded to one size for the gather)."""

    def __init__(self, in_features: int, shard: Shard, vocab_size: int, padded: int, dtype: torch.dtype, group: object):
        super().__init__(in_features, shard.stop - shard.start, bias=False, dtype=dtype)
        self.shard, self.group, self.vocab_size, self.padded = shard, group, vocab_size, padded
        self.act_quant: ActivationQuant | None = None  # as ColumnParallelLinear's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            logits = _emulated_linear(self, x, None)
        else:
            logits = ops.linear(x, self.weight, None, self.weight_scale)
        if logits.shape[-1] < self.padded:
            pad = logits.new_zeros((*logits.shape[:-1], self.padded - logits.shape[-1]))
            logits = torch.cat((logits, pad), dim=-1)
        return comm.all_gather(logits, dim=-1, group=self.group)[..., : self.vocab_size]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vocab rows [{self.shard.start}, {self.shard.stop}) of {self.vocab_size}"


class ShardedExperts(RoutedExperts):
    """Some of the routed experts, called like :class:`RoutedExperts` (global ids in).

    ``held``: the global ids of the experts whose weights this rank holds (``w13[i]`` is
    expert ``held[i]``). ``owner[e]``: the rank in ``ep_group`` holding expert ``e``, or -1
    when no rank of this EP group handles it (another tensor-parallel rank's EP group does;
    the caller sums the partial outputs with an all-reduce).

    Up to :attr:`FIXED_SHAPE_SLOTS` (token, expert) slots (decode steps, short prefill chunks),
    where the backend's ``moe_experts`` serves ``NO_EXPERT`` ids
    (``Capabilities.moe_no_expert_ids``: every backend dshal ships), the rank computes its own
    experts' share of every token in fixed shapes (no host read, so the steps can be captured
    as device graphs): the other ranks' experts become ``NO_EXPERT`` slots, which
    ``dshal.ops.moe_experts`` skips. With an EP group the tokens are the same on every rank of
    it, so an all-reduce over the group then sums its ranks' shares, as DeepSeek-V3's own
    inference code does: one collective per layer (the dispatch below takes five), whose
    ``2 (m-1)/m T D`` wire elements per rank (``m`` ranks, ``T`` tokens, width ``D``) are
    fewer than the dispatch's ``(m-1)/m T D (1 + 2k/m)`` below ``m = 2k`` ranks, ``k`` being
    the slots per token this EP group serves (top-k over the TP size; ``dshal plan`` shows both).

    Past that bound (long prefill chunks) the op's temporaries (a GPU kernel's float32 slot
    rows) would grow with every slot; there the rank keeps only the slots it serves
    (``torch.nonzero``, a host read). Without an EP group it computes them itself. With one,
    the tokens are cut into one slice per rank; each rank sends its slice's (token, expert)
    pairs to the experts' owners with ``all_to_all`` (uneven counts, possibly none), the
    owners run ``dshal.ops.moe_experts`` and send the outputs back, the sender weights and
    sums them (in expert order, as the single-device op does), and an all-gather rebuilds
    every token.
    """

    #: Calls with up to this many (token, expert) slots run in fixed shapes (see the class
    #: doc): decode batches of up to 4096 sequences at DeepSeek-V3's top-8; past it a GPU
    #: kernel's float32 slot rows for every slot (~0.9 GiB at this bound, H 7168) would grow
    #: with the prefill chunk (7.5 GiB for 32768 tokens) instead of with this rank's share.
    FIXED_SHAPE_SLOTS = 32768

    @property
    def graph_capture_unsupported(self) -> str | None:  # RoutedExperts' declaration, per instance
        if not current().moe_skips_no_expert:
            return ("the backend's moe_experts does not declare Capabilities.moe_no_expert_ids: the rank keeps the "
                    "(token, expert) slots its experts serve (torch.nonzero"
                    + (", and all_to_all counts read on the host" if self.ep_size > 1 else "")
                    + "), a data-dependent shape")
        return None

    @property
    def graph_capture_max_slots(self) -> int | None:  # RoutedExperts' declaration: past it, the kept slots
        return self.FIXED_SHAPE_SLOTS

    def __init__(self, n_experts: int, held: list[int], dim: int, inter_dim: int, dtype: torch.dtype):
        super().__init__(len(held), dim, inter_dim, dtype)
        self.n_experts = n_experts
        self.ep_group: object = None
        self.ep_rank, self.ep_size = 0, 1
        owner = torch.full((n_experts,), -1, dtype=torch.int64, device="cpu")
        owner[list(held)] = 0
        self.set_owners(owner, list(held))

    def set_owners(self, owner: torch.Tensor, held: list[int]) -> None:
        """Record who handles each expert (``owner``, see the class doc) and which experts'
        weights are here (``held``, in ``w13`` order)."""
        device = owner.device if self.w13.is_meta else self.w13.device
        self.held = list(held)
        local = torch.full((self.n_experts,), -1, dtype=torch.int64, device="cpu")
        local[self.held] = torch.arange(len(self.held), device="cpu")
        self.register_buffer("owner", owner.to("cpu").to(device), persistent=False)
        self.register_buffer("local", local.to(device), persistent=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        tokens, top_k = ids.shape
        if ids.numel() <= self.FIXED_SHAPE_SLOTS and current().moe_skips_no_expert:
            # the other ranks' experts are NO_EXPERT slots (local is -1 there)
            local = self.local.to(ids.device)[ids]  # a meta model keeps its tables on the CPU
            part = ops.moe_experts(x, weights, local, self.w13, self.w2, self.w13_scale, self.w2_scale)
            return part if self.ep_size == 1 else comm.all_reduce(part, group=self.ep_group)
        lo, hi = split_range(tokens, self.ep_size, self.ep_rank) if self.ep_size > 1 else (0, tokens)
        flat = ids[lo:hi].reshape(-1)
        order, counts = self._dispatch_order(flat)
        token = order // top_k
        send_x, send_ids = x[lo:hi][token], flat[order]
        if self.ep_size == 1:
            out_rows = self._compute(send_x, send_ids)
        else:
            link = comm.communicator(self.ep_group)
            back = link.exchange_splits(counts, x.device)
            recv_x = link.all_to_all(send_x, back, counts)
            recv_ids = link.all_to_all(send_ids, back, counts)
            out_rows = link.all_to_all(self._compute(recv_x, recv_ids), counts, back)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = torch.zeros((hi - lo, x.shape[1]), dtype=acc_dtype, device=x.device)
        slot_weight = weights[lo:hi].reshape(-1)[order].to(acc_dtype)
        # One [R, D] temporary (out_rows is this call's own: scaled in place when already acc_dtype).
        acc.index_add_(0, token, out_rows.to(acc_dtype).mul_(slot_weight[:, None]))
        part = acc.to(x.dtype)
        return part if self.ep_size == 1 else _gather_rows(part, tokens, self.ep_size, self.ep_group)

    def _dispatch_order(self, flat: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The slots of ``flat`` (expert ids) this EP group handles, ordered by owner rank then
        expert, and how many go to each rank of ``ep_group``.

        Meta tensors carry no ids: the order then has the length balanced routing gives (this
        group's share of the experts times the slots, split evenly over its ranks), so a
        meta-device forward (``dshal plan``) runs this same code with the shapes of an even load.
        """
        if flat.is_meta:
            slots = math.ceil(flat.numel() * len(self.held) * self.ep_size / self.n_experts)
            per, extra = divmod(slots, self.ep_size)
            return torch.arange(slots, device=flat.device), [per + (r < extra) for r in range(self.ep_size)]
        owner = self.owner[flat]
        kept = (owner >= 0).nonzero().squeeze(1)
        order = kept[torch.argsort(owner[kept] * self.n_experts + flat[kept], stable=True)]  # by rank, then expert
        counts = torch.bincount(owner[order], minlength=self.ep_size).tolist() if self.ep_size > 1 else [order.numel()]
        return order, counts

    def _compute(self, x: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs ``[R, D]`` of this rank's experts for rows ``x`` routed to ``global_ids``."""
        if x.shape[0] == 0:
            return x.new_zeros((0, x.shape[1]))
        local = self.local.to(global_ids.device)[global_ids][:, None]  # a meta model keeps its tables on the CPU
        ones = torch.ones(local.shape, dtype=torch.float32, device=x.device)
        return ops.moe_experts(x, ones, local, self.w13, self.w2, self.w13_scale, self.w2_scale)

    def extra_repr(self) -> str:
        ep = f", ep rank {self.ep_rank}/{self.ep_size}" if self.ep_size > 1 else ""
        return f"experts {self.held} of {self.n_experts}{ep}"


def _gather_rows(part: torch.Tensor, total: int, parts: int, group: object) -> torch.Tensor:
    """All ranks' row slices (from :func:`split_range`) joined in rank order."""
    per = math.ceil(total / parts)
    if part.shape[0] < per:
        part = torch.cat((part, part.new_zeros((per - part.shape[0], *part.shape[1:]))))
    gathered = comm.all_gather(part, dim=0, group=group)
    if per * parts == total:
        return gathered
    keep = []
    for r in range(parts):
        start, stop = split_range(total, parts, r)
        keep.append(gathered[r * per : r * per + stop - start])
    return torch.cat(keep)


class ParallelMoE(nn.Module):
    """DeepSeekMoE whose routed and shared experts each give a partial sum over the
    tensor-parallel ``group``; one all-reduce completes both."""

    def __init__(self, gate: nn.Module, experts: nn.Module, shared_experts: nn.Module, group: object):
        super().__init__()
        self.gate, self.experts, self.shared_experts, self.group = gate, experts, shared_experts, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids) + self.shared_experts(x)
        return comm.all_reduce(out, group=self.group).view(shape)


__all__ = [
    "ActivationQuant",
    "ColumnParallelLinear",
    "ParallelMoE",
    "RowParallelLinear",
    "Shard",
    "ShardedExperts",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "split_range",
]
