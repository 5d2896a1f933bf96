"""Load a parallel model straight from a checkpoint: each rank reads only its slices.

The model is built on the meta device, the parallel transforms record what each module
holds, and :class:`ShardView` presents the checkpoint *as this rank sees it* -- sliced
tensors under their usual names, this rank's experts numbered from 0 -- to the model
core's own loader (:func:`dshal.model.loader.load_weights`), which therefore needs no
parallel knowledge. Tensors are read with the reader's ``get_slice``, so a memory-mapped
safetensors file is only touched where this rank's slices lie.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

import dshal
from dshal.config import precision_config
from dshal.errors import CheckpointError
from dshal.model.args import ModelArgs, checkpoint_folder
from dshal.model.loader import (
    CheckpointReader,
    LoadProgress,
    ReaderNames,
    checkpoint_args,
    fp8_storage_of,
    load_weights,
    phase_steps,
    place_and_prepare,
)
from dshal.model.model import Transformer
from dshal.model.precision import (
    AUTO,
    GEMM_ALIASES,
    HIGH,
    apply_precision,
    checkpoint_name,
    fp8_redirect,
    keeps_high_precision,
    refuse_undeclared_fp8_before_reading,
)
from dshal.ops.spec import FP8_DTYPES
from dshal.parallel.groups import ParallelGroups
from dshal.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    ShardedExperts,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)
from dshal.parallel.transforms import activation_quant_of, expert_parallel, tensor_parallel
from dshal.runtime import current

#: (shape, dtype, read) of one tensor as this rank sees it.
_Source = tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def _index(shard: Shard, ndim: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[shard.dim] = slice(shard.start, shard.stop)
    return tuple(index)


class ShardView(ReaderNames):
    """One rank's view of a checkpoint reader (the reader interface: ``names``, ``in``,
    ``shape``, ``dtype``, ``get``, ``get_slice``), built from a transformed model.
    ``origin(name)`` gives the checkpoint's own name of what a name of the view reads (a
    renumbered expert's, also where the checkpoint lacks it), ``part(name)`` which rows or
    columns of it this rank holds, so the loader's messages say what one process says."""

    def __init__(self, reader: Any, model: nn.Module, block: tuple[int, int] = (128, 128)):
        self.reader = reader
        self.path = reader.path
        self.block = block
        self._sources: dict[str, _Source] = {}
        self._hidden: set[str] = set()
        self._origins: dict[str, str] = {}  # a view name -> the checkpoint's name of what it reads
        self._parts: dict[str, str] = {}  # a sliced name -> which part of it this rank holds
        self.read_whole: list[str] = []  # names read without slicing (for checks and tests)
        for path, module in model.named_modules():
            hf = checkpoint_name(path)
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead, VocabParallelEmbedding)):
                shard = module.shard
                bases = [hf]
                if path.endswith(".gate_up_proj"):  # two checkpoint tensors, the same rows of each
                    parent = hf[: -len(".gate_up_proj")]
                    bases = [f"{parent}.gate_proj", f"{parent}.up_proj"]
                    shard = replace(shard, parts=1)
                for base in bases:
                    self._weight(base, shard, tuple(module.weight.shape))
                    if isinstance(module, ColumnParallelLinear) and module.bias is not None:
                        self._plain(f"{base}.bias", Shard(0, shard.start, shard.stop, total=shard.total))
            elif isinstance(module, ShardedExperts):
                self._experts(hf, module.held, module.n_experts, module.w13.shape[1] // 2)

    # ------------------------------------------------------------ building the view
    def _check_full(self, name: str, shard: Shard, full: list[int] | None = None) -> None:
        """CheckpointError unless ``name``'s extent along the shard's dim is the full size the
        shard was cut from (``full``: the whole expected shape, where known): the loader sees
        only the slice, which would fit a tensor of another size (another config.json)."""
        found = list(self.reader.shape(name))
        if shard.total is None or shard.dim >= len(found):
            return
        want = list(full) if full is not None else [*found[: shard.dim], shard.total, *found[shard.dim + 1:]]
        if found != want:
            axis = "rows" if shard.dim == 0 else "columns"
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} has shape {found}, expected {want} "
                f"(the full tensor, whose {axis} [{shard.start}, {shard.stop}) this tensor-parallel rank reads)"
            )

    def _plain(self, name: str, shard: Shard, full: list[int] | None = None) -> None:
        if name not in self.reader:
            return
        if full is None:  # a weight's full shape is checked by _weight, before it decides the path
            self._check_full(name, shard)
        shape = list(self.reader.shape(name))
        index = _index(shard, len(shape))
        self._note_part(name, shard, shape)
        shape[shard.dim] = shard.stop - shard.start
        self._sources[name] = (tuple(shape), self.reader.dtype(name), lambda: self.reader.get_slice(name, index))

    def _weight(self, base: str, shard: Shard, local: tuple[int, ...]) -> None:
        """``base.weight`` (and its FP8 scale) sliced by ``shard``; ``local``: this rank's
        weight shape, which with the shard's full extent gives the checkpoint's shape."""
        name, scale_name = f"{base}.weight", f"{base}.weight_scale_inv"
        full = list(local)
        if shard.total is not None:
            full[shard.dim] = shard.total
        if name not in self.reader:  # the loader says it is missing, where it is not optional (a tied lm_head)
            return
        self._check_full(name, shard, full)
        if self.reader.dtype(name) == torch.int8:  # W8A8: one scale per output row, sliced with its rows
            self._plain(name, shard, full)
            if shard.dim == 0:  # a column slice keeps every row's scale: that tensor is read whole
                self._plain(f"{base}.weight_scale", replace(shard, parts=1))
            return
        quantized = self.reader.dtype(name) in FP8_DTYPES.values() and scale_name in self.reader
        if not quantized:
            self._plain(name, shard, full)
            return
        block = self.block[shard.dim]
        scale_shard = Shard(shard.dim, shard.start // block, math.ceil(shard.stop / block))
        if shard.total is not None and len(full) == 2:  # the scale of the full weight: one per block
            scale_shard = replace(scale_shard, total=math.ceil(shard.total / block))
            self._check_full(scale_name, scale_shard, [math.ceil(n / b) for n, b in zip(full, self.block)])
        if shard.start % block == 0 and (shard.stop % block == 0 or shard.stop == full[shard.dim]):
            self._plain(name, shard, full)
            self._plain(scale_name, scale_shard)
            return
        # the slice cuts FP8 blocks: this rank gets it dequantized (float32) and no scale
        self._hidden.add(scale_name)
        shape = list(self.reader.shape(name))
        self._note_part(name, shard, shape)
        shape[shard.dim] = shard.stop - shard.start
        self._sources[name] = (tuple(shape), torch.float32, lambda: self._dequantized_slice(name, scale_name, shard))

    def _note_part(self, name: str, shard: Shard, full: list[int]) -> None:
        """Remember which rows (columns) of ``name`` (``full``: its shape) the slice holds."""
        if shard.dim < len(full) and (shard.start, shard.stop) != (0, full[shard.dim]):
            axis = "rows" if shard.dim == 0 else "columns"
            self._parts[name] = f"this rank's {axis} [{shard.start}, {shard.stop}) of it"

    def _dequantized_slice(self, name: str, scale_name: str, shard: Shard) -> torch.Tensor:
        block = self.block[shard.dim]
        lo, hi = shard.start // block, math.ceil(shard.stop / block)
        ndim = len(self.reader.shape(name))
        covering = Shard(shard.dim, lo * block, min(hi * block, self.reader.shape(name)[shard.dim]))
        q = self.reader.get_slice(name, _index(covering, ndim)).to(torch.float32)
        scale = self.reader.get_slice(scale_name, _index(Shard(shard.dim, lo, hi), ndim)).to(torch.float32)
        bm, bk = self.block
        dense = q * scale.repeat_interleave(bm, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
        return dense.narrow(shard.dim, shard.start - lo * block, shard.stop - shard.start)

    def _experts(self, prefix: str, held: list[int], n_experts: int, inter: int) -> None:
        """Expert ``held[i]`` of the checkpoint appears as expert ``i`` (per-expert layout),
        from either the per-expert or the fused (``gate_up_proj [E, 2I, D]``) layout. Only
        what the model reads is hidden (the three projections' weights and scales of every
        expert below ``n_experts``, the fused tensors): anything else under ``prefix``
        (``experts.3.gate_proj.bias``, an expert past ``n_experts``) stays visible under its
        own name, so the loader calls it unexpected, as in one process. ``inter``: the
        experts' intermediate size (the rows of the gate in the fused layout)."""
        projections, kinds = ("gate_proj", "up_proj", "down_proj"), ("weight", "weight_scale_inv", "weight_scale")
        fused_up, fused_down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
        self._hidden.update(f"{prefix}.{e}.{p}.{k}" for e in range(n_experts) for p in projections for k in kinds)
        self._hidden.update((fused_up, fused_down))
        fused = fused_up in self.reader or fused_down in self.reader
        for local, expert in enumerate(held):
            for proj in projections:
                for kind in kinds:
                    source, name = f"{prefix}.{expert}.{proj}.{kind}", f"{prefix}.{local}.{proj}.{kind}"
                    self._origins[name] = source  # also when absent: the loader names what is missing
                    if source in self.reader:
                        self._sources[name] = (
                            tuple(self.reader.shape(source)), self.reader.dtype(source), lambda s=source: self._whole(s)
                        )
            if fused:  # the fused tensor and the expert's rows of it
                self._origins[f"{prefix}.{local}.gate_proj.weight"] = f"{fused_up}[{expert}, 0:{inter}]"
                self._origins[f"{prefix}.{local}.up_proj.weight"] = f"{fused_up}[{expert}, {inter}:{2 * inter}]"
                self._origins[f"{prefix}.{local}.down_proj.weight"] = f"{fused_down}[{expert}]"
            if fused_up in self.reader and fused_down in self.reader:
                for fused_name in (fused_up, fused_down):
                    if self.reader.shape(fused_name)[0] != n_experts:
                        raise CheckpointError(
                            f"checkpoint {self.path}: tensor {fused_name!r} has shape {list(self.reader.shape(fused_name))}, "
                            f"expected {n_experts} experts in dim 0 (n_routed_experts in config.json)"
                        )
                _, two_i, dim = self.reader.shape(fused_up)
                half = two_i // 2
                dtype = self.reader.dtype(fused_up)
                for proj, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, two_i))):
                    self._sources[f"{prefix}.{local}.{proj}.weight"] = (
                        (half, dim), dtype, lambda e=expert, r=rows: self.reader.get_slice(fused_up, (slice(e, e + 1), r))[0]
                    )
                self._sources[f"{prefix}.{local}.down_proj.weight"] = (
                    (dim, half), self.reader.dtype(fused_down), lambda e=expert: self.reader.get_slice(fused_down, (slice(e, e + 1),))[0]
                )

    def _whole(self, name: str) -> torch.Tensor:
        self.read_whole.append(name)
        return self.reader.get(name)

    # ------------------------------------------------------------ the reader interface
    def origin(self, name: str) -> str:
        return self._origins.get(name, name)

    def part(self, name: str) -> str:
        return self._parts.get(name, "")

    def index_shard(self, name: str) -> str | None:
        return self.reader.index_shard(self.origin(name))
    def names(self) -> list[str]:
        shown = [n for n in self.reader.names() if n not in self._hidden and n not in self._sources]
        return shown + list(self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources or (name in self.reader and name not in self._hidden)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name][0] if name in self._sources else tuple(self.reader.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        return self._sources[name][1] if name in self._sources else self.reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self._sources:
            return self._sources[name][2]()
        return self._whole(name)

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return self.get(name)[slices]


def _sliced_read_is_exact(reader: Any, model: nn.Module, precision: Any, capabilities: Any = None) -> bool:
    """Whether loading this rank's slices and then applying ``precision`` gives the slices
    of the single-process model. It does without tensor parallelism (experts are held
    whole), when nothing is quantized, with a W8A8 (int8) checkpoint run as stored (its
    per-row scales slice with their rows), and in ``fp8-block`` (or ``auto`` on an FP8
    checkpoint) when no TP shard cuts a quantized weight's 128-blocks. Quantizing on load
    to per-row / per-tensor / int8 scales, or a cut block, needs the whole weight first
    (quantize, then shard).
    ``capabilities`` (default the active backend's): ``auto`` runs an FP8 checkpoint in the
    mode the backend names where it has no FP8 (:func:`~dshal.model.precision.fp8_redirect`)."""
    mode = GEMM_ALIASES.get(precision.gemm, precision.gemm)
    kinds = (ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead)
    sharded = [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]
    if mode == HIGH or not sharded:
        return True
    stored = {reader.dtype(n) for n in reader.names() if n.endswith(".weight")}
    fp8 = bool(stored & set(FP8_DTYPES.values()))
    redirect = fp8_redirect(capabilities) if mode == AUTO and fp8 else None
    if redirect is not None:  # int8 (per-row scales span a row-parallel shard) or high (a cast)
        return redirect[0] == HIGH
    if mode == AUTO and not fp8:
        # a float checkpoint run as stored; or W8A8 as stored: per-row scales slice with their
        # rows, and a row-parallel shard quantizes its gathered input as a whole (activation_quant_of)
        return True
    if mode not in (AUTO, "fp8-block") or torch.int8 in stored:
        return False  # a row-parallel shard's per-row or per-token scales span the ranks
    for path, module in sharded:
        hf = checkpoint_name(path).removesuffix(".gate_up_proj") + (".gate_proj" if path.endswith(".gate_up_proj") else "")
        stored_fp8 = f"{hf}.weight" in reader and reader.dtype(f"{hf}.weight") in FP8_DTYPES.values()
        quantized = (stored_fp8 or mode != AUTO) and not keeps_high_precision(path, precision.keep_high_precision)
        # strict (an unaligned last shard that ends the weight also counts): exact either way
        if quantized and (module.shard.start % 128 or module.shard.stop % 128):
            return False
    return True


def build_parallel(
    args: ModelArgs,
    reader: Any,
    groups: ParallelGroups,
    precision: Any = None,
    device: torch.device | str | None = None,
    progress: LoadProgress | None = None,
) -> Transformer:
    """This rank's part of the model in ``reader``: tensor-parallel over ``groups.tp`` and
    expert-parallel over ``groups.ep`` (see :func:`dshal.parallel.setup_groups`), reading
    only this rank's slices. Precision, device and ``progress`` as in :func:`dshal.model.build_model`.

    When slicing first would change the numbers (quantizing on load, or shards that cut
    the checkpoint's 128x128 FP8 blocks: see :func:`_sliced_read_is_exact`), each rank
    loads the whole model, applies the precision policy, then shards it (the transforms
    keep a cut block's values and emulate its activation quantization), so TP and EP equal
    the single process in every precision mode; memory is then the whole model per rank
    during the load."""
    runtime = current()
    precision = precision_config(precision) if precision is not None else runtime.config.precision
    device = torch.device(device if device is not None else runtime.device)
    fp8_storage = fp8_storage_of(runtime, precision)  # False: FP8 converted on the host, then placed
    with torch.device("meta"):
        model = Transformer(args)
    refuse_undeclared_fp8_before_reading(model, precision)
    if groups.tp_size > 1:
        tensor_parallel(model, groups.tp)
    if groups.ep_size > 1:
        expert_parallel(model, groups.ep)
    if not _sliced_read_is_exact(reader, model, precision, runtime.backend.capabilities()):
        with torch.device("meta"):
            model = Transformer(args)
        load_weights(model, reader, device, fp8_on_host=not fp8_storage, progress=progress)
        apply_precision(model, precision, device=device, progress=phase_steps(progress, "precision"))
        if groups.tp_size > 1:
            tensor_parallel(model, groups.tp)
        if groups.ep_size > 1:
            expert_parallel(model, groups.ep)
        model.shard_view = None
        place_and_prepare(model, device, fp8_storage, runtime, progress)  # only the shards move; layouts on the shards
        return model.eval()
    view = ShardView(reader, model, tuple(args.weight_block_size or (128, 128)))
    load_weights(model, view, device, fp8_on_host=not fp8_storage, progress=progress)
    for module in model.modules():
        if isinstance(module, ShardedExperts):
            module.set_owners(module.owner, module.held)  # tables next to the loaded weights
    apply_precision(model, precision, device=device, progress=phase_steps(progress, "precision"))
    for module in model.modules():  # after the policy: a layer it keeps in high precision quantizes nothing
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelLMHead)):
            module.act_quant = activation_quant_of(module)  # a row-parallel W8A8 shard's input scale spans ranks
    model.shard_view = view
    place_and_prepare(model, device, fp8_storage, runtime, progress)  # the backend's layouts on the shards
    return model.eval()


def from_pretrained_parallel(
    path: str | os.PathLike,
    groups: ParallelGroups,
    config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    mla_mode: str | None = None,
    mtp_layers: int | None = None,
    progress: LoadProgress | None = None,
) -> Transformer:
    """:func:`dshal.model.from_pretrained` for one rank of a parallel job: ``groups`` from
    :func:`dshal.parallel.setup_groups` says which TP / EP groups this rank is in."""
    folder = checkpoint_folder(path)  # a Hugging Face model id: its snapshot in the local cache
    runtime = dshal.use(config) if config is not None else dshal.current()
    args = checkpoint_args(folder, runtime, dtype=dtype, mla_mode=mla_mode, mtp_layers=mtp_layers)
    return build_parallel(args, CheckpointReader(folder), groups, runtime.config.precision, runtime.device, progress)


__all__ = ["ShardView", "build_parallel", "from_pretrained_parallel"]
