"""Quantization ops: FP8 block/row/tensor quantize and dequantize, and symmetric int8.

Block layout (shared by every FP8 op): a block ``(bm, bk)`` tiles the last two dims of a
tensor ``[..., M, K]``; ``-1`` means "the whole dim"; ``None`` means one scale for the
whole tensor. Partial last blocks are allowed. A 1-D tensor ``[K]`` is one row, and its
scale drops the row dim (``[ceil(K/bk)]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from dshal.ops.examples import Draw, Example, fill_pattern
from dshal.ops.spec import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    FP8_FORMAT_OF,
    FP8_MAX,
    Cost,
    Output,
    check_same_device,
    check_tensor,
    fp8_dtype,
    op_spec,
)

FP8_DTYPE_LIST = tuple(FP8_DTYPES.values())
#: Dtypes a scale tensor may have (float64 only appears in float64 oracles).
SCALE_DTYPES = (torch.float32, torch.float64)
SCALE_FORMATS = (None, "ue8m0")


# ---------------------------------------------------------------- block helpers
def check_block(op: str, block: Any) -> None:
    """``block`` must be None or a pair of ints, each positive or -1."""
    if block is None:
        return
    ok = (
        isinstance(block, (tuple, list))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and (b > 0 or b == -1) for b in block)
    )
    if not ok:
        raise ArgumentError(
            f"{op}: argument 'block' is {block!r}, expected None (tensorwise) or a pair of ints, each > 0 or -1, "
            "e.g. (1, 128), (128, 128), (1, -1)"
        )


def _block_sizes(shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> tuple[int, int, int, int]:
    """(M, K, bm, bk) of a tensor shape viewed as ``[..., M, K]`` with ``-1`` resolved. A block
    longer than its dim is that dim: the same one block, without padding to its length."""
    m, k = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    bm = max(m, 1) if block[0] == -1 or block[0] > m else block[0]
    bk = max(k, 1) if block[1] == -1 or block[1] > k else block[1]
    return m, k, bm, bk


def scale_shape(shape: torch.Size | tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """Shape of the scale of a tensor of ``shape`` quantized with ``block``."""
    if block is None:
        return ()
    m, k, bm, bk = _block_sizes(shape, block)
    if len(shape) < 2:
        return (math.ceil(k / bk),)
    return (*shape[:-2], math.ceil(m / bm), math.ceil(k / bk))


def _blocked(x: torch.Tensor, bm: int, bk: int) -> torch.Tensor:
    """``x [..., M, K]`` as ``[..., Mb, bm, Kb, bk]``, zero-padded to whole blocks (a view
    when the dims divide and ``x`` is contiguous)."""
    m, k = x.shape[-2:]
    pad_m, pad_k = -m % bm, -k % bk
    if pad_m or pad_k:
        x = F.pad(x, (0, pad_k, 0, pad_m))
    return x.reshape(*x.shape[:-2], (m + pad_m) // bm, bm, (k + pad_k) // bk, bk)


def _unblocked(xb: torch.Tensor, m: int, k: int) -> torch.Tensor:
    lead = xb.shape[:-4]
    mb, bm, kb, bk = xb.shape[-4:]
    return xb.reshape(*lead, mb * bm, kb * bk)[..., :m, :k]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64 (the oracle), else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (exact, via frexp: s = m * 2**e with m in [0.5, 1))."""
    mantissa, exponent = torch.frexp(s)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(s), exponent)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN and +-Inf replaced by 0, so they do not decide a block's scale."""
    a = x.abs()
    return torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype))


def _scale_from_amax(amax: torch.Tensor, qmax: float, scale_fmt: str | None) -> torch.Tensor:
    """float32 scale = amax / qmax; all-zero blocks get 1; never 0, NaN or Inf. (DeepSeek-V3's
    ``act_quant`` raises amax to at least 1e-4 first: blocks below that get coarser scales
    there, and the same dequantized zeros for all-zero blocks; dshal keeps the exact amax.)"""
    scale = (amax / qmax).to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny  # amax / qmax may underflow float32
    scale = torch.where(amax > 0, scale.clamp(min=tiny), torch.ones((), dtype=torch.float32))
    if scale_fmt == "ue8m0":
        scale = _round_up_pow2(scale)
    return scale


# ---------------------------------------------------------------- quantize_fp8
@op_spec
def quantize_fp8(x, block=(1, 128), fmt="e4m3", scale_fmt=None):
    """Quantize ``x [..., M, K]`` to FP8 with one float32 scale per block.

    ``block``: ``(1, 128)`` -> scale ``[..., M, ceil(K/128)]`` (activations);
    ``(128, 128)`` -> ``[..., ceil(M/128), ceil(K/128)]`` (weights); ``(1, -1)`` ->
    ``[..., M, 1]`` (rowwise); ``None`` -> a 0-dim scale (tensorwise). A 1-D ``x`` is one
    row; its scale drops the row dim. Partial last blocks are allowed.

    ``fmt``: ``"e4m3"`` (the backend's native E4M3; ``e4m3fn`` for the reference),
    ``"e4m3fn"``, ``"e4m3fnuz"`` or ``"e5m2"``. ``scale = amax(|block|) / fmt_max``;
    all-zero blocks get scale 1. ``scale_fmt="ue8m0"`` rounds each scale up to a power of
    two. ``q = clamp(x / scale, -fmt_max, fmt_max)`` cast to the format (round to
    nearest even); ``e4m3fnuz`` has no negative zero.

    Non-finite values: NaN and +-Inf do not take part in the amax (the block's scale comes
    from its finite values). NaN stays NaN in ``q`` (every format here has a NaN); +-Inf
    saturates to +-fmt_max. Returns ``(q, scale)``.
    """
    op = "quantize_fp8"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_block(op, block)
    fp8_dtype(op, "fmt", fmt)
    if scale_fmt not in SCALE_FORMATS:
        raise ArgumentError(f"{op}: argument 'scale_fmt' is {scale_fmt!r}, expected None or 'ue8m0'")


@quantize_fp8.reference
def _quantize_fp8_reference(x, block=(1, 128), fmt="e4m3", scale_fmt=None):
    dtype = fp8_dtype("quantize_fp8", "fmt", fmt)
    qmax = FP8_MAX[FP8_FORMAT_OF[dtype]]
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    if block is None:
        amax = _finite_abs(xf).amax() if xf.numel() else torch.zeros((), dtype=acc)
        scale = _scale_from_amax(amax, qmax, scale_fmt)
        q = (xf / scale.to(acc)).clamp(-qmax, qmax)
        return q.to(dtype), scale
    rows = _as_rows(xf)
    m, k, bm, bk = _block_sizes(x.shape, block)
    xb = _blocked(rows, bm, bk)
    amax = _finite_abs(xb).amax(dim=(-3, -1))
    scale = _scale_from_amax(amax, qmax, scale_fmt)
    qb = (xb / scale.to(acc)[..., :, None, :, None]).clamp(-qmax, qmax)
    q = _unblocked(qb, m, k).to(dtype).reshape(x.shape)
    return q, scale.reshape(scale_shape(x.shape, block))


@quantize_fp8.cost
def _quantize_fp8_cost(x, block=(1, 128), fmt="e4m3", scale_fmt=None):
    n = x.numel()
    n_scales = math.prod(scale_shape(x.shape, block)) if x.dim() else 1
    # |x|, max, divide, clamp per element.
    return Cost(flops=4 * n, bytes=n * x.element_size() + n + 4 * n_scales)


@quantize_fp8.outputs
def _quantize_fp8_outputs(x, block=(1, 128), fmt="e4m3", scale_fmt=None):
    return Output(x.shape), Output(scale_shape(x.shape, block) if x.dim() else ())


# ---------------------------------------------------------------- dequantize_fp8
@op_spec
def dequantize_fp8(q, scale, block=(1, 128), out_dtype=torch.bfloat16):
    """``q.float() * scale`` broadcast per block (the inverse of :func:`quantize_fp8` with
    the same ``block``), cast to ``out_dtype``. ``scale`` must have the shape
    ``quantize_fp8`` returns for ``q``'s shape and ``block``."""
    op = "dequantize_fp8"
    check_tensor(op, "q", q, dtypes=FP8_DTYPE_LIST, min_ndim=1)
    check_tensor(op, "scale", scale, dtypes=SCALE_DTYPES)
    check_block(op, block)
    want = scale_shape(q.shape, block)
    if tuple(scale.shape) != want:
        raise ShapeError(
            f"{op}: argument 'scale' has shape {list(scale.shape)}, expected {list(want)} "
            f"(q of shape {list(q.shape)} with block {block!r})"
        )
    check_out_dtype(op, out_dtype)
    check_same_device(op, "q", q, scale=scale)


def check_out_dtype(op: str, out_dtype: Any) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise DTypeError(
            f"{op}: argument 'out_dtype' is {out_dtype!r}, expected one of float32, bfloat16, float16, float64"
        )


def dequantize_to(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, acc: torch.dtype) -> torch.Tensor:
    """``q * scale`` per block in dtype ``acc`` (shared by the FP8 ops' references)."""
    qf = q.to(acc)
    if block is None:
        return qf * scale.to(acc).reshape(())
    m, k, bm, bk = _block_sizes(q.shape, block)
    qb = _blocked(_as_rows(qf), bm, bk)
    s = scale.to(acc).reshape(*qb.shape[:-4], qb.shape[-4], qb.shape[-2])
    return _unblocked(qb * s[..., :, None, :, None], m, k).reshape(q.shape)


@dequantize_fp8.reference
def _dequantize_fp8_reference(q, scale, block=(1, 128), out_dtype=torch.bfloat16):
    acc = compute_dtype(scale.dtype, out_dtype)
    return dequantize_to(q, scale, block, acc).to(out_dtype)


@dequantize_fp8.cost
def _dequantize_fp8_cost(q, scale, block=(1, 128), out_dtype=torch.bfloat16):
    n = q.numel()
    out_size = torch.empty((), dtype=out_dtype).element_size()
    return Cost(flops=n, bytes=n + scale.numel() * scale.element_size() + n * out_size)


@dequantize_fp8.outputs
def _dequantize_fp8_outputs(q, scale, block=(1, 128), out_dtype=torch.bfloat16):
    return (Output(q.shape, out_dtype),)


# ---------------------------------------------------------------- int8
@op_spec
def quantize_int8(x):
    """Symmetric int8, one scale per row (the last dim): ``scale = amax / 127`` (all-zero
    rows get 1), ``q = clamp(round_half_even(x / scale), -127, 127)``. Returns
    ``(q int8 [..., K], scale float32 [..., 1])``. NaN and +-Inf do not take part in the
    amax; NaN becomes 0 and +-Inf saturates to +-127 (int8 has neither)."""
    check_tensor("quantize_int8", "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)


@quantize_int8.reference
def _quantize_int8_reference(x):
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    amax = _finite_abs(xf).amax(dim=-1, keepdim=True) if x.shape[-1] else torch.zeros((*x.shape[:-1], 1), dtype=acc)
    scale = _scale_from_amax(amax, 127.0, None)
    q = torch.nan_to_num(xf / scale.to(acc), nan=0.0).round().clamp(-127, 127)
    return q.to(torch.int8), scale


@quantize_int8.cost
def _quantize_int8_cost(x):
    n = x.numel()
    rows = n // x.shape[-1] if x.shape[-1] else 0
    return Cost(flops=5 * n, bytes=n * x.element_size() + n + 4 * rows)


@quantize_int8.outputs
def _quantize_int8_outputs(x):
    return Output(x.shape, torch.int8), Output((*x.shape[:-1], 1), torch.float32)


# ---------------------------------------------------------------- host FP8 -> int8
#: Rows converted at a time by :func:`fp8_block_to_int8_rows`: one 128-row block of scales,
#: a float32 slab that stays in cache (3.5 MiB at K = 7168).
HOST_CHUNK_ROWS = 128


def e4m3fn_bits_as_e4m3fnuz(q: torch.Tensor) -> torch.Tensor:
    """An e4m3fn tensor's values as e4m3fnuz codes worth half as much (fnuz's exponent bias is
    one larger: the same bits read as fnuz are half the value, so the caller doubles the
    scales). Exact, except that -0 (0x80, fnuz's NaN) becomes +0 and both of fn's NaNs
    (0x7F, 0xFF: read as fnuz they would be +-240) become fnuz's one NaN, 0x80."""
    bits = q.view(torch.uint8)
    fixed = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    fixed = torch.where((bits & 0x7F) == 0x7F, torch.full_like(bits, 0x80), fixed)
    return fixed.view(torch.float8_e4m3fnuz)


def fp8_block_to_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``q [..., N, K]`` with 128x128 block scales ``[..., ceil(N/128), ceil(K/128)]`` ->
    int8 ``[..., N, K]`` with one float32 scale per row ``[..., N, 1]``: bit for bit
    ``quantize_int8(dequantize_fp8(q, scale, (128, 128), float32))`` by the references, for
    host (CPU) tensors, which is how a checkpoint is converted for a device that cannot hold
    float8 (the references' ~9 passes over float32 copies become 6 in place over one 128-row
    slab at a time; benchmarks/host_fp8_to_int8.py). A slab holding NaN or Inf is computed by
    the references themselves. Wrong dtypes, shapes or a device other than the CPU raise
    :class:`~dshal.errors.DshalError` subclasses that name the argument."""
    op = "fp8_block_to_int8_rows"
    check_tensor(op, "q", q, dtypes=FP8_DTYPE_LIST, min_ndim=2)
    check_tensor(op, "scale", scale, dtypes=SCALE_DTYPES)
    want = scale_shape(q.shape, (128, 128))
    if tuple(scale.shape) != want:
        raise ShapeError(f"{op}: argument 'scale' has shape {list(scale.shape)}, expected {list(want)} (128x128 blocks of q {list(q.shape)})")
    for arg, t in (("q", q), ("scale", scale)):
        if t.device.type != "cpu":
            raise DeviceError(f"{op}: argument {arg!r} is on {t.device}, expected cpu (a host conversion)")
    n, k = q.shape[-2], q.shape[-1]
    lead = q.shape[:-2]
    if scale.dtype == torch.float64 or n == 0 or k == 0:  # float64 scales: the references compute in float64
        return _quantize_int8_reference(dequantize_to(q, scale, (128, 128), compute_dtype(scale.dtype)).to(torch.float32))
    rows_q, rows_s = q.reshape(-1, n, k), scale.reshape(-1, *scale.shape[-2:]).to(torch.float32)
    out = torch.empty((rows_q.shape[0], n, k), dtype=torch.int8)
    scales = torch.empty((rows_q.shape[0], n, 1), dtype=torch.float32)
    slab = torch.empty((min(HOST_CHUNK_ROWS, n), k), dtype=torch.float32)
    k_whole = k - k % 128  # columns in whole 128-wide blocks; the rest share the last block's scale
    for e in range(rows_q.shape[0]):
        for r0 in range(0, n, HOST_CHUNK_ROWS):
            r1 = min(r0 + HOST_CHUNK_ROWS, n)
            x = slab[: r1 - r0]
            x.copy_(rows_q[e, r0:r1])
            block_scales = rows_s[e, r0 // 128]  # [ceil(K/128)]: HOST_CHUNK_ROWS is one row block
            if k_whole:
                x[:, :k_whole].unflatten(1, (k_whole // 128, 128)).mul_(block_scales[: k_whole // 128, None])
            if k_whole < k:
                x[:, k_whole:].mul_(block_scales[-1])
            low, high = torch.aminmax(x, dim=1, keepdim=True)
            amax = torch.maximum(high, low.neg_())
            if not bool(torch.isfinite(amax).all()):  # NaN / Inf: the references' rules for them
                dense = dequantize_to(rows_q[e, r0:r1], rows_s[e, r0 // 128 : r0 // 128 + 1], (128, 128), torch.float32)
                out[e, r0:r1], scales[e, r0:r1] = _quantize_int8_reference(dense)
                continue
            row_scale = _scale_from_amax(amax, 127.0, None)
            out[e, r0:r1].copy_(x.div_(row_scale).round_().clamp_(-127, 127))
            scales[e, r0:r1] = row_scale
    return out.reshape(*lead, n, k), scales.reshape(*lead, n, 1)


# ---------------------------------------------------------------- examples
# Edge rows cover FP8 maximum values, all-zero blocks, FP8 subnormals, partial blocks
# (K % 128 != 0, which the block layout allows), NaN/Inf, M = 1 and M = 0 and
# non-contiguous inputs. Full-tier and bench sizes are DeepSeek-V3's (hidden 7168, MoE
# intermediate 2048, dense intermediate 18432, 4096-token prefill).
BF16, F32 = torch.bfloat16, torch.float32
ACT, WEIGHT, ROW = (1, 128), (128, 128), (1, -1)


def _block_of(p) -> tuple[int, int] | None:
    """The row's ``block`` as the op takes it (a YAML shapes file gives a list)."""
    block = p.get("block", ACT)
    return None if block is None else tuple(block)


QUANTIZE_FP8_ROWS = [
    dict(name="bf16/act-1x128/T4xK256", dtype=BF16, shape=(4, 256), block=ACT),
    dict(name="f32/weight-128x128/N256xK384", dtype=F32, shape=(256, 384), block=WEIGHT),
    dict(name="bf16/rowwise/T8xK256", dtype=BF16, shape=(8, 256), block=ROW),
    dict(name="bf16/tensorwise/T8xK256", dtype=BF16, shape=(8, 256), block=None),
    dict(name="bf16/3d/B2xT3xK256", dtype=BF16, shape=(2, 3, 256), block=ACT),
    dict(name="f32/e4m3fn/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e4m3fn"),
    dict(name="f32/e4m3fnuz/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e4m3fnuz"),
    dict(name="f32/e5m2/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e5m2"),
    dict(name="f32/ue8m0/T4xK256", dtype=F32, shape=(4, 256), block=ACT, scale_fmt="ue8m0"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256), block=ACT),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256), block=ACT),
    dict(name="bf16/K200-partial-block", kind="edge", dtype=BF16, shape=(4, 200), block=ACT),
    dict(name="f32/weight-K200-partial-block", kind="edge", dtype=F32, shape=(136, 200), block=WEIGHT),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), block=ACT, noncontiguous=("x",)),
    dict(name="f32/fp8-max", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="fp8_max"),
    dict(name="f32/zero-block", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="zero_block"),
    dict(name="f32/fp8-subnormals", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="fp8_subnormal"),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), block=ACT, values="nan_inf"),
    dict(name="bf16/act/T4096xK7168", tier="full", dtype=BF16, shape=(4096, 7168), block=ACT),
    dict(name="bf16/weight/N2112xK7168", tier="full", dtype=BF16, shape=(2112, 7168), block=WEIGHT),
    dict(name="bf16/weight/N7168xK2048", tier="full", dtype=BF16, shape=(7168, 2048), block=WEIGHT),
    # bench
    dict(name="bench/bf16/act-1x128/T64xK1024", kind="bench", dtype=BF16, shape=(64, 1024), block=ACT, fmt="e4m3"),
    dict(name="bench/bf16/act-1x128/T4096xK7168", kind="bench", tier="full", dtype=BF16, shape=(4096, 7168), block=ACT),
]


def _fp8_pattern(draw: Draw, x: torch.Tensor, pattern: str | None) -> torch.Tensor:
    if pattern == "fp8_max":
        # Every block holds +-amax many times: those must land exactly on +-fmt_max.
        x = x.clone()
        x[..., ::16] = 3.0
        x[..., 8::16] = -3.0
        return x
    if pattern == "zero_block":
        x = x.clone()
        x[1] = 0  # a whole row of blocks
        x[2, 128:] = 0  # one block
        return x
    if pattern == "fp8_subnormal":
        # amax 1 per block, others down to 2^-16: x / scale spans E4M3's subnormals (< 2^-6).
        exponent = torch.rand(x.shape, generator=draw.generator, dtype=torch.float64, device=draw.device) * -16.0
        coin = torch.rand(x.shape, generator=draw.generator, device=draw.device)
        sign = torch.where(coin < 0.5, -1.0, 1.0).to(torch.float64)
        y = sign * torch.exp2(exponent)
        y[..., ::128] = 1.0
        return y.to(x.dtype)
    return fill_pattern(x, pattern)


@quantize_fp8.examples(QUANTIZE_FP8_ROWS)
def _quantize_fp8_example(draw: Draw, p) -> Example:
    x = _fp8_pattern(draw, draw.randn(*p["shape"], dtype=p.get("dtype", BF16)), p.get("values"))
    kw = {"x": x, "block": _block_of(p), "fmt": p.get("fmt", "e4m3"), "scale_fmt": p.get("scale_fmt")}
    return Example(kw, {**kw, "fmt": draw.fp8(kw["fmt"])})


DEQUANTIZE_FP8_ROWS = [
    dict(name="bf16/act-1x128/T4xK256", dtype=BF16, shape=(4, 256), block=ACT),
    dict(name="f32/weight-128x128/N256xK384", dtype=F32, shape=(256, 384), block=WEIGHT),
    dict(name="bf16/rowwise/T8xK256", dtype=BF16, shape=(8, 256), block=ROW),
    dict(name="f32/tensorwise/T8xK256", dtype=F32, shape=(8, 256), block=None),
    dict(name="f32/e5m2/T4xK256", dtype=F32, shape=(4, 256), block=ACT, fmt="e5m2"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256), block=ACT),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256), block=ACT),
    dict(name="f32/K200-partial-block", kind="edge", dtype=F32, shape=(136, 200), block=WEIGHT),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), block=ACT, noncontiguous=("q",)),
    dict(name="bf16/weight/N7168xK2048", tier="full", dtype=BF16, shape=(7168, 2048), block=WEIGHT),
    # bench
    dict(name="bench/bf16/act-1x128/T64xK1024", kind="bench", dtype=BF16, shape=(64, 1024), block=ACT),
    dict(name="bench/bf16/weight/N7168xK18432", kind="bench", tier="full", dtype=BF16, shape=(7168, 18432), block=WEIGHT),
]


@dequantize_fp8.examples(DEQUANTIZE_FP8_ROWS)
def _dequantize_fp8_example(draw: Draw, p) -> Example:
    """``dtype`` is the output dtype; the FP8 input quantizes float32 values."""
    x = draw.randn(*p["shape"], dtype=torch.float32)
    block = _block_of(p)
    q, scale = quantize_fp8.reference_impl(x, block, draw.fp8(p.get("fmt", "e4m3")), None)
    return Example({"q": q, "scale": scale, "block": block, "out_dtype": p.get("dtype", BF16)})


QUANTIZE_INT8_ROWS = [
    dict(name="bf16/T4xK256", dtype=BF16, shape=(4, 256)),
    dict(name="f32/B2xT3xK200", dtype=F32, shape=(2, 3, 200)),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 256)),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(0, 256)),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(4, 256), noncontiguous=("x",)),
    dict(name="f32/zero_rows", kind="edge", dtype=F32, shape=(4, 256), values="zero_rows"),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(4, 256), values="nan_inf"),
    dict(name="bf16/T4096xK7168", tier="full", dtype=BF16, shape=(4096, 7168)),
    # bench
    dict(name="bench/bf16/T64xK1024", kind="bench", dtype=BF16, shape=(64, 1024)),
    dict(name="bench/bf16/T4096xK7168", kind="bench", tier="full", dtype=BF16, shape=(4096, 7168)),
]


@quantize_int8.examples(QUANTIZE_INT8_ROWS)
def _quantize_int8_example(draw: Draw, p) -> Example:
    return Example({"x": fill_pattern(draw.randn(*p["shape"], dtype=p.get("dtype", BF16)), p.get("values"))})
