"""Load a Hugging Face DeepSeek-V3 checkpoint (config.json + safetensors) into the model core.

Files are opened with ``safe_open`` (memory-mapped) and each tensor is read once, when the
parameter it fills is built; :class:`CheckpointReader` also reads slices
(``get_slice(name, slices)``) so a parallel shard can read just its part.

Names are the official ones: ``model.layers.N.self_attn.q_a_proj.weight``, per-expert
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (stacked into ``w13`` / ``w2``
here), and for FP8 checkpoints ``<linear>.weight_scale_inv`` (one float32 scale per
128x128 block, multiplied in to dequantize); W8A8 int8 checkpoints (``dshal-ascend-convert``)
``<linear>.weight`` int8 with ``<linear>.weight_scale`` (one scale per output channel). The fused layout some transformers versions
write (``mlp.experts.gate_up_proj`` ``[E, 2I, D]``, ``mlp.experts.down_proj``) is read too.
DeepSeek-V3.2's indexer (``self_attn.indexer``): ``wq_b`` / ``wk`` as linears (FP8 blocks or
not), ``k_norm.weight`` / ``.bias``, and ``weights_proj.weight`` read into float32.
Tensors of multi-token-prediction layers (``model.layers.<num_hidden_layers + i>``) are
skipped unless ``ModelArgs.mtp_layers`` asks for them (the model's ``mtp.<layer>``). A
missing, unexpected or mis-shaped tensor raises :class:`CheckpointError` naming it.

Each tensor goes to the model's device as it is read, except, for a backend that cannot hold
float8 tensors on its device (``Capabilities.fp8_storage`` False, Ascend 910B), FP8 payloads
and their block scales: they stay where the reader put them (the host), the precision policy
converts them there (to int8 or high precision), and :func:`place_on_device` then moves the
converted tensors, so no float8 tensor ever reaches that device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dshal
from dshal import ops
from dshal.config import Config, precision_config
from dshal.errors import CheckpointError, DeviceError, DTypeError, ShapeError
from dshal.hub import resolve_checkpoint
from dshal.model.args import ModelArgs, checkpoint_folder
from dshal.model.checkpoint import check_finite, check_finite_enabled, read_weight_map
from dshal.model.model import (
    MLA,
    Embedding,
    Gate,
    HeadWeights,
    LayerNorm,
    Linear,
    RMSNorm,
    RoutedExperts,
    Transformer,
    rope_tables,
)
from dshal.model.precision import (
    apply_precision,
    checkpoint_name,
    refuse_fp8_without_storage,
    refuse_undeclared_fp8_before_reading,
)
from dshal.model.weights import conversion_ops, dequantize_weight
from dshal.ops.spec import FP8_DTYPES
from dshal.runtime import current

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"

#: ``progress(phase, done, total)``: where a long load is, for a progress bar. Phases in order:
#: ``read`` (``done`` of ``total`` modules whose weights are read), ``precision`` (0 of 1 when it
#: starts, then ``done`` of ``total`` modules converted), then ``place`` and ``prepare`` (each
#: called with 0 of 1 when it starts and 1 of 1 when done).
LoadProgress = Callable[[str, int, int], None]
#: The modules whose weights the loader reads (one ``read`` step each).
LOADED_MODULES = (Linear, RoutedExperts, Gate, RMSNorm, Embedding, LayerNorm, HeadWeights)


def phase_steps(progress: LoadProgress | None, phase: str) -> Callable[[int, int], None] | None:
    """``progress`` for the steps of one ``phase``: ``(done, total)`` -> ``progress(phase, done, total)``."""
    if progress is None:
        return None
    progress(phase, 0, 1)  # started: shown before the first step ends
    return lambda done, total: progress(phase, done, total)


@contextlib.contextmanager
def load_phase(progress: LoadProgress | None, phase: str) -> Iterator[None]:
    """Report ``phase`` to ``progress`` (when given) as started, then as done."""
    if progress is not None:
        progress(phase, 0, 1)
    yield
    if progress is not None:
        progress(phase, 1, 1)


# ---------------------------------------------------------------- readers
class ReaderNames:
    """What a reader says about one of its names, for messages (the defaults: a name is the
    checkpoint's own, all of it, in no index). A view that renames or slices tensors
    (:class:`dshal.parallel.loading.ShardView`) says what each of its names reads."""

    def origin(self, name: str) -> str:
        """The checkpoint's own name of what ``name`` reads (also for a name the reader lacks)."""
        return name

    def part(self, name: str) -> str:
        """Which part of :meth:`origin` ``name`` is, where not all of it ("" when it is)."""
        return ""

    def index_shard(self, name: str) -> str | None:
        """The shard file the checkpoint's index places tensor ``name`` in, if it lists it."""
        return None


class CheckpointReader(ReaderNames):
    """Lazy tensors of a safetensors checkpoint: one file, or shards listed by
    ``model.safetensors.index.json``. Files are memory-mapped and opened once.

    ``get(name)`` reads one tensor, ``get_slice(name, slices)`` only the part selected by a
    tuple of slices (e.g. a tensor-parallel shard's rows)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = Path(resolve_checkpoint(path))  # a Hugging Face model id: its snapshot in the local cache
        if self.path.suffix == ".json" and self.path.is_file():  # config.json or the index: their folder
            self.path = self.path.parent
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._index_map: dict[str, str] = {}  # the index's weight_map, for messages about missing tensors
        if self.path.is_file():
            files = [self.path]
        elif (self.path / INDEX_FILE).is_file():
            files = self._from_index(self.path / INDEX_FILE)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"checkpoint {self.path}: no *.safetensors file and no {INDEX_FILE}")
        for file in files:
            for name in self._open(file).keys():
                if name in self._files and self._files[name] != file:
                    raise CheckpointError(
                        f"checkpoint {self.path}: tensor {name!r} is in both {self._files[name].name} and {file.name}"
                    )
                self._files.setdefault(name, file)

    def _from_index(self, index: Path) -> list[Path]:
        files = []
        self._index_map = read_weight_map(index)
        for shard in sorted(set(self._index_map.values())):
            file = index.parent / shard
            if not file.is_file():
                raise CheckpointError(f"checkpoint {index}: shard {shard!r} is listed but missing")
            files.append(file)
        return files

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._safe_open(str(file), framework="pt", device="cpu")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"checkpoint {file}: not a readable safetensors file ({err})") from None
            self._handles[file] = handle
        return handle

    def _file_of(self, name: str) -> Path:
        try:
            return self._files[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: missing tensor {name!r}") from None

    def names(self) -> list[str]:
        return list(self._files)

    def index_shard(self, name: str) -> str | None:
        return self._index_map.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of(name)).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._open(self._file_of(name)).get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name!r} has dtype {code}, which dshal cannot read")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._file_of(name)).get_tensor(name)

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return self._open(self._file_of(name)).get_slice(name)[slices]


class DictReader(ReaderNames):
    """The :class:`CheckpointReader` interface over in-memory tensors (random models, tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<in-memory>"):
        self.tensors = dict(tensors)
        self.path = path

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: missing tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        return self._tensor(name)[slices]


Reader = CheckpointReader | DictReader


# ---------------------------------------------------------------- reading one weight
class _Loader:
    """Fills a meta-device model from a reader, remembering which tensors it used.
    ``fp8_on_host``: FP8 payloads and their scales stay where the reader put them (see the
    module doc); everything else, dequantized FP8 included, goes to ``device``."""

    def __init__(self, reader: Reader, args: ModelArgs, device: torch.device, fp8_on_host: bool = False):
        self.reader, self.args, self.device, self.fp8_on_host = reader, args, device, fp8_on_host
        self.used: set[str] = set()
        self.check_finite = check_finite_enabled()  # DSHAL_CHECK_FINITE=0 skips the NaN/Inf scan
        block = args.weight_block_size or (128, 128)
        self.block = (int(block[0]), int(block[1]))

    def read(
        self, name: str, shape: tuple[int, ...], what: str, dtypes: Iterable[torch.dtype] | None = None,
        fp8_part: bool = False,
    ) -> torch.Tensor:
        """Tensor ``name`` checked against ``shape`` (and ``dtypes``), on the target device; an
        FP8 payload (or, ``fp8_part``, its scale) stays as read under ``fp8_on_host``."""
        origin = self.reader.origin(name)
        if name not in self.reader:
            shard = self.reader.index_shard(name)
            placed = (
                f"; {INDEX_FILE} places it in {shard}, which does not hold it: re-download that shard?"
                if shard is not None else ""
            )
            raise CheckpointError(
                f"checkpoint {self.reader.path}: missing tensor {origin!r} (expected shape {list(shape)} for {what}{placed})"
            )
        found = self.reader.shape(name)
        if tuple(found) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {self.reader.path}: tensor {origin!r} has shape {list(found)}, "
                f"expected {list(shape)} ({what})"
            )
        dtype = self.reader.dtype(name)
        allowed = tuple(dtypes) if dtypes is not None else None
        if allowed is not None and dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise CheckpointError(
                f"checkpoint {self.reader.path}: tensor {origin!r} has dtype {dtype}, expected one of {names} ({what})"
            )
        self.used.add(name)
        tensor = self.reader.get(name)
        if self.check_finite:
            check_finite(origin, tensor, self.reader.path, self.reader.part(name))
        if self.fp8_on_host and (fp8_part or dtype in FP8_DTYPES.values()):
            return tensor
        return tensor.to(self.device)

    def float_tensor(self, name: str, shape: tuple[int, ...], what: str, dtype: torch.dtype) -> torch.Tensor:
        return self.read(name, shape, what, (torch.float32, torch.bfloat16, torch.float16)).to(dtype)

    def weight(self, prefix: str, shape: tuple[int, int], what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``prefix.weight`` (+ its scales when quantized): ``(weight, scale or None)``.

        FP8 weights come with ``prefix.weight_scale_inv`` (one float32 scale per 128x128
        block, DeepSeek-V3's format); int8 weights with ``prefix.weight_scale`` (one scale
        per output channel, ``[N, 1]`` or ``[N]``: W8A8 as ``dshal-ascend-convert`` writes)."""
        name = f"{prefix}.weight"
        dtype = self.reader.dtype(name) if name in self.reader else None
        if dtype == torch.int8:
            q = self.read(name, shape, what)
            scale_name = f"{prefix}.weight_scale"
            rows = (shape[0],) if scale_name in self.reader and len(self.reader.shape(scale_name)) == 1 else (shape[0], 1)
            scale = self.read(scale_name, rows, f"per-channel scales of {what}", (torch.float32, torch.bfloat16, torch.float16))
            return q, scale.to(torch.float32).reshape(shape[0], 1)
        if dtype not in FP8_DTYPES.values():
            return self.float_tensor(name, shape, what, self.args.dtype), None
        q = self.read(name, shape, what)
        bm, bk = self.block
        scale_shape = (math.ceil(shape[0] / bm), math.ceil(shape[1] / bk))
        scale = self.read(f"{prefix}.weight_scale_inv", scale_shape, f"block scales of {what}", (torch.float32,), True)
        if (bm, bk) != (128, 128):  # the FP8 ops take 128x128 blocks: keep such weights dequantized
            with conversion_ops(q, self.device):
                return _dequantize_blocks(q, scale, (bm, bk), self.args.dtype).to(self.device), None
        return q, scale

    def stacked(self, prefixes: list[str], rows: int, cols: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights ``[rows, cols]`` of ``prefixes`` concatenated by rows. int8 parts (one
        scale per row) stay int8; FP8 parts stay FP8 when their 128-row blocks tile the
        result; otherwise they are dequantized."""
        parts = [self.weight(p, (rows, cols), what) for p in prefixes]
        if _stay_quantized(parts, rows):
            return torch.cat([w for w, _ in parts]), torch.cat([s for _, s in parts])
        return torch.cat([self.dense(w, s) for w, s in parts]), None

    def dense(self, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """A weight as read, dequantized to the model's dtype, on the model's device."""
        with conversion_ops(weight, self.device):
            return dequantize_weight(weight, scale, self.args.dtype).to(self.device)


def _stay_quantized(parts: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int) -> bool:
    """Whether weight parts read as ``(weight, scale)``, ``rows`` rows each where they are
    concatenated by rows, keep their stored quantization: all scaled and of one dtype, and
    int8 (one scale per row) or FP8 whose 128-row blocks tile the concatenation."""
    if any(s is None for _, s in parts) or len({w.dtype for w, _ in parts}) != 1:
        return False
    return parts[0][0].dtype == torch.int8 or rows % 128 == 0


def _dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    if block == (128, 128):
        return ops.dequantize_fp8(q, scale, block, dtype)
    # Other block sizes: expand the scales over their blocks.
    s = scale.repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
    return (q.to(torch.float32) * s).to(dtype)


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=False))


def load_weights(
    model: nn.Module,
    reader: Reader,
    device: torch.device | str = "cpu",
    *,
    fp8_on_host: bool = False,
    progress: LoadProgress | None = None,
) -> None:
    """Fill every parameter of ``model`` (built on the meta device) from ``reader``; raise
    :class:`CheckpointError` on a missing, mis-shaped or unexpected tensor (one that no
    module can read before reading anything), naming it as ``reader.origin`` says. ``fp8_on_host``:
    FP8 payloads and their scales stay where the reader put them (for a backend without
    ``Capabilities.fp8_storage``; see the module doc), the rest goes to ``device``.
    ``progress`` is told each module read (:data:`LoadProgress`, phase ``read``)."""
    args: ModelArgs = model.args
    device = torch.device(device)
    ld = _Loader(reader, args, device, fp8_on_host)
    unloaded = dict(model.named_parameters())  # loading replaces each one (onto the meta device too: dshal plan)
    loaded = [(path, module) for path, module in model.named_modules() if isinstance(module, LOADED_MODULES)]
    # A tensor no loaded module can use is an error that needs no data: said before reading any.
    _refuse_unexpected(reader, _unusable(reader.names(), _module_prefixes(loaded), args), args)
    for done, (path, module) in enumerate(loaded, 1):
        hf = checkpoint_name(path)
        if isinstance(module, Linear):
            rows, cols = module.out_features, module.in_features
            if path.endswith(".gate_up_proj"):
                parent = hf[: -len(".gate_up_proj")]
                w, s = ld.stacked([f"{parent}.gate_proj", f"{parent}.up_proj"], rows // 2, cols, path)
            elif path == "lm_head" and args.tie_word_embeddings and "lm_head.weight" not in reader:
                w, s = ld.weight("model.embed_tokens", (rows, cols), "lm_head, tied to the embedding")
            else:
                w, s = ld.weight(hf, (rows, cols), path)
            _set(module, "weight", w)
            _set(module, "weight_scale", s)
            if module.bias is not None:
                _set(module, "bias", ld.float_tensor(f"{hf}.bias", (rows,), path, args.dtype))
        elif isinstance(module, RoutedExperts):
            # a rank's ShardedExperts holds experts ``held``: messages name them by their number
            labels = getattr(module, "held", None)
            w13, w2, s13, s2 = read_experts(ld, hf, range(module.w13.shape[0]), path, labels)
            for name, value in (("w13", w13), ("w2", w2), ("w13_scale", s13), ("w2_scale", s2)):
                _set(module, name, value)
        elif isinstance(module, Gate):
            experts = module.weight.shape[0]
            _set(module, "weight", ld.float_tensor(f"{hf}.weight", (experts, args.hidden_size), path, torch.float32))
            _set(
                module,
                "e_score_correction_bias",
                ld.float_tensor(f"{hf}.e_score_correction_bias", (experts,), path, torch.float32),
            )
        elif isinstance(module, (RMSNorm, Embedding)):
            _set(module, "weight", ld.float_tensor(f"{hf}.weight", tuple(module.weight.shape), path, args.dtype))
        elif isinstance(module, LayerNorm):  # DeepSeek-V3.2's indexer k_norm
            for name in ("weight", "bias"):
                _set(module, name, ld.float_tensor(f"{hf}.{name}", tuple(module.weight.shape), path, args.dtype))
        elif isinstance(module, HeadWeights):  # the indexer's weights_proj: float32, as transformers keeps it
            shape = (module.weight.shape[0], module.weight.shape[1])
            stored = reader.dtype(f"{hf}.weight") if f"{hf}.weight" in reader else None
            if stored == torch.int8 or stored in FP8_DTYPES.values():  # quantized by a converter (a *_proj name)
                w, s = ld.weight(hf, shape, path)
                with conversion_ops(w, device):
                    _set(module, "weight", dequantize_weight(w, s, torch.float32).to(device))
            else:
                _set(module, "weight", ld.float_tensor(f"{hf}.weight", shape, path, torch.float32))
        if progress is not None:
            progress("read", done, len(loaded))
    # left over: under a module's prefix, but nothing read them (``experts.3.gate_proj.bias``)
    _refuse_unexpected(reader, [n for n in reader.names() if n not in ld.used and not _ignored(n, args)], args)
    #: What the checkpoint stores (before any cast), for the precision policy's ``auto`` report.
    model.checkpoint_weight_dtypes = sorted(
        {str(reader.dtype(n)).replace("torch.", "") for n in ld.used if n.endswith(".weight")}
    )
    left = [name for name, p in model.named_parameters() if p is unloaded.get(name)]
    if left:
        raise CheckpointError(f"checkpoint {reader.path}: parameters left unloaded: {', '.join(left[:5])}")
    cos, sin = _rope(args, device)
    model.rope_cos, model.rope_sin = cos, sin
    if fp8_on_host:
        warn_host_conversion(model)


#: FP8 parameters held on the host for conversion at load above which the loader warns.
HOST_CONVERSION_WARN_PARAMS = 1_000_000_000
#: What that conversion measured per torch thread: the slowest DeepSeek-V3 shape through
#: ``int8_rows`` (benchmarks/host_fp8_to_int8.py --threads 1, 2-core AMD EPYC, 2026-12-05).
HOST_CONVERSION_PARAMS_PER_S_PER_THREAD = 150e6


def warn_host_conversion(model: nn.Module, threshold: int = HOST_CONVERSION_WARN_PARAMS) -> int:
    """Count the FP8 parameters of ``model`` just loaded for a backend without
    ``Capabilities.fp8_storage`` (all of them are on the host, for conversion) and, from
    ``threshold`` on, warn how long that may take: the whole of DeepSeek-V3 takes over an hour
    on one thread. Returns the count."""
    count = sum(p.numel() for p in model.parameters() if p.dtype in FP8_DTYPES.values())  # all held back for it
    if count >= threshold:
        threads = torch.get_num_threads()
        minutes = count / (HOST_CONVERSION_PARAMS_PER_S_PER_THREAD * threads) / 60
        log.warning(
            "dshal: %.1fB FP8 parameters are converted on the host at this load (the device cannot hold float8 "
            "tensors); measured ~%.0f M parameters/s per thread, that is at least %.0f min on %d thread(s). A checkpoint "
            "converted to int8 once (see your backend's documentation) loads without it",
            count / 1e9, HOST_CONVERSION_PARAMS_PER_S_PER_THREAD / 1e6, minutes, threads,
        )
    return count


def _rope(args: ModelArgs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(args, device)


def read_experts(
    ld: _Loader, prefix: str, expert_ids: Iterable[int], what: str, labels: Iterable[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Stacked ``w13 [E', 2I, D]``, ``w2 [E', D, I]`` (+ block scales) of ``expert_ids``,
    from the per-expert layout or the fused one (``prefix.gate_up_proj`` / ``prefix.down_proj``).
    ``labels``: the number each expert has in messages (default its id; a rank's renumbered
    experts are said by their checkpoint numbers)."""
    a = ld.args
    ids = list(expert_ids)
    said = dict(zip(ids, labels if labels is not None else ids))
    inter, dim = a.moe_intermediate_size, a.hidden_size
    if f"{prefix}.gate_up_proj" in ld.reader:  # fused layout (float only)
        n = a.n_routed_experts
        w13 = ld.float_tensor(f"{prefix}.gate_up_proj", (n, 2 * inter, dim), what, a.dtype)[ids]
        w2 = ld.float_tensor(f"{prefix}.down_proj", (n, dim, inter), what, a.dtype)[ids]
        return w13, w2, None, None
    gate, up, down = (
        [ld.weight(f"{prefix}.{e}.{proj}", shape, f"{what}[{said[e]}]") for e in ids]
        for proj, shape in (("gate_proj", (inter, dim)), ("up_proj", (inter, dim)), ("down_proj", (dim, inter)))
    )
    if _stay_quantized(gate + up + down, inter):  # gate and up are stacked by rows into w13
        part = lambda pairs, i: [pair[i] for pair in pairs]  # noqa: E731
        w13, w13_scale = _stack_experts(part(gate, 0), part(up, 0)), _stack_experts(part(gate, 1), part(up, 1))
        return w13, _stack_experts(part(down, 0)), w13_scale, _stack_experts(part(down, 1))
    dense = lambda pairs: [ld.dense(w, s) for w, s in pairs]  # noqa: E731
    return _stack_experts(dense(gate), dense(up)), _stack_experts(dense(down)), None, None


def _stack_experts(*projections: list[torch.Tensor]) -> torch.Tensor:
    """``[E, rows, ...]``: for each expert ``e``, ``projections[0][e]``, ``projections[1][e]``...
    one after another by rows. Each tensor is copied once into the result: no stacked
    temporaries to concatenate (half the bytes moved, one buffer less held; and on the meta
    device, ``dshal plan``, a copy is far cheaper than torch's Python stack and cat)."""
    first = projections[0][0]
    rows = [p[0].shape[0] for p in projections]
    out = torch.empty((len(projections[0]), sum(rows), *first.shape[1:]), dtype=first.dtype, device=first.device)
    for e in range(out.shape[0]):
        start = 0
        for projection, n in zip(projections, rows):
            out[e, start : start + n].copy_(projection[e])
            start += n
    return out


def _module_prefixes(loaded: list[tuple[str, nn.Module]]) -> dict[str, int | None]:
    """The checkpoint name prefix of each loaded module's tensors (a ``gate_up_proj`` linear
    has two: ``gate_proj`` and ``up_proj``), with the number of experts of a routed-experts
    module (its local count, as the reader numbers them) and None for the others."""
    prefixes: dict[str, int | None] = {}
    for path, module in loaded:
        hf = checkpoint_name(path)
        if isinstance(module, RoutedExperts):
            prefixes[hf] = int(module.w13.shape[0])
        elif isinstance(module, Linear) and path.endswith(".gate_up_proj"):
            parent = hf[: -len(".gate_up_proj")]
            prefixes[f"{parent}.gate_proj"] = prefixes[f"{parent}.up_proj"] = None
        else:
            prefixes[hf] = None
    return prefixes


def _unusable(names: Iterable[str], prefixes: Mapping[str, int | None], args: ModelArgs) -> list[str]:
    """The ``names`` no loaded module can read: not :func:`_ignored` and under none of
    ``prefixes`` (:func:`_module_prefixes`), or under a routed-experts one with an expert
    index past its count. Each name's proper prefixes are looked up, longest first: a few
    dict lookups per name (DeepSeek-V3 has ~90k names and ~2k module prefixes)."""
    out = []
    for name in names:
        if _ignored(name, args):
            continue
        end = len(name)
        while True:
            end = name.rfind(".", 0, end)
            if end <= 0:  # under no module
                out.append(name)
                break
            if name[:end] in prefixes:
                count = prefixes[name[:end]]
                index = name[end + 1 :].split(".", 1)[0]
                if count is not None and index.isdigit() and int(index) >= count:
                    out.append(name)  # an expert past the module's experts
                break
    return out


def _refuse_unexpected(reader: Reader, names: list[str], args: ModelArgs) -> None:
    """CheckpointError naming ``names`` (by the checkpoint's own names), when there are any."""
    if not names:
        return
    unexpected = sorted({reader.origin(n) for n in names})
    shown = ", ".join(repr(n) for n in unexpected[:5])
    more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
    raise CheckpointError(
        f"checkpoint {reader.path}: unexpected tensor(s) {shown}{more}, not part of a DeepSeek-V3 model with "
        f"{args.num_hidden_layers} layers (check config.json against the checkpoint)"
    )


def _ignored(name: str, args: ModelArgs) -> bool:
    """Tensors that are in checkpoints but not in the model: rotary buffers, the MTP layers
    not asked for (``args.mtp_layers``) and the built ones' copy of the token embedding
    (the model's own serves them)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if name.startswith("model.layers."):
        layer = name.split(".")[2]
        first_mtp = args.num_hidden_layers
        if layer.isdigit() and first_mtp <= int(layer) < first_mtp + args.num_nextn_predict_layers:
            built = int(layer) < first_mtp + args.mtp_layers
            return not built or name == f"model.layers.{layer}.embed_tokens.weight"
    return False


# ---------------------------------------------------------------- building models
def build_model(
    args: ModelArgs,
    reader: Reader,
    precision: Any = None,
    device: torch.device | str | None = None,
    progress: LoadProgress | None = None,
) -> Transformer:
    """Build a :class:`~dshal.model.model.Transformer` from ``reader`` on ``device`` (default:
    the active runtime's), then apply the precision policy (default: the runtime config's).
    On a backend that cannot hold float8 tensors (``Capabilities.fp8_storage`` False) FP8
    weights are converted on the host first (:func:`load_weights`, :func:`place_on_device`).
    ``progress``: told each step (:data:`LoadProgress`)."""
    runtime = current()
    precision = precision_config(precision) if precision is not None else runtime.config.precision
    device = torch.device(device if device is not None else runtime.device)
    fp8_storage = fp8_storage_of(runtime, precision)
    with torch.device("meta"):
        model = Transformer(args)
    refuse_undeclared_fp8_before_reading(model, precision)
    load_weights(model, reader, device, fp8_on_host=not fp8_storage, progress=progress)
    apply_precision(model, precision, device=device, progress=phase_steps(progress, "precision"))
    place_and_prepare(model, device, fp8_storage, runtime, progress)
    return model.eval()


def fp8_storage_of(runtime: Any, precision: Any) -> bool:
    """Whether ``runtime``'s backend can hold float8 tensors on its device
    (``Capabilities.fp8_storage``); where it cannot, an FP8 ``precision.gemm`` mode is refused
    here, before anything is read (:func:`~dshal.model.precision.refuse_fp8_without_storage`)."""
    capabilities = runtime.backend.capabilities()
    refuse_fp8_without_storage(precision, capabilities, runtime.backend.name)
    return bool(capabilities.fp8_storage)


def place_on_device(model: nn.Module, device: torch.device | str, fp8_storage: bool = True) -> int:
    """Move every parameter and buffer of ``model`` held off ``device`` there (the weights the
    loader kept on the host, converted by the precision policy, and tables built next to them);
    return how many moved. With ``fp8_storage`` False a float8 tensor left among them is a
    :class:`~dshal.DeviceError` naming it: such a device must never receive one."""
    device = torch.device(device)
    moved = 0
    for path, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device == device:
                    continue
                if not fp8_storage and tensor.dtype in FP8_DTYPES.values():
                    raise DeviceError(
                        f"place_on_device: {f'{path}.{name}' if path else name} is {tensor.dtype} but the backend cannot hold float8 tensors "
                        "on its device (Capabilities.fp8_storage False); the precision policy should have converted it"
                    )
                placed = tensor.to(device)
                table[name] = nn.Parameter(placed, requires_grad=False) if isinstance(tensor, nn.Parameter) else placed
                moved += 1
    return moved


def prepare_for_backend(model: nn.Module, runtime: Any) -> int:
    """Give each weight the model hands to an op to the backend's load hook once
    (:meth:`dshal.Backend.prepare_weight`; e.g. Ascend keeps int8 linear weights transposed in
    its NZ format), for the ops ``runtime``'s backend itself serves, and keep what it returns
    instead of the original; return how many weights it replaced. Skipped: meta tensors
    (``dshal plan``) and ``kv_b_proj``, whose weight MLA reads directly. The hook may change
    only the layout: another shape, dtype or device is an error naming the weight."""
    backend = runtime.backend
    read_directly = {id(m.kv_b_proj) for m in model.modules() if isinstance(m, MLA)}
    replaced = 0
    for path, module in model.named_modules():
        if not isinstance(module, (Linear, RoutedExperts)) or id(module) in read_directly:
            continue
        op = module.op
        if runtime.providers.get(op) != backend.name:
            continue
        for arg in (name for pair in module.weight_pairs for name in pair):
            weight = getattr(module, arg)
            if weight is None or weight.is_meta:
                continue
            name = f"{path}.{arg}"
            got = backend.prepare_weight(name, weight, f"{op}.{arg}")
            if got is weight:
                continue
            seen = f"backend {backend.name!r}: prepare_weight({name!r}, role {op}.{arg}) returned"
            if tuple(got.shape) != tuple(weight.shape):
                raise ShapeError(f"{seen} shape {list(got.shape)}, expected {list(weight.shape)} (only the layout may change)")
            if got.dtype != weight.dtype:
                raise DTypeError(f"{seen} dtype {got.dtype}, expected {weight.dtype} (only the layout may change)")
            if got.device != weight.device:
                raise DeviceError(f"{seen} a tensor on {got.device}, expected {weight.device}")
            setattr(module, arg, nn.Parameter(got, requires_grad=False))
            replaced += 1
    return replaced


def place_and_prepare(
    model: nn.Module, device: torch.device, fp8_storage: bool, runtime: Any, progress: LoadProgress | None = None
) -> None:
    """The last steps of every build, after the precision policy: weights held elsewhere
    moved to ``device`` (:func:`place_on_device`), then the backend's weight layouts, once
    (:func:`prepare_for_backend`); each a ``progress`` phase."""
    with load_phase(progress, "place"):
        place_on_device(model, device, fp8_storage)
    with load_phase(progress, "prepare"):
        prepare_for_backend(model, runtime)


def from_pretrained(
    path: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    *,
    dtype: torch.dtype | None = None,
    mla_mode: str | None = None,
    mtp_layers: int | None = None,
    progress: LoadProgress | None = None,
) -> Transformer:
    """Load a DeepSeek-V3 checkpoint directory (``config.json`` + safetensors), or a Hugging
    Face model id (``"deepseek-ai/DeepSeek-V3"``, ``"org/name@revision"``) already in the local
    Hugging Face cache (:mod:`dshal.hub`: never downloaded; a folder of that name wins).

    ``config``: a dshal config (path, dict or Config) made active with :func:`dshal.use`;
    None keeps the active runtime (or the default one). Its ``precision`` section picks
    each linear's format, its ``attention`` section the dynamic-attention window.
    ``dtype`` overrides the checkpoint's high-precision dtype; ``mla_mode`` the KV cache
    layout ("absorb" or "naive"); ``mtp_layers`` loads that many of the checkpoint's
    multi-token-prediction layers (for :mod:`dshal.model.speculative`; default none).
    ``progress(phase, done, total)`` is told where the load is
    (:data:`LoadProgress`; ``dshal run`` draws it as a progress bar).
    """
    folder = checkpoint_folder(path)  # a Hugging Face model id: its snapshot in the local cache
    runtime = dshal.use(config) if config is not None else dshal.current()
    args = checkpoint_args(folder, runtime, dtype=dtype, mla_mode=mla_mode, mtp_layers=mtp_layers)
    return build_model(args, CheckpointReader(folder), runtime.config.precision, runtime.device, progress)


def runtime_attention(runtime: Any) -> dict[str, Any]:
    """``runtime``'s config ``attention.window`` / ``attention.global_tokens`` as ``ModelArgs`` fields."""
    attention = runtime.config.attention
    return {"attention_window": attention.window, "attention_global_tokens": attention.global_tokens}


def with_runtime_attention(args: ModelArgs, runtime: Any = None) -> ModelArgs:
    """``args`` with the runtime config's dynamic attention (default runtime: the active one)
    where ``args`` sets no window of its own: a built model follows ``attention:`` as a loaded
    checkpoint does."""
    if args.attention_window is not None:
        return args
    fields = runtime_attention(runtime if runtime is not None else current())
    return args if fields["attention_window"] is None else dataclasses.replace(args, **fields)


def checkpoint_args(
    path: str | os.PathLike,
    runtime: Any,
    *,
    dtype: torch.dtype | None = None,
    mla_mode: str | None = None,
    mtp_layers: int | None = None,
) -> ModelArgs:
    """``ModelArgs`` of the checkpoint at ``path`` with ``runtime``'s dynamic-attention
    settings, and ``dtype`` / ``mla_mode`` / ``mtp_layers`` overrides when given."""
    overrides: dict[str, Any] = runtime_attention(runtime)
    if dtype is not None:
        overrides["dtype"] = dtype
    if mla_mode is not None:
        overrides["mla_mode"] = mla_mode
    if mtp_layers is not None:
        overrides["mtp_layers"] = mtp_layers
    return ModelArgs.from_file(path, **overrides)


__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "DictReader",
    "LoadProgress",
    "ReaderNames",
    "build_model",
    "checkpoint_args",
    "runtime_attention",
    "with_runtime_attention",
    "from_pretrained",
    "fp8_storage_of",
    "load_phase",
    "phase_steps",
    "load_weights",
    "place_and_prepare",
    "place_on_device",
    "prepare_for_backend",
    "read_experts",
]
