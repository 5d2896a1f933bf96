"""The precision policy: a transform that sets each linear's weight format, and the
per-layer report ``model.describe()`` prints.

Config (``precision`` section of ``dshal.yaml``):

- ``gemm``: ``auto`` (the default: run the checkpoint in its own format -- an FP8-block
  checkpoint stays FP8-block, an int8 one W8A8, a bf16 / fp32 one in high precision;
  quantizing on load is an explicit choice, as in vLLM), ``high`` (dequantize everything
  to the checkpoint's high precision: bf16, or float32 for float32 checkpoints; ``bf16``
  is its older name and still accepted), ``fp8-block`` (128x128 weight blocks,
  activations per 1x128, as DeepSeek-V3 runs), ``fp8-row`` (one scale per output channel
  / token), ``fp8-tensor``, or ``int8`` (W8A8: int8 weights with one scale per output
  channel, activations quantized per token, as Ascend runs);
- ``fp8_format``: ``auto`` (the backend's native E4M3: e4m3fn, or e4m3fnuz on MI300X),
  or explicit;
- ``keep_high_precision``: module-name globs kept in high precision (matched against
  the model path, e.g. ``layers.3.mlp.gate``, and the checkpoint name,
  ``model.layers.3.mlp.gate``). DeepSeek-V3 keeps ``embed``, ``lm_head`` and the router.

The router (``Gate``) always computes in float32, as DeepSeek-V3 does; the embedding is a
lookup, not a GEMM. Routed experts take FP8 only with 128x128 block scales
(``moe_experts``' contract), so ``fp8-row`` / ``fp8-tensor`` run them as ``fp8-block``.
``kv_b_proj`` is weight-only in every quantized mode: MLA multiplies its dequantized
weight with the normalized KV latent in high precision (DeepSeek-V3's absorbed attention
never quantizes the latent), so its stored format only saves memory.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from torch import nn

from dshal import ops
from dshal.config import PrecisionConfig
from dshal.errors import ConfigError
from dshal.ops.spec import FP8_DTYPES, FP8_FORMAT_OF

#: gemm mode -> FP8 quantization block of a weight [N, K] (None = one scale).
WEIGHT_BLOCKS: dict[str, tuple[int, int] | None] = {"fp8-block": (128, 128), "fp8-row": (1, -1), "fp8-tensor": None}
HIGH = "high"
INT8 = "int8"
AUTO = "auto"
#: Older names of gemm modes, still accepted in configs.
GEMM_ALIASES = {"bf16": HIGH}


def checkpoint_name(path: str) -> str:
    """The Hugging Face checkpoint prefix of a model path (``embed`` -> ``model.embed_tokens``)."""
    if path == "lm_head" or path.startswith("lm_head."):
        return path
    if path == "embed" or path.startswith("embed."):
        return "model.embed_tokens" + path[len("embed") :]
    return f"model.{path}"


def keeps_high_precision(path: str, globs: tuple[str, ...] | list[str]) -> bool:
    """True when a ``keep_high_precision`` glob matches the model path or the checkpoint name."""
    names = (path, checkpoint_name(path))
    return any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)


# ---------------------------------------------------------------- weight formats
def weight_block(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int] | None:
    """The quantization block of ``weight [..., N, K]`` implied by its scale's shape."""
    n, k = weight.shape[-2], weight.shape[-1]
    shape = tuple(scale.shape)
    lead = tuple(weight.shape[:-2])
    if shape == (*lead, math.ceil(n / 128), math.ceil(k / 128)):
        return (128, 128)
    if shape == (*lead, n, 1):
        return (1, -1)
    if math.prod(shape) == 1:
        return None
    raise ConfigError(
        f"weight {list(weight.shape)} has a scale of shape {list(shape)}: no 128x128-block, row or tensor layout"
    )


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``: a cast for float weights, ``q * scale`` for FP8 / int8 ones."""
    if scale is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    if weight.dtype == torch.int8:  # W8A8 weights: one scale per output row
        return (weight.to(torch.float32) * scale.to(torch.float32)).to(dtype)
    block = weight_block(weight, scale)
    return ops.dequantize_fp8(weight, scale.reshape(()) if block is None else scale, block, dtype)


def convert_fp8_format(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express FP8 ``weight * scale`` in format ``fmt``.

    e4m3fn -> e4m3fnuz is exact: the same bits read as fnuz are worth half (its exponent
    bias is one larger), so the scales double; 0x80 (fn's -0) is fnuz's NaN and becomes 0.
    Other pairs dequantize and requantize with the same block."""
    target = FP8_DTYPES[fmt]
    if weight.dtype == target:
        return weight, scale
    if weight.dtype == torch.float8_e4m3fn and target == torch.float8_e4m3fnuz:
        bits = weight.view(torch.uint8)
        bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
        return bits.view(torch.float8_e4m3fnuz), scale * 2
    block = weight_block(weight, scale)
    dense = dequantize_weight(weight, scale, torch.float32)
    return ops.quantize_fp8(dense, block, fmt)


def _quantize(
    weight: torch.Tensor, scale: torch.Tensor | None, mode: str, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (float, FP8 or int8) in quantized ``mode``: FP8 ``fmt`` with the block of
    ``mode``, or int8 with one scale per output row (``[..., N, 1]``)."""
    if mode == INT8:
        if weight.dtype == torch.int8 and scale is not None:
            return weight, scale  # already W8A8: keep the checkpoint's bits
        return ops.quantize_int8(dequantize_weight(weight, scale, torch.float32))
    block = WEIGHT_BLOCKS[mode]
    if scale is not None and weight.dtype in FP8_FORMAT_OF and weight_block(weight, scale) == block:
        return convert_fp8_format(weight, scale, fmt)  # already in this layout: keep the checkpoint's bits
    dense = dequantize_weight(weight, scale, torch.float32)
    q, s = ops.quantize_fp8(dense, block, fmt)
    return q, s


def stored_mode(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """The gemm mode a weight is stored in: ``high``, ``int8`` or an ``fp8-*`` mode."""
    if scale is None:
        return HIGH
    if weight.dtype == torch.int8:
        return INT8
    return {(128, 128): "fp8-block", (1, -1): "fp8-row", None: "fp8-tensor"}[weight_block(weight, scale)]


def _weights(module: nn.Module) -> list[tuple[str, str]]:
    """``(weight, scale)`` attribute names of a ``Linear`` or ``RoutedExperts``."""
    return [("weight", "weight_scale")] if hasattr(module, "weight_scale") else [("w13", "w13_scale"), ("w2", "w2_scale")]


def fp8_redirect(capabilities: Any = None) -> tuple[str, str] | None:
    """``(mode, why)`` when the backend has no FP8 GEMM units (``Capabilities.fp8_gemm_native``
    False) and names another mode for FP8 checkpoints (``fp8_checkpoint_gemm``: ``int8`` or
    ``high``/``bf16``); None when FP8 weights run as stored. ``capabilities``: default the
    active backend's."""
    if capabilities is None:
        from dshal.runtime import current

        capabilities = current().backend.capabilities()
    if getattr(capabilities, "fp8_gemm_native", True):
        return None
    target = GEMM_ALIASES.get(capabilities.fp8_checkpoint_gemm, capabilities.fp8_checkpoint_gemm)
    if target in WEIGHT_BLOCKS:
        return None
    return target, "this backend has no FP8 GEMM units (every FP8 path would be emulated)"


def resolve_gemm_mode(precision: PrecisionConfig, model: nn.Module, capabilities: Any = None) -> tuple[str, str]:
    """``(mode, why)``: the gemm mode ``precision.gemm`` means for the loaded ``model``
    (``auto`` resolved from the weights the checkpoint stored, ``bf16`` to ``high``). Under
    ``auto`` an FP8 checkpoint on a backend without FP8 GEMM units runs in the mode the
    backend names (:func:`fp8_redirect`; Ascend 910B: int8 W8A8). ``capabilities``: default
    the active backend's."""
    from dshal.model.model import Linear, RoutedExperts

    asked = precision.gemm
    if asked != AUTO:
        mode = GEMM_ALIASES.get(asked, asked)
        alias = f" ({asked!r} is the older name of {mode!r})" if mode != asked else ""
        why = "precision.gemm" + alias
        if mode != HIGH:
            why += ": quantized on load where the checkpoint stores another format"
        return mode, why
    stored: dict[str, set[str]] = {}
    for module in model.modules():
        if isinstance(module, (Linear, RoutedExperts)):
            for w_name, s_name in _weights(module):
                weight, scale = getattr(module, w_name), getattr(module, s_name)
                label = stored_mode(weight, scale)
                stored.setdefault(label, set()).add(str(FP8_FORMAT_OF.get(weight.dtype, weight.dtype)).replace("torch.", ""))
    quantized = sorted(m for m in stored if m != HIGH)
    if not quantized:
        on_disk = " + ".join(getattr(model, "checkpoint_weight_dtypes", None) or sorted(stored.get(HIGH, {"no"})))
        dtype = str(model.args.dtype).replace("torch.", "")
        return HIGH, (
            f"auto: the checkpoint stores {on_disk} weights: high precision, {dtype} "
            "(quantize on load only with precision.gemm: fp8-block | fp8-row | fp8-tensor | int8)"
        )
    mode = quantized[0]
    what = {"fp8-block": "FP8 weights with 128x128 block scales", INT8: "int8 weights with per-channel scales (W8A8)"}
    fmts = "" if mode == INT8 else f" ({' + '.join(sorted(stored[mode]))})"
    redirect = fp8_redirect(capabilities)
    if mode in WEIGHT_BLOCKS and redirect is not None:  # no FP8 GEMM units here: the backend's choice
        target, backend_why = redirect
        return target, (
            f"auto: the checkpoint stores {what.get(mode, mode + ' weights')}{fmts}; {backend_why}: "
            f"run as {target} ({'quantized on load' if target == INT8 else 'dequantized on load'})"
        )
    why = f"auto: the checkpoint stores {what.get(mode, mode + ' weights')}{fmts}, run as stored"
    if HIGH in stored:  # e.g. FP8 gate/up parts whose 128-row blocks do not tile the fused weight
        why += f"; weights it stores in (or the loader dequantized to) {' + '.join(sorted(stored[HIGH]))} stay so"
    return mode, why


def resolve_fp8_format(precision: PrecisionConfig) -> str:
    """``fp8_format`` with ``auto`` replaced by the active backend's native E4M3."""
    if precision.fp8_format != "auto":
        return precision.fp8_format
    from dshal.runtime import current

    return current().backend.native_e4m3()


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=False))


def apply_precision(
    model: nn.Module, precision: PrecisionConfig, dtype: torch.dtype | None = None, capabilities: Any = None
) -> dict[str, str]:
    """Convert every ``Linear`` and ``RoutedExperts`` of ``model`` in place to the policy's
    format; return ``{module path: mode}`` (mode: ``high``, ``int8`` or an ``fp8-*`` gemm mode).

    ``auto`` keeps each weight in the format the checkpoint stored it in (FP8 only converted
    to the backend's E4M3 variant, or run as the backend's choice where it has no FP8 GEMM
    units: :func:`fp8_redirect`); the chosen mode and why are kept as
    ``model.precision_choice`` for ``describe()``. ``dtype``: the high-precision dtype
    (default: the model's ``args.dtype``); ``capabilities``: default the active backend's."""
    from dshal.model.model import Linear, RoutedExperts

    dtype = dtype or model.args.dtype
    fmt = resolve_fp8_format(precision)
    mode_all, why = resolve_gemm_mode(precision, model, capabilities)
    redirect = fp8_redirect(capabilities) if precision.gemm == AUTO else None
    plan: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (Linear, RoutedExperts)):
            continue
        high = keeps_high_precision(path, precision.keep_high_precision)
        for w_name, s_name in _weights(module):
            weight, scale = getattr(module, w_name), getattr(module, s_name)
            mode = mode_all
            if precision.gemm == AUTO:
                mode = stored_mode(weight, scale)
                if redirect is not None and mode in WEIGHT_BLOCKS:
                    mode = redirect[0]
            elif isinstance(module, RoutedExperts) and mode in WEIGHT_BLOCKS:
                mode = "fp8-block"  # moe_experts takes FP8 experts with 128x128 block scales only
            if high:
                mode = HIGH
            if mode == HIGH:
                weight, scale = dequantize_weight(weight, scale, dtype), None
            else:
                weight, scale = _quantize(weight, scale, mode, fmt)
            _set(module, w_name, weight)
            _set(module, s_name, scale)
            plan[path] = mode
    model.precision_choice = {"gemm": precision.gemm, "mode": mode_all, "why": why}
    return plan


# ---------------------------------------------------------------- describe()
def precision_summary(choice: dict[str, Any]) -> str:
    """One line for ``dshal run`` / ``dshal profile``: the gemm mode chosen and why."""
    return f"precision: {choice.get('mode')} ({choice.get('why')})"


def precision_label(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """How a weight is stored: ``float32``, ``bfloat16``, ``fp8-block e4m3fn``, ``int8-row``..."""
    if scale is None:
        return str(weight.dtype).replace("torch.", "")
    if weight.dtype == torch.int8:
        return "int8-row"
    block = weight_block(weight, scale)
    kind = {(128, 128): "fp8-block", (1, -1): "fp8-row", None: "fp8-tensor"}[block]
    return f"{kind} {FP8_FORMAT_OF.get(weight.dtype, weight.dtype)}"


def _group_of(path: str, dense_layer: bool) -> str:
    if path.startswith("embed"):
        return "embed"
    if path.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in path:
        return "attention"
    if ".mlp.gate" == path[path.find(".mlp.") :]:
        return "router gate"
    if ".mlp.shared_experts" in path:
        return "shared experts"
    if ".mlp.experts" in path:
        return "routed experts"
    return "dense mlp" if dense_layer else "mlp"


def kv_cache_report(model: nn.Module) -> dict[str, Any]:
    """KV bytes per token (absorbed latent vs naive per-head keys/values) and the saving
    of dynamic attention (only ``global_tokens + window`` tokens stay cached)."""
    a = model.args
    elem = torch.empty((), dtype=a.dtype).element_size()
    heads = model.layers[0].self_attn.kv_b_proj.weight.shape[0] // (a.qk_nope_head_dim + a.v_head_dim)
    layers = len(model.layers)
    absorbed = layers * (a.kv_lora_rank + a.qk_rope_head_dim) * elem
    naive = layers * heads * (a.qk_head_dim + a.v_head_dim) * elem
    per_token = absorbed if a.mla_mode == "absorb" else naive
    report: dict[str, Any] = {
        "mode": a.mla_mode,
        "bytes_per_token": per_token,
        "bytes_per_token_absorbed": absorbed,
        "bytes_per_token_naive": naive,
        "absorbed_saving": 1 - absorbed / naive,
        "window": a.attention_window,
        "global_tokens": a.attention_global_tokens if a.attention_window else 0,
    }
    if a.attention_window is not None:
        kept = a.attention_global_tokens + a.attention_window
        context = a.max_position_embeddings
        effective = per_token * min(1.0, kept / context)
        report.update(
            max_cached_tokens=kept,
            context=context,
            bytes_per_token_at_context=effective,
            bytes_saved_per_token=per_token - effective,
        )
    return report


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What ``Transformer.describe()`` returns (JSON-friendly)."""
    from dshal.model.model import Gate, Linear, RoutedExperts

    a = model.args
    layers = []
    groups: dict[str, set[str]] = {"embed": {str(a.dtype).replace("torch.", "")}}
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            label = precision_label(module.weight, module.weight_scale)
            spans = getattr(module, "act_quant", None)  # a TP shard whose quantization groups span ranks
            if spans is not None:
                kept = module.weight_scale is not None
                label = f"{spans.mode} {spans.fmt} ({'input quantized across ranks' if kept else 'dequantized TP shard'})"
        elif isinstance(module, RoutedExperts):
            label = precision_label(module.w13, module.w13_scale)
        elif isinstance(module, Gate):
            label = "float32"
        else:
            continue
        layer_id = int(path.split(".")[1]) if path.startswith("layers.") else None
        dense = layer_id is not None and not a.is_moe_layer(layer_id)
        groups.setdefault(_group_of(path, dense), set()).add(label)
        if layer_id is not None:
            while len(layers) <= layer_id:
                n = len(layers)
                layers.append({"layer": n, "ffn": "moe" if a.is_moe_layer(n) else "dense", "precision": {}})
            layers[layer_id]["precision"][path.split(".", 2)[2]] = label
    n_params = sum(p.numel() for p in model.parameters())
    choice = getattr(model, "precision_choice", None) or {"gemm": None, "mode": None, "why": "no precision policy applied"}
    kv_b = model.layers[0].self_attn.kv_b_proj if len(model.layers) else None
    return {
        "dtype": str(a.dtype).replace("torch.", ""),
        "precision": {
            **choice,
            # MLA multiplies kv_b_proj's dequantized weight with the latent (never quantized).
            "weight_only": ["kv_b_proj"] if kv_b is not None and kv_b.weight_scale is not None else [],
        },
        "parameters": n_params,
        "layers_total": a.num_hidden_layers,
        "dense_layers": min(a.first_k_dense_replace, a.num_hidden_layers),
        "precision_groups": {g: " + ".join(sorted(v)) for g, v in groups.items()},
        "layers": layers,
        "kv_cache": kv_cache_report(model),
    }


__all__ = [
    "apply_precision",
    "checkpoint_name",
    "resolve_gemm_mode",
    "stored_mode",
    "convert_fp8_format",
    "dequantize_weight",
    "describe_model",
    "keeps_high_precision",
    "kv_cache_report",
    "precision_label",
    "precision_summary",
    "resolve_fp8_format",
    "weight_block",
]
