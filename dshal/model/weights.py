"""How a weight is stored: its quantization block, its gemm mode and label, and the way
back to a dense tensor. Below the model core (:mod:`dshal.model.model` dequantizes with
it) and the precision policy (:mod:`dshal.model.precision` chooses the formats)."""

from __future__ import annotations

import contextlib
import math

import torch

from dshal import ops
from dshal.errors import ConfigError
from dshal.ops.quant import SCALE_DTYPES, e4m3fn_bits_as_e4m3fnuz, fp8_block_to_int8_rows
from dshal.ops.spec import FP8_DTYPES, FP8_FORMAT_OF
from dshal.runtime import reference_ops

#: gemm mode -> FP8 quantization block of a weight [N, K] (None = one scale).
WEIGHT_BLOCKS: dict[str, tuple[int, int] | None] = {"fp8-block": (128, 128), "fp8-row": (1, -1), "fp8-tensor": None}
HIGH = "high"
INT8 = "int8"


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


def int8_rows(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (float, or FP8 with its scale) as int8 with one scale per output row
    ``(int8 [..., N, K], float32 [..., N, 1])``. An FP8 weight with 128x128 block scales on
    the host (a checkpoint converted for a device that cannot hold float8) takes
    :func:`dshal.ops.quant.fp8_block_to_int8_rows`: the references' bits, in cache-sized
    slabs; everything else dequantizes, then ``ops.quantize_int8``."""
    if (
        scale is not None
        and weight.device.type == "cpu"
        and weight.dtype in FP8_FORMAT_OF
        and scale.dtype in SCALE_DTYPES
        and weight_block(weight, scale) == (128, 128)
    ):
        return fp8_block_to_int8_rows(weight, scale)
    return ops.quantize_int8(dequantize_weight(weight, scale, torch.float32))


def convert_fp8_format(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express FP8 ``weight * scale`` in format ``fmt``.

    e4m3fn -> e4m3fnuz is exact (:func:`~dshal.ops.quant.e4m3fn_bits_as_e4m3fnuz`: the same
    bits read as fnuz are worth half, so the scales double; -0 becomes 0, NaN stays NaN).
    Other pairs dequantize and requantize with the same block."""
    target = FP8_DTYPES[fmt]
    if weight.dtype == target:
        return weight, scale
    if weight.dtype == torch.float8_e4m3fn and target == torch.float8_e4m3fnuz:
        return e4m3fn_bits_as_e4m3fnuz(weight), scale * 2
    block = weight_block(weight, scale)
    dense = dequantize_weight(weight, scale, torch.float32)
    return ops.quantize_fp8(dense, block, fmt)


def conversion_ops(weight: torch.Tensor, device: torch.device | str | None) -> contextlib.AbstractContextManager[None]:
    """The ops that convert ``weight`` (dequantize, quantize) for a model on ``device``: the
    active runtime's, or, for a weight held off that device (an FP8 payload the loader kept on
    the host for a backend that cannot hold float8 tensors, ``Capabilities.fp8_storage``), each
    op's reference, which runs wherever the weight is (the backend's providers take only
    tensors on its device). ``device`` None: the active runtime's ops."""
    if device is None or weight.device.type == torch.device(device).type:
        return contextlib.nullcontext()
    return reference_ops()


def stored_mode(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """The gemm mode a weight is stored in: ``high``, ``int8`` or an ``fp8-*`` mode."""
    if scale is None:
        return HIGH
    if weight.dtype == torch.int8:
        return INT8
    return {(128, 128): "fp8-block", (1, -1): "fp8-row", None: "fp8-tensor"}[weight_block(weight, scale)]


def precision_label(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """How a weight is stored: ``float32``, ``bfloat16``, ``fp8-block e4m3fn``, ``int8-row``..."""
    if scale is None:
        return str(weight.dtype).replace("torch.", "")
    if weight.dtype == torch.int8:
        return "int8-row"
    block = weight_block(weight, scale)
    kind = {(128, 128): "fp8-block", (1, -1): "fp8-row", None: "fp8-tensor"}[block]
    return f"{kind} {FP8_FORMAT_OF.get(weight.dtype, weight.dtype)}"


__all__ = [
    "HIGH",
    "INT8",
    "WEIGHT_BLOCKS",
    "conversion_ops",
    "convert_fp8_format",
    "dequantize_weight",
    "int8_rows",
    "precision_label",
    "stored_mode",
    "weight_block",
]
