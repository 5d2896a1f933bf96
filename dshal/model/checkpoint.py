"""Make DeepSeek-V3 checkpoints: random weights in the official tensor names, FP8 block
quantization as the official checkpoints store it, and a safetensors writer; and the
checks a checkpoint read from disk gets beyond shapes: its index file, and non-finite
values (:func:`check_finite`).

Used by ``dshal run`` (a random model on the fly), the tests and the benchmark. The FP8
code here is plain torch, independent of ``dshal.ops``, so tests that feed its output to
the model core do not check the ops against themselves.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from dshal.config import env_flag, read_json_file
from dshal.errors import CheckpointError, ConfigError
from dshal.model.args import ModelArgs

E4M3FN_MAX = 448.0
#: Environment switch of the load-time scan for NaN / Inf weights (on unless 0).
CHECK_FINITE_ENV = "DSHAL_CHECK_FINITE"
#: Elements scanned per step, so the scan of a huge tensor needs little extra memory.
_SCAN_CHUNK = 1 << 24
#: FP8 bit patterns that are not finite, as (mask, value) on the uint8 view:
#: e4m3fn has NaN = S.1111.111, e4m3fnuz has NaN = 1000_0000, e5m2 has Inf/NaN = S.11111.xx.
_FP8_NONFINITE = {
    torch.float8_e4m3fn: (0x7F, 0x7F),
    torch.float8_e4m3fnuz: (0xFF, 0x80),
    torch.float8_e5m2: (0x7C, 0x7C),
}


def check_finite_enabled() -> bool:
    """Whether loading scans weights for NaN / Inf: yes unless ``DSHAL_CHECK_FINITE=0``
    (the opt-out for speed: the scan reads every weight once more)."""
    return env_flag(CHECK_FINITE_ENV, True)


def check_finite(name: str, tensor: torch.Tensor, where: object, part: str = "") -> None:
    """Raise CheckpointError when ``tensor`` (checkpoint tensor ``name`` of ``where``) holds
    a NaN or an Inf: such a model loads but generates garbage without a word. Integer
    tensors and meta tensors pass; FP8 ones are checked on their bit patterns. ``part``:
    which part of ``name`` ``tensor`` is, where it is not all of it (a tensor-parallel
    rank's rows, ``this rank's rows [a, b) of it``): the index said is within that part."""
    if tensor.is_meta:
        return  # shapes only (`dshal plan`'s checkpoint of names and shapes): no values to scan
    fp8 = _FP8_NONFINITE.get(tensor.dtype)
    if fp8 is None and not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    if fp8 is not None:
        flat = flat.view(torch.uint8)
    for start in range(0, flat.numel(), _SCAN_CHUNK):
        chunk = flat[start : start + _SCAN_CHUNK]
        if fp8 is None and math.isfinite(float(chunk.sum())):
            continue  # a reduction allocates nothing; a NaN or Inf would make the sum non-finite
        bad = (chunk & fp8[0]) == fp8[1] if fp8 is not None else ~torch.isfinite(chunk)
        if bool(bad.any()):
            first = start + int(bad.nonzero()[0, 0])
            count = int(bad.sum()) if flat.numel() <= _SCAN_CHUNK else None
            many = f"{count} non-finite value(s)" if count is not None else "non-finite values"
            index = list(torch.unravel_index(torch.tensor(first), tuple(tensor.shape))) if tensor.dim() else []
            raise CheckpointError(
                f"checkpoint {where}: tensor {name!r}{f' ({part})' if part else ''} ({tensor.dtype}, shape "
                f"{list(tensor.shape)}) has {many}, "
                f"the first at index {[int(i) for i in index]}; expected finite weights "
                f"(set {CHECK_FINITE_ENV}=0 to skip this scan)"
            )


def read_index(index: Path) -> list[str]:
    """The shard file names listed by a ``model.safetensors.index.json``; CheckpointError
    when the file is unreadable or its ``weight_map`` is not ``{tensor name: shard file}``
    with plain file names in the checkpoint folder."""
    return sorted(set(read_weight_map(index).values()))


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (``{tensor name: shard file name}``) of a
    ``model.safetensors.index.json``, checked as :func:`read_index` says."""
    try:
        _, data = read_json_file(index, "checkpoint index")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"checkpoint {index}: 'weight_map' is {weight_map!r:.80}, expected a JSON object "
            "{tensor name: shard file name}"
        )
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(
                f"checkpoint {index}: weight_map[{tensor!r}] is {shard!r}, expected the file name of a shard "
                "in the checkpoint folder"
            )
    return dict(weight_map)


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepSeek-V3 checkpoint (per-expert layout) and its shape."""
    a = args
    d = a.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, d)}
    for i in range(a.num_hidden_layers):
        _layer_shapes(shapes, a, i)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (a.vocab_size, d)
    # The multi-token-prediction layers (after the head, so the main model's random weights
    # do not depend on them): a layer of their own, their input projection and output head.
    for i in range(a.num_hidden_layers, a.num_hidden_layers + a.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        _layer_shapes(shapes, a, i)
        shapes[f"{p}.embed_tokens.weight"] = (a.vocab_size, d)
        shapes[f"{p}.enorm.weight"] = (d,)
        shapes[f"{p}.hnorm.weight"] = (d,)
        shapes[f"{p}.eh_proj.weight"] = (d, 2 * d)
        shapes[f"{p}.shared_head.norm.weight"] = (d,)
        shapes[f"{p}.shared_head.head.weight"] = (a.vocab_size, d)
    return shapes


def _layer_shapes(shapes: dict[str, tuple[int, ...]], a: ModelArgs, i: int) -> None:
    """The attention, norms and FFN of layer ``i``."""
    d = a.hidden_size
    p = f"model.layers.{i}"
    shapes[f"{p}.input_layernorm.weight"] = (d,)
    shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
    att = f"{p}.self_attn"
    h = a.num_attention_heads
    if a.q_lora_rank is None:
        shapes[f"{att}.q_proj.weight"] = (h * a.qk_head_dim, d)
    else:
        shapes[f"{att}.q_a_proj.weight"] = (a.q_lora_rank, d)
        shapes[f"{att}.q_a_layernorm.weight"] = (a.q_lora_rank,)
        shapes[f"{att}.q_b_proj.weight"] = (h * a.qk_head_dim, a.q_lora_rank)
    shapes[f"{att}.kv_a_proj_with_mqa.weight"] = (a.kv_lora_rank + a.qk_rope_head_dim, d)
    shapes[f"{att}.kv_a_layernorm.weight"] = (a.kv_lora_rank,)
    shapes[f"{att}.kv_b_proj.weight"] = (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
    shapes[f"{att}.o_proj.weight"] = (d, h * a.v_head_dim)
    if a.sparse_attention and not a.shares_selection(i):  # DeepSeek-V3.2's lightning indexer (not GLM-5's shared layers)
        index = f"{att}.indexer"
        shapes[f"{index}.wq_b.weight"] = (a.index_n_heads * a.index_head_dim, int(a.q_lora_rank or 0))
        shapes[f"{index}.wk.weight"] = (a.index_head_dim, d)
        shapes[f"{index}.k_norm.weight"] = (a.index_head_dim,)
        shapes[f"{index}.k_norm.bias"] = (a.index_head_dim,)
        shapes[f"{index}.weights_proj.weight"] = (a.index_n_heads, d)
    if a.attention_bias:  # as the model reads them (q_proj, kv_b_proj: never a bias)
        for proj, rows in (("q_a_proj", a.q_lora_rank), ("kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim),
                           ("o_proj", d)):
            if rows is not None:
                shapes[f"{att}.{proj}.bias"] = (rows,)
    mlp = f"{p}.mlp"
    if a.is_moe_layer(i):
        shapes[f"{mlp}.gate.weight"] = (a.n_routed_experts, d)
        shapes[f"{mlp}.gate.e_score_correction_bias"] = (a.n_routed_experts,)
        for e in range(a.n_routed_experts):
            _mlp_shapes(shapes, f"{mlp}.experts.{e}", d, a.moe_intermediate_size)
        _mlp_shapes(shapes, f"{mlp}.shared_experts", d, a.n_shared_experts * a.moe_intermediate_size)
    else:
        _mlp_shapes(shapes, mlp, d, a.intermediate_size)


def _mlp_shapes(shapes: dict[str, tuple[int, ...]], prefix: str, dim: int, inter: int) -> None:
    shapes[f"{prefix}.gate_proj.weight"] = (inter, dim)
    shapes[f"{prefix}.up_proj.weight"] = (inter, dim)
    shapes[f"{prefix}.down_proj.weight"] = (dim, inter)


def random_checkpoint(args: ModelArgs, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights for ``args`` in the official names: normal(0, std) matrices and
    attention biases (``attention_bias``), norms near 1, a non-zero ``e_score_correction_bias``;
    float32 router, ``args.dtype`` elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(args).items():
        if name.endswith("e_score_correction_bias"):
            t = torch.rand(shape, generator=gen) * 0.1
        elif name.endswith(".bias"):  # attention biases, the indexer's k_norm bias
            t = torch.randn(shape, generator=gen) * std
        elif len(shape) == 1:  # norm weights
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * std
        keep_fp32 = ".mlp.gate." in name or name.endswith(".weights_proj.weight")
        out[name] = t if keep_fp32 else t.to(args.dtype)
    return out


def is_quantized_linear(name: str) -> bool:
    """Linears DeepSeek-V3's FP8 checkpoint stores in FP8 (not embed, lm_head, router, norms,
    nor the multi-token-prediction layer's ``eh_proj`` and ``shared_head.head``); DeepSeek-V3.2's
    also its indexer's ``wq_b`` and ``wk`` (not ``weights_proj``)."""
    if name.endswith((".eh_proj.weight", ".weights_proj.weight")):
        return False
    if name.endswith((".indexer.wq_b.weight", ".indexer.wk.weight")):
        return True
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


def quantize_checkpoint_fp8(tensors: dict[str, torch.Tensor], block: int = 128) -> dict[str, torch.Tensor]:
    """FP8 e4m3fn ``weight`` + float32 ``weight_scale_inv`` (one per ``block x block``
    tile, ``amax / 448``) for every quantized linear, as DeepSeek-V3's checkpoint stores them."""
    out = {}
    for name, t in tensors.items():
        if not is_quantized_linear(name):
            out[name] = t
            continue
        q, scale = fp8_block_quantize(t, block)
        out[name] = q
        out[name[: -len("weight")] + "weight_scale_inv"] = scale
    return out


def dequantize_checkpoint_fp8(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, block: int = 128
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`quantize_checkpoint_fp8`: ``weight * weight_scale_inv`` per block."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = tensors.get(name[: -len("weight")] + "weight_scale_inv") if name.endswith("weight") else None
        out[name] = t if scale is None else fp8_block_dequantize(t, scale, block).to(dtype)
    return out


def fp8_block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (e4m3fn ``[N, K]``, float32 scales ``[ceil(N/b), ceil(K/b)]``)."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, block, kb, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3FN_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3FN_MAX, E4M3FN_MAX).to(torch.float8_e4m3fn)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``q * scale`` per ``block x block`` tile, float32."""
    n, k = q.shape
    s = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * s


def save_checkpoint(
    directory: str | os.PathLike, args: ModelArgs, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json`` and the tensors (one ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json``). FP8 tensors in ``tensors``
    add a ``quantization_config`` to config.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(t.dtype == torch.float8_e4m3fn for t in tensors.values()) and args.weight_block_size is None:
        args = replace(args, weight_block_size=(128, 128), fp8_format="e4m3fn")
    (directory / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return directory


__all__ = [
    "check_finite",
    "check_finite_enabled",
    "read_index",
    "read_weight_map",
    "checkpoint_shapes",
    "dequantize_checkpoint_fp8",
    "fp8_block_dequantize",
    "fp8_block_quantize",
    "is_quantized_linear",
    "quantize_checkpoint_fp8",
    "random_checkpoint",
    "save_checkpoint",
]
