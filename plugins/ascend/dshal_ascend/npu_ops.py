"""The Ascend op implementations: a torch_npu kernel call wrapped in pure-torch preparation.

NPU ONLY. Every function here calls into ``torch_npu``, which is imported lazily on first
use, so these calls are exercised only on NPU hardware (the ``conformance-ascend`` leg and
``tests/test_ascend_npu.py``, which skip elsewhere). The preparation around each call lives
in :mod:`dshal_ascend.layouts` and :mod:`dshal_ascend.fp8emu` and is tested on CPU.

Each function has exactly its op spec's signature; dshal validates inputs before calling.
The torch_npu signatures follow the op-plugin API docs (``Ascend/op-plugin``,
``docs/context/torch_npu-<name>.md``); the file named beside each call is the one followed.
Where a doc left an argument unclear, the comment says so and the code avoids relying on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dshal.errors import DTypeError
from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import GRANULARITY_BLOCKS, gemm_granularity
from dshal.ops.quant import dequantize_to
from dshal_ascend.fp8emu import decode_fp8, fake_quantize_fp8, format_of
from dshal_ascend.layouts import (
    combine_rows,
    deinterleave_pairs,
    dynamic_quant_result,
    expert_operands,
    finish_gate,
    fusion_attention_mask,
    gating_top_k_fit,
    interleave_halves,
    masked_pairs,
    pick_rms_norm_outputs,
    quant_matmul_args,
    rope_rows_4d,
    zero_rows_without_keys,
)

#: Activation dtypes the CANN kernels take (NPUs have no float64 compute).
NPU_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: Input dtypes of npu_dynamic_quant (doc: float16, bfloat16).
HALF_FLOATS = (torch.bfloat16, torch.float16)


def _torch_npu() -> Any:
    """torch_npu, imported on first use (only ever reached on an NPU host)."""
    import torch_npu  # noqa: PLC0415 - lazy on purpose: never at import/discovery time

    return torch_npu


def _require_npu_float(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in NPU_FLOATS:
        raise DTypeError(f"{op}: argument {arg!r} has dtype {t.dtype}, expected float32, bfloat16 or float16 (Ascend NPUs have no float64)")


def _require_npu_out_dtype(op: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in NPU_FLOATS:
        raise DTypeError(f"{op}: argument 'out_dtype' is {out_dtype}, expected float32, bfloat16 or float16 (Ascend NPUs have no float64)")


def _reference(op: str) -> Callable[..., Any]:
    """dshal's reference math, run as plain torch on the NPU tensors (for cases no kernel covers)."""
    return SPECS[op].reference_impl


# ---------------------------------------------------------------- norm / activation / rotary


def rms_norm(x, weight, eps=1e-6, residual=None):
    _require_npu_float("rms_norm", "x", x)
    if x.numel() == 0:  # kernels reject empty tensors; plain torch handles them
        return _reference("rms_norm")(x, weight, eps, residual)
    npu = _torch_npu()
    x = x.contiguous()
    gamma = weight if weight.dtype == x.dtype else weight.to(x.dtype)  # doc: gamma dtype == x dtype
    if residual is None:
        # torch_npu-npu_rms_norm.md: npu_rms_norm(self, gamma, epsilon) -> (y, rstd)
        return pick_rms_norm_outputs(npu.npu_rms_norm(x, gamma, epsilon=eps), fused=False)
    # op-plugin test_npu_add_rms_norm.py: npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
    return pick_rms_norm_outputs(npu.npu_add_rms_norm(x, residual.contiguous(), gamma, eps), fused=True)


def silu_and_mul(x):
    _require_npu_float("silu_and_mul", "x", x)
    if x.numel() == 0:  # doc: no empty tensors
        return _reference("silu_and_mul")(x)
    # torch_npu-npu_swiglu.md: swish(A) * B with A the first half along dim -- dshal's order.
    return _torch_npu().npu_swiglu(x.contiguous(), dim=-1)


def rotary_embedding(x, cos, sin, interleaved=True):
    _require_npu_float("rotary_embedding", "x", x)
    if x.numel() == 0:
        return _reference("rotary_embedding")(x, cos, sin, interleaved)
    npu = _torch_npu()
    x4, c4, s4 = rope_rows_4d(x, cos, sin)
    if not interleaved:
        # torch_npu-npu_rotary_mul.md, half mode: r1 * x + r2 * cat(-x2, x1), r1/r2 full width.
        y = npu.npu_rotary_mul(x4, c4, s4, rotary_mode="half")
    elif x.shape[-1] == 64 and x.dtype in HALF_FLOATS:
        # torch_npu-npu_interleave_rope.md (+ ops-transformer InterleaveRope formula): the kernel
        # de-interleaves x itself and returns the rotated values in HALF-split order, so the
        # result is re-interleaved. Needs D == 64, bf16/fp16, cos N == 1 (ours is [1, 1, R, D]).
        y = interleave_halves(npu.npu_interleave_rope(x4, c4, s4))
    else:
        y = interleave_halves(npu.npu_rotary_mul(deinterleave_pairs(x4).contiguous(), c4, s4, rotary_mode="half"))
    return y.reshape(x.shape)


# ---------------------------------------------------------------- attention


def attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    _require_npu_float("attention", "q", q)
    batch, heads, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    if dv > d or q.numel() == 0 or k.numel() == 0:  # doc: Dq == Dk >= Dv, no empty inputs
        return _reference("attention")(q, k, v, causal, scale, window, global_tokens)
    mask = fusion_attention_mask(tq, tk, causal, window, global_tokens, q.device)
    # torch_npu-npu_fusion_attention.md: (query, key, value, head_num, input_layout, ...) ->
    # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels). BNSD is
    # dshal's [B, H, T, D]; GQA is native (Nq / Nkv integer). NB: the doc lists it for
    # training; npu_fused_infer_attention_score is the inference-tuned kernel (not used yet).
    out = _torch_npu().npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), heads, "BNSD",
        atten_mask=mask.atten_mask,
        scale=float(scale if scale is not None else d ** -0.5),
        pre_tockens=mask.pre_tockens,
        next_tockens=mask.next_tockens,
        sparse_mode=mask.sparse_mode,
    )[0]
    # Only Tq > Tk can leave a query with no visible key; dshal defines those rows as 0.
    hidden = masked_pairs(tq, tk, causal, window, global_tokens, q.device) if tq > tk else None
    return out if hidden is None else zero_rows_without_keys(out, hidden)


# ---------------------------------------------------------------- MoE


def moe_gate(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    _require_npu_float("moe_gate", "logits", logits)
    if logits.shape[0] == 0:
        return _reference("moe_gate")(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    fits, _why = gating_top_k_fit(logits.shape[1], top_k, n_group, topk_group)
    if not fits:
        return _reference("moe_gate")(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    # torch_npu-npu_moe_gating_top_k.md: (x, k, *, bias, k_group, group_count, group_select_mode,
    # renorm, norm_type, out_flag, routed_scaling_factor, eps) -> (y, expert_idx int32, norm_out).
    # float32 in, so a float32 correction bias is not rounded to bf16 before the choice.
    # Only expert_idx is used: the doc's y formula is an image we could not read precisely,
    # so weights are recomputed from the ids exactly as dshal defines them (finish_gate).
    _y, ids, _norm = _torch_npu().npu_moe_gating_top_k(
        logits.to(torch.float32), top_k,
        bias=None if bias is None else bias.to(torch.float32),
        k_group=topk_group, group_count=n_group,
        group_select_mode=1,  # group score = sum of its top-2 experts (DeepSeek-V3)
        renorm=0,  # norm (sigmoid) before top-k; the only value the doc allows
        norm_type=1,  # sigmoid
        out_flag=False, routed_scaling_factor=1.0, eps=1e-20,
    )
    return finish_gate(logits, bias, ids, routed_scaling_factor, norm_topk_prob)


def _grouped_matmul(rows: torch.Tensor, weight_ekn: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
    # torch_npu-npu_grouped_matmul.md, "single-single-single" with group_type=0 (group the M
    # axis): x [M, K], weight [E, K, N] (the doc allows transposed weights; we pass a transposed
    # view -- unverified off-hardware whether the kernel reads its strides or wants .contiguous()),
    # group_list = cumulative row counts (group_list_type=0), split_item=2 -> one tensor [M, N].
    return _torch_npu().npu_grouped_matmul(
        [rows], [weight_ekn], group_list=group_ends, split_item=2, group_type=0, group_list_type=0,
    )[0]


def moe_experts(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    _require_npu_float("moe_experts", "x", x)
    if ids.numel() == 0:
        return torch.zeros_like(x)
    prep = expert_operands(x, weights, ids, w13, w2, w13_scale, w2_scale)
    h = _grouped_matmul(prep.rows, prep.w13_ekn, prep.routing.group_ends)
    act = _torch_npu().npu_swiglu(h, dim=-1)  # gate rows first, then up rows: swish(A) * B
    y = _grouped_matmul(prep.between(act), prep.w2_ekn, prep.routing.group_ends)
    return combine_rows(y, prep.routing, x.shape[0]).to(x.dtype)


# ---------------------------------------------------------------- int8 (W8A8, native)


def quantize_int8(x):
    if x.dtype not in HALF_FLOATS or x.numel() == 0:  # npu_dynamic_quant: fp16/bf16, non-empty
        _require_npu_float("quantize_int8", "x", x)
        return _reference("quantize_int8")(x)
    # torch_npu-npu_dynamic_quant.md: per-token symmetric -> (y int8, scale float32 x.shape[:-1]);
    # the kernel wants >= 2 dims.
    q, scale = _torch_npu().npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
    return dynamic_quant_result(q, scale, x.shape)


def int8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    _require_npu_out_dtype("int8_gemm", out_dtype)
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    npu = _torch_npu()
    a = a.contiguous()
    if out_dtype in HALF_FLOATS:
        # torch_npu-npu_quant_matmul.md table 2 rows "int8, int8, float32 scale, pertoken float32
        # -> bfloat16 / float16": out = (x1 @ x2) * scale * pertoken_scale. x2 is [K, N]: b.T.
        x1, x2, scale, pertoken = quant_matmul_args(a, a_scale, b, b_scale)
        return npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pertoken, output_dtype=out_dtype)
    # float32 out: the int32-output row (no pertoken_scale), then scale in float32 here.
    # Uncertain: whether `scale` is applied to an int32 output; a unit scale is right either way.
    ones = torch.ones(b.shape[0], dtype=torch.float32, device=b.device)
    acc = npu.npu_quant_matmul(a, b.t(), ones, output_dtype=torch.int32)
    return acc.to(torch.float32) * a_scale.to(torch.float32) * b_scale.to(torch.float32).t()


# ---------------------------------------------------------------- FP8 (emulated on 910B)


def dequantize_fp8(q, scale, block=(1, 128), out_dtype=torch.bfloat16):
    _require_npu_out_dtype("dequantize_fp8", out_dtype)
    return dequantize_to(decode_fp8(q), scale, None if block is None else tuple(block), torch.float32).to(out_dtype)


def _fp8_operands_bf16(a, a_scale, b, b_scale) -> tuple[torch.Tensor, torch.Tensor]:
    a_block, b_block = GRANULARITY_BLOCKS[gemm_granularity("fp8_gemm", a, a_scale, b, b_scale)]
    if a_block is None:
        a_scale, b_scale = a_scale.reshape(()), b_scale.reshape(())
    ad = dequantize_to(decode_fp8(a), a_scale, a_block, torch.float32).to(torch.bfloat16)
    bd = dequantize_to(decode_fp8(b), b_scale, b_block, torch.float32).to(torch.bfloat16)
    return ad, bd


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    _require_npu_out_dtype("fp8_gemm", out_dtype)
    # 910B has no FP8 units: dequantize to bf16 on the NPU, then a bf16 matmul (fp32 accumulate).
    ad, bd = _fp8_operands_bf16(a, a_scale, b, b_scale)
    return (ad @ bd.t()).to(out_dtype)


def _weight_blocks(weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    n, k = weight.shape
    if tuple(weight_scale.shape) == (-(-n // 128), -(-k // 128)):
        return "block"
    return "row" if tuple(weight_scale.shape) == (n, 1) else "tensor"


def linear(x, weight, bias=None, weight_scale=None):
    _require_npu_float("linear", "x", x)
    if weight_scale is None:  # plain float matmul (CANN MatMul through torch)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), b)
    rows = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    if weight.dtype == torch.int8:
        y = _linear_w8a8(rows, weight, weight_scale, bias)
    else:  # FP8 weight: emulated (x rounded per the weight's scheme, both dequantized to bf16)
        mode = _weight_blocks(weight, weight_scale)
        x_block, w_block = GRANULARITY_BLOCKS[mode]
        xd = fake_quantize_fp8(rows, x_block, format_of(weight.dtype).name).to(torch.bfloat16)
        ws = weight_scale.reshape(()) if mode == "tensor" else weight_scale
        wd = dequantize_to(decode_fp8(weight), ws, w_block, torch.float32).to(torch.bfloat16)
        y = (xd @ wd.t()).to(torch.float32)
        if bias is not None:
            y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _linear_w8a8(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-token dynamic int8 activations x per-channel int8 weights (the W8A8 path).
    Activations are assumed finite here (npu_dynamic_quant's handling of +-Inf/NaN is not
    documented); the standalone ``quantize_int8`` op follows dshal's rules for float32."""
    if rows.shape[0] == 0:
        y = torch.zeros(0, weight.shape[0], dtype=torch.float32, device=rows.device)
        return y if bias is None else y + bias.to(torch.float32)
    if rows.dtype in HALF_FLOATS:
        npu = _torch_npu()
        q, token_scale = npu.npu_dynamic_quant(rows)  # torch_npu-npu_dynamic_quant.md
        x1, x2, scale, pertoken = quant_matmul_args(q, token_scale, weight, weight_scale)
        # torch_npu-npu_quant_matmul.md: a float32 bias with bf16/fp16 output is added after scaling.
        b = None if bias is None else bias.to(torch.float32)
        return npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pertoken, bias=b, output_dtype=rows.dtype)
    q, token_scale = quantize_int8(rows)
    y = int8_gemm(q, token_scale, weight, weight_scale, torch.float32)
    return y if bias is None else y + bias.to(torch.float32)


#: op name -> implementation. quantize_fp8 is absent on purpose: 910B cannot hold the
#: result natively, so the reference serves it (shown as a fallback by ``dshal info``).
OPS: dict[str, Callable[..., Any]] = {
    "dequantize_fp8": dequantize_fp8,
    "quantize_int8": quantize_int8,
    "fp8_gemm": fp8_gemm,
    "int8_gemm": int8_gemm,
    "linear": linear,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": rotary_embedding,
    "attention": attention,
    "moe_gate": moe_gate,
    "moe_experts": moe_experts,
}

#: How each op is served on 910B (``Capabilities.op_kinds``).
OP_KINDS = {name: "native" for name in OPS} | {"dequantize_fp8": "emulated", "fp8_gemm": "emulated"}
