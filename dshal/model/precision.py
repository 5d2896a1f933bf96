"""The precision policy: a transform that sets each linear's weight format (the formats
themselves: :mod:`dshal.model.weights`; the per-layer report ``model.describe()`` prints:
:func:`dshal.model.model.describe_model`).

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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dshal import ops
from dshal.config import FP8_FORMATS, PrecisionConfig, precision_config
from dshal.errors import ConfigError
from dshal.model.model import Linear, RoutedExperts, describe_model, kv_cache_report
from dshal.model.weights import (
    HIGH,
    INT8,
    WEIGHT_BLOCKS,
    conversion_ops,
    convert_fp8_format,
    dequantize_weight,
    int8_rows,
    precision_label,
    stored_mode,
    weight_block,
)
from dshal.ops.spec import FP8_FORMAT_OF
from dshal.runtime import current

AUTO = "auto"
#: Older names of gemm modes, still accepted in configs.
GEMM_ALIASES = {"bf16": HIGH}


def checkpoint_name(path: str) -> str:
    """The Hugging Face checkpoint prefix of a model path (``embed`` -> ``model.embed_tokens``,
    the multi-token-prediction layer ``mtp.61`` -> ``model.layers.61``)."""
    if path == "lm_head" or path.startswith("lm_head."):
        return path
    if path == "embed" or path.startswith("embed."):
        return "model.embed_tokens" + path[len("embed") :]
    if path.startswith("mtp."):
        return "model.layers." + path[len("mtp.") :]
    return f"model.{path}"


def keeps_high_precision(path: str, globs: tuple[str, ...] | list[str]) -> bool:
    """True when a ``keep_high_precision`` glob matches the model path or the checkpoint name."""
    names = (path, checkpoint_name(path))
    return any(fnmatch.fnmatchcase(name, glob) for name in names for glob in globs)


def _quantize(
    weight: torch.Tensor, scale: torch.Tensor | None, mode: str, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (float, FP8 or int8) in quantized ``mode``: FP8 ``fmt`` with the block of
    ``mode``, or int8 with one scale per output row (``[..., N, 1]``)."""
    if mode == INT8:
        if weight.dtype == torch.int8 and scale is not None:
            return weight, scale  # already W8A8: keep the checkpoint's bits
        return per_expert(int8_rows, weight, scale)
    block = WEIGHT_BLOCKS[mode]
    if scale is not None and weight.dtype in FP8_FORMAT_OF and weight_block(weight, scale) == block:
        return convert_fp8_format(weight, scale, fmt)  # already in this layout: keep the checkpoint's bits
    def convert(w: torch.Tensor, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.quantize_fp8(dequantize_weight(w, s, torch.float32), block, fmt)

    # per tensor (block None), one scale spans the whole stack: no expert can be quantized alone
    return convert(weight, scale) if block is None else per_expert(convert, weight, scale)


def per_expert(
    convert: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``convert(weight, scale) -> (q, q_scale)`` run one expert at a time on a stacked
    ``[E, N, K]`` weight (its ``[E, ...]`` scale sliced alike; any other, e.g. one value, shared), into
    outputs allocated once: the same bits as one call on the stack, whose float32 temporaries
    were 3-15x the stack (a DeepSeek-V3 layer's w13 is 14 GiB in bf16). 2-D weights: one call."""
    if weight.dim() != 3 or weight.shape[0] <= 1:
        return convert(weight, scale)
    sliced = scale is not None and scale.dim() == weight.dim() and scale.shape[0] == weight.shape[0]
    q = s = None
    for e in range(weight.shape[0]):
        part_scale = scale[e : e + 1] if sliced else scale
        q_e, s_e = convert(weight[e : e + 1], part_scale)
        if q is None:
            q = q_e.new_empty((weight.shape[0], *q_e.shape[1:]))
            s = s_e.new_empty((weight.shape[0], *s_e.shape[1:]))
        q[e : e + 1], s[e : e + 1] = q_e, s_e
    return q, s


#: Why ``auto`` does not run an FP8 checkpoint as stored, per missing capability.
NO_FP8_UNITS = "this backend has no FP8 GEMM units (every FP8 path would be emulated)"
NO_FP8_STORAGE = "this backend cannot hold float8 tensors on its device"


def fp8_redirect(capabilities: Any = None) -> tuple[str, str] | None:
    """``(mode, why)`` when the backend has no FP8 GEMM units (``Capabilities.fp8_gemm_native``
    False) and names another mode for FP8 checkpoints (``fp8_checkpoint_gemm``: ``int8`` or
    ``high``/``bf16``), or cannot hold float8 tensors on its device (``fp8_storage`` False:
    then high precision where it names an FP8 mode); None when FP8 weights run as stored.
    ``capabilities``: default the active backend's."""
    if capabilities is None:
        capabilities = current().backend.capabilities()
    units, storage = capabilities.fp8_gemm_native, capabilities.fp8_storage
    if units and storage:
        return None
    target = GEMM_ALIASES.get(capabilities.fp8_checkpoint_gemm, capabilities.fp8_checkpoint_gemm)
    if target in WEIGHT_BLOCKS:
        if storage:
            return None
        target = HIGH
    return target, "; ".join(why for ok, why in ((units, NO_FP8_UNITS), (storage, NO_FP8_STORAGE)) if not ok)


def refuse_fp8_without_storage(precision: PrecisionConfig, capabilities: Any = None, backend: str | None = None) -> None:
    """A :class:`~dshal.ConfigError` when ``precision.gemm`` asks for an FP8 mode on a backend
    that cannot hold float8 tensors on its device (``Capabilities.fp8_storage`` False), naming
    what to use instead. ``capabilities`` / ``backend`` (its name): default the active backend's."""
    mode = GEMM_ALIASES.get(precision.gemm, precision.gemm)
    if mode not in WEIGHT_BLOCKS:
        return
    if capabilities is None:
        active = current().backend
        capabilities, backend = active.capabilities(), backend or active.name
    if capabilities.fp8_storage:
        return
    redirect = fp8_redirect(capabilities)
    auto_runs = redirect[0] if redirect is not None else HIGH
    who = f"backend {backend!r}" if backend else f"this backend ({capabilities.device_name})"
    raise precision.error(
        "gemm",
        f"precision.gemm: {precision.gemm!r} keeps float8 weights on the device, but {who} cannot hold "
        f"float8 tensors on its device (it declares Capabilities.fp8_storage False); use precision.gemm: "
        f"auto (an FP8 checkpoint then runs as {auto_runs}, converted on the host), int8 (W8A8) or high",
    )


def refuse_undeclared_fp8_format(
    fmt: str, capabilities: Any = None, backend: str | None = None, precision: PrecisionConfig | None = None
) -> None:
    """A :class:`~dshal.ConfigError` when FP8 weights would be stored as ``fmt`` on a backend
    that does not declare it in ``Capabilities.fp8_formats``: its ops would serve that format
    by a fallback or not at all (gfx942 computes e4m3fnuz only), which the first forward, or
    only a profile, would show. ``capabilities`` / ``backend`` (its name): default the active
    backend's. ``precision``: the policy that chose ``fmt`` (the error then names the config
    file and line of its ``fp8_format``, or of its ``gemm`` where the format was left auto)."""
    if capabilities is None:
        active = current().backend
        capabilities, backend = active.capabilities(), backend or active.name
    declared = tuple(capabilities.fp8_formats)
    if fmt in declared:
        return
    who = f"backend {backend!r}" if backend else f"this backend ({capabilities.device_name})"
    # e5m2 is a format some ops take, not one precision.fp8_format stores weights in
    storable = [f for f in declared if f in FP8_FORMATS]
    if storable:
        native = capabilities.native_e4m3
        fix = " or ".join(([f"auto ({native})"] if native in storable else [])
                          + [f for f in storable if f != native])
        fix = f"precision.fp8_format: {fix}"
    else:
        fix = "precision.gemm: high (or int8, W8A8)"
    message = (f"precision.fp8_format: FP8 weights would be stored as {fmt!r}, but {who} declares the FP8 formats "
               f"{list(declared)} (Capabilities.fp8_formats); use {fix}")
    if precision is None:
        raise ConfigError(message)
    raise precision.error("fp8_format" if "fp8_format" in precision.origins else "gemm", message)


def refuse_undeclared_fp8_before_reading(model: nn.Module, precision: PrecisionConfig) -> None:
    """:func:`refuse_undeclared_fp8_format` for an explicit FP8 ``precision.gemm`` on the
    not-yet-loaded ``model`` (meta), before any weight is read, where some linear would store
    FP8 (not every one kept in high precision). Under ``auto`` the weights decide: the check
    then waits for :func:`apply_precision`."""
    if GEMM_ALIASES.get(precision.gemm, precision.gemm) not in WEIGHT_BLOCKS:
        return
    quantized = [path for path, module in model.named_modules()
                 if isinstance(module, (Linear, RoutedExperts)) and not keeps_high_precision(path, precision.keep_high_precision)]
    if quantized:
        refuse_undeclared_fp8_format(resolve_fp8_format(precision), precision=precision)


def resolve_gemm_mode(precision: PrecisionConfig, model: nn.Module, capabilities: Any = None) -> tuple[str, str]:
    """``(mode, why)``: the gemm mode ``precision.gemm`` means for the loaded ``model``
    (``auto`` resolved from the weights the checkpoint stored, ``bf16`` to ``high``). Under
    ``auto`` an FP8 checkpoint on a backend without FP8 GEMM units runs in the mode the
    backend names (:func:`fp8_redirect`; Ascend 910B: int8 W8A8). ``capabilities``: default
    the active backend's."""
    asked = precision.gemm
    if asked != AUTO:
        refuse_fp8_without_storage(precision, capabilities)
        mode = GEMM_ALIASES.get(asked, asked)
        alias = f" ({asked!r} is the older name of {mode!r})" if mode != asked else ""
        why = "precision.gemm" + alias
        if mode != HIGH:
            why += ": quantized on load where the checkpoint stores another format"
        return mode, why
    stored: dict[str, set[str]] = {}
    for module in model.modules():
        if isinstance(module, (Linear, RoutedExperts)):
            for w_name, s_name in module.weight_pairs:
                weight, scale = getattr(module, w_name), getattr(module, s_name)
                label = stored_mode(weight, scale)
                stored.setdefault(label, set()).add(str(FP8_FORMAT_OF.get(weight.dtype, weight.dtype)).replace("torch.", ""))
    quantized = sorted(m for m in stored if m != HIGH)
    if not quantized:
        on_disk = " + ".join(getattr(model, "checkpoint_weight_dtypes", None) or sorted(stored.get(HIGH, {"no"})))
        dtype = str(model.args.dtype).replace("torch.", "")
        block = model.args.weight_block_size
        if "float8" in on_disk and block is not None and tuple(block) != (128, 128):
            return HIGH, (
                f"auto: the checkpoint's FP8 weights have {block[0]}x{block[1]} blocks, which the FP8 ops do not "
                f"take (128x128): dequantized on load, high precision, {dtype} "
                "(precision.gemm: fp8-block re-quantizes them per 128x128 block on load)"
            )
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
    return current().backend.native_e4m3()


def _set(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    setattr(module, name, None if value is None else nn.Parameter(value, requires_grad=False))


def apply_precision(
    model: nn.Module,
    precision: PrecisionConfig,
    dtype: torch.dtype | None = None,
    capabilities: Any = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Convert every ``Linear`` and ``RoutedExperts`` of ``model`` in place to the policy's
    format; return ``{module path: mode}`` (mode: ``high``, ``int8`` or an ``fp8-*`` gemm mode).

    ``auto`` keeps each weight in the format the checkpoint stored it in (FP8 only converted
    to the backend's E4M3 variant, or run as the backend's choice where it has no FP8 GEMM
    units or cannot hold float8 tensors: :func:`fp8_redirect`); the chosen mode and why are kept
    as ``model.precision_choice`` for ``describe()``. ``dtype``: the high-precision dtype
    (default: the model's ``args.dtype``); ``capabilities``: default the active backend's.
    ``device``: the model's device; a weight held elsewhere (an FP8 payload the loader kept on
    the host: ``Capabilities.fp8_storage`` False) is converted where it is, by the op references
    (:func:`~dshal.model.weights.conversion_ops`), and stays there for
    :func:`dshal.model.loader.place_on_device`. None: every weight by the active runtime's ops.
    ``progress(done, total)`` is told after each module (a V3 checkpoint converted on the
    host takes most of a load: the bar moves with it)."""
    precision = precision_config(precision)
    dtype = dtype or model.args.dtype
    fmt = resolve_fp8_format(precision)
    mode_all, why = resolve_gemm_mode(precision, model, capabilities)
    redirect = fp8_redirect(capabilities) if precision.gemm == AUTO else None
    plan: dict[str, str] = {}
    fmt_checked = False
    converted = [(path, module) for path, module in model.named_modules() if isinstance(module, (Linear, RoutedExperts))]
    for done, (path, module) in enumerate(converted, 1):
        high = keeps_high_precision(path, precision.keep_high_precision)
        for w_name, s_name in module.weight_pairs:
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
            elif mode in WEIGHT_BLOCKS and not fmt_checked:
                refuse_undeclared_fp8_format(fmt, capabilities, precision=precision)
                fmt_checked = True
            with conversion_ops(weight, device):
                if mode == HIGH:
                    weight, scale = dequantize_weight(weight, scale, dtype), None
                else:
                    weight, scale = _quantize(weight, scale, mode, fmt)
            _set(module, w_name, weight)
            _set(module, s_name, scale)
            plan[path] = mode
        if progress is not None:
            progress(done, len(converted))
    model.precision_choice = {"gemm": precision.gemm, "mode": mode_all, "why": why}
    if model.args.scale_fmt is not None and any(mode in WEIGHT_BLOCKS for mode in plan.values()):
        model.precision_choice["activation_scales"] = (
            f"float32, not the checkpoint's {model.args.scale_fmt!r} (quantization_config.scale_fmt): linear and "
            "moe_experts quantize activations inside the op with float32 scales (same FP8 format and blocks, "
            "another rounding grid)"
        )
    return plan


# ---------------------------------------------------------------- reporting
def precision_summary(choice: dict[str, Any]) -> str:
    """One line for ``dshal run`` / ``dshal profile``: the gemm mode chosen and why."""
    line = f"precision: {choice.get('mode')} ({choice.get('why')})"
    if choice.get("activation_scales"):
        line += f"; activation scales: {choice['activation_scales']}"
    return line


__all__ = [
    "apply_precision",
    "fp8_redirect",
    "refuse_fp8_without_storage",
    "refuse_undeclared_fp8_before_reading",
    "refuse_undeclared_fp8_format",
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
