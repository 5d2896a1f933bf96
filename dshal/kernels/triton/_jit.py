"""``@triton.jit`` helpers shared by the kernels (imported only by kernel modules).

Several exist because a plain float cast is not rounded the same everywhere: the Triton
interpreter truncates float32 -> bfloat16 and mis-rounds float -> FP8 (NaN included),
while GPUs round to nearest even. Rounding in float32 arithmetic first makes the final
cast exact, so results are bit-identical to torch's casts on every hardware and under the
interpreter. FP8 results are stored as their bytes (``fp8_codes``) for the same reason.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Smallest normal float32: a scale never goes below it (amax / fp8_max may underflow).
#: A ``tl.constexpr`` instance: compiled kernels may read no other globals (the interpreter may).
FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def cast_rne(v, DTYPE: tl.constexpr):
    """``v`` cast to ``DTYPE``, rounding to nearest even (also for bfloat16)."""
    if DTYPE == tl.bfloat16:
        v = v.to(tl.float32)
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the high 16 bits
        v = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))  # NaN stays NaN
    return v.to(DTYPE)


@triton.jit
def finite_abs(x):
    """``|x|`` with NaN and +-Inf replaced by 0, so they do not decide a block's scale."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def round_to_fp8_grid(v, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr):
    """Round float32 ``v`` (finite, within the format's range) to the nearest FP8 value,
    ties to even, returned as float32. Exact: scaling by the grid step is a power of two."""
    bits = v.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)  # subnormals share MIN_EXP's step
    step = ((exp - MANT_BITS + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - exp + MANT_BITS) << 23).to(tl.float32, bitcast=True)
    r = v * inv_step
    r = (r + 12582912.0) - 12582912.0  # 1.5 * 2**23: float32 add rounds to an integer, ties to even
    out = r * step
    if NO_NEG_ZERO:
        out = tl.where(out == 0.0, 0.0, out)
    else:  # keep the sign of values that round to zero, as a direct cast does
        out = (out.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return out


@triton.jit
def scale_from_amax(amax, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """``amax / FP8_MAX`` (at least float32's tiny; 1 where amax is 0), rounded up to a power
    of two when UE8M0."""
    scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32)), FLOAT32_TINY)
    scale = tl.where(amax > 0.0, scale, 1.0)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        exp_field = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exp_field << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def quantize_with_scale(
    x, scale, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr
):
    """``x / scale`` clamped to the format's range (+-Inf saturates) and rounded onto its
    grid, as float32; NaN stays NaN."""
    # div_rn: IEEE division, as torch does (a plain "/" may lower to an approximate divide)
    y = tl.math.div_rn(x, scale)
    q = round_to_fp8_grid(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), MANT_BITS, MIN_EXP, NO_NEG_ZERO)
    return tl.where(y != y, y, q)


@triton.jit
def fp8_codes(q, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, NAN_CODE: tl.constexpr):
    """The FP8 bytes (uint8) of float32 ``q`` already on the format's grid (NaN allowed)."""
    if MANT_BITS == 3:
        if FP8_MAX == 448.0:
            fp8 = q.to(tl.float8e4nv)
        else:
            fp8 = q.to(tl.float8e4b8)
    else:
        if NAN_CODE == 0x80:
            fp8 = q.to(tl.float8e5b16)
        else:
            fp8 = q.to(tl.float8e5)
    return tl.where(q != q, NAN_CODE, fp8.to(tl.uint8, bitcast=True))


@triton.jit
def quantize_to_codes(
    x, scale,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    NAN_CODE: tl.constexpr,
):  # fmt: skip
    """``quantize_with_scale`` then ``fp8_codes``: the stored bytes of ``x / scale``."""
    q = quantize_with_scale(x, scale, FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO)
    return fp8_codes(q, FP8_MAX, MANT_BITS, NAN_CODE)
