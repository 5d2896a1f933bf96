"""The Ascend op implementations: torch_npu kernel calls wrapped in pure-torch preparation.

:class:`AscendOps` holds the kernel module (``torch_npu`` on an NPU host, imported lazily)
and the :class:`~dshal_ascend.releases.KernelFeatures` of the installed release, and calls
each kernel the way that release accepts (or serves the reference, saying so in
:func:`~dshal_ascend.releases.plan_ops`). Every call site is bound in CI against the recorded
schemas of every supported release: ``tests/test_ascend_signatures.py`` drives these methods
on CPU tensors through a signature-checking stand-in (which is not an NPU and never reported
as one). On hardware they run in ``tests/test_ascend_npu.py`` and the ``conformance-ascend`` leg.

Each public method has exactly its op spec's signature; dshal validates inputs before calling.
The preparation around the kernels lives in :mod:`dshal_ascend.layouts` and
:mod:`dshal_ascend.fp8emu` and is unit-tested against the reference ops.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from dshal.plugin import (
    GRANULARITY_BLOCKS,
    NO_EXPERT,
    SPECS,
    DTypeError,
    check_ids_in_range,
    dequantize_to,
    gemm_granularity,
    guarded_attention,
    moe_experts_on_kept_slots,
    values_are_key_columns,
)
from dshal_ascend.fp8emu import decode_fp8, fake_quantize_fp8, format_of
from dshal_ascend.layouts import (
    DSA_NO_TOKEN_LIMIT,
    GROUPED_MATMUL_MAX_GROUPS,
    MLA_BLOCK_SIZE,
    MLA_LATENT_DIM,
    ROTARY_MAX_D,
    active_experts,
    combine_rows,
    deinterleave_pairs,
    dequantize_expert_weights,
    dynamic_quant_result,
    finish_gate,
    fix_zero_scales,
    fp8_expert_rows,
    fused_attention_unsupported,
    gating_top_k_fit,
    indexer_operands,
    indexer_result,
    infer_attention_plan,
    interleave_halves,
    lightning_indexer_unsupported,
    masked_pairs,
    mla_form_unsupported,
    mla_heads,
    page_table,
    paged,
    pick_rms_norm_outputs,
    rope_operands,
    route_tokens,
    sfa_heads,
    sparse_attention_operands,
    sparse_attention_result,
    sparse_attention_unsupported,
    split_ranges,
    zero_rows_without_keys,
)
from dshal_ascend.releases import KernelFeatures

#: Activation dtypes the CANN kernels take (NPUs have no float64 compute).
NPU_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: Input dtypes of npu_dynamic_quant (doc: float16, bfloat16).
HALF_FLOATS = (torch.bfloat16, torch.float16)
#: ACL format id of FRACTAL_NZ, the cube units' native weight layout (npu_format_cast(w, 29)).
ACL_FORMAT_FRACTAL_NZ = 29
#: DeepSeek Sparse Attention's ops (DeepSeek-V3.2): served only where the installed dshal's catalogue
#: has them (the registry refuses a plugin that provides an op it does not know).
DSA_OP_NAMES = ("indexer_topk", "sparse_mla_attention")


def served_op_names(catalogue: Mapping[str, Any]) -> tuple[str, ...]:
    """The op names this module serves against an op ``catalogue`` (quantize_fp8 is absent: the
    reference serves it; the DSA ops only where the catalogue has them)."""
    core = ("dequantize_fp8", "quantize_int8", "fp8_gemm", "int8_gemm", "linear", "rms_norm", "silu_and_mul",
            "rotary_embedding", "attention", "moe_gate", "moe_experts")
    return core + tuple(op for op in DSA_OP_NAMES if op in catalogue)


#: The op names this module serves with the installed dshal.
OP_NAMES = served_op_names(SPECS)
#: How each op is served on 910B (``Capabilities.op_kinds``: one kind per op). ``linear`` and
#: ``moe_experts`` are native for float and int8 weights; their FP8-weight paths (emulated) are
#: in ``Capabilities.op_paths`` (:func:`dshal_ascend.backend.weight_format_paths`).
OP_KINDS = {name: "native" for name in OP_NAMES} | {"dequantize_fp8": "emulated", "fp8_gemm": "emulated"}


def import_torch_npu() -> Any:
    """torch_npu, imported on first use (only ever reached on an NPU host)."""
    import torch_npu  # lazy: vendor runtime, never at import/discovery time

    return torch_npu


def keys_one_query_sees(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | slice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` / ``v [B, H, Tk, D]`` cut to the key positions ``keys`` (None: all); ``v`` stays a
    view of ``k``'s first columns where it was one (absorbed MLA pages the latent once)."""
    if keys is None:
        return k, v
    if values_are_key_columns(v, k):
        k = k[:, :, keys]
        return k, k[..., : v.shape[-1]]
    return k[:, :, keys], v[:, :, keys]


def _require_npu_float(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in NPU_FLOATS:
        raise DTypeError(
            f"{op}: argument {arg!r} has dtype {t.dtype}, expected float32, bfloat16 or float16 "
            "(Ascend NPUs have no float64)"
        )


def _require_npu_out_dtype(op: str, out_dtype: torch.dtype) -> None:
    if out_dtype not in NPU_FLOATS:
        raise DTypeError(
            f"{op}: argument 'out_dtype' is {out_dtype}, expected float32, bfloat16 or float16 "
            "(Ascend NPUs have no float64)"
        )


class PreparedWeights:
    """Device layouts derived from a weight at its first use (decoded FP8 linears, cast
    experts, an int8 linear weight the load hook could not prepare: one cut into tiles beyond
    the kernel limit, or one handed to the op directly), kept while the weight lives and is
    unchanged. The original stays with its owner, so each costs one extra copy; weights the
    model core loads go through :meth:`AscendOps.prepare_weight` instead and are held once."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}

    def get(self, weight: torch.Tensor, kind: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (id(weight), kind)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == weight._version:
            return entry[2]
        prepared = make()
        forget = weakref.ref(weight, lambda _r, k=key: self._entries.pop(k, None))
        self._entries[key] = (forget, weight._version, prepared)
        return prepared

    def __len__(self) -> int:
        return len(self._entries)


class AscendOps:
    """dshal's ops on an Ascend NPU, for one torch_npu release.

    ``kernels``: the module the kernels are called on -- ``torch_npu`` (None: imported on first
    use), or in tests a signature-checking stand-in. ``features``: what that release accepts.
    """

    def __init__(self, features: KernelFeatures, kernels: Any = None) -> None:
        self.features = features
        self._kernels = kernels
        self.prepared = PreparedWeights()
        #: op -> how many calls its reference served (bounded: one counter per op)
        self.reference_calls: Counter[str] = Counter()
        self._count_lock = threading.Lock()  # requests on several threads: no lost counts

    @property
    def npu(self) -> Any:
        if self._kernels is None:
            self._kernels = import_torch_npu()
        return self._kernels

    def ops(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in OP_NAMES}

    def _reference(self, op: str) -> Callable[..., Any]:
        """dshal's reference math, run as plain torch on the NPU tensors (for cases no kernel
        covers); each use is counted in ``reference_calls`` (the stand-in's dry view shows it)."""
        with self._count_lock:
            self.reference_calls[op] += 1
        return SPECS[op].reference_impl

    def reference_counts(self) -> dict[str, int]:
        """A snapshot of ``reference_calls`` (consistent while other threads count)."""
        with self._count_lock:
            return dict(self.reference_calls)

    # ------------------------------------------------------------ load hook (Backend.prepare_weight)
    def prepare_weight(self, name: str, weight: torch.Tensor, role: str) -> torch.Tensor:
        """An int8 linear weight ``[N, K]`` becomes its transpose ``[K, N]`` cast to FRACTAL_NZ
        once, at load (as vllm-ascend does after loading W8A8 weights), returned as an ``[N, K]``
        view of it: same shape, dtype and values, and the model holds only the NZ copy, which
        :meth:`_weight_tiles` hands ``npu_quant_matmul`` itself. A weight beyond the kernel's
        65535 limit (cut into tiles at first use) and every other weight are returned unchanged:
        experts are passed as transposed views and need no copy, and FP8 weights keep their
        dtype (the op contract reads the FP8 format from it; see the README)."""
        if role != "linear.weight" or weight.dtype != torch.int8 or weight.dim() != 2:
            return weight
        n, k = weight.shape
        if len(split_ranges(k)) > 1 or len(split_ranges(n)) > 1:
            return weight
        return self.npu.npu_format_cast(weight.t().contiguous(), ACL_FORMAT_FRACTAL_NZ).t()

    # ------------------------------------------------------------ norm / activation / rotary
    def rms_norm(self, x, weight, eps=1e-6, residual=None):
        _require_npu_float("rms_norm", "x", x)
        if x.numel() == 0:  # kernels reject empty tensors; plain torch handles them
            return self._reference("rms_norm")(x, weight, eps, residual)
        if x.dim() == 1:  # the kernels take 2-8 dims (op-plugin torch_npu-npu_rms_norm.md)
            out = self.rms_norm(x[None], weight, eps, None if residual is None else residual[None])
            return tuple(t[0] for t in out) if isinstance(out, tuple) else out[0]
        x = x.contiguous()
        same = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        if residual is None:
            # npu_rms_norm(self, gamma, epsilon) -> (y, rstd); 7.2.0+: a float32 gamma with bf16/fp16 x.
            fp32_gamma = weight.dtype == torch.float32 and self.features.rms_norm_fp32_gamma
            gamma = weight if fp32_gamma else same
            return pick_rms_norm_outputs(self.npu.npu_rms_norm(x, gamma, epsilon=eps), fused=False)
        # npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
        return pick_rms_norm_outputs(self.npu.npu_add_rms_norm(x, residual.contiguous(), same, eps), fused=True)

    def silu_and_mul(self, x):
        _require_npu_float("silu_and_mul", "x", x)
        if x.numel() == 0:
            return self._reference("silu_and_mul")(x)
        return self.npu.npu_swiglu(x.contiguous(), dim=-1)  # swish(first half) * second half

    def _rotary_half(self, x4, c4, s4):
        if self.features.rotary_mode:
            return self.npu.npu_rotary_mul(x4, c4, s4, rotary_mode="half")
        return self.npu.npu_rotary_mul(x4, c4, s4)  # 6.0.0: half mode is the only mode

    def rotary_embedding(self, x, cos, sin, interleaved=True):
        _require_npu_float("rotary_embedding", "x", x)
        if x.numel() == 0 or x.shape[-1] >= ROTARY_MAX_D:  # past the kernel's head dim: the reference
            return self._reference("rotary_embedding")(x, cos, sin, interleaved)
        x4, c4, s4 = rope_operands(x, cos, sin)  # tables [1, 1, S, D]: broadcast, not per row
        if not interleaved:
            y = self._rotary_half(x4, c4, s4)
        elif self.features.interleave_rope and x.shape[-1] == 64 and x.dtype in HALF_FLOATS:
            # npu_interleave_rope de-interleaves x itself and returns the HALF-split order;
            # its cos/sin want N == 1 and x's batch.
            per_batch = (x4.shape[0], 1, *c4.shape[2:])
            cos4, sin4 = c4.expand(per_batch).contiguous(), s4.expand(per_batch).contiguous()
            y = interleave_halves(self.npu.npu_interleave_rope(x4, cos4, sin4))
        else:
            y = interleave_halves(self._rotary_half(deinterleave_pairs(x4).contiguous(), c4, s4))
        return y.reshape(x.shape)

    # ------------------------------------------------------------ attention
    def attention(self, q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        _require_npu_float("attention", "q", q)
        if q.numel() == 0 or k.numel() == 0:
            return self._reference("attention")(q, k, v, causal, scale, window, global_tokens)
        if window is not None and window >= q.shape[2] + k.shape[2]:
            window = None  # it hides nothing (and window - 1 would not fit the kernel's pre_tokens)
        if q.shape[2] == 1 and window is not None:
            # One query sees a fixed set of keys: pass those alone, so the kernels' key limits
            # (S <= 262144) weigh what is read, not the whole cache, and no mask is needed.
            k, v = keys_one_query_sees(k, v, infer_attention_plan(1, k.shape[2], causal, window, global_tokens, q.device).keys)
            window, global_tokens = None, 0
        # Absorbed MLA (head dim r + rope = 576, one kv head) has its own form of the kernel.
        mla = self.features.mla_rope and mla_form_unsupported(q, k, v, causal, window) is None
        if not mla and (v.shape[3] > q.shape[3] or fused_attention_unsupported(q, k)):
            return self._reference("attention")(q, k, v, causal, scale, window, global_tokens)
        run = self._mla_attention if mla else self._fused_attention
        # The op's NaN / Inf rule (the fused kernel's own handling is not documented): the
        # kernel runs on zeroed inputs, then the outputs that saw a non-finite value become NaN.
        # No host read: decode steps stay free of syncs.
        return guarded_attention(run, q, k, v, causal, scale, window, global_tokens, may_read_host=False)

    def _fused_attention(self, q, k, v, causal, scale, window, global_tokens):
        """``attention`` on finite inputs through ``npu_fused_infer_attention_score``."""
        heads, tq, d = q.shape[1:]
        tk, dv = k.shape[2], v.shape[3]
        plan = infer_attention_plan(tq, tk, causal, window, global_tokens, q.device)
        if dv < d:  # the kernel wants one head dim for K and V (MLA: 192 vs 128): zero-pad V
            v = F.pad(v, (0, d - dv))
        # npu_fused_infer_attention_score(query, key, value, *, atten_mask, num_heads, scale,
        # pre_tokens, next_tokens, input_layout, num_key_value_heads, sparse_mode) -> (out, lse)
        out, _lse = self.npu.npu_fused_infer_attention_score(
            q.contiguous(), k.contiguous(), v.contiguous(),
            atten_mask=plan.atten_mask, num_heads=heads, scale=float(scale if scale is not None else d ** -0.5),
            pre_tokens=plan.pre_tokens, next_tokens=plan.next_tokens, input_layout="BNSD",
            num_key_value_heads=k.shape[1], sparse_mode=plan.sparse_mode,
        )
        out = out[..., :dv]
        # Only Tq > Tk can leave a query with no visible key; dshal defines those rows as 0.
        hidden = masked_pairs(tq, tk, causal, window, global_tokens, q.device) if tq > tk else None
        return out if hidden is None else zero_rows_without_keys(out, hidden)

    def _mla_attention(self, q, k, v, causal, scale, window, global_tokens):
        """Absorbed MLA on finite inputs through the kernel's MLA form: the query and key split into
        latent (r = 512) and rope (64) parts, the keys and values as 128-token pages (the form
        requires page attention; :func:`mla_form_unsupported` lists its limits), the heads padded
        with zero queries to a count the form takes (their rows are dropped)."""
        batch, heads, tq, d = q.shape
        padded = mla_heads(heads)
        if padded != heads:
            q = F.pad(q, (0, 0, 0, 0, 0, padded - heads))
        plan = infer_attention_plan(tq, k.shape[2], causal, window, global_tokens, q.device)
        shares_latent = values_are_key_columns(v, k)  # the model's v = k[..., :r]: paged once
        tk, r = k.shape[2], MLA_LATENT_DIM
        key = paged(k[..., :r])
        # npu_fused_infer_attention_score(query, key, value, *, query_rope, key_rope, block_table,
        # actual_seq_lengths_kv, block_size, num_heads, num_key_value_heads, scale, input_layout,
        # sparse_mode, atten_mask) -> (out [B, N, Tq, r], lse): rope parts contiguous (docs).
        out, _lse = self.npu.npu_fused_infer_attention_score(
            q[..., :r].contiguous(), key, key if shares_latent else paged(v),
            query_rope=q[..., r:].contiguous(), key_rope=paged(k[..., r:]),
            block_table=page_table(batch, tk, q.device), actual_seq_lengths_kv=[tk] * batch,
            block_size=MLA_BLOCK_SIZE, num_heads=padded, num_key_value_heads=1,
            scale=float(scale if scale is not None else d ** -0.5), input_layout="BNSD",
            sparse_mode=plan.sparse_mode, atten_mask=plan.atten_mask,
        )
        return out if padded == heads else out[:, :heads]

    # ------------------------------------------------------------ DeepSeek Sparse Attention (V3.2)
    def indexer_topk(self, q, weights, k, topk, visible=None):
        _require_npu_float("indexer_topk", "q", q)
        f = self.features
        why = lightning_indexer_unsupported(q, weights, k, topk, visible, float32_weights=f.indexer_float32_weights,
                                            large_counts=f.indexer_large_counts)
        if why is not None or not f.lightning_indexer:
            return self._reference("indexer_topk")(q, weights, k, topk, visible)
        query, key, w = indexer_operands(q, weights, k)
        # -> (sparse_indices int32 [B, T, 1, topk], sparse_values: not asked for)
        sparse_indices, _values = self.npu.npu_lightning_indexer(
            query, key, w, layout_query="BSND", layout_key="BSND", sparse_count=topk,
            sparse_mode=3,  # causal from the bottom-right corner: the queries are the last T positions
            pre_tokens=DSA_NO_TOKEN_LIMIT, next_tokens=DSA_NO_TOKEN_LIMIT, return_value=False,
        )
        return indexer_result(sparse_indices, k.shape[1])

    def sparse_mla_attention(self, q, kv, indices, scale, v_dim):
        _require_npu_float("sparse_mla_attention", "q", q)
        if not self.features.sparse_flash_attention or sparse_attention_unsupported(q, kv, indices, v_dim) is not None:
            return self._reference("sparse_mla_attention")(q, kv, indices, scale, v_dim)
        # before the kernel indexes with them: a bad index would read another row of the NPU's memory
        check_ids_in_range("sparse_mla_attention", "indices", indices, kv.shape[1], "key index",
                           f"kv has S = {kv.shape[1]} rows", low=-1)
        heads = q.shape[1]
        ops = sparse_attention_operands(q, kv, indices, sfa_heads(heads))
        # -> (attention_out [B, T, N1, 512], softmax_max, softmax_sum: not asked for)
        out, _max, _sum = self.npu.npu_sparse_flash_attention(
            ops.query, ops.key, ops.key, ops.sparse_indices, float(scale),
            query_rope=ops.query_rope, key_rope=ops.key_rope, sparse_block_size=1,
            layout_query="BSND", layout_kv="BSND",
            sparse_mode=0,  # the selected keys only: the op has no causal mask of its own
            pre_tokens=DSA_NO_TOKEN_LIMIT, next_tokens=DSA_NO_TOKEN_LIMIT,
            attention_mode=2,  # MLA-absorb: query | query_rope against key | key_rope, values = key
            return_softmax_lse=False,
        )
        return sparse_attention_result(out, ops, heads, v_dim)

    # ------------------------------------------------------------ MoE
    def moe_gate(self, logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
        _require_npu_float("moe_gate", "logits", logits)
        fits = logits.shape[0] > 0 and self.features.gating_top_k
        if fits:
            fits, _why = gating_top_k_fit(logits.shape[1], top_k, n_group, topk_group,
                                          fixed_shape=self.features.gating_fixed_shape, has_bias=bias is not None)
        if not fits:
            reference = self._reference("moe_gate")
            return reference(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
        # -> (y, expert_idx int32, norm_out). float32 in, so a float32 bias is not rounded before
        # the choice; only expert_idx is used, the weights are recomputed exactly (finish_gate).
        _y, ids, _norm = self.npu.npu_moe_gating_top_k(
            logits.to(torch.float32), top_k,
            bias=None if bias is None else bias.to(torch.float32),
            k_group=topk_group, group_count=n_group,
            group_select_mode=1,  # group score = sum of its top-2 experts (DeepSeek-V3)
            renorm=0, norm_type=1,  # sigmoid, then top-k
            out_flag=False, routed_scaling_factor=1.0, eps=1e-20,
        )
        return finish_gate(logits, bias, ids, routed_scaling_factor, norm_topk_prob)

    def _grouped_matmul(self, rows, weight_ekn, group_ends, **quant):
        """One ``npu_grouped_matmul`` over expert-sorted ``rows [M, K]`` and ``weight_ekn [E, K, N]``
        (single tensor in and out: split_item 2, a Tensor group_list: 7.0.0+); N beyond the
        kernel limit is split."""
        group = dict(group_list=group_ends, group_type=0, group_list_type=0)  # cumulative counts
        pieces = []
        for lo, hi in split_ranges(weight_ekn.shape[-1]):
            w = weight_ekn if (lo, hi) == (0, weight_ekn.shape[-1]) else weight_ekn[..., lo:hi]
            scale = quant.get("scale")
            kw = dict(quant, scale=[scale[0][..., lo:hi]]) if scale is not None else quant
            pieces.append(self.npu.npu_grouped_matmul([rows], [w], split_item=2, **group, **kw)[0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def _experts_ekn(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[E, N, K]`` as the ``[E, K, N]`` weight npu_grouped_matmul takes: a transposed view
        (its doc lists transposed, i.e. stride-swapped, weights as supported), so the experts are
        never copied; only a weight in another dtype is cast, once."""
        if w.dtype != dtype:
            w = self.prepared.get(w, f"cast:{dtype}", lambda: w.to(dtype))
        return w.transpose(1, 2)

    def moe_experts(self, x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
        _require_npu_float("moe_experts", "x", x)
        # before any path indexes with them: a bad id would read another expert's memory on the NPU
        check_ids_in_range("moe_experts", "ids", ids, w13.shape[0], "expert id", f"w13 has {w13.shape[0]} experts",
                           low=NO_EXPERT)
        if ids.numel() == 0:
            return torch.zeros_like(x)
        hidden, inter = w13.shape[2], w2.shape[2]
        # 6.0.0's int[] group_list wants a list of 2-D weights (plan_ops routes it to the reference).
        fp8 = w13_scale is not None and w13.dtype != torch.int8
        if (max(hidden, inter) > 65535  # K beyond one call's limit: partial sums would round per piece
                or not self.features.grouped_matmul_v2
                or (not fp8 and w13.shape[0] > GROUPED_MATMUL_MAX_GROUPS)):  # FP8 counts its active experts
            return self._reference("moe_experts")(x, weights, ids, w13, w2, w13_scale, w2_scale)
        if w13.dtype == torch.int8:
            if not self.features.w8a8_experts:
                return self._reference("moe_experts")(x, weights, ids, w13, w2, w13_scale, w2_scale)
            return self._moe_experts_w8a8(x, weights, ids, w13, w2, w13_scale, w2_scale)
        if fp8:  # emulated: decode only the experts this batch uses (torch.unique reads ids on the host)
            if bool((ids == NO_EXPERT).any()):  # a host read too, but this path has one already
                return moe_experts_on_kept_slots(self.moe_experts, x, weights, ids, w13, w2, w13_scale, w2_scale)
            active = active_experts(ids)
            if active.index.numel() > GROUPED_MATMUL_MAX_GROUPS:
                return self._reference("moe_experts")(x, weights, ids, w13, w2, w13_scale, w2_scale)
            routing = route_tokens(weights, active.local_ids, active.index.numel())
            w13_d = dequantize_expert_weights(w13[active.index], w13_scale[active.index], x.dtype).transpose(1, 2)
            w2_d = dequantize_expert_weights(w2[active.index], w2_scale[active.index], x.dtype).transpose(1, 2)
            rows = fp8_expert_rows(x[routing.token_of_row], w13)
            h = self._grouped_matmul(rows, w13_d, routing.group_ends)
            act = self.npu.npu_swiglu(h, dim=-1)
            act = fake_quantize_fp8(act, (1, 128), format_of(w2.dtype).name).to(act.dtype)
            y = self._grouped_matmul(act, w2_d, routing.group_ends)
            return combine_rows(y, routing, x.shape[0]).to(x.dtype)
        routing = route_tokens(weights, ids, w13.shape[0])
        h = self._grouped_matmul(x[routing.token_of_row], self._experts_ekn(w13, x.dtype), routing.group_ends)
        act = self.npu.npu_swiglu(h, dim=-1)  # gate rows first, then up rows: swish(A) * B
        y = self._grouped_matmul(act, self._experts_ekn(w2, x.dtype), routing.group_ends)
        return combine_rows(y, routing, x.shape[0]).to(x.dtype)

    def _dynamic_quant(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token int8 of ``rows [M, K]`` -> ``(q [M, K], scale [M] float32)``."""
        q, scale = self.quantize_int8(rows)
        return q, scale.reshape(-1)

    def _moe_experts_w8a8(self, x, weights, ids, w13, w2, w13_scale, w2_scale):
        """int8 experts as vllm-ascend's w8a8_dynamic runs them: per-token dynamic int8
        activations, ``npu_grouped_matmul`` with the per-channel weight ``scale`` and the
        ``per_token_scale``, bf16 out; SwiGLU, re-quantized per token, second grouped matmul."""
        out_dtype = x.dtype if x.dtype in HALF_FLOATS else torch.bfloat16
        routing = route_tokens(weights, ids, w13.shape[0])
        rows = x[routing.token_of_row]
        q, token_scale = self._dynamic_quant(rows if rows.dtype in HALF_FLOATS else rows.to(out_dtype))
        # op-plugin 7.1.0 npu_grouped_matmul doc, per-token table: scale bf16 for a bf16 output,
        # float32 for float16; per_token_scale float32.
        scale_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
        def per_expert(scale: torch.Tensor) -> torch.Tensor:  # [E, N, 1] -> [E, N], once per scale
            as_rows = lambda: scale.reshape(scale.shape[0], -1).to(scale_dtype)  # noqa: E731
            return self.prepared.get(scale, f"scale:{scale_dtype}", as_rows)

        s13, s2 = per_expert(w13_scale), per_expert(w2_scale)
        h = self._grouped_matmul(q, self._experts_ekn(w13, torch.int8), routing.group_ends,
                                 scale=[s13], per_token_scale=[token_scale], output_dtype=out_dtype)
        act = self.npu.npu_swiglu(h, dim=-1)
        q2, act_scale = self._dynamic_quant(act)
        y = self._grouped_matmul(q2, self._experts_ekn(w2, torch.int8), routing.group_ends,
                                 scale=[s2], per_token_scale=[act_scale], output_dtype=out_dtype)
        return combine_rows(y, routing, x.shape[0]).to(x.dtype)

    # ------------------------------------------------------------ int8 (W8A8, native)
    def quantize_int8(self, x):
        if x.dtype not in HALF_FLOATS or x.numel() == 0:  # npu_dynamic_quant: fp16/bf16, non-empty
            _require_npu_float("quantize_int8", "x", x)
            return self._reference("quantize_int8")(x)
        # per-token symmetric -> (y int8, scale float32 x.shape[:-1]); the kernel wants >= 2 dims
        q, scale = self.npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
        return dynamic_quant_result(q, scale, x.shape)

    def _weight_tiles(self, b: torch.Tensor) -> dict[tuple[tuple[int, int], tuple[int, int]], torch.Tensor]:
        """int8 ``b [N, K]`` as the ``x2 [K, N]`` npu_quant_matmul reads best: transposed and cast
        to FRACTAL_NZ once per weight (as vllm-ascend does after loading), not a strided view per
        call; cut into tiles of at most 65535 along K and N first (usually one tile). A weight
        the load hook prepared is a transposed view already: its ``[K, N]`` (NZ) tensor is used."""
        n, k = b.shape
        if b.t().is_contiguous() and len(split_ranges(k)) == 1 and len(split_ranges(n)) == 1:
            return {((0, k), (0, n)): b.t()}  # prepared at load (prepare_weight): no second copy

        def make():
            return {
                (kr, nr): self.npu.npu_format_cast(b[nr[0]:nr[1], kr[0]:kr[1]].t().contiguous(), ACL_FORMAT_FRACTAL_NZ)
                for kr in split_ranges(k) for nr in split_ranges(n)
            }
        return self.prepared.get(b, "kn-nz", make)

    def _quant_matmul(self, q, token_scale, b, b_scale, out_dtype, bias=None):
        """W8A8 ``(q [M, K] @ b[N, K]^T) * token_scale * b_scale (+ bias)``, K and N split at the
        kernel's limit; float32 out (or a split K) via int32 partial sums (7.0.0+), else the reference."""
        m, k = q.shape
        n = b.shape[0]
        scale_n = b_scale.reshape(-1).to(torch.float32)
        tokens = token_scale.reshape(-1).to(torch.float32)
        tiles = self._weight_tiles(b)
        if out_dtype in HALF_FLOATS and len(split_ranges(k)) == 1:
            pieces = []
            for (_kr, (lo, hi)), w in tiles.items():
                bias_part = None if bias is None else bias.to(torch.float32)[lo:hi]
                # -> out = (x1 @ x2) * scale * pertoken_scale (+ bias), bf16/fp16
                pieces.append(self.npu.npu_quant_matmul(q, w, scale_n[lo:hi], pertoken_scale=tokens,
                                                        bias=bias_part, output_dtype=out_dtype))
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        if not self.features.quant_matmul_int32_guard:  # 6.0.0 would reinterpret the float32 scale
            y = self._reference("int8_gemm")(q, token_scale.reshape(-1, 1), b, b_scale.reshape(-1, 1), torch.float32)
            return (y if bias is None else y + bias.to(torch.float32)).to(out_dtype)
        ones = torch.ones(n, dtype=torch.float32, device=b.device)
        acc = torch.zeros(m, n, dtype=torch.int32, device=q.device)
        for ((k_lo, k_hi), (lo, hi)), w in tiles.items():
            part = q[:, k_lo:k_hi].contiguous()
            acc[:, lo:hi] += self.npu.npu_quant_matmul(part, w, ones[lo:hi], output_dtype=torch.int32)
        y = acc.to(torch.float32) * tokens[:, None] * scale_n[None, :]
        return (y if bias is None else y + bias.to(torch.float32)).to(out_dtype)

    def int8_gemm(self, a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        _require_npu_out_dtype("int8_gemm", out_dtype)
        if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
            return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
        return self._quant_matmul(a.contiguous(), a_scale, b, b_scale, out_dtype)

    # ------------------------------------------------------------ FP8 (emulated on 910B)
    def dequantize_fp8(self, q, scale, block=(1, 128), out_dtype=torch.bfloat16):
        _require_npu_out_dtype("dequantize_fp8", out_dtype)
        return dequantize_to(decode_fp8(q), scale, None if block is None else tuple(block), torch.float32).to(out_dtype)

    def fp8_gemm(self, a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        _require_npu_out_dtype("fp8_gemm", out_dtype)
        # 910B has no FP8 units: decode to bf16 on the NPU, then a bf16 matmul (fp32 accumulate).
        a_block, b_block = GRANULARITY_BLOCKS[gemm_granularity("fp8_gemm", a, a_scale, b, b_scale)]
        if a_block is None:
            a_scale, b_scale = a_scale.reshape(()), b_scale.reshape(())
        ad = dequantize_to(decode_fp8(a), a_scale, a_block, torch.float32).to(torch.bfloat16)
        bd = dequantize_to(decode_fp8(b), b_scale, b_block, torch.float32).to(torch.bfloat16)
        return (ad @ bd.t()).to(out_dtype)

    def linear(self, x, weight, bias=None, weight_scale=None):
        _require_npu_float("linear", "x", x)
        if weight_scale is None:  # plain float matmul (CANN MatMul through torch)
            b = None if bias is None else bias.to(x.dtype)
            return F.linear(x, weight.to(x.dtype), b)
        rows = x.reshape(-1, x.shape[-1])
        n = weight.shape[0]
        if weight.dtype == torch.int8:
            y = self._linear_w8a8(rows, weight, weight_scale, bias)
        else:  # FP8 weight, emulated: decoded to bf16 once per weight, x rounded per the weight's scheme
            mode = _weight_blocks(weight, weight_scale)
            x_block, w_block = GRANULARITY_BLOCKS[mode]
            xd = fake_quantize_fp8(rows, x_block, format_of(weight.dtype).name).to(torch.bfloat16)
            ws = weight_scale.reshape(()) if mode == "tensor" else weight_scale
            def decoded() -> torch.Tensor:
                return dequantize_to(decode_fp8(weight), ws, w_block, torch.float32).to(torch.bfloat16)

            wd = self.prepared.get(weight, "fp8-decoded", decoded)
            y = (xd @ wd.t()).to(torch.float32)
            if bias is not None:
                y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    def _linear_w8a8(self, rows, weight, weight_scale, bias):
        """Per-token dynamic int8 activations x per-channel int8 weights (the W8A8 path)."""
        if rows.shape[0] == 0:
            y = torch.zeros(0, weight.shape[0], dtype=torch.float32, device=rows.device)
            return y if bias is None else y + bias.to(torch.float32)
        q, token_scale = self._dynamic_quant(rows)
        out_dtype = rows.dtype if rows.dtype in HALF_FLOATS else torch.float32
        return self._quant_matmul(q, fix_zero_scales(token_scale), weight, weight_scale, out_dtype, bias)


def _weight_blocks(weight: torch.Tensor, weight_scale: torch.Tensor) -> str:
    n, k = weight.shape
    if tuple(weight_scale.shape) == (-(-n // 128), -(-k // 128)):
        return "block"
    return "row" if tuple(weight_scale.shape) == (n, 1) else "tensor"
