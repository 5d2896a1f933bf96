"""FP8 checkpoints on gfx942 (MI300X): e4m3fn weights re-expressed as e4m3fnuz.

The two formats share the bit layout (1 sign, 4 exponent, 3 mantissa bits) but FNUZ's
exponent bias is 8 instead of 7, so the same bits mean exactly half the value. Keeping the
bits and doubling the scale therefore dequantizes to the same numbers, with no rounding.
Two bit patterns differ in meaning: ``0x80`` is -0 in e4m3fn but NaN in FNUZ (it becomes
+0), and e4m3fn's NaNs (``0x7F``/``0xFF``) would read as +-240 in FNUZ (they become FNUZ's
NaN, ``0x80``).
"""

from __future__ import annotations

import torch

from dshal import DeviceError, DTypeError
from dshal.plugin import e4m3fn_bits_as_e4m3fnuz


def e4m3fn_to_e4m3fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an e4m3fn tensor and its dequantization scale (e.g. DeepSeek-V3's
    ``weight_scale_inv``, any shape) to e4m3fnuz with the scale doubled.

    ``weight.float() * scale`` (broadcast per block) equals the result's
    ``q.float() * (2 * scale)`` exactly, except that -0 becomes +0 and NaN stays NaN.
    Raises :class:`~dshal.DTypeError` for other dtypes.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise DTypeError(f"e4m3fn_to_e4m3fnuz: argument 'weight' is {got}, expected torch.float8_e4m3fn")
    if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point or scale.dtype.itemsize == 1:
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise DTypeError(f"e4m3fn_to_e4m3fnuz: argument 'scale' is {got}, expected a floating-point tensor (float32, bfloat16...)")
    if scale.device != weight.device:
        raise DeviceError(f"e4m3fn_to_e4m3fnuz: argument 'scale' is on {scale.device}, expected {weight.device} (the weight's)")
    return e4m3fn_bits_as_e4m3fnuz(weight), scale * 2
