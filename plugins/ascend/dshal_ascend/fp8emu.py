"""FP8 without FP8 hardware: bit-exact decode and round-to-grid in plain integer/float32 torch.

Ascend 910B has no FP8 units, and whether a CANN build can even *cast* ``float8_*`` tensors
on the device is not documented for 910B. So the emulated FP8 path never casts: it reads
the raw bytes (``q.view(torch.uint8)``, a metadata-only view) and decodes them with integer
ops, and it simulates FP8 rounding on float32 values. Both are pure torch, exact, and tested
against torch's own casts on the CPU for every code point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dshal.plugin import FP8_FORMAT_OF


@dataclass(frozen=True)
class Fp8Format:
    """Bit layout of one FP8 format."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias


FORMATS = {
    "e4m3fn": Fp8Format("e4m3fn", 4, 3, 7, 448.0),
    "e4m3fnuz": Fp8Format("e4m3fnuz", 4, 3, 8, 240.0),
    "e5m2": Fp8Format("e5m2", 5, 2, 15, 57344.0),
}


def format_of(dtype: torch.dtype) -> Fp8Format:
    """The :class:`Fp8Format` of an FP8 torch dtype."""
    return FORMATS[FP8_FORMAT_OF[dtype]]


def decode_fp8(q: torch.Tensor) -> torch.Tensor:
    """FP8 tensor -> float32 with the same values, using only integer and float32 ops."""
    fmt = format_of(q.dtype)
    bits = q.view(torch.uint8).to(torch.int32)
    mb = fmt.mantissa_bits
    exponent = (bits >> mb) & ((1 << fmt.exponent_bits) - 1)
    mantissa = (bits & ((1 << mb) - 1)).to(torch.float32)
    # normal: (2^mb + m) * 2^(e - bias - mb); subnormal (e = 0): m * 2^(1 - bias - mb)
    scale_exp = torch.where(exponent == 0, 1, exponent) - fmt.bias - mb
    significand = torch.where(exponent == 0, mantissa, mantissa + (1 << mb))
    value = significand * torch.exp2(scale_exp.to(torch.float32))
    top = (1 << fmt.exponent_bits) - 1
    if fmt.name == "e4m3fn":  # no infinities; S.1111.111 is NaN
        value = torch.where((exponent == top) & (mantissa == (1 << mb) - 1), torch.nan, value)
    elif fmt.name == "e4m3fnuz":  # no infinities, no -0; 0x80 is the only NaN
        value = torch.where(bits == 0x80, torch.nan, value)
    else:  # IEEE-like e5m2
        special = torch.where(mantissa == 0, torch.inf, torch.nan)
        value = torch.where(exponent == top, special, value)
    return torch.where((bits & 0x80) != 0, -value, value)


def round_to_fp8_grid(v: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """float32 ``v`` rounded to the nearest ``fmt`` value (ties to even), saturating at
    +-max; NaN stays NaN. Equals ``v.clamp(-max, max).to(fp8).float()`` bit for bit."""
    fmt = FORMATS[fmt_name]
    v = v.to(torch.float32).clamp(-fmt.max, fmt.max)
    mag = v.abs()
    exponent = torch.floor(torch.log2(mag)).clamp(min=fmt.min_normal_exponent, max=fmt.bias + 1)
    # log2 may land one off next to powers of two; correct it exactly.
    exponent = torch.where(torch.exp2(exponent) > mag, exponent - 1, exponent)
    exponent = torch.where(torch.exp2(exponent + 1) <= mag, exponent + 1, exponent)
    exponent = exponent.clamp(min=fmt.min_normal_exponent)
    quantum = torch.exp2(exponent - fmt.mantissa_bits)
    return torch.round(v / quantum) * quantum


def fake_quantize_fp8(x2: torch.Tensor, block: tuple[int, int] | None, fmt_name: str) -> torch.Tensor:
    """Quantize-dequantize ``x2 [M, K]`` as ``quantize_fp8(x2, block, fmt)`` followed by
    ``dequantize_fp8`` would, in float32, without any FP8 dtype. ``block`` is ``(1, 128)``,
    ``(1, -1)`` (rowwise) or None (tensorwise): the activation granularities of ``linear``."""
    fmt = FORMATS[fmt_name]
    m, k = x2.shape
    xf = x2.to(torch.float32)
    if block is None:
        groups, pad = xf.reshape(1, 1, m * k), 0
    else:
        width = k if block[1] == -1 else block[1]
        count = -(-k // width) if k else 0
        pad = count * width - k
        groups = F.pad(xf, (0, pad)).reshape(m, count, width)
    finite = torch.where(torch.isfinite(groups), groups.abs(), torch.zeros_like(groups))
    scale = finite.amax(dim=-1, keepdim=True) / fmt.max if groups.shape[-1] else torch.ones(groups.shape[:-1] + (1,))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    out = round_to_fp8_grid(groups / scale, fmt_name) * scale
    if block is None:
        return out.reshape(m, k)
    return out.reshape(m, -1)[:, :k]
