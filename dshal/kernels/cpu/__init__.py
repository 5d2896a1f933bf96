"""C kernels for the ``cpu`` backend: the decode-step work torch spreads over many small
calls or reads memory badly for.

``kernels.c`` holds the kernels (few-row float32 GEMV, FP8 block-scaled GEMM for a few
rows, the experts of a decode step's few tokens in float32 and FP8, the router, the expert
grouping, RMSNorm, rotary, and a prefill's per-(1, 128) FP8 activation quantization); each
computes a row's result from that row alone, whatever the other rows of the call;
:mod:`._library` builds and loads it on first use. Each kernel has a checked Python
wrapper here, as the Triton kernels do: it raises a ``DshalError`` for a wrong dtype,
shape, layout or device, allocates the outputs and calls the kernel.
Nothing is built at ``import dshal``. Without a working compiler (or with
``DSHAL_CPU_KERNELS=0``) :func:`status` says why and the cpu backend serves these cases
with torch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from dshal.errors import DeviceError, DTypeError, ShapeError
from dshal.kernels.cpu._library import (
    FP8_E4M3,
    KernelStatus,
    cache_dir,
    library,
    reload,
    require_library,
    status,
)
from dshal.ops.spec import check_broadcasts_to, check_tensor

__all__ = [
    "FP8_E4M3",
    "KernelStatus",
    "cache_dir",
    "fp8_block_gemm",
    "fp8_fake_quant_rows",
    "gemv",
    "library",
    "moe_combine",
    "moe_gate",
    "moe_group",
    "moe_tokens",
    "moe_tokens_fp8",
    "reload",
    "rms_norm",
    "rotary",
    "status",
]


_F32 = (torch.float32,)
_INT32_MAX = 2**31 - 1


def _not_traced(kernel: Any) -> Any:
    """``kernel`` as a graph break under ``torch.compile``: dynamo would trace its ctypes call with
    fake tensors' pointers (heap corruption, then wrong logits). The cpu backend's ops reach
    the kernels inside opaque operators there (:mod:`dshal.backends.cpu_opaque`, no break);
    this guards a kernel called directly. Wrapped when traced only:
    ``torch.compiler.disable`` imports dynamo, which imports triton, and triton imported before
    ``TRITON_INTERPRET=1`` rules out emulated GPU plugins later in the process."""

    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo is tracing this call: run the kernel outside the graph
            return torch.compiler.disable(kernel)(*args, **kwargs)
        return kernel(*args, **kwargs)

    return call


def _check_cpu(
    kernel: str, arg: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], ndim: int | None = None,
    contiguous: bool = False,
) -> None:  # fmt: skip
    """The ops' own dtype/rank check, then: on the CPU, and contiguous when asked."""
    check_tensor(kernel, arg, t, dtypes=dtypes, ndim=ndim)
    if not t.is_cpu:
        raise DeviceError(f"{kernel}: argument {arg!r} is on {t.device}, expected cpu")
    if contiguous and not t.is_contiguous():
        raise ShapeError(f"{kernel}: argument {arg!r} has strides {t.stride()}, expected a contiguous tensor")


def _check_f32_cpu(kernel: str, arg: str, t: torch.Tensor) -> None:
    _check_cpu(kernel, arg, t, _F32)


def _check_weight(kernel: str, arg: str, w: torch.Tensor, ndim: int) -> None:
    _check_cpu(kernel, arg, w, _F32, ndim=ndim, contiguous=True)


def _check_routing(kernel: str, weights: torch.Tensor, ids: torch.Tensor) -> None:
    """The routing of ``T >= 1`` tokens: ``ids [T, k]`` int64/int32 and ``weights [T, k]``
    float, on the CPU."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.dtype not in (torch.int64, torch.int32) or not ids.is_cpu:
        raise ShapeError(
            f"{kernel}: argument 'ids' is {ids.dtype} {list(ids.shape)} on {ids.device}, "
            "expected int64/int32 [T, k] with T >= 1 on cpu"
        )
    if tuple(weights.shape) != tuple(ids.shape) or not weights.is_floating_point() or not weights.is_cpu:
        raise ShapeError(
            f"{kernel}: argument 'weights' is {weights.dtype} {list(weights.shape)} on {weights.device}, "
            f"expected float {list(ids.shape)} on cpu (one weight per id)"
        )


def _raise_bad_id(kernel: str, ids: torch.Tensor, slot: int, experts: int, no_expert: bool = False) -> None:
    """The error for the id a kernel found outside ``[0, experts)`` at flat ``slot`` (and not
    ``NO_EXPERT`` where the kernel takes it: ``no_expert``)."""
    raise ShapeError(
        f"{kernel}: argument 'ids' holds expert id {int(ids.reshape(-1)[slot])} (slot {slot}), "
        f"expected ids in [0, {experts})" + (" or -1 (NO_EXPERT)" if no_expert else "")
    )


@_not_traced
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for a few rows, reading ``weight`` once, row after row:
    ``x [..., K]`` float32 (``K > 0``), ``weight [N, K]`` float32 contiguous, ``bias [N]``
    float32 or None, all on the CPU. Returns a new ``[..., N]`` float32 tensor. ``x`` and
    ``bias`` may have any strides (copied when not contiguous). Each x row costs a full
    pass of dot products, so this is for decode steps (one row or a small batch)."""
    kernel = "cpu_kernels.gemv"
    lib = require_library()
    _check_f32_cpu(kernel, "x", x)
    _check_weight(kernel, "weight", weight, 2)
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k or k == 0:
        raise ShapeError(f"{kernel}: argument 'x' has shape {list(x.shape)}, expected [..., K={k}] with K > 0")
    if bias is not None:
        _check_f32_cpu(kernel, "bias", bias)
        if tuple(bias.shape) != (n,):
            raise ShapeError(f"{kernel}: argument 'bias' has shape {list(bias.shape)}, expected [{n}]")
        bias = bias.contiguous()
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32, device="cpu")
    bias_ptr = None if bias is None else bias.data_ptr()
    lib.dshal_gemv_f32(weight.data_ptr(), x.data_ptr(), bias_ptr, out.data_ptr(), x.numel() // k, n, k)
    return out


@_not_traced
def moe_tokens(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """A few tokens through their routed SwiGLU experts (``moe_experts`` for a decode step):
    ``out[t] = sum_s weights[t, s] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t]))``,
    ``e = ids[t, s]``, summed in float32 in slot order. Each expert's weights are read once
    for all the tokens routed to it, and a token's result depends on its own row and routing
    only, bit for bit (not on the other tokens of the call). A slot whose id is ``NO_EXPERT``
    (-1: served by another expert-parallel rank) adds nothing, whatever its weight (NaN too):
    the token gets what it gets alone with that slot dropped.

    ``x [T, H]`` float32 (``T >= 1``); ``weights [T, k]`` float (read as float32); ``ids [T, k]``
    int64/int32 in ``[0, E)`` or -1; ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` float32 contiguous;
    all on the CPU. Returns a new ``[T, H]`` float32 tensor (a token with every slot -1: zeros).
    Any other id raises ShapeError (checked before any weight is read)."""
    kernel = "cpu_kernels.moe_tokens"
    lib = require_library()
    _check_f32_cpu(kernel, "x", x)
    _check_weight(kernel, "w13", w13, 3)
    _check_weight(kernel, "w2", w2, 3)
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    _check_routing(kernel, weights, ids)
    tokens, top_k = ids.shape
    if tuple(x.shape) != (tokens, hidden):
        raise ShapeError(f"{kernel}: argument 'x' has shape {list(x.shape)}, expected [{tokens}, {hidden}] (a row per row of 'ids')")
    if two_inter % 2 or tuple(w2.shape) != (experts, hidden, inter):
        raise ShapeError(
            f"{kernel}: arguments 'w13' {list(w13.shape)} and 'w2' {list(w2.shape)} do not match; "
            f"expected w13 [E, 2I, H] and w2 [E, H, I]"
        )
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    counts_order = torch.empty(experts + tokens * top_k, dtype=torch.int64, device="cpu")  # one allocation: a decode step's
    scratch = torch.empty(tokens * top_k * (two_inter + hidden), dtype=torch.float32, device="cpu")  # calls are µs
    out = torch.empty(tokens, hidden, dtype=torch.float32, device="cpu")
    bad = lib.dshal_moe_tokens_f32(
        x.data_ptr(), w13.data_ptr(), w2.data_ptr(), ids.data_ptr(), weights.data_ptr(), tokens, top_k, experts, hidden,
        inter, counts_order.data_ptr(), counts_order.data_ptr() + experts * 8, scratch.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if bad:
        _raise_bad_id(kernel, ids, bad - 1, experts, no_expert=True)
    return out


@_not_traced
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, fused with the residual add when ``residual`` is given:
    ``s = x (+ residual)``, ``y = s / sqrt(mean(s**2) + eps) * weight``, in float32.

    ``x [..., D]`` and ``residual`` (same shape) float32, any strides (copied when not
    contiguous); ``weight [D]`` float32; all on the CPU. Returns ``y`` (new, ``x``'s shape),
    or ``(y, s)`` with ``residual``, as ``dshal.ops.rms_norm`` does."""
    kernel = "cpu_kernels.rms_norm"
    lib = require_library()
    _check_f32_cpu(kernel, "x", x)
    _check_f32_cpu(kernel, "weight", weight)
    if x.dim() == 0 or tuple(weight.shape) != (x.shape[-1],):
        raise ShapeError(
            f"{kernel}: argument 'weight' has shape {list(weight.shape)}, "
            f"expected [D] with D = x.shape[-1] of x {list(x.shape)}"
        )
    if residual is not None:
        _check_f32_cpu(kernel, "residual", residual)
        if residual.shape != x.shape:
            raise ShapeError(
                f"{kernel}: argument 'residual' has shape {list(residual.shape)}, expected {list(x.shape)} (x's shape)"
            )
        residual = residual.contiguous()
    x, weight = x.contiguous(), weight.contiguous()
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    y = torch.empty(x.shape, dtype=torch.float32, device="cpu")
    total = None if residual is None else torch.empty(x.shape, dtype=torch.float32, device="cpu")
    lib.dshal_rms_norm_f32(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
        y.data_ptr(), None if total is None else total.data_ptr(), rows, width,
    )  # fmt: skip
    return y if total is None else (y, total)


@_not_traced
def moe_gate(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V3's router, as ``dshal.ops.moe_gate`` defines it, in float32:
    ``logits [T, E]`` float32 (any strides), ``bias [E]`` float32 or None, on the CPU ->
    ``(weights [T, top_k] float32, ids [T, top_k] int64)``, best expert first (the lowest
    id on exact ties). Returns None when a logit or bias is NaN or infinite: the caller
    then takes the reference, whose ordering of non-finite scores this kernel does not
    reproduce. The counts must satisfy the op's rules (``n_group`` divides E,
    ``1 <= topk_group <= n_group``, ``1 <= top_k <=`` the experts in the kept groups)."""
    kernel = "cpu_kernels.moe_gate"
    lib = require_library()
    _check_f32_cpu(kernel, "logits", logits)
    if logits.dim() != 2:
        raise ShapeError(f"{kernel}: argument 'logits' has shape {list(logits.shape)}, expected [T, E]")
    tokens, experts = logits.shape
    if bias is not None:
        _check_f32_cpu(kernel, "bias", bias)
        if tuple(bias.shape) != (experts,):
            raise ShapeError(f"{kernel}: argument 'bias' has shape {list(bias.shape)}, expected [{experts}]")
        bias = bias.contiguous()
    if n_group < 1 or experts % n_group or not 1 <= topk_group <= n_group:
        raise ShapeError(f"{kernel}: n_group={n_group}, topk_group={topk_group} do not split {experts} experts")
    if not 1 <= top_k <= (experts // n_group) * (topk_group if topk_group < n_group else n_group):
        raise ShapeError(f"{kernel}: top_k={top_k} is outside [1, the experts in the kept groups]")
    logits = logits.contiguous()
    scratch = torch.empty(2 * experts + n_group, dtype=torch.float32, device="cpu")
    usable = torch.empty(experts + n_group, dtype=torch.uint8, device="cpu")
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device="cpu")
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device="cpu")
    not_finite = lib.dshal_moe_gate_f32(
        logits.data_ptr(), None if bias is None else bias.data_ptr(), tokens, experts, top_k, n_group, topk_group,
        routed_scaling_factor, int(norm_topk_prob),
        scratch.data_ptr(), usable.data_ptr(), weights.data_ptr(), ids.data_ptr(),
    )  # fmt: skip
    return None if not_finite else (weights, ids)


@_not_traced
def moe_group(x: torch.Tensor, ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort a multi-token ``moe_experts`` call's slots by expert and gather their rows.

    ``x [T, H]`` float32 and ``ids [T, k]`` int64/int32 on the CPU (any strides); slot
    ``t * k + s`` is token ``t``'s ``s``-th expert. Returns ``(xs [T * k, H] float32,
    order [T * k] int64, ends [experts] int32)``: ``order`` lists the slots by expert
    (stable), ``xs[j] = x[order[j] // k]``, and ``ends[e]`` counts the slots of experts
    ``<= e`` (the ``offs`` of ``torch._grouped_mm``). An id outside ``[0, experts)``, or
    more than ``2**31 - 1`` slots (``ends`` is int32), raises ShapeError."""
    kernel = "cpu_kernels.moe_group"
    lib = require_library()
    _check_f32_cpu(kernel, "x", x)
    if (
        x.dim() != 2
        or ids.dim() != 2
        or ids.shape[0] != x.shape[0]
        or ids.dtype not in (torch.int64, torch.int32)
        or not ids.is_cpu
    ):
        raise ShapeError(
            f"{kernel}: arguments 'x' {list(x.shape)} and 'ids' {ids.dtype} {list(ids.shape)} on {ids.device}, "
            "expected x [T, H] and int64/int32 ids [T, k] on cpu"
        )
    if experts < 1:
        raise ShapeError(f"{kernel}: argument 'experts' is {experts}, expected >= 1")
    tokens, hidden = x.shape
    k = ids.shape[1]
    if tokens * k > _INT32_MAX:  # ends (grouped_mm's offs) are int32: a larger count would wrap
        raise ShapeError(
            f"{kernel}: argument 'ids' has shape {list(ids.shape)} ({tokens * k} slots), "
            f"expected at most {_INT32_MAX} slots (the group ends are int32)"
        )
    x, ids = x.contiguous(), ids.to(torch.int64).contiguous()
    counts = torch.empty(experts, dtype=torch.int64, device="cpu")
    order = torch.empty(tokens * k, dtype=torch.int64, device="cpu")
    ends = torch.empty(experts, dtype=torch.int32, device="cpu")
    xs = torch.empty(tokens * k, hidden, dtype=torch.float32, device="cpu")
    bad = lib.dshal_moe_group_f32(
        x.data_ptr(),
        ids.data_ptr(),
        tokens,
        k,
        experts,
        hidden,
        counts.data_ptr(),
        order.data_ptr(),
        ends.data_ptr(),
        xs.data_ptr(),
    )
    if bad:
        _raise_bad_id(kernel, ids, bad - 1, experts)
    return xs, order, ends


@_not_traced
def moe_combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum back per token, the inverse of :func:`moe_group`:
    ``out[t] = sum_j weights[t, s] * y[j]`` over the rows ``j`` with ``order[j] = t * k + s``,
    in float32, in expert order. ``y [T * k, H]`` float32 contiguous, ``order [T * k]``
    int64 from :func:`moe_group`, ``weights [T, k]`` float (read as float32), on the CPU.
    Returns a new ``[T, H]`` float32 tensor. A slot in ``order`` outside ``[0, T * k)``
    raises ShapeError."""
    kernel = "cpu_kernels.moe_combine"
    lib = require_library()
    _check_weight(kernel, "y", y, 2)
    if weights.dim() != 2 or not weights.is_floating_point() or not weights.is_cpu:
        raise ShapeError(
            f"{kernel}: argument 'weights' is {weights.dtype} {list(weights.shape)}, expected float [T, k] on cpu"
        )
    tokens, k = weights.shape
    if (
        y.shape[0] != tokens * k
        or tuple(order.shape) != (tokens * k,)
        or order.dtype != torch.int64
        or not order.is_contiguous()
    ):
        raise ShapeError(
            f"{kernel}: arguments 'y' {list(y.shape)} and 'order' {order.dtype} {list(order.shape)} do not match "
            f"'weights' {list(weights.shape)}; expected y [T * k, H] and a contiguous int64 order [T * k] "
            "from moe_group"
        )
    if not order.is_cpu:
        raise DeviceError(f"{kernel}: argument 'order' is on {order.device}, expected cpu")
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(tokens, y.shape[1], dtype=torch.float32, device="cpu")
    bad = lib.dshal_moe_combine_f32(
        y.data_ptr(), order.data_ptr(), weights.data_ptr(), tokens, k, y.shape[1], out.data_ptr()
    )
    if bad:  # order indexes weights and out: a slot outside them would be read and written out of bounds
        raise ShapeError(
            f"{kernel}: argument 'order' holds {int(order[bad - 1])} at position {bad - 1}, "
            f"expected slots in [0, {tokens * k}) (a permutation from moe_group)"
        )
    return out


@functools.lru_cache(maxsize=256)
def _rotary_layout(
    shape: tuple[int, ...], strides: tuple[int, ...], table: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """``(row_stride, inner, periods)`` for ``x`` of this shape and these strides and a
    contiguous angle table of shape ``table`` (``[..., D/2]``): row ``r`` of ``x`` (its
    leading dims, row-major) sits at ``r * row_stride`` and takes table row
    ``(r // inner) % periods``. ``row_stride`` is 0 when the leading dims do not collapse
    to one stride (``x`` must be copied first). None: the table's last dim is not D/2, or
    its non-broadcast dims are not one block of consecutive dims."""
    lead, d = shape[:-1], shape[-1]
    if table[-1] != d // 2 or len(table) - 1 > len(lead):
        return None
    padded = (1,) * (len(lead) - len(table) + 1) + table[:-1]
    kept = [i for i, (n, c) in enumerate(zip(lead, padded)) if n > 1 and c == n]
    inner, periods = 1, 1
    if kept:
        first, last = kept[0], kept[-1] + 1
        if any(lead[i] > 1 and padded[i] == 1 for i in range(first, last)):
            return None
        inner, periods = math.prod(lead[last:]), math.prod(lead[first:last])
    collapses = strides[-1] == 1 and all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(len(shape) - 2))
    row_stride = (strides[-2] if len(shape) > 1 else d) if collapses else 0
    return row_stride, inner, periods


@_not_traced
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor | None:
    """``dshal.ops.rotary_embedding`` in float32: pairs of ``x [..., D]`` rotated by the
    angles in ``cos``/``sin`` (same shape, ``[..., D/2]``, broadcastable to ``x[..., :D/2]``).
    All float32 on the CPU. Returns a new contiguous tensor of ``x``'s shape, or None when
    the angle tables' layout is one this kernel does not index (0-d, a last dim of 1, or
    non-broadcast dims that are not consecutive): the caller then takes another path.
    Tables that do not broadcast to ``x[..., :D/2]`` raise ShapeError."""
    kernel = "cpu_kernels.rotary"
    lib = require_library()
    for arg, t in (("x", x), ("cos", cos), ("sin", sin)):
        _check_f32_cpu(kernel, arg, t)
    if x.dim() == 0 or x.shape[-1] % 2 or cos.shape != sin.shape:
        raise ShapeError(
            f"{kernel}: arguments 'x' {list(x.shape)}, 'cos' {list(cos.shape)}, 'sin' {list(sin.shape)}, "
            "expected x [..., D] with D even and cos, sin of one shape [..., D/2]"
        )
    # the kernel indexes the tables by x's rows: another shape would be read out of bounds
    check_broadcasts_to(kernel, "cos", cos, (*x.shape[:-1], x.shape[-1] // 2), "x[..., :D/2]")
    layout = None if cos.dim() == 0 else _rotary_layout(x.shape, x.stride(), cos.shape)
    if layout is None:
        return None
    row_stride, inner, periods = layout
    if row_stride == 0:
        x = x.contiguous()
        row_stride = x.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device="cpu")
    lib.dshal_rotary_f32(
        x.data_ptr(), row_stride, cos.data_ptr(), sin.data_ptr(), x.numel() // x.shape[-1] if x.shape[-1] else 0,
        x.shape[-1], inner, periods, int(interleaved), out.data_ptr(),
    )  # fmt: skip
    return out


def _check_block_scaled(
    kernel: str, arg: str, w: torch.Tensor, scale_arg: str, scale: torch.Tensor, ndim: int
) -> None:
    """``w [..., N, K]`` (``ndim`` dims) E4M3 contiguous with float32
    ``scale [..., ceil(N/128), ceil(K/128)]``."""
    _check_cpu(kernel, arg, w, tuple(FP8_E4M3), ndim=ndim, contiguous=True)
    _check_f32_cpu(kernel, scale_arg, scale)
    want = (*w.shape[:-2], math.ceil(w.shape[-2] / 128), math.ceil(w.shape[-1] / 128))
    if tuple(scale.shape) != want:
        raise ShapeError(
            f"{kernel}: argument {scale_arg!r} has shape {list(scale.shape)}, expected {list(want)} "
            f"(one scale per 128x128 block of {arg!r} {list(w.shape)})"
        )


@_not_traced
def fp8_block_gemm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``dshal.ops.linear`` for a few rows and an FP8 block-scaled weight, in float32: each
    row of ``x`` is quantized per 128 values to the weight's format (E4M3 or E4M3 FNUZ;
    NaN stays NaN, +-Inf saturates), then ``y[i, r] = sum_j dot(xq_ij, w[r, j]) *
    x_scale[i, j] * weight_scale[r // 128, j]`` (+ ``bias``, float32). The weight is read
    once whatever the row count; the work grows with it, so this is for decode steps (one
    row, or a small batch), not prefills.

    ``x [..., K]`` float32/bf16/fp16 (``K > 0``); ``weight [N, K]`` E4M3 contiguous;
    ``weight_scale [ceil(N/128), ceil(K/128)]`` float32; ``bias [N]`` float or None; all on
    the CPU. Returns a new ``[..., N]`` float32 tensor (the caller casts to its dtype)."""
    kernel = "cpu_kernels.fp8_block_gemm"
    lib = require_library()
    _check_block_scaled(kernel, "weight", weight, "weight_scale", weight_scale, 2)
    n, k = weight.shape
    _check_cpu(kernel, "x", x, (torch.float32, torch.bfloat16, torch.float16))
    if x.dim() == 0 or x.shape[-1] != k or k == 0:
        raise ShapeError(f"{kernel}: argument 'x' has shape {list(x.shape)}, expected [..., K={k}] with K > 0")
    if bias is not None:
        if tuple(bias.shape) != (n,) or not bias.is_floating_point() or not bias.is_cpu:
            raise ShapeError(
                f"{kernel}: argument 'bias' is {bias.dtype} {list(bias.shape)}, expected float [{n}] on cpu"
            )
        bias = bias.to(torch.float32).contiguous()
    rows = x.numel() // k
    blocks = math.ceil(k / 128)
    x32 = x.to(torch.float32).contiguous()
    scratch = torch.empty(rows * (k + blocks) + 128, dtype=torch.float32, device="cpu")
    out = torch.empty(*x.shape[:-1], n, dtype=torch.float32, device="cpu")
    scale = weight_scale.contiguous()  # bound: a temporary's memory is freed before the call reads it
    lib.dshal_fp8_block_gemm_f32(
        x32.data_ptr(), weight.data_ptr(), scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(), scratch.data_ptr(), rows, n, k, FP8_E4M3[weight.dtype],
    )  # fmt: skip
    return out


@_not_traced
def moe_tokens_fp8(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
) -> torch.Tensor:
    """``moe_experts`` for a few tokens with FP8 block-scaled experts, as the op defines it:
    each expert's two products quantize their input row per 128 values to the weights'
    format; with a bf16 ``x`` the gate/up outputs, the SwiGLU product and each expert's
    output are rounded to bf16 where the op rounds them to ``x``'s dtype; the weighted sum
    is float32, in slot order. As :func:`moe_tokens`: each expert's weights are read once for
    all its tokens, a token's result depends on its own row and routing only, bit for bit, and
    a ``NO_EXPERT`` (-1) slot adds nothing.

    ``x [T, H]`` float32 or bfloat16 (``T >= 1``); ``weights [T, k]`` float; ``ids [T, k]``
    int64/int32 in ``[0, E)`` or -1; ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` E4M3 (one format) contiguous with float32
    block scales ``w13_scale [E, ceil(2I/128), ceil(H/128)]``, ``w2_scale [E, ceil(H/128),
    ceil(I/128)]``; all on the CPU. Returns a new ``[T, H]`` float32 tensor. Any other id
    raises ShapeError."""
    kernel = "cpu_kernels.moe_tokens_fp8"
    lib = require_library()
    _check_block_scaled(kernel, "w13", w13, "w13_scale", w13_scale, 3)
    _check_block_scaled(kernel, "w2", w2, "w2_scale", w2_scale, 3)
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    if two_inter % 2 or tuple(w2.shape) != (experts, hidden, inter) or w2.dtype != w13.dtype:
        raise ShapeError(
            f"{kernel}: arguments 'w13' {w13.dtype} {list(w13.shape)} and 'w2' {w2.dtype} {list(w2.shape)} "
            "do not match; "
            "expected w13 [E, 2I, H] and w2 [E, H, I] in one FP8 format"
        )
    _check_routing(kernel, weights, ids)
    tokens, top_k = ids.shape
    if x.dtype not in (torch.float32, torch.bfloat16) or tuple(x.shape) != (tokens, hidden) or not x.is_cpu:
        raise ShapeError(
            f"{kernel}: argument 'x' is {x.dtype} {list(x.shape)} on {x.device}, "
            f"expected float32/bfloat16 [{tokens}, {hidden}] on cpu (a row per row of 'ids')"
        )
    rows = x.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    slots = tokens * top_k
    counts_order = torch.empty(experts + slots, dtype=torch.int64, device="cpu")
    scratch = torch.empty(
        tokens * (hidden + math.ceil(hidden / 128)) + slots * (3 * inter + math.ceil(inter / 128) + hidden) + 128,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    out = torch.empty(tokens, hidden, dtype=torch.float32, device="cpu")
    s13, s2 = w13_scale.contiguous(), w2_scale.contiguous()  # bound: temporaries would be freed before the call
    bad = lib.dshal_moe_tokens_fp8(
        rows.data_ptr(), w13.data_ptr(), w2.data_ptr(), s13.data_ptr(), s2.data_ptr(), ids.data_ptr(),
        weights.data_ptr(), tokens, top_k, experts, hidden, inter, FP8_E4M3[w13.dtype], int(x.dtype == torch.bfloat16),
        counts_order.data_ptr(), counts_order.data_ptr() + experts * 8, scratch.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if bad:
        _raise_bad_id(kernel, ids, bad - 1, experts, no_expert=True)
    return out


@_not_traced
def fp8_fake_quant_rows(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``x [..., K]`` quantized per (1, 128) to the E4M3 format ``fp8`` and dequantized
    again, in one pass per 128-value block: the float32 values an FP8 ``linear`` multiplies
    (``dshal.ops.linear``'s reference: ``scale = amax / max`` over the block's finite values,
    at least float32's smallest normal, 1 for a block without a nonzero finite value;
    ``q = (x / scale).clamp(-max, max).to(fp8)``; ``q.float() * scale``), bit for bit,
    NaN and signed zeros included. ``K`` need not be a multiple of 128 (the last block of a
    row is shorter).

    ``x`` float32/bfloat16/float16 (float16 is widened by torch first) on the CPU, any
    leading shape; its rows are read in place when its last dim is contiguous and the
    leading dims collapse to one stride, else from a contiguous copy. ``fp8``
    ``torch.float8_e4m3fn`` or ``torch.float8_e4m3fnuz``. Returns a new contiguous float32
    tensor of ``x``'s shape."""
    kernel = "cpu_kernels.fp8_fake_quant_rows"
    lib = require_library()
    _check_cpu(kernel, "x", x, (torch.float32, torch.bfloat16, torch.float16), ndim=None)
    if x.dim() == 0:
        raise ShapeError(f"{kernel}: argument 'x' has shape [], expected [..., K]")
    if fp8 not in FP8_E4M3:
        raise DTypeError(f"{kernel}: argument 'fp8' is {fp8!r}, expected one of {sorted(map(str, FP8_E4M3))}")
    if x.dtype == torch.float16:
        x = x.to(torch.float32)
    k = x.shape[-1]
    # empty_like: ~1 µs less than torch.empty(shape) per call, a prefill makes ~30 of these
    out = torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    rows = x.numel() // k
    row_stride = k if x.is_contiguous() else _row_stride(x)
    if row_stride is None:
        x = x.contiguous()
        row_stride = k
    lib.dshal_fp8_fake_quant_rows(
        x.data_ptr(), int(x.dtype == torch.bfloat16), row_stride, rows, k, FP8_E4M3[fp8], out.data_ptr()
    )
    return out


def _row_stride(x: torch.Tensor) -> int | None:
    """The one stride between consecutive rows of ``x [..., K]`` (its leading dims
    flattened), or None when its last dim is not contiguous or the leading dims do not
    collapse to one stride."""
    shape, strides = x.shape, x.stride()
    if shape[-1] > 1 and strides[-1] != 1:
        return None
    lead = [(n, s) for n, s in zip(shape[:-1], strides[:-1]) if n > 1]
    if not lead:
        return shape[-1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != inner * n:
            return None
    return lead[-1][1]
