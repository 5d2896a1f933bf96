"""One rank of a parallel job, simulated on the meta device: no weights, no process group.

:func:`build_rank` runs the real loading path, :func:`dshal.parallel.loading.build_parallel`
(meta model -> ``tensor_parallel`` / ``expert_parallel`` -> ``ShardView`` -> the model
core's ``load_weights`` -> the precision policy), against a :class:`MetaCheckpoint`: a
checkpoint made of names, shapes and dtypes only, whose reads return meta tensors of the
requested slice and are logged. The groups are :class:`dshal.comm.SimulatedGroup`\\ s, so
the transforms see the sizes and ranks of the real job and the collectives of a forward
log what would travel.

:func:`run_steps` then runs one prefill chunk and one decode step of that rank's model on
meta tensors through ``dshal.ops``: every op's reference implementation behind its input
checks (:func:`dshal.runtime.reference_ops`), since the meta device carries shapes and dtypes only. The
live bytes of the tensors the forward creates are tracked to find its activation peak. An op
call repeated with the same argument layouts (the next layer's) is answered from the first.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from dshal.comm import SimulatedGroup, Transfer
from dshal.errors import CommError
from dshal.model.args import ModelArgs
from dshal.model.loader import CheckpointError, ReaderNames
from dshal.model.model import MLA
from dshal.ops.attention import guarded_attention, values_are_key_columns
from dshal.parallel.groups import GroupPlan, ParallelGroups, plan_groups
from dshal.parallel.loading import build_parallel
from dshal.plan.names import TensorEntry
from dshal.runtime import op_hook, reference_ops


# ---------------------------------------------------------------- a checkpoint without weights
@dataclass(frozen=True)
class Read:
    """One read of the rank: the tensor, its shard file, the part read (None = all) and its bytes."""

    name: str
    file: str | None
    index: tuple[slice, ...] | None
    shape: tuple[int, ...]
    nbytes: int


class MetaCheckpoint(ReaderNames):
    """The checkpoint reader interface (``names``, ``in``, ``shape``, ``dtype``, ``get``,
    ``get_slice``) over a listing of tensors (:mod:`dshal.plan.names`). Every read returns
    a meta tensor of what was asked for and is appended to ``reads``."""

    def __init__(self, tensors: dict[str, TensorEntry], path: str = "<listing>"):
        self.tensors, self.path = tensors, path
        self.reads: list[Read] = []

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return self._read(name, tuple(slices))

    def _read(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        entry = self._entry(name)
        full = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
        part = full if index is None else full[index]
        self.reads.append(Read(name, entry.file, index, tuple(part.shape), part.numel() * part.element_size()))
        return part.contiguous()


# ---------------------------------------------------------------- one rank
@dataclass
class SimulatedRank:
    """One rank's part of the model (on the meta device), its groups and what it read."""

    rank: int
    tp_rank: int
    ep_rank: int
    groups: ParallelGroups
    model: Any
    reads: list[Read]

    def groups_in_use(self) -> list[SimulatedGroup]:
        return [g for g in (self.groups.tp, self.groups.ep) if isinstance(g, SimulatedGroup)]


def layout(world: int, tp: int, ep: int, gpus_per_node: int | None = None) -> GroupPlan:
    """The TP / EP groups of a job of ``world`` ranks, as :func:`dshal.parallel.setup_groups` places them."""
    return plan_groups(world, tp, ep, local_world_size=gpus_per_node)


def build_rank(
    args: ModelArgs,
    tensors: dict[str, TensorEntry],
    tp: int,
    ep: int,
    rank: int,
    precision: Any,
    *,
    gpus_per_node: int | None = None,
    path: str = "<listing>",
) -> SimulatedRank:
    """Global ``rank`` of a ``tp * ep`` job: its model, built as :func:`build_parallel` builds
    it, from a checkpoint of ``tensors`` (meta tensors; every read logged)."""
    world = tp * ep
    plan = layout(world, tp, ep, gpus_per_node)
    if not 0 <= rank < world:
        raise CommError(f"build_rank: argument 'rank' is {rank}, expected 0..{world - 1}")
    tp_members, ep_members = plan.tp_group_of(rank), plan.ep_group_of(rank)
    tp_rank, ep_rank = tp_members.index(rank), ep_members.index(rank)
    groups = ParallelGroups(
        tp=SimulatedGroup(tp, tp_rank, "tp") if tp > 1 else None,
        ep=SimulatedGroup(ep, ep_rank, "ep") if ep > 1 else None,
        tp_size=tp,
        ep_size=ep,
        plan=plan,
    )
    reader = MetaCheckpoint(tensors, path)
    with reference_ops():
        model = build_parallel(args, reader, groups, precision, device="meta")
    return SimulatedRank(rank, tp_rank, ep_rank, groups, model, reader.reads)


# ---------------------------------------------------------------- a forward on meta tensors
_UNKEYED = object()


def _leaf_key(leaf: Any) -> Any:
    """A hashable stand-in for one argument leaf of an op call on meta tensors: what the
    call's result can depend on (a meta tensor has no values); ``_UNKEYED`` where unknown."""
    if isinstance(leaf, torch.Tensor):
        if not leaf.is_meta:
            return _UNKEYED
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.dtype, leaf.requires_grad)
    try:
        hash(leaf)
    except TypeError:
        return _UNKEYED
    return (type(leaf), leaf)


@dataclass(frozen=True)
class _OpOutcome:
    """What one op call on meta tensors did: its outputs' layout and how far the eager
    bytes rose above their level at the call (its temporaries included)."""

    spec: Any  # pytree spec of the result
    leaves: tuple[Any, ...]  # ("tensor", shape, stride, dtype) or ("value", leaf) per leaf
    eager_rise: int


def _storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (its StorageImpl; tensors that share bytes share it)."""
    return t.untyped_storage()._cdata


def _storages(tree: Any) -> set[int]:
    return {_storage_key(t) for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _span(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to one past its last (0 when empty)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))) * t.element_size()


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors a forward holds at once, counted two ways.

    ``eager``: the bytes of every storage an aten op makes count while any tensor of it
    lives (a view holds its base's; views of what the forward did not make, the weights and
    the KV cache, add nothing) -- what the reference ops hold, their temporaries included (the
    attention reference materializes every score). Not followed: ``set_``, ``resize_`` and
    ``out=`` writes that change a storage's size (no forward of the model uses them). ``fused``: each ``dshal.ops`` call
    counts as one kernel -- only the tensors it returns, plus the model's torch glue
    between ops -- which is what a backend with fused kernels holds (their small
    workspaces aside).

    A forward repeats the same op calls layer after layer, and on meta tensors a call's
    result depends only on its arguments' layouts. So an op call is run once per distinct
    layout of its arguments; a repeat gets fresh outputs of the recorded layout and raises
    the eager peak by the recorded rise, which is what running it again would do. (The
    references on meta run torch's Python meta kernels: this makes a DeepSeek-V3 forward
    several times faster.)"""

    def __init__(self, replay: bool = True) -> None:
        super().__init__()
        self.replay = replay
        self.live = {"eager": 0, "fused": 0}
        self.peak = {"eager": 0, "fused": 0}
        self.largest: tuple[int, str, tuple[int, ...], str] = (0, "", (), "")
        self.depth = 0  # > 0 inside a dshal op
        self.outcomes: dict[Any, _OpOutcome | None] = {}  # None: a call that cannot be replayed
        self.replayed = 0
        #: the attention call with the most key and value bytes, as layouts (holding its tensors
        #: would keep their bytes live): its NaN guard is measured apart
        self.largest_attention: tuple[int, tuple[Any, ...]] | None = None
        #: per way: storage -> [tensors holding it, its bytes]. Bytes live while any tensor of
        #: the storage does: a view keeps its base's storage after the base's Python object is gone.
        self.storages: dict[str, dict[int, list[int]]] = {"eager": {}, "fused": {}}

    def _release(self, way: str, key: int) -> None:
        entry = self.storages[way][key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live[way] -= entry[1]
            del self.storages[way][key]

    def _hold(self, way: str, t: torch.Tensor, what: str, view: bool = False) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.storages[way].get(key)
        if entry is None and view:  # a view of what the forward did not make (weights, the KV cache)
            return
        if entry is None:  # new bytes; a view of a held storage only adds a holder
            nbytes = storage.nbytes()
            entry = self.storages[way][key] = [0, nbytes]
            self.live[way] += nbytes
            self.peak[way] = max(self.peak[way], self.live[way])
            if way == "fused" and nbytes > self.largest[0]:
                self.largest = (nbytes, what, tuple(t.shape), str(t.dtype).replace("torch.", ""))
        entry[0] += 1
        weakref.finalize(t, self._release, way, key)

    def _new(self, out: Any, inputs: Any) -> list[torch.Tensor]:
        seen = {id(t) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and id(t) not in seen and not t._is_view()]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Views too (below autograd their _is_view() is False; and aten.to is annotated as one but
        # copies): an output on an input's storage holds that storage, adding no bytes.
        inputs = _storages((args, kwargs))
        for t in self._new(out, (args, kwargs)):
            view = _storage_key(t) in inputs
            self._hold("eager", t, func.overloadpacket.__name__, view)
            if not self.depth:
                self._hold("fused", t, func.overloadpacket.__name__, view)
        return out

    def _key(self, name: str, args: Any, kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        keys = tuple(_leaf_key(leaf) for leaf in leaves)
        return None if any(k is _UNKEYED for k in keys) else (name, str(spec), keys)

    def _record(self, key: Any, out: Any, inputs: Any, level: int) -> None:
        leaves, spec = tree_flatten(out)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        fresh = self._new(out, inputs)
        taken = _storages(inputs)
        # Replayable: every tensor it returns is a new meta tensor with a storage of its own, all
        # of it (no view of an input or of another output: _is_view() is False under inference_mode).
        own = [_storage_key(t) for t in tensors]
        if (len(fresh) == len(tensors) == len(set(own)) and all(t.is_meta for t in tensors)
                and not taken.intersection(own)
                and all(t.storage_offset() == 0 and t.untyped_storage().nbytes() == _span(t) for t in tensors)):
            layouts = tuple(
                ("tensor", tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else ("value", x)
                for x in leaves
            )
            self.outcomes[key] = _OpOutcome(spec, layouts, self.peak["eager"] - level)
        else:
            self.outcomes[key] = None

    def _replay(self, outcome: _OpOutcome, level: int) -> Any:
        self.peak["eager"] = max(self.peak["eager"], level + outcome.eager_rise)
        # Made inside the op (depth > 0): held as eager bytes by __torch_dispatch__, as fused ones by op_hook.
        leaves = [
            torch.empty_strided(x[1], x[2], dtype=x[3], device="meta") if x[0] == "tensor" else x[1]
            for x in outcome.leaves
        ]
        self.replayed += 1
        return tree_unflatten(leaves, outcome.spec)

    def op_hook(self, name: str, fn: Any) -> Any:
        """Wrap one dshal op: its temporaries are a kernel's own, its outputs are activations."""

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "attention" and not self.depth and not kwargs and len(args) == 7:  # as the model calls it
                size = args[1].numel() * args[1].element_size() + args[2].numel() * args[2].element_size()
                if self.largest_attention is None or size > self.largest_attention[0]:
                    self.largest_attention = (size, attention_layouts(*args))
            # An op inside an op runs as is: the outer call's outcome covers it.
            key = self._key(name, args, kwargs) if self.replay and not self.depth else None
            outcome = self.outcomes.get(key) if key is not None else None
            level, peak = self.live["eager"], self.peak["eager"]
            self.peak["eager"] = level  # this call's own rise, measured from here
            self.depth += 1
            try:
                if outcome is not None:
                    out = self._replay(outcome, level)
                else:
                    out = fn(*args, **kwargs)
                    if key is not None and key not in self.outcomes:
                        self._record(key, out, (args, kwargs), level)
            finally:
                self.depth -= 1
                self.peak["eager"] = max(peak, self.peak["eager"])
            if not self.depth:
                taken = _storages((args, kwargs))
                for t in self._new(out, (args, kwargs)):
                    self._hold("fused", t, f"ops.{name}", _storage_key(t) in taken)
            return out

        return call


@dataclass
class StepResult:
    """One forward step of one rank: tokens, logits shape, collectives, activation peaks
    (``peak_bytes``: one kernel per dshal op; ``eager_peak_bytes``: the reference ops as run)."""

    tokens: int
    logits_shape: tuple[int, ...]
    traffic: list[Transfer] = field(default_factory=list)
    peak_bytes: int = 0
    eager_peak_bytes: int = 0
    largest: tuple[int, str, tuple[int, ...], str] = (0, "", (), "")
    #: op calls answered from an earlier call with the same argument layouts (see _LiveBytes)
    replayed_calls: int = field(default=0, compare=False)
    #: peak bytes of the attention NaN guard a GPU provider builds inside its largest attention
    #: call (:func:`attention_guard_bytes`): kernel temporaries ``peak_bytes`` leaves out
    attention_guard_bytes: int = 0


def _step(model: Any, sim: SimulatedRank, ids: torch.Tensor, start: int, cache: Any, replay: bool) -> StepResult:
    for group in sim.groups_in_use():
        group.traffic.clear()
    tracker = _LiveBytes(replay)
    with reference_ops(), op_hook(tracker.op_hook), tracker:
        logits = model(ids, start, cache, last_only=True)
    traffic = [t for g in sim.groups_in_use() for t in g.traffic]
    return StepResult(
        ids.numel(),
        tuple(logits.shape),
        traffic,
        tracker.peak["fused"],
        tracker.peak["eager"],
        tracker.largest,
        tracker.replayed,
        attention_guard_bytes(*tracker.largest_attention[1]) if tracker.largest_attention else 0,
    )


def attention_layouts(q: Any, k: Any, v: Any, *options: Any) -> tuple[Any, ...]:
    """An attention call's arguments with q, k and v as (shape, dtype) and whether v is k's
    first columns (absorbed MLA), for :func:`attention_guard_bytes`."""
    return ((tuple(q.shape), q.dtype), (tuple(k.shape), k.dtype), (tuple(v.shape), values_are_key_columns(v, k)),
            *options)


def attention_guard_bytes(q: Any, k: Any, v: Any, causal: bool, scale: Any, window: Any, global_tokens: int) -> int:
    """Peak bytes of what :func:`~dshal.ops.attention.guarded_attention` holds for one attention
    call on a GPU provider (no host read: the guard is always built, in groups of kv heads)
    besides its inputs and output, which the step counts: run on meta tensors of the call's
    layouts (:func:`attention_layouts`)."""
    (q_shape, dtype), (k_shape, _), (v_shape, shared) = q, k, v
    q, k = (torch.empty(shape, dtype=dtype, device="meta") for shape in (q_shape, k_shape))
    v = k[..., : v_shape[-1]] if shared else torch.empty(v_shape, dtype=dtype, device="meta")

    def kernel(q: Any, k: Any, v: Any, *rest: Any) -> Any:  # the kernel's own workspace is its vendor's
        return q.new_empty(*q.shape[:3], v.shape[3])

    tracker = _LiveBytes(replay=False)
    with tracker:
        out = guarded_attention(kernel, q, k, v, causal, scale, window, global_tokens, may_read_host=False)
    return tracker.peak["eager"] - out.numel() * out.element_size()  # the output is an activation, counted there


def run_steps(
    sim: SimulatedRank, batch: int, context: int, chunk: int, *, replay: bool = True
) -> tuple[StepResult, StepResult]:
    """``batch`` sequences of ``context`` tokens each: the prompt's last prefill chunk, ``chunk``
    tokens ending before position ``context - 1`` (the cache stands for the tokens before it:
    meta tensors hold no values, only the count matters), then the decode step at position
    ``context - 1``, which fills the cache. Returns ``(prefill, decode)``. ``replay=False``
    runs every op call (the same results, several times slower)."""
    model = sim.model
    if not 0 < chunk < context:
        raise CommError(f"run_steps: prefill chunk {chunk} must be in 1..context - 1 ({context - 1})")
    cache = model.new_cache(batch, context)
    start = cache.length = context - 1 - chunk
    with reference_ops():  # kv_b_proj's copies: held for the run, counted apart (plan's absorbed bytes)
        for module in model.modules():
            if isinstance(module, MLA):
                module.cache_kv_b(model.args.dtype)
    prefill = _step(model, sim, torch.zeros((batch, chunk), dtype=torch.int64, device="meta"), start, cache, replay)
    decode = _step(model, sim, torch.zeros((batch, 1), dtype=torch.int64, device="meta"), context - 1, cache, replay)
    return prefill, decode


def kv_cache_bytes(sim: SimulatedRank, batch: int, context: int, mtp: bool = False) -> tuple[int, int]:
    """``(bytes per token, bytes for batch x context)`` of this rank's KV cache (meta: free);
    with ``mtp``, the MTP layer's cache too (speculative decoding keeps one)."""
    caches = [sim.model.new_cache(batch, context)] + ([sim.model.new_cache(batch, context, mtp=True)] if mtp else [])
    total = sum(cache.bytes_per_token * cache.capacity * cache.batch for cache in caches)  # as allocated
    return total // max(batch * context, 1), total


__all__ = [
    "MetaCheckpoint",
    "Read",
    "SimulatedRank",
    "StepResult",
    "build_rank",
    "kv_cache_bytes",
    "layout",
    "reference_ops",
    "run_steps",
]
