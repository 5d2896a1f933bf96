"""The tensors of a Hugging Face DeepSeek-V3 checkpoint, by name, without the weights.

:func:`checkpoint_listing` writes out what a ``config.json`` implies: every tensor name
of the ``deepseek_v3`` layout (``model.layers.N.self_attn.q_a_proj.weight``, per-expert
``mlp.experts.E.{gate,up,down}_proj``, the MTP layers after the last one), its shape and
its stored dtype (FP8 weights with float32 ``weight_scale_inv`` blocks when the config has
a ``quantization_config``; embedding, output head, router, norms and the MTP projection
stay high precision, as DeepSeek-V3 ships them; DeepSeek-V3.2's indexer ``wq_b`` / ``wk`` are
FP8 too, its ``k_norm`` and ``weights_proj`` not).

:func:`expand_listing` reads the compact form the tests keep of a published checkpoint
(one row per name pattern, ``{L}`` layers and ``{E}`` experts as ranges) back into names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from dshal.errors import ConfigError
from dshal.model.args import ModelArgs

#: safetensors dtype names (the index and header spelling) -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: shape, dtype and the shard file holding it (None when unknown)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def checkpoint_listing(args: ModelArgs, mtp_layers: int | None = None) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint ``args`` describes, in layer order (no shard files).

    ``mtp_layers``: multi-token-prediction layers stored after the last layer (default
    ``args.num_nextn_predict_layers``)."""
    a = args
    mtp = a.num_nextn_predict_layers if mtp_layers is None else mtp_layers
    high = a.dtype
    fp8 = a.weight_block_size is not None
    if fp8 and a.fp8_format not in ("e4m3fn", "e5m2"):
        raise ConfigError(f"config.json: quantization_config.fmt is {a.fp8_format!r}, expected e4m3 or e5m2")
    fp8_dtype = torch.float8_e4m3fn if a.fp8_format == "e4m3fn" else torch.float8_e5m2
    out: dict[str, TensorEntry] = {}

    def norm(name: str, dim: int) -> None:
        out[f"{name}.weight"] = TensorEntry((dim,), high)

    def linear(name: str, rows: int, cols: int, quantized: bool = True) -> None:
        if fp8 and quantized:
            bm, bk = a.weight_block_size
            out[f"{name}.weight"] = TensorEntry((rows, cols), fp8_dtype)
            out[f"{name}.weight_scale_inv"] = TensorEntry((math.ceil(rows / bm), math.ceil(cols / bk)), torch.float32)
        else:
            out[f"{name}.weight"] = TensorEntry((rows, cols), high)

    def mlp(prefix: str, inter: int) -> None:
        linear(f"{prefix}.gate_proj", inter, a.hidden_size)
        linear(f"{prefix}.up_proj", inter, a.hidden_size)
        linear(f"{prefix}.down_proj", a.hidden_size, inter)

    d, h = a.hidden_size, a.num_attention_heads
    out["model.embed_tokens.weight"] = TensorEntry((a.vocab_size, d), high)
    for layer in range(a.num_hidden_layers + mtp):
        p = f"model.layers.{layer}"
        if layer >= a.num_hidden_layers:  # MTP: its own embedding, projections and head
            out[f"{p}.embed_tokens.weight"] = TensorEntry((a.vocab_size, d), high)
            norm(f"{p}.enorm", d)
            norm(f"{p}.hnorm", d)
            linear(f"{p}.eh_proj", d, 2 * d, quantized=False)
            norm(f"{p}.shared_head.norm", d)
            out[f"{p}.shared_head.head.weight"] = TensorEntry((a.vocab_size, d), high)
        norm(f"{p}.input_layernorm", d)
        norm(f"{p}.post_attention_layernorm", d)
        attn = f"{p}.self_attn"
        if a.q_lora_rank is None:
            linear(f"{attn}.q_proj", h * a.qk_head_dim, d)
        else:
            linear(f"{attn}.q_a_proj", a.q_lora_rank, d)
            norm(f"{attn}.q_a_layernorm", a.q_lora_rank)
            linear(f"{attn}.q_b_proj", h * a.qk_head_dim, a.q_lora_rank)
        linear(f"{attn}.kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim, d)
        norm(f"{attn}.kv_a_layernorm", a.kv_lora_rank)
        linear(f"{attn}.kv_b_proj", h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
        linear(f"{attn}.o_proj", d, h * a.v_head_dim)
        if a.sparse_attention and not a.shares_selection(layer):  # V3.2's indexer (none in GLM-5's shared layers)
            index = f"{attn}.indexer"
            linear(f"{index}.wq_b", a.index_n_heads * a.index_head_dim, int(a.q_lora_rank or 0))
            linear(f"{index}.wk", a.index_head_dim, d)
            norm(f"{index}.k_norm", a.index_head_dim)
            out[f"{index}.k_norm.bias"] = TensorEntry((a.index_head_dim,), high)
            out[f"{index}.weights_proj.weight"] = TensorEntry((a.index_n_heads, d), high)
        if not a.is_moe_layer(layer):
            mlp(f"{p}.mlp", a.intermediate_size)
            continue
        for e in range(a.n_routed_experts):
            mlp(f"{p}.mlp.experts.{e}", a.moe_intermediate_size)
        out[f"{p}.mlp.gate.weight"] = TensorEntry((a.n_routed_experts, d), high)
        out[f"{p}.mlp.gate.e_score_correction_bias"] = TensorEntry((a.n_routed_experts,), torch.float32)
        if a.n_shared_experts:
            mlp(f"{p}.mlp.shared_experts", a.n_shared_experts * a.moe_intermediate_size)
    out["model.norm.weight"] = TensorEntry((d,), high)
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = TensorEntry((a.vocab_size, d), high)
    return out


def _range(text: str) -> range:
    low, _, high = str(text).partition("-")
    return range(int(low), int(high or low) + 1)


def expand_listing(listing: dict[str, Any]) -> dict[str, TensorEntry]:
    """Names, shapes, dtypes and files from the compact form (see ``tests/fixtures/plan``):
    ``rows`` of ``{"name": "model.layers.{L}.mlp.experts.{E}.up_proj.weight", "L": "3-61",
    "E": "0-255", "shape": [...], "dtype": "F8_E4M3"}`` and ``files``: ``{"name": file}``
    for single tensors and ``{"layers": {"3": file or [file per expert block]}}``."""
    files = listing.get("files", {})
    per_layer = files.get("layers", {})
    out: dict[str, TensorEntry] = {}
    for row in listing["rows"]:
        shape, dtype = tuple(int(s) for s in row["shape"]), DTYPES[row["dtype"]]
        for layer in _range(row["L"]) if "L" in row else [None]:
            for expert in _range(row["E"]) if "E" in row else [None]:
                name = row["name"].replace("{L}", str(layer)).replace("{E}", str(expert))
                file = files.get(name) or _layer_file(per_layer, layer, expert, len(_range(row.get("E", "0"))))
                out[name] = TensorEntry(shape, dtype, file)
    return out


def _layer_file(per_layer: dict[str, Any], layer: int | None, expert: int | None, experts: int) -> str | None:
    where = per_layer.get(str(layer)) if layer is not None else None
    if isinstance(where, list):  # a layer spread over several files: experts in equal blocks, the rest in the first
        return where[0] if expert is None else where[min(expert * len(where) // experts, len(where) - 1)]
    return where


def load_listing(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, TensorEntry]]:
    """``(header, tensors)`` of a compact listing file (JSON, optionally gzip-compressed)."""
    import gzip

    raw = gzip.open(path, "rt").read() if str(path).endswith(".gz") else open(path).read()
    data = json.loads(raw)
    return {k: v for k, v in data.items() if k not in ("rows", "files")}, expand_listing(data)


__all__ = ["DTYPES", "DTYPE_NAMES", "TensorEntry", "checkpoint_listing", "expand_listing", "load_listing"]
