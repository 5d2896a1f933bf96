"""GEMM ops: FP8 (block / row / tensor scales), int8 W8A8, and ``linear``.

Layout everywhere is nn.Linear's "NT": ``a [M, K]``, ``b [N, K]``, ``out = a @ b.T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dshal.errors import ArgumentError, DTypeError, ShapeError
from dshal.ops.examples import Draw, Example, fill_pattern
from dshal.ops.quant import (
    FP8_DTYPE_LIST,
    SCALE_DTYPES,
    check_out_dtype,
    compute_dtype,
    dequantize_to,
    quantize_fp8,
    quantize_int8,
)
from dshal.ops.spec import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    FP8_FORMAT_OF,
    Cost,
    OpSpec,
    Output,
    check_dim,
    check_same_device,
    check_tensor,
    op_spec,
)

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


def _nt_gemm_hub(spec: OpSpec, scaled_product: Callable[..., torch.Tensor]) -> None:
    """Declare what fp8_gemm and int8_gemm share around ``scaled_product(a, a_scale, b, b_scale,
    acc)``, the op's scaled ``a @ b.T`` accumulated in ``acc``: the reference (in
    ``compute_dtype``, rounded to ``out_dtype``), the float64 oracle, the outputs and the cost."""

    @spec.reference
    def reference(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        return scaled_product(a, a_scale, b, b_scale, compute_dtype(a_scale.dtype, out_dtype)).to(out_dtype)

    @spec.oracle
    def oracle(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        return scaled_product(a, a_scale, b, b_scale, torch.float64)

    @spec.outputs
    def outputs(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        return (Output((a.shape[0], b.shape[0]), out_dtype),)

    @spec.cost
    def cost(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        """2*M*N*K flops; operands, scales and the output moved once."""
        return Cost(flops=2 * a.shape[0] * b.shape[0] * a.shape[1], bytes=_gemm_bytes(a, a_scale, b, b_scale, out_dtype))


# ---------------------------------------------------------------- fp8_gemm
@op_spec
def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """``(a * a_scale) @ (b * b_scale).T`` with FP32 accumulation -> ``[M, N]`` in ``out_dtype``.

    ``a [M, K]``, ``b [N, K]`` FP8 of one family (e4m3fn/e5m2 mix; e4m3fnuz only with
    itself). The scale shapes select the granularity: block ``a_scale [M, ceil(K/128)]``
    (1x128 tiles) + ``b_scale [ceil(N/128), ceil(K/128)]`` (128x128 tiles); rowwise
    ``[M, 1]`` + ``[N, 1]``; tensorwise 0-dim (or 1-element) + 0-dim. Mixed granularities
    and K = 0 raise ShapeError. Scales are float32.
    """
    op = "fp8_gemm"
    _check_nt_operands(op, a, a_scale, b, b_scale, FP8_DTYPE_LIST)
    if a.shape[1] == 0:  # an empty row has no scale block: rowwise and block shapes coincide (as in linear)
        raise ShapeError(f"{op}: argument 'a' is {a.dtype} [{a.shape[0]}, 0], expected K >= 1")
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


_nt_gemm_hub(fp8_gemm, _fp8_gemm_in)


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


#: K per float32 matmul in :func:`_int8_products`: 1024 products of two int8 (|p| <= 2**14) sum
#: to at most 2**24, every partial sum an integer float32 holds exactly.
INT8_EXACT_K = 1024


def _int8_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` of int8 operands, exactly, as int64: float32 matmuls over K
    chunks (exact, see INT8_EXACT_K; also under TF32/bf16 matmul precision, which hold int8
    values exactly) summed in int64. No float64 matmul: NPUs have none, GPUs run it slowly."""
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    for k0 in range(0, a.shape[1], INT8_EXACT_K):
        k1 = k0 + INT8_EXACT_K
        total += (a[:, k0:k1].to(torch.float32) @ b[:, k0:k1].to(torch.float32).T).to(torch.int64)
    return total


def _int8_gemm_in(a, a_scale, b, b_scale, acc: torch.dtype) -> torch.Tensor:
    return _int8_products(a, b).to(acc) * a_scale.to(acc) * b_scale.to(acc).T


_nt_gemm_hub(int8_gemm, _int8_gemm_in)


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
        if weight.shape[1] == 0:  # an empty row has no scale block: rowwise and block shapes coincide
            raise ShapeError(f"linear: argument 'weight' is {weight.dtype} [{weight.shape[0]}, 0], expected K >= 1 for a quantized weight")
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
        xq, xs = quantize_int8.reference_impl(x2)
        return int8_gemm.reference_impl(xq, xs, weight, weight_scale, acc)
    x_block = GRANULARITY_BLOCKS[mode][0]
    xq, xs = quantize_fp8.reference_impl(x2, x_block, FP8_FORMAT_OF[weight.dtype])
    if dense is not None:
        return dequantize_to(xq, xs, x_block, acc) @ dense.to(acc).T
    return fp8_gemm.reference_impl(xq, xs, weight, weight_scale.reshape(()) if mode == "tensor" else weight_scale, acc)


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


@linear.outputs
def _linear_outputs(x, weight, bias=None, weight_scale=None):
    return (Output((*x.shape[:-1], weight.shape[0]), x.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32 = torch.bfloat16, torch.float32
#: DeepGEMM's GEMM benchmark shapes (N, K) and Ms: the full tier of fp8_gemm.
DEEPGEMM_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPGEMM_M = [1, 64, 128, 4096]

#: ``m, n, k``; ``granularity`` picks the scale layout (GRANULARITY_BLOCKS); ``dtype`` is the output's.
FP8_GEMM_ROWS = [
    dict(name="block/bf16/M128xN256xK256", dtype=BF16, m=128, n=256, k=256, granularity="block"),
    dict(name="block/f32/M64xN128xK256", dtype=F32, m=64, n=128, k=256, granularity="block"),
    dict(name="rowwise/bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256, granularity="row"),
    dict(name="tensorwise/bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256, granularity="tensor"),
    dict(name="block/M1", kind="edge", dtype=BF16, m=1, n=256, k=256, granularity="block"),
    dict(name="block/M0", kind="edge", dtype=BF16, m=0, n=128, k=256, granularity="block"),
    dict(name="block/K200-partial-block", kind="edge", dtype=BF16, m=16, n=128, k=200, granularity="block"),
    dict(name="block/N200-partial-block", kind="edge", dtype=BF16, m=16, n=200, k=256, granularity="block"),
    # Four K blocks: an activation scale read at the wrong K block (e.g. kb % 2) shows only past two.
    dict(name="block/bf16/M16xN128xK512", dtype=BF16, m=16, n=128, k=512, granularity="block"),
    # Rowwise scales span the whole row: any K, the tail past the last multiple of 128 included.
    dict(name="rowwise/K200-tail", kind="edge", dtype=BF16, m=16, n=64, k=200, granularity="row"),
    dict(name="block/noncontiguous", kind="edge", dtype=BF16, m=32, n=128, k=256, granularity="block", noncontiguous=("a",)),
    dict(name="block/zero-rows", kind="edge", dtype=BF16, m=32, n=128, k=256, granularity="block", values="zero_rows"),
    # Every FP8 format, named (the rows above take the backend's native E4M3): a backend is
    # judged in each format it declares (Capabilities.fp8_formats), the others are unsupported.
    *(dict(name=f"block/{fmt}/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, granularity="block", fmt=fmt)
      for fmt in FP8_DTYPES),
    *(
        dict(name=f"block/deepgemm/M{m}xN{n}xK{k}", tier="full", dtype=BF16, m=m, n=n, k=k, granularity="block")
        for n, k in DEEPGEMM_NK
        for m in DEEPGEMM_M
    ),
    # bench (full: the dense down_proj of DeepSeek-V3, N 7168 x K 18432, at a 4096-token prefill)
    dict(name="bench/block/M64xN256xK512", kind="bench", dtype=BF16, m=64, n=256, k=512, granularity="block"),
    dict(name="bench/rowwise/M64xN256xK512", kind="bench", dtype=BF16, m=64, n=256, k=512, granularity="row"),
    dict(name="bench/block/M4096xN7168xK18432", kind="bench", tier="full", dtype=BF16, m=4096, n=7168, k=18432, granularity="block"),
    dict(name="bench/rowwise/M4096xN7168xK18432", kind="bench", tier="full", dtype=BF16, m=4096, n=7168, k=18432, granularity="row"),
]


@fp8_gemm.examples(FP8_GEMM_ROWS)
def _fp8_gemm_example(draw: Draw, p) -> Example:
    """Quantized from float32 draws, which ride along as ``extras`` (``a_f``, ``b_f``)."""
    m, n, k = p["m"], p["n"], p["k"]
    fmt = draw.fp8(p.get("fmt", "e4m3"))
    a_f = fill_pattern(draw.randn(m, k), p.get("values"))
    b_f = draw.randn(n, k)
    a_block, b_block = GRANULARITY_BLOCKS[p.get("granularity", "block")]
    a, a_scale = quantize_fp8.reference_impl(a_f, a_block, fmt, None)
    b, b_scale = quantize_fp8.reference_impl(b_f, b_block, fmt, None)
    kw = {"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale, "out_dtype": p.get("dtype", BF16)}
    return Example(kw, extras={"a_f": a_f, "b_f": b_f})


INT8_GEMM_ROWS = [
    dict(name="bf16/M32xN64xK256", dtype=BF16, m=32, n=64, k=256),
    dict(name="f32/M16xN128xK200", dtype=F32, m=16, n=128, k=200),
    dict(name="M1", kind="edge", dtype=BF16, m=1, n=64, k=256),
    dict(name="M0", kind="edge", dtype=BF16, m=0, n=64, k=256),
    dict(name="noncontiguous", kind="edge", dtype=BF16, m=16, n=64, k=256, noncontiguous=("a",)),
    dict(name="bf16/M4096xN7168xK2048", tier="full", dtype=BF16, m=4096, n=7168, k=2048),
    dict(name="bf16/M128xN2112xK7168", tier="full", dtype=BF16, m=128, n=2112, k=7168),
    # bench
    dict(name="bench/bf16/M64xN256xK512", kind="bench", dtype=BF16, m=64, n=256, k=512),
    dict(name="bench/bf16/M4096xN7168xK18432", kind="bench", tier="full", dtype=BF16, m=4096, n=7168, k=18432),
]


@int8_gemm.examples(INT8_GEMM_ROWS)
def _int8_gemm_example(draw: Draw, p) -> Example:
    a, a_scale = quantize_int8.reference_impl(draw.randn(p["m"], p["k"]))
    b, b_scale = quantize_int8.reference_impl(draw.randn(p["n"], p["k"]))
    return Example({"a": a, "a_scale": a_scale, "b": b, "b_scale": b_scale, "out_dtype": p.get("dtype", BF16)})


#: ``lead`` (x's leading dims) or ``m``; ``weight``: float (x's dtype), fp8-block, fp8-row or
#: int8. Full and bench rows are DeepSeek-V3's projections (hidden 7168, q_lora 1536,
#: 128 heads x 192 / x 128, dense intermediate 18432, vocab 129280).
LINEAR_ROWS = [
    dict(name="bf16/M4xN256xK256", dtype=BF16, m=4, n=256, k=256),
    dict(name="bf16/bias/M4xN128xK256", dtype=BF16, m=4, n=128, k=256, bias=True),
    dict(name="f32/3d/B2xT3xN64xK128", dtype=F32, lead=(2, 3), n=64, k=128, bias=True),
    dict(name="f16/M8xN64xK128", dtype=torch.float16, m=8, n=64, k=128),
    dict(name="fp8-block/bf16/M16xN256xK256", dtype=BF16, m=16, n=256, k=256, weight="fp8-block"),
    dict(name="fp8-block/bias/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-block", bias=True),
    dict(name="fp8-row/bf16/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-row"),
    dict(name="fp8-row/bias/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-row", bias=True),
    dict(name="int8/bf16/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="int8"),
    dict(name="int8/bias/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="int8", bias=True),
    # A 2 x 3 block-scale grid (N 256, K 384): not square, so a transposed read of it is wrong,
    # and three K blocks, so is an activation scale read at the wrong K block.
    dict(name="fp8-block/bf16/M8xN256xK384", dtype=BF16, m=8, n=256, k=384, weight="fp8-block"),
    dict(name="bf16/M1", kind="edge", dtype=BF16, m=1, n=128, k=256),
    dict(name="bf16/M0", kind="edge", dtype=BF16, m=0, n=128, k=256),
    dict(name="fp8-block/M1", kind="edge", dtype=BF16, m=1, n=128, k=256, weight="fp8-block"),
    dict(name="fp8-block/K200-partial-block", kind="edge", dtype=BF16, m=8, n=128, k=200, weight="fp8-block"),
    # Rowwise scales allow any K: the tail past the last multiple of 128 counts too.
    dict(name="fp8-row/K200-tail", kind="edge", dtype=BF16, m=8, n=128, k=200, weight="fp8-row"),
    *(dict(name=f"fp8-block/{fmt}/M16xN128xK256", dtype=BF16, m=16, n=128, k=256, weight="fp8-block", fmt=fmt)
      for fmt in FP8_DTYPES),  # every format, named (as fp8_gemm's)
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, m=8, n=128, k=256, noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, m=4, n=64, k=128, values="nan_inf"),
    # One row (a decode step's projections), K not a multiple of any vector width.
    dict(name="f32/decode/M1xN256xK200", dtype=F32, m=1, n=256, k=200),
    dict(name="f32/decode/bias/B1xT1xN96xK256", dtype=F32, lead=(1, 1), n=96, k=256, bias=True),
    dict(name="f32/decode/nan_inf", kind="edge", dtype=F32, m=1, n=64, k=128, values="nan_inf"),
    dict(name="fp8-block/f32/decode/M1xN200xK200-partial-blocks", dtype=F32, m=1, n=200, k=200, weight="fp8-block", bias=True),
    dict(name="bf16/q_a_proj/M4096xN1536xK7168", tier="full", dtype=BF16, m=4096, n=1536, k=7168),
    dict(name="fp8-block/q_b_proj/M4096xN24576xK1536", tier="full", dtype=BF16, m=4096, n=24576, k=1536, weight="fp8-block"),
    dict(name="fp8-block/o_proj/M4096xN7168xK16384", tier="full", dtype=BF16, m=4096, n=7168, k=16384, weight="fp8-block"),
    # bench
    dict(name="bench/bf16/M16xN512xK512", kind="bench", dtype=BF16, m=16, n=512, k=512, weight="float"),
    dict(name="bench/f32/M128xN512xK512", kind="bench", dtype=F32, m=128, n=512, k=512),
    dict(name="bench/fp8-block/M16xN512xK512", kind="bench", dtype=BF16, m=16, n=512, k=512, weight="fp8-block"),
    dict(name="bench/fp8-block/q_a_proj/M4096xN1536xK7168", kind="bench", tier="full", dtype=BF16, m=4096, n=1536, k=7168, weight="fp8-block"),
    dict(name="bench/fp8-block/gate_up/M4096xN36864xK7168", kind="bench", tier="full", dtype=BF16, m=4096, n=36864, k=7168, weight="fp8-block"),
    dict(name="bench/fp8-block/down/M4096xN7168xK18432", kind="bench", tier="full", dtype=BF16, m=4096, n=7168, k=18432, weight="fp8-block"),
    dict(name="bench/fp8-block/down/M64xN7168xK18432", kind="bench", tier="full", dtype=BF16, m=64, n=7168, k=18432, weight="fp8-block"),
    dict(name="bench/bf16/lm_head/M64xN129280xK7168", kind="bench", tier="full", dtype=BF16, m=64, n=129280, k=7168),
]


@linear.examples(LINEAR_ROWS)
def _linear_example(draw: Draw, p) -> Example:
    """The float32 weight the quantized ones come from rides along as ``extras["w_f"]``."""
    lead = tuple(p.get("lead", (p.get("m", 1),)))
    n, k, dtype = p["n"], p["k"], p.get("dtype", BF16)
    x = fill_pattern(draw.randn(*lead, k, dtype=dtype), p.get("values"))
    w_f = draw.randn(n, k, scale=k**-0.5)
    kind = p.get("weight", "float")
    kw = {"x": x}
    if kind == "float":
        kw["weight"], kw["weight_scale"] = w_f.to(dtype), None
    elif kind == "int8":
        kw["weight"], kw["weight_scale"] = quantize_int8.reference_impl(w_f)
    else:
        block = (128, 128) if kind == "fp8-block" else (1, -1)
        kw["weight"], kw["weight_scale"] = quantize_fp8.reference_impl(w_f, block, draw.fp8(p.get("fmt", "e4m3")), None)
    kw["bias"] = draw.randn(n, dtype=dtype) if p.get("bias") else None
    return Example(kw, extras={"w_f": w_f})
