"""Rotary position embedding."""

from __future__ import annotations

import torch

from dshal.errors import ArgumentError, ShapeError
from dshal.ops.examples import Draw, Example, fill_pattern
from dshal.ops.spec import FLOAT_DTYPES, Cost, Output, check_broadcasts_to, check_same_device, check_tensor, op_spec


@op_spec
def rotary_embedding(x, cos, sin, interleaved=True):
    """Rotate pairs of ``x [..., D]`` (D even) by the angle whose cosine/sine are given.

    ``cos``/``sin`` hold one angle per pair: same shape, broadcastable to
    ``x[..., :D/2]`` (e.g. ``[T, D/2]`` for ``x [B, H, T, D]``). Pair ``i`` is
    ``(x[2i], x[2i+1])`` when ``interleaved`` (DeepSeek / GPT-J layout), else
    ``(x[i], x[i + D/2])`` (HF ``rotate_half`` / NeoX layout). Each pair ``(a, b)``
    becomes ``(a cos - b sin, b cos + a sin)``. Computed in float32 (float64 for float64
    inputs); the output has ``x``'s dtype and shape.
    """
    op = "rotary_embedding"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(op, "cos", cos, dtypes=FLOAT_DTYPES)
    check_tensor(op, "sin", sin, dtypes=FLOAT_DTYPES)
    d = x.shape[-1]
    if d % 2:
        raise ShapeError(f"{op}: argument 'x' has last dim {d} (shape {list(x.shape)}), expected an even size D")
    if sin.shape != cos.shape:
        raise ShapeError(f"{op}: argument 'sin' has shape {list(sin.shape)}, expected {list(cos.shape)} (the shape of 'cos')")
    check_broadcasts_to(op, "cos", cos, (*x.shape[:-1], d // 2), "x[..., :D/2]: one angle per pair")
    if not isinstance(interleaved, bool):
        raise ArgumentError(f"{op}: argument 'interleaved' is {interleaved!r}, expected True or False")
    check_same_device(op, "x", x, cos=cos, sin=sin)


@rotary_embedding.reference
def _rotary_embedding_reference(x, cos, sin, interleaved=True):
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    xf, c, s = x.to(acc), cos.to(acc), sin.to(acc)
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
    else:
        a, b = xf.chunk(2, dim=-1)
    ra, rb = a * c - b * s, b * c + a * s
    out = torch.stack((ra, rb), dim=-1).flatten(-2) if interleaved else torch.cat((ra, rb), dim=-1)
    return out.to(x.dtype)


@rotary_embedding.cost
def _rotary_embedding_cost(x, cos, sin, interleaved=True):
    n = x.numel()
    return Cost(flops=3 * n, bytes=2 * n * x.element_size() + 2 * cos.numel() * cos.element_size())


@rotary_embedding.outputs
def _rotary_embedding_outputs(x, cos, sin, interleaved=True):
    return (Output(x.shape, x.dtype),)


# ---------------------------------------------------------------- examples
BF16, F32 = torch.bfloat16, torch.float32
#: ``shape`` is x's ([B, H, T, D] or [T, D]); one angle per pair and position (``cos_shape``:
#: the tables' shape where they are not ``[T, D/2]`` with T = ``shape[-2]``: the model core's
#: layouts, ``[B, T, H, D]`` queries with ``[T, 1, D/2]`` tables, and a decode step whose rows
#: are at their own positions, ``[B, 1, 1, D/2]`` / ``[B, 1, D/2]``). Full-tier and bench
#: sizes are DeepSeek-V3's: 128 heads, rope head dim 64.
ROTARY_EMBEDDING_ROWS = [
    dict(name="bf16/interleaved/B1xH4xT16xD64", dtype=BF16, shape=(1, 4, 16, 64), interleaved=True),
    dict(name="bf16/halves/B1xH4xT16xD64", dtype=BF16, shape=(1, 4, 16, 64), interleaved=False),
    dict(name="f32/interleaved/B2xH2xT8xD32", dtype=F32, shape=(2, 2, 8, 32), interleaved=True),
    dict(name="f32/halves/T8xD64", dtype=F32, shape=(8, 64), interleaved=False),
    dict(name="bf16/model-queries/B2xT8xH4xD64", dtype=BF16, shape=(2, 8, 4, 64), cos_shape=(8, 1, 32), interleaved=True),
    dict(name="bf16/row-positions/B3xT1xH4xD64", dtype=BF16, shape=(3, 1, 4, 64), cos_shape=(3, 1, 1, 32),
         interleaved=True),
    dict(name="f32/row-positions/B3xT1xD64", dtype=F32, shape=(3, 1, 64), cos_shape=(3, 1, 32), interleaved=True),
    dict(name="bf16/M1", kind="edge", dtype=BF16, shape=(1, 4, 1, 64), interleaved=True),
    dict(name="bf16/M0", kind="edge", dtype=BF16, shape=(1, 4, 0, 64), interleaved=True),
    dict(name="bf16/noncontiguous", kind="edge", dtype=BF16, shape=(1, 4, 16, 64), interleaved=True, noncontiguous=("x",)),
    dict(name="f32/nan_inf", kind="edge", dtype=F32, shape=(1, 2, 8, 64), interleaved=True, values="nan_inf"),
    dict(name="bf16/v3-rope/B1xH128xT4096xD64", tier="full", dtype=BF16, shape=(1, 128, 4096, 64), interleaved=True),
    # bench
    dict(name="bench/bf16/B1xH16xT64xD64", kind="bench", dtype=BF16, shape=(1, 16, 64, 64)),
    dict(name="bench/bf16/B1xH128xT4096xD64", kind="bench", tier="full", dtype=BF16, shape=(1, 128, 4096, 64)),
]


@rotary_embedding.examples(ROTARY_EMBEDDING_ROWS)
def _rotary_embedding_example(draw: Draw, p) -> Example:
    shape, dtype = p["shape"], p.get("dtype", BF16)
    x = fill_pattern(draw.randn(*shape, dtype=dtype), p.get("values"))
    angles = draw.randn(*p.get("cos_shape", (shape[-2], shape[-1] // 2)), scale=3.0)
    interleaved = p.get("interleaved", True)
    return Example({"x": x, "cos": angles.cos().to(dtype), "sin": angles.sin().to(dtype), "interleaved": interleaved})
