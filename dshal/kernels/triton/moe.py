"""Grouped MoE experts: tokens sorted by expert, one grouped-GEMM launch per projection.

``grouped_moe_experts`` computes, for every token t and each of its top-k choices j,
``weights[t, j] * w2[e] @ swiglu(w13[e] @ x[t])`` with ``e = ids[t, j]``, and sums over j.

How it runs (no Python loop over experts):
1. the T*k (token, choice) rows are sorted by expert (a stable argsort of ``ids``); the
   per-expert row offsets are cut into tiles of ``block_m`` rows, giving every tile its
   expert and first row (a few small torch ops on the device, no host sync);
2. one launch of ``_moe_gate_up_kernel`` over (tile, N block): gathers the tiles' token rows
   of ``x``, multiplies by ``w13[e]`` (gate and up halves together) and applies SwiGLU in
   the epilogue;
3. one launch of ``_moe_down_kernel``: multiplies by ``w2[e]``, scales each row by its
   routing weight and writes it back to the row's original (token, choice) slot, in float32;
4. a sum over the k choices (one torch reduction) gives ``[T, H]``. With one choice per token
   (k = 1: the expert-parallel path) the down kernel writes the output in ``x``'s dtype itself.

Weights are ``x``'s float dtype, or FP8 with 128x128 block scales; then, as in
``dshal.ops.linear``, the GEMM's activation rows are quantized per (1, 128) in the weight's
FP8 format -- inside the kernel, one 128-wide K block at a time -- and each block product
is promoted to FP32 with both scales (the block-FP8 GEMM's scheme).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dshal.errors import DTypeError, ShapeError
from dshal.kernels.triton._checks import (
    FP8_FORMATS,
    check_flag,
    check_kernel_device,
    checked_target,
    hardware_nan_moe,
    launch,
    module_interpreted,
    resolve_target,
)
from dshal.kernels.triton._jit import cast_rne, finite_abs, quantize_with_scale, scale_from_amax
from dshal.kernels.triton.target import KernelTarget
from dshal.ops.spec import check_dim, check_ids_in_range, check_same_device, check_tensor

INTERPRETED = module_interpreted()

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int64, torch.int32)
#: Rows/columns of one FP8 weight scale block.
SCALE_BLOCK = 128
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _dot(acc, a, b, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with both operands in DOT_DTYPE (float32 dots are IEEE, not TF32)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _quantize_rows(a, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
                   NO_NEG_ZERO: tl.constexpr):  # fmt: skip
    """``a [BLOCK_M, 128]`` quantized per row as ``quantize_fp8(block=(1, 128))`` would (the
    reference's activation quantization): (values on the FP8 grid as float32, row scales)."""
    a = a.to(tl.float32)
    a_scale = scale_from_amax(tl.max(finite_abs(a), axis=1), FP8_MAX, False)
    return quantize_with_scale(a, a_scale[:, None], FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO), a_scale


@triton.jit
def _fp8_scaled_dot(acc, qa, a_scale, w_ptrs, k_ok, w_scale, DOT_FP8: tl.constexpr, ONE_W_SCALE: tl.constexpr):
    """``acc + qa @ w * scales`` for one 128-wide K block: ``qa`` from :func:`_quantize_rows`,
    ``w [128, BLOCK_N]`` an FP8 weight tile; ``w_scale`` its columns' scales (their 128x128
    blocks'), or with ONE_W_SCALE the one scale all its stored columns share."""
    w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
    if DOT_FP8:
        part = tl.dot(qa.to(w.dtype), w)
    else:  # exact: FP8 values are float16 values
        part = tl.dot(qa.to(tl.float16), w.to(tl.float16))
    # scales first: part * a_scale alone can overflow
    if ONE_W_SCALE:  # a [BLOCK_M] scale vector, not [BLOCK_M, BLOCK_N] in registers: same products
        return acc + part * (a_scale * w_scale)[:, None]
    else:
        return acc + part * (a_scale[:, None] * w_scale[None, :])


@triton.jit
def _tile_rows(tile_expert_ptr, tile_row_ptr, expert_end_ptr, E, BLOCK_M: tl.constexpr):
    """This tile's expert (E for skipped slots' rows, E + 1 when the tile is unused), its
    sorted rows and their validity."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    end = tl.load(expert_end_ptr + tl.minimum(expert, E))
    rows = row0 + tl.arange(0, BLOCK_M)
    return expert, rows, rows < end


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, act_ptr,
    token_of_row_ptr, tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    H, INTER, E,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP8: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    UP_ONE_SCALE: tl.constexpr,
):  # fmt: skip
    # With FP8 weights BLOCK_K is 128: one activation/weight scale block per K step. A tile
    # of BLOCK_N <= 128 columns (a power of two) starting at a multiple of BLOCK_N lies in one
    # 128-row weight scale block: so do its stored gate rows (offs_n < INTER), and its up rows
    # INTER + offs_n when INTER is a multiple of BLOCK_N (UP_ONE_SCALE); else one scale per column.
    expert, rows, row_ok = _tile_rows(tile_expert_ptr, tile_row_ptr, expert_end_ptr, E, BLOCK_M)
    if expert < E:
        tokens = tl.load(token_of_row_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gate_rows = offs_n % INTER  # wrapped columns are computed but never stored
        up_rows = gate_rows + INTER
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh
        w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk
        g_ptrs = w_base + gate_rows[None, :].to(tl.int64) * stride_wn
        u_ptrs = w_base + up_rows[None, :].to(tl.int64) * stride_wn
        s_base = s_ptr + expert.to(tl.int64) * stride_se
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = offs_k + k0 < H
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_FP8:
                s_k = s_base + (k0 // BLOCK_K) * stride_sk
                if BLOCK_N <= BLOCK_K:
                    g_scale = tl.load(s_k + (n0 // BLOCK_K) * stride_sn)
                else:
                    g_scale = tl.load(s_k + (gate_rows // BLOCK_K) * stride_sn)
                if UP_ONE_SCALE:
                    u_scale = tl.load(s_k + ((INTER + n0) // BLOCK_K) * stride_sn)
                else:
                    u_scale = tl.load(s_k + (up_rows // BLOCK_K) * stride_sn)
                qa, a_scale = _quantize_rows(a, FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO)  # once for both halves
                acc_g = _fp8_scaled_dot(acc_g, qa, a_scale, g_ptrs, k_ok, g_scale, DOT_FP8, BLOCK_N <= BLOCK_K)
                acc_u = _fp8_scaled_dot(acc_u, qa, a_scale, u_ptrs, k_ok, u_scale, DOT_FP8, UP_ONE_SCALE)
            else:
                acc_g = _dot(acc_g, a, tl.load(g_ptrs, mask=k_ok[:, None], other=0.0), DOT_DTYPE)
                acc_u = _dot(acc_u, a, tl.load(u_ptrs, mask=k_ok[:, None], other=0.0), DOT_DTYPE)
            a_ptrs += BLOCK_K * stride_xh
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        # Round the projections to x's dtype (what an unfused x @ w13.T hands to SwiGLU).
        out_dtype = act_ptr.dtype.element_ty
        gate = cast_rne(acc_g, out_dtype).to(tl.float32)
        up = cast_rne(acc_u, out_dtype).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        mask = row_ok[:, None] & (offs_n < INTER)[None, :]
        tl.store(act_ptr + rows[:, None].to(tl.int64) * INTER + offs_n[None, :], cast_rne(act, out_dtype), mask=mask)


@triton.jit
def _moe_down_kernel(
    act_ptr, w_ptr, s_ptr, y_ptr,
    slot_of_row_ptr, weight_of_row_ptr, tile_expert_ptr, tile_row_ptr, expert_end_ptr,
    H, INTER, E,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_FP8: tl.constexpr, ROUND_DTYPE: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, NO_NEG_ZERO: tl.constexpr,
    COMBINED: tl.constexpr,
):  # fmt: skip
    expert, rows, row_ok = _tile_rows(tile_expert_ptr, tile_row_ptr, expert_end_ptr, E, BLOCK_M)
    if expert < E:
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w_rows = offs_n % H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + rows[:, None].to(tl.int64) * INTER + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn
        w_ptrs += offs_k[:, None] * stride_wk
        s_base = s_ptr + expert.to(tl.int64) * stride_se
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            k_ok = offs_k + k0 < INTER
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_FP8:
                s_k = s_base + (k0 // BLOCK_K) * stride_sk
                if BLOCK_N <= BLOCK_K:  # the tile's stored rows (offs_n < H) lie in one scale block
                    w_scale = tl.load(s_k + (n0 // BLOCK_K) * stride_sn)
                else:
                    w_scale = tl.load(s_k + (w_rows // BLOCK_K) * stride_sn)
                qa, a_scale = _quantize_rows(a, FP8_MAX, MANT_BITS, MIN_EXP, NO_NEG_ZERO)
                acc = _fp8_scaled_dot(acc, qa, a_scale, w_ptrs, k_ok, w_scale, DOT_FP8, BLOCK_N <= BLOCK_K)
            else:
                acc = _dot(acc, a, tl.load(w_ptrs, mask=k_ok[:, None], other=0.0), DOT_DTYPE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        # The expert's output in x's dtype, then weighted in float32 for the combine.
        routing = tl.load(weight_of_row_ptr + rows, mask=row_ok, other=0.0)
        out = cast_rne(acc, ROUND_DTYPE).to(tl.float32) * routing[:, None]
        slots = tl.load(slot_of_row_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mask = row_ok[:, None] & (offs_n < H)[None, :]
        if COMBINED:  # one choice per token: its weighted output is the token's, in x's dtype
            out = cast_rne(out, ROUND_DTYPE)
        tl.store(y_ptr + slots[:, None] * H + offs_n[None, :], out, mask=mask)
    elif expert == E:  # skipped slots (no expert here): zeros, whatever their weight
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        slots = tl.load(slot_of_row_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        mask = row_ok[:, None] & (offs_n < H)[None, :]
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if COMBINED:
            zeros = zeros.to(ROUND_DTYPE)
        tl.store(y_ptr + slots[:, None] * H + offs_n[None, :], zeros, mask=mask)


def _check_weight(
    fn: str, name: str, w: torch.Tensor, scale: torch.Tensor | None, x_dtype: torch.dtype, shape: tuple[int, int, int]
) -> bool:
    """Checks one expert weight and its optional scale; returns whether it is FP8."""
    check_tensor(fn, name, w, dtypes=(x_dtype, *FP8_FORMATS), ndim=3)
    for dim, want in enumerate(shape):
        check_dim(fn, name, w, dim, want, ("E, the experts", "rows", "columns")[dim])
    is_fp8 = w.dtype in FP8_FORMATS
    sname = f"{name}_scale"
    if is_fp8 and scale is None:
        raise DTypeError(
            f"{fn}: argument {name!r} is {w.dtype} but {sname!r} is None; FP8 weights need 128x128 block scales"
        )
    if not is_fp8 and scale is not None:
        raise DTypeError(f"{fn}: argument {sname!r} is given but {name!r} is {w.dtype}, not FP8; pass None")
    if scale is not None:
        check_tensor(fn, sname, scale, dtypes=(torch.float32,), ndim=3)
        want = (shape[0], triton.cdiv(shape[1], SCALE_BLOCK), triton.cdiv(shape[2], SCALE_BLOCK))
        if tuple(scale.shape) != want:
            raise ShapeError(
                f"{fn}: argument {sname!r} has shape {list(scale.shape)}, expected {list(want)} "
                f"(128x128 blocks of {name!r})"
            )
    return is_fp8


def _check_grouped_moe_experts(
    fn: str,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    target: object,
    check_ids: bool,
) -> KernelTarget:
    """:func:`grouped_moe_experts`'s input checks (skipped inside :func:`dshal.ops.trusted`;
    the ids' range is not among them); returns the target."""
    check_tensor(fn, "x", x, dtypes=X_DTYPES, ndim=2)
    check_tensor(fn, "weights", weights, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2)
    check_tensor(fn, "ids", ids, dtypes=ID_DTYPES, ndim=2)
    T, H = x.shape
    if weights.shape != ids.shape or weights.shape[0] != T:
        raise ShapeError(
            f"{fn}: arguments 'weights' {list(weights.shape)} and 'ids' {list(ids.shape)} must both be [T, k] "
            f"with T={T} (rows of 'x')"
        )
    check_tensor(fn, "w13", w13, ndim=3)
    E, two_i = w13.shape[0], w13.shape[1]
    if two_i % 2:
        raise ShapeError(f"{fn}: argument 'w13' has shape {list(w13.shape)}, expected [E, 2I, H] with an even 2I")
    w13_fp8 = _check_weight(fn, "w13", w13, w13_scale, x.dtype, (E, two_i, H))
    w2_fp8 = _check_weight(fn, "w2", w2, w2_scale, x.dtype, (E, H, two_i // 2))
    check_flag(fn, "check_ids", check_ids)
    check_same_device(fn, "x", x, weights=weights, ids=ids, w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)
    check_kernel_device(fn, "x", x, INTERPRETED)
    tgt = resolve_target(fn, target, x.device)
    for name, w, is_fp8 in (("w13", w13, w13_fp8), ("w2", w2, w2_fp8)):
        if is_fp8:
            tgt.check_fp8_dtype(fn, name, w.dtype)
    return tgt


def grouped_moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    target: KernelTarget | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts: ``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``.

    ``x [T, H]`` bfloat16/float16/float32 (any strides); ``weights [T, k]`` float (routing
    weights); ``ids [T, k]`` int64/int32 expert indices in ``[0, E)``, or -1 for a slot no
    expert here serves (it adds nothing, whatever its weight); ``w13 [E, 2I, H]``
    (gate rows ``[:I]``, up rows ``[I:]``) and ``w2 [E, H, I]``, each of ``x``'s dtype or FP8
    with float32 128x128 block scales ``w13_scale [E, ceil(2I/128), ceil(H/128)]`` and
    ``w2_scale [E, ceil(H/128), ceil(I/128)]`` (each GEMM's activations are then quantized
    per (1, 128) in the weight's format, in the kernel). ``expert_e(v) = w2[e] @ (silu(g) * u)`` with
    ``[g; u] = w13[e] @ v``; matmuls accumulate in float32, each projection's output is
    rounded to ``x``'s dtype, the weighted combine is float32. Returns a new ``[T, H]`` of
    ``x``'s dtype.

    Two grouped-GEMM launches in all (see the module docstring); tile sizes come from
    ``target.moe_tile`` / ``target.moe_block_k``. ``check_ids`` verifies the ids' range:
    on the host in checked mode (one sync), as a device-side assertion inside
    :func:`dshal.ops.trusted` (no sync: decode steps and graph capture); False skips it.

    Raises DTypeError (dtypes, FP8 weight without scale or scale without FP8 weight),
    ArgumentError (``check_ids`` not a bool), ShapeError (shapes, ids out of range), DeviceError (mixed devices, a CPU tensor without
    the interpreter), UnsupportedOpError (FP8 weights outside ``target.fp8_dtypes``). Inside
    :func:`dshal.ops.trusted` these input checks are skipped (as the op's own are): the
    caller vouches for the inputs; only ``target`` is resolved, and ``check_ids`` still
    asserts the ids' range on the device.
    """
    fn = "grouped_moe_experts"
    tgt = checked_target(
        fn, target, x.device,
        lambda: _check_grouped_moe_experts(fn, x, weights, ids, w13, w2, w13_scale, w2_scale, target, check_ids),
    )
    T, H = x.shape
    E, inter = w13.shape[0], w13.shape[1] // 2
    k = ids.shape[1]
    w13_fp8, w2_fp8 = w13.dtype in FP8_FORMATS, w2.dtype in FP8_FORMATS
    if check_ids:  # a host read in checked mode; a device-side assert inside dshal.ops.trusted()
        check_ids_in_range(fn, "ids", ids, E, "expert id", f"w13 has {E} experts", low=-1)
    if T * k == 0 or H == 0 or E == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=x.device)

    # 1. sort the (token, choice) rows by expert and cut each expert's rows into tiles; the
    # skipped slots (id -1) form a last group, "expert" E, whose tiles write zeros
    dev = x.device
    block_m, block_n, block_k = tgt.moe_tile.block_m, tgt.moe_tile.block_n, tgt.moe_block_k
    flat_ids = ids.reshape(-1).to(torch.int64)
    group_of_slot = torch.where(flat_ids < 0, E, flat_ids)
    slot_of_row = torch.argsort(group_of_slot, stable=True)  # sorted row -> (token * k + choice)
    token_of_row = (slot_of_row // k).to(torch.int32)
    weight_of_row = weights.reshape(-1)[slot_of_row].to(torch.float32)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, group_of_slot, torch.ones_like(flat_ids))
    expert_end = torch.cumsum(counts, 0)
    expert_start = expert_end - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(T * k, block_m) + min(E + 1, T * k)  # bound on sum(ceil(count / block_m))
    tile_ids = torch.arange(max_tiles, device=dev)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)  # E + 1 for unused tiles
    owner = tile_expert.clamp(max=E)
    tile_row = expert_start[owner] + (tile_ids - (tile_end - tiles)[owner]) * block_m
    tile_expert, tile_row = tile_expert.to(torch.int32), tile_row.to(torch.int32)
    expert_end = expert_end.to(torch.int32)

    x_tl = _TL[x.dtype]
    # bfloat16 operands are widened to float32 where tl.dot mishandles them (the interpreter)
    dot_dtype = tl.float32 if x.dtype == torch.bfloat16 and not tgt.bf16_dot else x_tl
    warps, stages = tgt.moe_tile.num_warps, tgt.moe_tile.num_stages

    def weight_meta(w: torch.Tensor, is_fp8: bool) -> dict[str, object]:
        """Constexprs that depend on one weight: K step, and its FP8 format if any."""
        fmt = FP8_FORMATS[w.dtype if is_fp8 else torch.float8_e4m3fn]
        return dict(
            BLOCK_K=SCALE_BLOCK if is_fp8 else block_k,
            W_FP8=is_fp8,
            DOT_FP8=is_fp8 and tgt.dot_takes(w.dtype),
            FP8_MAX=fmt.max, MANT_BITS=fmt.mantissa_bits, MIN_EXP=fmt.min_exp, NO_NEG_ZERO=fmt.no_negative_zero,
        )  # fmt: skip

    extra = {key: v for key, v in tgt.moe_tile.kernel_kwargs().items() if key not in ("BLOCK_M", "BLOCK_N", "GROUP_M")}
    dummy = torch.empty(1, 1, 1, dtype=torch.float32, device=dev)  # stands in for absent scales

    # 2. gate/up projection + SwiGLU, one launch over (tile, I block)
    act = torch.empty((T * k, inter), dtype=x.dtype, device=dev)
    s13 = w13_scale if w13_scale is not None else dummy
    launch(
        _moe_gate_up_kernel, (max_tiles, triton.cdiv(inter, block_n)),
        x, w13, s13, act,
        token_of_row, tile_expert, tile_row, expert_end,
        H, inter, E,
        x.stride(0), x.stride(1),
        *w13.stride(),
        *s13.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_DTYPE=dot_dtype, **weight_meta(w13, w13_fp8),
        UP_ONE_SCALE=w13_fp8 and block_n <= SCALE_BLOCK and inter % block_n == 0,
        num_warps=warps, num_stages=stages, **extra,
    )  # fmt: skip

    # 3. down projection, weighted, back to each row's (token, choice) slot: float32 for the
    # combine; with one choice per token (the expert-parallel path) the token's output itself
    combined = k == 1
    slots = torch.empty((T * k, H), dtype=x.dtype if combined else torch.float32, device=dev)
    s2 = w2_scale if w2_scale is not None else dummy
    launch(
        _moe_down_kernel, (max_tiles, triton.cdiv(H, block_n)),
        act, w2, s2, slots,
        slot_of_row, weight_of_row, tile_expert, tile_row, expert_end,
        H, inter, E,
        *w2.stride(),
        *s2.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_DTYPE=dot_dtype, ROUND_DTYPE=x_tl, **weight_meta(w2, w2_fp8),
        COMBINED=combined, num_warps=warps, num_stages=stages, **extra,
    )  # fmt: skip

    # 4. combine the k choices of each token (float32 [T * k, H] slots: 16x a bf16 output at k = 8)
    out = slots if combined else slots.view(T, k, H).sum(dim=1).to(x.dtype)
    if INTERPRETED and (w13_fp8 or w2_fp8):  # the interpreter decodes FP8 NaN codes as numbers
        hardware_nan_moe(out, x, ids, w13, w2)
    return out


__all__ = ["grouped_moe_experts"]
