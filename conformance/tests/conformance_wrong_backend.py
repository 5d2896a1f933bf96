"""A deliberately wrong backend: the reference, with six classic bugs planted.

It exists to prove the conformance suite can fail. It is registered under the name
``wrong`` through a throw-away ``dist-info`` on ``sys.path`` (see the tests), so the suite
finds it exactly as it finds a vendor plugin -- also in its collective rank processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from cpu_variant import CpuVariant

from dshal.comm import ProcessGroupCommunicator
from dshal.ops.catalogue import SPECS

REF = {name: spec.reference_impl for name, spec in SPECS.items()}


def rms_norm(x, weight, eps=1e-6, residual=None):
    """Bug: eps off by one order of magnitude."""
    return REF["rms_norm"](x, weight, eps * 10, residual)


def quantize_fp8(x, block=(1, 128), fmt="e4m3", scale_fmt=None):
    """Bug: E4M3FN quantized with E4M3FNUZ's maximum (240 instead of 448)."""
    q, scale = REF["quantize_fp8"](x, block, fmt, scale_fmt)
    if fmt in ("e4m3", "e4m3fn"):
        # scale = amax / 240 and q = x / scale: the codes then never exceed 240.
        q_wrong, _ = REF["quantize_fp8"](x * (240.0 / 448.0), block, "e4m3fn", scale_fmt)
        return q_wrong, scale * (448.0 / 240.0)
    return q, scale


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """Bug: the scales are ignored."""
    return (a.to(torch.float32) @ b.to(torch.float32).T).to(out_dtype)


def attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    """Bug: the sliding window is forgotten."""
    return REF["attention"](q, k, v, causal, scale, None, global_tokens)


def moe_gate(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """Bug: the correction bias does not take part in the choice."""
    return REF["moe_gate"](logits, None, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


class SwappedSplitsCommunicator(ProcessGroupCommunicator):
    """Bug: all_to_all passes input_splits as output_splits and vice versa."""

    def all_to_all(self, t: torch.Tensor, output_splits: Sequence[int] | None = None, input_splits: Sequence[int] | None = None) -> torch.Tensor:
        return super().all_to_all(t, input_splits, output_splits)


class WrongBackend(CpuVariant):
    variant_name, variant_note = "wrong", "deliberately wrong"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return dict(rms_norm=rms_norm, quantize_fp8=quantize_fp8, fp8_gemm=fp8_gemm, attention=attention, moe_gate=moe_gate)

    def communicator(self, group: Any = None) -> ProcessGroupCommunicator:
        return SwappedSplitsCommunicator(group)
