"""GEMM ops: FP8 (block / row / tensor scales), int8 W8A8, and ``linear``.

Layout everywhere is nn.Linear's "NT": ``a [M, K]``, ``b [N, K]``, ``out = a @ b.T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dshal.errors import ArgumentError, DTypeError, ShapeError
from dshal.ops.quant import (
    FP8_DTYPE_LIST,
    SCALE_DTYPES,
    _quantize_fp8_reference,
    _quantize_int8_reference,
    check_out_dtype,
    compute_dtype,
    dequantize_to,
)
from dshal.ops.spec import FLOAT_DTYPES, FP8_FORMAT_OF, Cost, check_dim, check_same_device, check_tensor, op_spec

#: Scale granularity -> (a's quantization block, b's quantization block).
GRANULARITY_BLOCKS = {"block": ((1, 128), (128, 128)), "row": ((1, -1), (1, -1)), "tensor": (None, None)}
#: FP8 formats that may be multiplied together (OCP formats mix; fnuz only with itself).
_FP8_FAMILY = {torch.float8_e4m3fn: "ocp", torch.float8_e5m2: "ocp", torch.float8_e4m3fnuz: "fnuz"}


def _granularities(shape: torch.Size, rows: int, k: int, block_rows: int) -> set[str]:
    """Granularities a scale of ``shape`` can mean for an operand ``[rows, K]``. A shape may
    match several (e.g. ``[1, 1]``); they then scale exactly the same elements."""
    found = set()
    dims = tuple(shape)
    if dims == (math.ceil(rows / block_rows), math.ceil(k / 128)):
        found.add("block")
    if dims == (rows, 1):
        found.add("row")
    if len(dims) <= 2 and math.prod(dims) == 1:
        found.add("tensor")
    return found


def gemm_granularity(op: str, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> str:
    """'block', 'row' or 'tensor' as selected by the two scale shapes; ShapeError if they
    disagree or match nothing."""
    m, k = a.shape
    n = b.shape[0]
    for_a = _granularities(a_scale.shape, m, k, 1)
    for_b = _granularities(b_scale.shape, n, k, 128)
    common = for_a & for_b
    for name in ("block", "row", "tensor"):
        if name in common:
            return name
    kb, nb = math.ceil(k / 128), math.ceil(n / 128)
    raise ShapeError(
        f"{op}: scale shapes a_scale {list(a_scale.shape)} ({'/'.join(sorted(for_a)) or 'no granularity'}) and "
        f"b_scale {list(b_scale.shape)} ({'/'.join(sorted(for_b)) or 'no granularity'}) do not select one granularity; "
        f"expected block a_scale [{m}, {kb}] + b_scale [{nb}, {kb}], rowwise [{m}, 1] + [{n}, 1], or tensorwise 0-dim + 0-dim"
    )


def _check_nt_operands(op: str, a, a_scale, b, b_scale, dtypes: tuple[torch.dtype, ...]) -> None:
    check_tensor(op, "a", a, dtypes=dtypes, ndim=2)
    check_tensor(op, "b", b, dtypes=dtypes, ndim=2)
    check_dim(op, "b", b, 1, a.shape[1], "K, the last dim of 'a'")
    check_tensor(op, "a_scale", a_scale, dtypes=SCALE_DTYPES)
    check_tensor(op, "b_scale", b_scale, dtypes=SCALE_DTYPES)
    check_same_device(op, "a", a, a_scale=a_scale, b=b, b_scale=b_scale)


def _gemm_bytes(a, a_scale, b, b_scale, out_dtype) -> int:
    m, n = a.shape[0], b.shape[0]
    out_size = torch.empty((), dtype=out_dtype).element_size()
    return sum(t.numel() * t.element_size() for t in (a, a_scale, b, b_scale)) + m * n * out_size


# ---------------------------------------------------------------- fp8_gemm
@op_spec
def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """``(a * a_scale) @ (b * b_scale).T`` with FP32 accumulation -> ``[M, N]`` in ``out_dtype``.

    ``a [M, K]``, ``b [N, K]`` FP8 of one family (e4m3fn/e5m2 mix; e4m3fnuz only with
    itself). The scale shapes select the granularity: block ``a_scale [M, ceil(K/128)]``
    (1x128 tiles) + ``b_scale [ceil(N/128), ceil(K/128)]`` (128x128 tiles); rowwise
    ``[M, 1]`` + ``[N, 1]``; tensorwise 0-dim (or 1-element) + 0-dim. Mixed granularities
    raise ShapeError. Scales are float32.
    """
    op = "fp8_gemm"
    _check_nt_operands(op, a, a_scale, b, b_scale, FP8_DTYPE_LIST)
    if _FP8_FAMILY[a.dtype] != _FP8_FAMILY[b.dtype]:
        raise DTypeError(
            f"{op}: arguments 'a' ({a.dtype}) and 'b' ({b.dtype}) mix FP8 families, expected both OCP "
            "(float8_e4m3fn / float8_e5m2) or both float8_e4m3fnuz"
        )
    gemm_granularity(op, a, a_scale, b, b_scale)
    check_out_dtype(op, out_dtype)


def _fp8_gemm_in(a, a_scale, b, b_scale, acc: torch.dtype) -> torch.Tensor:
    a_block, b_block = GRANULARITY_BLOCKS[gemm_granularity("fp8_gemm", a, a_scale, b, b_scale)]
    if a_block is None:  # a 1-element scale of any rank
        a_scale, b_scale = a_scale.reshape(()), b_scale.reshape(())
    return dequantize_to(a, a_scale, a_block, acc) @ dequantize_to(b, b_scale, b_block, acc).T


@fp8_gemm.reference
def _fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return _fp8_gemm_in(a, a_scale, b, b_scale, compute_dtype(a_scale.dtype, out_dtype)).to(out_dtype)


@fp8_gemm.oracle
def _fp8_gemm_oracle(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return _fp8_gemm_in(a, a_scale, b, b_scale, torch.float64)


# ---------------------------------------------------------------- int8_gemm
@op_spec
def int8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """W8A8: ``(a @ b.T) * a_scale * b_scale.T`` -> ``[M, N]`` in ``out_dtype``.

    ``a [M, K]``, ``b [N, K]`` int8; ``a_scale [M, 1]``, ``b_scale [N, 1]`` float32 (as
    :func:`quantize_int8` returns). The integer products are accumulated exactly (as int32
    does, without its overflow past K ~ 131072), then scaled in float32.
    """
    op = "int8_gemm"
    _check_nt_operands(op, a, a_scale, b, b_scale, (torch.int8,))
    for arg, s, rows in (("a_scale", a_scale, a.shape[0]), ("b_scale", b_scale, b.shape[0])):
        if tuple(s.shape) != (rows, 1):
            raise ShapeError(f"int8_gemm: argument {arg!r} has shape {list(s.shape)}, expected [{rows}, 1] (one scale per row)")
    check_out_dtype(op, out_dtype)


def _int8_gemm_in(a, a_scale, b, b_scale, acc: torch.dtype) -> torch.Tensor:
    # float64 holds every int8 dot product exactly up to K = 2**53 / 2**14.
    exact = a.to(torch.float64) @ b.to(torch.float64).T
    return exact.to(acc) * a_scale.to(acc) * b_scale.to(acc).T


@int8_gemm.reference
def _int8_gemm_reference(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return _int8_gemm_in(a, a_scale, b, b_scale, compute_dtype(a_scale.dtype, out_dtype)).to(out_dtype)


@int8_gemm.oracle
def _int8_gemm_oracle(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return _int8_gemm_in(a, a_scale, b, b_scale, torch.float64)


def _nt_gemm_cost(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """2*M*N*K flops; operands, scales and the output moved once (fp8_gemm and int8_gemm)."""
    return Cost(flops=2 * a.shape[0] * b.shape[0] * a.shape[1], bytes=_gemm_bytes(a, a_scale, b, b_scale, out_dtype))


fp8_gemm.cost(_nt_gemm_cost)
int8_gemm.cost(_nt_gemm_cost)


# ---------------------------------------------------------------- linear
def weight_quant_mode(op: str, weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    """'block', 'row' or 'tensor' for a quantized weight ``[N, K]`` and its scale."""
    n, k = weight.shape
    shape = tuple(weight_scale.shape)
    if weight.dtype != torch.int8 and shape == (math.ceil(n / 128), math.ceil(k / 128)):
        return "block"
    if shape == (n, 1):
        return "row"
    if weight.dtype != torch.int8 and shape in ((), (1,)):
        return "tensor"
    if weight.dtype == torch.int8:
        want = f"[{n}, 1] (one scale per output channel)"
    else:
        want = f"block [{math.ceil(n / 128)}, {math.ceil(k / 128)}], rowwise [{n}, 1] or tensorwise 0-dim"
    raise ShapeError(f"{op}: argument 'weight_scale' has shape {list(shape)}, expected {want} for weight {list(weight.shape)}")


@op_spec
def linear(x, weight, bias=None, weight_scale=None):
    """``y = x @ weight.T (+ bias)`` for ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]`` in
    ``x``'s dtype (bf16, fp16, fp32).

    A float ``weight`` is a plain matmul. An FP8 ``weight`` needs ``weight_scale``, whose
    shape selects the scheme: block ``[ceil(N/128), ceil(K/128)]`` quantizes ``x`` per
    (1, 128) in the weight's FP8 format, rowwise ``[N, 1]`` quantizes ``x`` per row,
    0-dim quantizes ``x`` per tensor; then :func:`fp8_gemm`. An int8 weight with a
    ``[N, 1]`` scale quantizes ``x`` with :func:`quantize_int8` and runs :func:`int8_gemm`
    (W8A8). ``bias [N]`` is added in the matmul's dtype (float32 on the quantized paths).
    """
    op = "linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES + FP8_DTYPE_LIST + (torch.int8,), ndim=2)
    check_dim(op, "weight", weight, 1, x.shape[-1], "K, the last dim of 'x'")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        check_dim(op, "bias", bias, 0, weight.shape[0], "N, the rows of 'weight'")
    quantized = weight.dtype not in FLOAT_DTYPES
    if quantized:
        if weight_scale is None:
            raise ArgumentError(f"linear: argument 'weight' is {weight.dtype}, which needs a 'weight_scale'; got None")
        check_tensor(op, "weight_scale", weight_scale, dtypes=SCALE_DTYPES)
        weight_quant_mode(op, weight, weight_scale)
    elif weight_scale is not None:
        raise ArgumentError(f"linear: argument 'weight_scale' is given, but 'weight' is {weight.dtype}; expected None for a float weight")
    check_same_device(op, "x", x, weight=weight, bias=bias, weight_scale=weight_scale)


def _linear_quantized(
    x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, acc: torch.dtype, dense: torch.Tensor | None = None
) -> torch.Tensor:
    """The quantized product of ``x2 [M, K]``; ``dense``: the FP8 weight already dequantized
    (float32 ``weight * weight_scale``, e.g. a backend's cached copy), multiplied with the
    same quantized activations instead of dequantizing the weight again."""
    mode = weight_quant_mode("linear", weight, weight_scale)
    if weight.dtype == torch.int8:
        xq, xs = _quantize_int8_reference(x2)
        return _int8_gemm_reference(xq, xs, weight, weight_scale, acc)
    x_block = GRANULARITY_BLOCKS[mode][0]
    xq, xs = _quantize_fp8_reference(x2, x_block, FP8_FORMAT_OF[weight.dtype])
    if dense is not None:
        return dequantize_to(xq, xs, x_block, acc) @ dense.to(acc).T
    return _fp8_gemm_reference(xq, xs, weight, weight_scale.reshape(()) if mode == "tensor" else weight_scale, acc)


def linear_quantized(x, weight, bias=None, weight_scale=None, dense=None):
    """:func:`linear`'s reference for a quantized ``weight`` (after the op's checks), with
    an optional pre-dequantized float32 ``dense`` copy of an FP8 weight (see
    :func:`_linear_quantized`): the same activation quantization and float32 product."""
    acc = compute_dtype(x.dtype)
    y = _linear_quantized(x.reshape(-1, x.shape[-1]), weight, weight_scale, acc, dense)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


@linear.reference
def _linear_reference(x, weight, bias=None, weight_scale=None):
    if weight.dtype in FLOAT_DTYPES:
        # Same-dtype F.linear: torch accumulates bf16/fp16 matmuls in float32 on CPU.
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return F.linear(x, w, b)
    return linear_quantized(x, weight, bias, weight_scale)


@linear.cost
def _linear_cost(x, weight, bias=None, weight_scale=None):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    n, k = weight.shape
    moved = x.numel() * x.element_size() + weight.numel() * weight.element_size() + m * n * x.element_size()
    moved += sum(t.numel() * t.element_size() for t in (bias, weight_scale) if t is not None)
    return Cost(flops=2 * m * n * k + (m * n if bias is not None else 0), bytes=moved)
