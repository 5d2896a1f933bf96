"""Rotary position embedding."""

from __future__ import annotations

import torch

from dshal.errors import ArgumentError, ShapeError
from dshal.ops.spec import FLOAT_DTYPES, Cost, check_same_device, check_tensor, op_spec


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
    half = (*x.shape[:-1], d // 2)
    # Broadcastable *to* half: right-aligned, each dim of cos is 1 or equal (plain ints: fast).
    fits = cos.dim() <= len(half) and all(c == 1 or c == h for c, h in zip(reversed(cos.shape), reversed(half)))
    if not fits:
        raise ShapeError(
            f"{op}: argument 'cos' has shape {list(cos.shape)}, expected a shape broadcastable to {list(half)} "
            "(x[..., :D/2]: one angle per pair)"
        )
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
