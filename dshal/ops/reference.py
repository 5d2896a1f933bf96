"""``dshal.ops.reference.<op>``: each op's reference implementation behind its input checks,
callable without any runtime. This is the oracle conformance compares against.

One function, seen two ways: ``SPECS[op].reference_impl`` is the raw reference (what a
provider calls after dispatch has already checked the inputs, and what the ``reference``
fallback provider serves); ``dshal.ops.reference.<op>`` is the same function behind the
op's input checks, for users, tests and conformance. There is no third way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dshal.ops.activation import silu_and_mul as _silu_and_mul
from dshal.ops.attention import attention as _attention
from dshal.ops.gemm import fp8_gemm as _fp8_gemm, int8_gemm as _int8_gemm, linear as _linear
from dshal.ops.moe import moe_experts as _moe_experts, moe_gate as _moe_gate
from dshal.ops.norm import rms_norm as _rms_norm
from dshal.ops.quant import (
    dequantize_fp8 as _dequantize_fp8,
    quantize_fp8 as _quantize_fp8,
    quantize_int8 as _quantize_int8,
)
from dshal.ops.rotary import rotary_embedding as _rotary_embedding
from dshal.ops.sparse_attention import (
    indexer_topk as _indexer_topk,
    sparse_mla_attention as _sparse_mla_attention,
)

if TYPE_CHECKING:
    # What a type checker sees: the dispatched ops' annotated signatures. Both have the op
    # spec's parameters (OpSpec checks its reference's, tests/test_core_dispatch.py the ops').
    import torch

    import dshal.ops as _ops

    quantize_fp8 = _ops.quantize_fp8
    dequantize_fp8 = _ops.dequantize_fp8
    quantize_int8 = _ops.quantize_int8
    fp8_gemm = _ops.fp8_gemm
    int8_gemm = _ops.int8_gemm
    linear = _ops.linear
    rms_norm = _ops.rms_norm
    silu_and_mul = _ops.silu_and_mul
    rotary_embedding = _ops.rotary_embedding

    # Written out: inside this package mypy reads `dshal.ops.attention` as the submodule.
    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        scale: float | None = None,
        window: int | None = None,
        global_tokens: int = 0,
    ) -> torch.Tensor: ...

    indexer_topk = _ops.indexer_topk
    sparse_mla_attention = _ops.sparse_mla_attention
    moe_gate = _ops.moe_gate
    moe_experts = _ops.moe_experts
else:
    quantize_fp8 = _quantize_fp8.checked(_quantize_fp8.reference_impl)
    dequantize_fp8 = _dequantize_fp8.checked(_dequantize_fp8.reference_impl)
    quantize_int8 = _quantize_int8.checked(_quantize_int8.reference_impl)
    fp8_gemm = _fp8_gemm.checked(_fp8_gemm.reference_impl)
    int8_gemm = _int8_gemm.checked(_int8_gemm.reference_impl)
    linear = _linear.checked(_linear.reference_impl)
    rms_norm = _rms_norm.checked(_rms_norm.reference_impl)
    silu_and_mul = _silu_and_mul.checked(_silu_and_mul.reference_impl)
    rotary_embedding = _rotary_embedding.checked(_rotary_embedding.reference_impl)
    attention = _attention.checked(_attention.reference_impl)
    indexer_topk = _indexer_topk.checked(_indexer_topk.reference_impl)
    sparse_mla_attention = _sparse_mla_attention.checked(_sparse_mla_attention.reference_impl)
    moe_gate = _moe_gate.checked(_moe_gate.reference_impl)
    moe_experts = _moe_experts.checked(_moe_experts.reference_impl)

__all__ = [
    "quantize_fp8", "dequantize_fp8", "quantize_int8", "fp8_gemm", "int8_gemm", "linear",
    "rms_norm", "silu_and_mul", "rotary_embedding", "attention", "indexer_topk", "sparse_mla_attention",
    "moe_gate", "moe_experts",
]
