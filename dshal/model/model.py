"""The DeepSeek-V3 architecture on ``dshal.ops``: one file, every backend.

Reads top to bottom like DeepSeek-V3's own ``inference/model.py``: ``Linear``,
``Embedding``, ``RMSNorm``, RoPE tables, ``MLA``, ``MLP``, ``Gate``, ``RoutedExperts``,
``MoE``, ``Block``, ``Transformer``. Every compute step is a ``dshal.ops`` call (or plain,
device-independent torch glue: views, indexing, concatenation, the per-head matmuls of
the absorbed MLA path), so the same file runs on any backend the runtime selected.

Module names mirror the Hugging Face checkpoint (``layers.N.self_attn.kv_b_proj`` is
``model.layers.N.self_attn.kv_b_proj`` on disk); see :mod:`dshal.model.loader`.

DeepSeek-V3.2 (``args.sparse_attention``) adds an :class:`Indexer` to each ``MLA``
(``self_attn.indexer``; its ``LayerNorm`` and float32 ``HeadWeights`` next to two ``Linear``):
a query with more than ``index_topk`` keys attends to the ones it scores highest (plain torch
glue too: the scores' matmuls, ``topk``, and the key mask added through more key dims).

Transforms, not branches. Quantization and parallelism are applied to a built model,
never tested for inside it:

- :func:`dshal.model.precision.apply_precision` converts ``Linear`` / ``RoutedExperts``
  weights (FP8 blocks + scales, or high precision);
- a tensor-parallel transform swaps ``Linear`` modules for column/row-parallel ones
  (``q_b_proj``/``q_proj``, ``kv_b_proj``, MLP ``gate_up_proj`` column-parallel;
  ``o_proj``, ``down_proj`` row-parallel with an all-reduce; DeepSeek-V3.2's indexer stays
  whole). ``MLA`` takes its local head count from the projection shapes (``view(..., -1,
  head_dim)``), so it needs no change; ``gate_up_proj`` holds the gate rows then the up rows,
  so a column split must take matching halves of each.
- an expert-parallel transform replaces ``MoE.experts`` (a :class:`RoutedExperts`, called
  as ``experts(x, weights, ids)`` with the router's global expert ids) with a module that
  serves its rank's share (``dshal.parallel.layers.ShardedExperts``: the others' slots as
  ``NO_EXPERT`` and an all-reduce, or tokens sent to their owners with ``dshal.comm.all_to_all``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from dshal import ops
from dshal.errors import ArgumentError, DTypeError, ShapeError
from dshal.model.args import ModelArgs, yarn_mscale
from dshal.model.cache import KVCache, LayerCache, check_cache_fits
from dshal.model.generate import check_input_ids, check_token_ids, generate
from dshal.model.prefill import check_start_pos, inference_only, own_dtypes
from dshal.model.weights import dequantize_weight, precision_label
from dshal.ops.spec import FP8_DTYPES, INT64_MAX, write_count
from dshal.runtime import free_memory, free_memory_note

#: Steps of up to this many tokens on a KV cache (one token, or a token and its draft, see
#: :mod:`dshal.model.speculative`) are decode steps: they attend in the absorbed form, and they
#: repeat the op calls of the model's first step of their length, so only that one runs the
#: input checks.
MAX_STEP_TOKENS = 2


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialized inference parameter (the loader or a random init fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)`` through ``dshal.ops.linear``.

    ``weight [out, in]`` is float, or FP8/int8 with ``weight_scale`` (block
    ``[ceil(out/128), ceil(in/128)]``, rowwise ``[out, 1]`` or tensorwise), as set by the
    precision policy or read from an FP8 checkpoint (``weight_scale_inv``).
    """

    #: The op this module calls and its ``(weight, scale)`` parameter pairs: what the precision
    #: policy converts and the backend's load hook (``Backend.prepare_weight``) is handed.
    op = "linear"
    weight_pairs = (("weight", "weight_scale"),)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.register_parameter("weight_scale", None)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.weight_scale)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` (dequantized when the policy stored it in FP8)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}, bias={self.bias is not None}"
        )


class Embedding(nn.Module):
    """Token embedding ``[V, D]`` (a row lookup)."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(vocab_size, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [B, T] -> [B, T, D]

    def extra_repr(self) -> str:
        return f"vocab={self.weight.shape[0]}, dim={self.weight.shape[1]}, weight={self.weight.dtype}"


class RMSNorm(nn.Module):
    """RMSNorm through ``dshal.ops.rms_norm``; with ``residual`` it is the fused
    "add & norm" and returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        return ops.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with a bias (DeepSeek-V3.2's indexer ``k_norm``), computed in float32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)
        self.bias = _param(dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.weight.shape[0],)
        return F.layer_norm(x.float(), shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, eps={self.eps}"


class HeadWeights(nn.Module):
    """The indexer's ``weights_proj``: a float32 ``[heads, D]`` projection of the hidden state
    (float32 as transformers keeps it; not a :class:`Linear`, so no precision policy quantizes it)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.weight = _param(heads, dim, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x.float(), self.weight)  # [..., D] -> [..., heads] float32

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, heads={self.weight.shape[0]}, weight=float32"


# ---------------------------------------------------------------- rotary position (YaRN)
def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [max_position_embeddings, qk_rope_head_dim / 2]`` float32, one angle per
    rotated pair, with YaRN's frequency ramp and cos/sin scale when ``rope_scaling`` is set."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    if torch.empty(0, device=device).is_meta:  # `device`, else the caller's default (a `with torch.device` block)
        # Shapes only. Not arange: a meta factory op imports triton (through torch._refs and
        # dynamo), which then cannot run under the interpreter an emulated plugin needs later.
        shape = (args.max_position_embeddings, dim // 2)
        return torch.empty(shape, dtype=torch.float32, device="meta"), torch.empty(shape, dtype=torch.float32, device="meta")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    attention_factor = 1.0
    rs = args.rope_scaling
    if rs is not None:
        # YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between.
        def correction_dim(rotations: float) -> float:
            return (
                dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))
            )

        low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / ((high - low) or 0.001)
        extrapolate = 1 - ramp.clamp(0, 1)
        inv_freq = inv_freq / rs.factor * (1 - extrapolate) + inv_freq * extrapolate
        if rs.attention_factor is not None:
            attention_factor = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(rs.factor)
    positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]  # [S, rope / 2]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


# ---------------------------------------------------------------- attention
class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): which keys each query sees.

    One key per token, cached next to the MLA latent: ``k = rope(k_norm(wk(x))) [B, S, Di]``.
    Per query, ``Hi`` heads from the MLA's normalized query latent, ``q = rope(wq_b(q_latent))
    [B, T, Hi, Di]``, and head weights ``w = weights_proj(x) [B, T, Hi]``; the score of key s for
    query t is ``sum_h w[t, h] * Hi**-0.5 * relu(q[t, h] . k[s] * Di**-0.5)``. The query attends
    to its ``topk`` best-scoring visible keys only. RoPE covers the first ``qk_rope_head_dim`` dims
    in the half-split (not interleaved) layout, whatever the MLA's is; GLM-5's
    (``args.index_rope_interleave``) in interleaved pairs.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        heads, dim, dt = args.index_n_heads, args.index_head_dim, args.dtype
        self.heads, self.dim, self.rope, self.topk = heads, dim, args.qk_rope_head_dim, args.index_topk
        self.interleaved = args.index_rope_interleave
        self.wq_b = Linear(int(args.q_lora_rank or 0), heads * dim, dtype=dt)
        self.wk = Linear(args.hidden_size, dim, dtype=dt)
        self.k_norm = LayerNorm(dim, 1e-6, dt)
        self.weights_proj = HeadWeights(args.hidden_size, heads)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = x.split([self.rope, self.dim - self.rope], dim=-1)
        return torch.cat((ops.rotary_embedding(pe, cos, sin, self.interleaved), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The keys to cache: ``x [B, T, D] -> [B, T, Di]``."""
        return self._rotate(self.k_norm(self.wk(x)), cos, sin)

    def select(
        self, x_q: torch.Tensor, q_latent: torch.Tensor, cos_q: torch.Tensor, sin_q: torch.Tensor, keys: torch.Tensor,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The keys ``[B, Tq, topk]`` (``-1`` past the keys a query sees) the queries (hidden
        ``x_q [B, Tq, D]``, MLA query latent ``q_latent [B, Tq, q_lora_rank]``) attend to among
        ``keys [B, S, Di]``: :func:`dshal.ops.indexer_topk`, the queries the last Tq positions
        (causal) unless ``visible [B, Tq, S]`` says which keys each sees."""
        bsz, tq = x_q.shape[:2]
        q = self.wq_b(q_latent).view(bsz, tq, self.heads, self.dim)
        q = self._rotate(q, cos_q[..., None, :], sin_q[..., None, :])  # [B, Tq, Hi, Di]
        # both scales folded into the head weights: relu(a * s) = s * relu(a) for s > 0
        weights = self.weights_proj(x_q) * (self.heads**-0.5 * self.dim**-0.5)  # [B, Tq, Hi] float32
        return ops.indexer_topk(q, weights, keys, self.topk, visible)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, topk={self.topk}"


class MLA(nn.Module):
    """Multi-head latent attention.

    Queries: ``x -> q_a_proj -> q_a_layernorm -> q_b_proj`` (or ``q_proj`` without q LoRA)
    ``-> [B, T, H, nope + rope]``. Keys/values: ``x -> kv_a_proj_with_mqa -> [c_kv (r) |
    k_pe (rope)]``; ``c_kv`` is normalized and expanded per head by ``kv_b_proj -> [k_nope |
    v]``; ``k_pe`` is one rotated key shared by all heads.

    Paths: no cache / "naive" cache expand keys and values per head; the "absorb" cache
    stores ``[c_kv | k_pe]`` and, for decode, folds ``kv_b_proj`` into the query
    (``q_nope @ W_uk``) and the output (``@ W_uv``) so attention runs over the latent
    directly, as one MQA head of width ``r + rope``.

    DeepSeek-V3.2 (``args.sparse_attention``): an :class:`Indexer` caches one more key per
    token, and a query with more than ``index_topk`` visible keys attends to the ``index_topk``
    it scores highest (:func:`dshal.ops.indexer_topk`); with fewer, to all of them, which is the
    dense attention above. A decode step's one query (dynamic or static) attends to its kept
    latent rows only (:func:`dshal.ops.sparse_mla_attention`); more queries (a prefill chunk,
    expanded as above; an MTP step) mask the others (:meth:`_kept`, :func:`_bias_of`, :meth:`_attend_masked`).
    GLM-5's shared-selection layers (``args.shares_selection(layer_id)``) have no indexer: they
    attend to the keys the previous full layer kept, handed over in ``forward``'s ``selection``.
    """

    #: Queries attended per call when a per-query key mask is added (each adds one key column).
    MASKED_QUERY_CHUNK = 64

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        d, h, dt = args.hidden_size, args.num_attention_heads, args.dtype
        self.nope, self.rope = args.qk_nope_head_dim, args.qk_rope_head_dim
        #: GLM-5 "shared" layer: the previous full layer's selection, no indexer of its own.
        self.shares_selection = args.shares_selection(layer_id)
        self.index_topk = args.index_topk
        self.v_dim, self.rank = args.v_head_dim, args.kv_lora_rank
        self.qk_head_dim = args.qk_head_dim
        self.softmax_scale = args.softmax_scale
        self.interleaved = args.rope_interleave
        #: Dynamic attention: each query sees its last `window` keys and the first `global_tokens`.
        self.window = args.attention_window
        self.global_tokens = args.attention_global_tokens if args.attention_window else 0
        #: In "absorb" mode, steps of more than MAX_STEP_TOKENS tokens (prefill) expand k/v
        #: from the latent (cheaper for long chunks); False runs them absorbed too. Decode
        #: steps stay absorbed: expanding the whole cache for one or two queries costs more.
        self.expand_prefill = True
        self.q_lora_rank = args.q_lora_rank
        if args.q_lora_rank is None:
            self.q_proj = Linear(d, h * self.qk_head_dim, dtype=dt)
        else:
            self.q_a_proj = Linear(d, args.q_lora_rank, bias=args.attention_bias, dtype=dt)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.latent_norm_eps, dt)
            self.q_b_proj = Linear(args.q_lora_rank, h * self.qk_head_dim, dtype=dt)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope, bias=args.attention_bias, dtype=dt)
        self.kv_a_layernorm = RMSNorm(self.rank, args.latent_norm_eps, dt)
        self.kv_b_proj = Linear(self.rank, h * (self.nope + self.v_dim), dtype=dt)
        self.o_proj = Linear(h * self.v_dim, d, bias=args.attention_bias, dtype=dt)
        self.indexer = Indexer(args) if args.sparse_attention and not self.shares_selection else None
        # (kv_b weight, scale, their write counts, dtype) the cached [H, nope+v, r] form was made from, and it
        self._absorbed: tuple[torch.Tensor, torch.Tensor | None, tuple[int | None, ...], torch.dtype, torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
        last_query_only: bool = False,
        selection: dict[str, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``x [B, T, D] -> [B, T, D]``, or ``[B, 1, D]`` for the last position only when
        ``last_query_only`` (keys and values, and the cache, still cover all T tokens).
        ``cos`` / ``sin``: ``[T, rope / 2]``, or ``[B, T, rope / 2]`` when the rows are at
        different positions (a static decode step of prompts of different lengths).
        ``selection``: one forward's dict in which a sparse layer leaves the keys it kept
        (``"kept"``) for GLM-5's shared-selection layers after it, which read them there."""
        bsz = x.shape[0]
        x_q, cos_q, sin_q = (x[:, -1:], cos[..., -1:, :], sin[..., -1:, :]) if last_query_only else (x, cos, sin)
        # queries: [B, Tq, H, nope], [B, Tq, H, rope]
        q_latent = None if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x_q))  # [B, Tq, q_lora_rank]
        q = self.q_proj(x_q) if q_latent is None else self.q_b_proj(q_latent)
        if self.indexer is None:
            q_latent = None  # only the indexer reads it: freed now, as before it had one (dshal plan's peak)
        q = q.view(bsz, x_q.shape[1], -1, self.qk_head_dim)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = ops.rotary_embedding(q_pe, cos_q[..., None, :], sin_q[..., None, :], self.interleaved)  # one angle for all heads
        # latent: [B, T, r + rope] = normalized c_kv | rotated shared key
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.rank, self.rope], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), ops.rotary_embedding(k_pe, cos, sin, self.interleaved)), dim=-1)
        # DeepSeek-V3.2: the indexer's keys [B, T, Di], cached as one more entry of the layer
        index_keys: list[torch.Tensor] = [] if self.indexer is None else [self.indexer.keys(x, cos, sin)]

        def sparse_bias(keys: list[torch.Tensor], slen: int) -> torch.Tensor | None:
            kept = self._kept(x_q, q_latent, cos_q, sin_q, keys, slen, cache, selection)
            return None if kept is None else _bias_of(kept, slen)

        if cache is None:
            out = self._attend_expanded(q_nope, q_pe, *self._expand(latent), sparse_bias(index_keys, x.shape[1]))
        elif cache.mode == "naive":
            k, v = self._expand(latent)  # [B, H, T, .] -> cached as [B, T, H, .]
            k, v, *index_keys = cache.update(k.transpose(1, 2), v.transpose(1, 2), *index_keys)
            out = self._attend_expanded(q_nope, q_pe, k.transpose(1, 2), v.transpose(1, 2), sparse_bias(index_keys, k.shape[1]))
        else:
            latent, *index_keys = cache.update(latent, *index_keys)
            slen = latent.shape[1]
            sparse = self.indexer is not None or self.shares_selection
            if sparse and x_q.shape[1] == 1 and slen > self.index_topk:
                # A decode step's one query attends to its kept keys only (sparse_mla_attention reads
                # just those rows; masking the others reads them all). Dynamic: it sees every key; a
                # static step: the slots the cache's key bias leaves visible.
                kept = self._kept(x_q, q_latent, cos_q, sin_q, index_keys, slen, cache, selection)  # [B, 1, topk]
                assert kept is not None  # more keys than index_topk
                out = self._attend_sparse(q_nope, q_pe, latent, kept)
            elif x_q.shape[1] > MAX_STEP_TOKENS and self.expand_prefill:
                out = self._attend_expanded(q_nope, q_pe, *self._expand(latent), sparse_bias(index_keys, slen))
            else:
                out = self._attend_absorbed(q_nope, q_pe, latent, cache, sparse_bias(index_keys, slen))
        return self.o_proj(out.transpose(1, 2).flatten(2))  # [B, H, Tq, v] -> [B, Tq, H * v] -> [B, Tq, D]

    def _kept(
        self,
        x_q: torch.Tensor,
        q_latent: torch.Tensor | None,
        cos_q: torch.Tensor,
        sin_q: torch.Tensor,
        keys: list[torch.Tensor],
        slen: int,
        cache: LayerCache | None,
        selection: dict[str, torch.Tensor | None] | None,
    ) -> torch.Tensor | None:
        """DeepSeek Sparse Attention's choice ``[B, Tq, topk]`` (``-1`` past the keys a query sees)
        among the ``slen`` keys (in position order, the queries last; in a static step the whole
        buffer, with the cache's :attr:`~LayerCache.key_bias`), or None where no query has more
        than ``index_topk`` keys (each then attends to all of them, the dense attention) or the
        model has no indexer. Known on the host (key count, cache capacity), so a static step
        that may need it always computes it. A layer with an indexer leaves it in ``selection``;
        a GLM-5 shared-selection layer takes it from there (its last ``Tq`` queries')."""
        if self.shares_selection:
            if selection is None or "kept" not in selection:
                raise ArgumentError(
                    "MLA: argument 'selection' holds no 'kept' entry, expected the dict the previous full layer "
                    "wrote in this forward: a GLM-5 shared-selection layer (indexer_types 'shared') attends to its keys"
                )
            kept = selection["kept"]
            return None if kept is None else kept[:, -x_q.shape[1]:]
        if self.indexer is None:
            return None
        assert q_latent is not None  # V3.2 configs have a q LoRA (ModelArgs checks)
        bsz, tq = x_q.shape[:2]
        kept = None
        if slen > self.indexer.topk:
            visible = _visible_slots(None if cache is None else cache.key_bias, bsz, tq, slen)
            kept = self.indexer.select(x_q, q_latent, cos_q, sin_q, keys[0], visible)  # [B, Tq, topk]
        if selection is not None:
            selection["kept"] = kept
        return kept

    def _causal(self, q_len: int) -> bool:
        """A single query at the end sees every key: no mask needed unless a window applies."""
        return q_len > 1 or self.window is not None

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[B, H, S, nope + rope]`` and values ``[B, H, S, v]`` from the latent."""
        bsz, slen, _ = latent.shape
        c_kv, k_pe = latent.split([self.rank, self.rope], dim=-1)
        # Weight-only, as in the absorbed path: the latent is never quantized (DeepSeek-V3).
        w_kv = self._kv_b_per_head(c_kv.dtype).flatten(0, 1)  # [H * (nope + v), r]
        kv = ops.linear(c_kv, w_kv).view(bsz, slen, -1, self.nope + self.v_dim).transpose(1, 2)  # [B, H, S, nope + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return k, v

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over per-head keys; ``bias [B, T, S]``: a per-query key mask (sparse attention)."""
        q = torch.cat((q_nope.transpose(1, 2), q_pe.transpose(1, 2)), dim=-1)  # [B, H, T, nope + rope]
        if bias is not None:
            return self._attend_masked(q, k, v, bias)
        causal = self._causal(q.shape[2])
        return ops.attention(q, k, v, causal, self.softmax_scale, self.window, self.global_tokens)  # [B, H, T, v]

    def _attend_masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``ops.attention`` of ``q [B, H, T, .]`` with a per-query key mask ``bias [B, T, S]`` (that
        holds the causal mask too) over ``k [B, Hk, S, .]`` (Hk: 1, the shared latent head, or H),
        ``MASKED_QUERY_CHUNK`` queries at a time: as :func:`_with_key_bias` does, query t gains a
        one-hot dim and every key one dim holding its bias for query t."""
        low = max(torch.finfo(k.dtype).min, torch.finfo(bias.dtype).min) / 2  # finite in k's dtype
        outs = []
        for t in range(0, q.shape[2], self.MASKED_QUERY_CHUNK):
            part = slice(t, t + self.MASKED_QUERY_CHUNK)
            columns = (bias[:, part] / self.softmax_scale).clamp(min=low).to(k.dtype).mT  # [B, S, c]
            queries = columns.shape[-1]
            width = -(-queries // 8) * 8  # zero dims up to a multiple of 8, as fused kernels want head dims
            columns = F.pad(columns, (0, width - queries))  # [B, S, w]
            one_hot = torch.eye(queries, width, dtype=q.dtype, device=q.device).expand(*q.shape[:2], queries, width)
            q_part = torch.cat((q[:, :, part], one_hot), dim=-1)  # [B, H, c, . + w]
            k_part = torch.cat((k, columns[:, None].expand(-1, k.shape[1], -1, -1)), dim=-1)  # [B, Hk, S, . + w]
            outs.append(ops.attention(q_part, k_part, v, False, self.softmax_scale, None, 0))
        return torch.cat(outs, dim=2)  # [B, H, T, v]

    def _attend_sparse(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Absorbed attention of each query over its kept rows ``kept [B, Tq, topk]`` of the
        cached ``latent [B, S, r + rope]`` (:func:`dshal.ops.sparse_mla_attention`) -> ``[B, H, Tq, v]``."""
        q, w_uv = self._absorbed_query(q_nope, q_pe)
        out = ops.sparse_mla_attention(q, latent, kept, self.softmax_scale, self.rank)  # [B, H, Tq, r]
        return (w_uv @ out.contiguous().mT).mT

    def _absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query over the latent ``[B, H, T, r + rope]`` and ``W_uv [H, v, r]``."""
        w_kv = self._kv_b_per_head(q_nope.dtype)  # [H, nope + v, r]
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]  # each head's matrix row-major (stride r, 1)
        # The per-head products are one GEMM per (row, head) with operands laid out alike
        # whatever B: torch broadcasts a 3-dim weight over the batch as a view for B = 1 and a
        # contiguous copy for B > 1, so a weight whose heads are not row-major (w_uv.mT) got
        # another GEMM layout -- another summation order -- once the batch grew, and a row's
        # result depended on its batch. Here the weights' heads are row-major slices and the
        # activations contiguous: B only adds GEMMs, never changes one.
        q_latent = q_nope.transpose(1, 2).contiguous() @ w_uk  # [B, H, T, nope] @ [H, nope, r] -> [B, H, T, r]
        q = torch.cat((q_latent, q_pe.transpose(1, 2)), dim=-1)  # [B, H, T, r + rope]
        return q, w_uv

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, cache: Any = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, w_uv = self._absorbed_query(q_nope, q_pe)
        if bias is not None and (cache is None or cache.key_bias is None):  # sparse attention, many queries
            return (w_uv @ self._attend_masked(q, latent[:, None], latent[:, None, :, : self.rank], bias).mT).mT
        key_bias = bias if bias is not None else None if cache is None else cache.key_bias
        if key_bias is not None:  # static decode step: unwritten slots (and unselected keys) masked by more dims
            q, latent = _with_key_bias(q, latent, key_bias / self.softmax_scale, cache)
        k = latent[:, None]  # [B, 1, S, r + rope]: one shared head
        v = latent[:, None, :, : self.rank]  # [B, 1, S, r]
        causal = self._causal(q.shape[2]) and key_bias is None  # the bias masks by position itself
        out = ops.attention(q, k, v, causal, self.softmax_scale, self.window, self.global_tokens)  # [B, H, T, r]
        return (w_uv @ out.contiguous().mT).mT  # ([H, v, r] @ [B, H, r, T]).mT -> [B, H, T, v]

    def cached_bytes(self) -> int:
        """Bytes this layer holds beyond its parameters once it has attended in the absorbed form:
        ``kv_b_proj``'s dequantized ``[H, nope + v, r]`` copy (none when the weight is already
        stored in the compute dtype, whose view it then is)."""
        if self._absorbed is None:
            return 0
        weight, *_, dense = self._absorbed
        if dense.dtype == weight.dtype and self.kv_b_proj.weight_scale is None:
            return 0
        return dense.numel() * dense.element_size()

    def cache_kv_b(self, dtype: torch.dtype) -> None:
        """Make the dequantized ``kv_b_proj`` copy (:meth:`cached_bytes`) now rather than at the
        first forward (``dshal plan`` counts it apart from a step's activations)."""
        self._kv_b_per_head(dtype)

    def _kv_b_per_head(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_b_proj``'s weight as ``[H, nope + v, r]`` in ``dtype`` (dequantized: kv_b is
        weight-only in every precision mode), cached until the weight or dtype changes. Under
        ``torch.compile`` it is made in the graph (dynamo cannot read the write counters the
        cache is checked with): a view for a weight already in ``dtype``, else dequantized per call."""
        if torch.compiler.is_compiling():
            return self.kv_b_proj.dequantized_weight(dtype).view(-1, self.nope + self.v_dim, self.rank)
        weight, scale = self.kv_b_proj.weight, self.kv_b_proj.weight_scale
        counts = (write_count(weight), write_count(scale))  # load_state_dict copies into the same parameters
        held = self._absorbed
        if held is None or held[0] is not weight or held[1] is not scale or held[2:4] != (counts, dtype):
            dense = self.kv_b_proj.dequantized_weight(dtype).view(-1, self.nope + self.v_dim, self.rank)
            self._absorbed = held = (weight, scale, counts, dtype, dense)
        return held[4]


def _bias_of(kept: torch.Tensor, slen: int) -> torch.Tensor:
    """The key mask ``[B, Tq, S]`` (0: attended, ``MASKED_SCORE``: not) of a selection ``kept
    [B, Tq, topk]`` (``-1`` past the keys a query sees) among ``slen`` keys."""
    bsz, tq = kept.shape[:2]
    slot = torch.where(kept >= 0, kept, slen)  # -1 marks the spare column past the keys
    chosen = torch.zeros(bsz, tq, slen + 1, dtype=torch.bool, device=kept.device).scatter_(-1, slot, True)[..., :slen]
    return torch.where(chosen, 0.0, KVCache.MASKED_SCORE)


def _visible_slots(key_bias: torch.Tensor | None, bsz: int, tq: int, slen: int) -> torch.Tensor | None:
    """``[B, Tq, S]`` bool: the slots a static step's key bias (``[S]``, ``[B, S]`` or ``[B, T, S]``,
    0 at the visible slots) leaves to each of its last ``Tq`` queries; None without one (the keys
    are positions 0 .. S - 1, the queries the last Tq of them: ``indexer_topk``'s default)."""
    if key_bias is None:
        return None
    visible = (key_bias == 0).expand(bsz, -1, -1) if key_bias.dim() == 3 else (key_bias == 0).view(-1, 1, slen)
    return visible[:, -tq:].expand(bsz, tq, slen)


def _with_key_bias(
    q: torch.Tensor, latent: torch.Tensor, bias: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, H, T, D]`` and ``latent [B, S, D]`` with more dims, so ``q . k`` gains ``bias``: a
    key mask through the plain attention op. ``bias [S]`` or per row ``[B, S]``: one dim, 1 in
    q and the bias in the keys. Per row and query ``[B, T, S]``: T dims, query t's one-hot in q
    and each query's bias in the keys. The keys' dims go into the layer ``cache``'s spare
    columns where it has them (no copy of the cache), else onto a copy of ``latent``."""
    # Finite in both dtypes: float16 latents, and float64 ones (a float32 bias cannot hold float64's min).
    low = max(torch.finfo(latent.dtype).min, torch.finfo(bias.dtype).min) / 2
    columns = bias.clamp(min=low).to(latent.dtype)
    if columns.dim() == 3:  # [B, T, S]: one column per query
        queries = q.shape[2]
        extra = torch.eye(queries, dtype=q.dtype, device=q.device).expand(*q.shape[:-1], queries)  # [B, H, T, T]
        columns = columns.transpose(1, 2)  # [B, S, T]
    else:
        extra = q.new_ones(*q.shape[:-1], 1)
        columns = columns.reshape(-1, columns.shape[-1])[:, :, None].expand(latent.shape[0], -1, 1)  # [B, S, 1]
    keys = cache.biased_keys(latent, columns)
    if keys is None:
        return torch.cat((q, extra), dim=-1), torch.cat((latent, columns), dim=-1)
    unused = keys.shape[-1] - latent.shape[-1] - extra.shape[-1]  # spare columns this step does not write
    return torch.cat((q, extra, q.new_zeros(*q.shape[:-1], unused)), dim=-1), keys


# ---------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(x W_gate) * (x W_up))``, gate and up fused in one GEMM
    (``gate_up_proj`` = gate rows then up rows)."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(dim, 2 * inter_dim, dtype=dtype)
        self.down_proj = Linear(inter_dim, dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class Gate(nn.Module):
    """DeepSeek-V3 router: float32 logits ``[T, E]`` -> ``moe_gate`` (sigmoid, group-limited
    top-k; ``e_score_correction_bias`` steers the choice only)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = args.num_experts_per_tok, args.n_group, args.topk_group
        self.routed_scaling_factor, self.norm_topk_prob = args.routed_scaling_factor, args.norm_topk_prob
        self.weight = _param(args.n_routed_experts, args.hidden_size, dtype=torch.float32)
        self.e_score_correction_bias = _param(args.n_routed_experts, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = ops.linear(x.float(), self.weight)  # [T, E]
        return ops.moe_gate(
            logits,
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.routed_scaling_factor,
            self.norm_topk_prob,
        )  # weights [T, k] float32, ids [T, k]

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, top_k={self.top_k}, n_group={self.n_group}, topk_group={self.topk_group}"


class RoutedExperts(nn.Module):
    """The routed experts, stacked: ``w13 [E, 2I, D]`` (gate rows then up rows), ``w2 [E, D, I]``,
    optional FP8 block scales. ``forward(x [T, D], weights [T, k], ids [T, k]) -> [T, D]``.

    The expert-parallel seam: replace this module with one holding a slice of the experts
    that takes the same call (global ids in, combined output out).
    """

    op = "moe_experts"  # and its (weight, scale) pairs, as Linear's
    weight_pairs = (("w13", "w13_scale"), ("w2", "w2_scale"))
    #: Why a decode step holding this module cannot be captured as a device graph (a
    #: data-dependent shape, a host read), or None. A replacement that cannot says so here.
    graph_capture_unsupported: str | None = None
    #: Calls of up to this many (token, expert) slots keep fixed shapes (None: any number); a
    #: decode step past it is not captured either.
    graph_capture_max_slots: int | None = None

    def __init__(self, n_experts: int, dim: int, inter_dim: int, dtype: torch.dtype):
        super().__init__()
        self.w13 = _param(n_experts, 2 * inter_dim, dim, dtype=dtype)
        self.w2 = _param(n_experts, dim, inter_dim, dtype=dtype)
        self.register_parameter("w13_scale", None)
        self.register_parameter("w2_scale", None)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x, weights, ids, self.w13, self.w2, self.w13_scale, self.w2_scale)

    def extra_repr(self) -> str:
        experts, _, dim = self.w13.shape
        return f"experts={experts}, dim={dim}, inter={self.w2.shape[-1]}, weight={self.w13.dtype}"


class MoE(nn.Module):
    """DeepSeekMoE: router + routed experts + always-on shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)
        self.experts = RoutedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size, args.dtype)
        self.shared_experts = MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size, args.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        weights, ids = self.gate(x)
        return (self.experts(x, weights, ids) + self.shared_experts(x)).view(shape)


# ---------------------------------------------------------------- the stack
class Block(nn.Module):
    """One layer: ``x + MLA(norm(x))``, then ``+ FFN(norm(.))`` (dense MLP or MoE); the
    residual stream is carried separately so each add is fused into the next norm."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.self_attn = MLA(args, layer_id)
        self.mlp: nn.Module = (
            MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size, args.dtype)
        )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None,
        last_only: bool = False,
        selection: dict[str, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual) [B, T, D]`` -> the same, or ``[B, 1, D]`` for the last position only
        when ``last_only`` (the cache still gets every token's keys). ``selection``: see :class:`MLA`."""
        if residual is None:  # first layer: the embedding is the residual
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, cache, last_query_only=last_only, selection=selection)
        if last_only:
            residual = residual[:, -1:]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class SharedHead(nn.Module):
    """A multi-token-prediction layer's output: final norm and vocabulary projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)
        self.head = Linear(args.hidden_size, args.vocab_size, dtype=args.dtype)


class MTPLayer(Block):
    """DeepSeek-V3's multi-token-prediction (MTP) module, stored in the checkpoint as layer
    ``num_hidden_layers`` (``model.layers.61``): one more layer that, from the main model's
    final hidden state at position i and the embedding of token i + 1, predicts token i + 2.
    Speculative decoding (:mod:`dshal.model.speculative`) takes that prediction as a draft
    the main model verifies.

    As vLLM runs it (``deepseek_mtp.py``): ``eh_proj([enorm(embedding); hnorm(hidden)])``
    through the layer, then ``shared_head``'s norm and head; the token embedding is the
    main model's (the checkpoint's copy in this layer is not read)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__(layer_id, args)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, dtype=args.dtype)
        self.shared_head = SharedHead(args)

    def predict(
        self, hidden: torch.Tensor, embedded: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``hidden [B, T, D]`` (the main model's, after its final norm) and ``embedded [B, T, D]``
        (the next tokens' embeddings) -> logits ``[B, T or 1, vocab]`` of the token after the next
        (``last_only``: the last position's; the cache still gets every position's keys)."""
        x = self.eh_proj(torch.cat((self.enorm(embedded), self.hnorm(hidden)), dim=-1))  # [B, T, D]
        x, residual = self(x, None, cos, sin, cache, last_only and x.shape[1] > 1)
        x, _ = self.shared_head.norm(x, residual)
        return self.shared_head.head(x)


@dataclass(frozen=True)
class ParallelState:
    """How this rank's copy of the model is split; written only by the transforms in
    :mod:`dshal.parallel` (a model nobody split is one rank of one)."""

    #: ``tensor_parallel``: its process group (None: not split), ranks, and this rank's place.
    tp_group: Any = None
    tp_size: int = 1
    tp_rank: int = 0
    #: ``expert_parallel``: the same for the routed experts.
    ep_group: Any = None
    ep_size: int = 1
    ep_rank: int = 0


class Transformer(nn.Module):
    """DeepSeek-V3 (and V3.2, with its indexer): ``embed -> layers -> norm -> lm_head``.

    ``model(input_ids [B, T])`` returns logits ``[B, T, vocab]``; with a cache from
    :meth:`new_cache`, ``model(ids, start_pos, cache)`` continues a sequence.
    ``last_only=True`` returns ``[B, 1, vocab]`` for the last position; the last layer then
    runs its queries, attention output and FFN for that position only (as llama.cpp's
    output-row selection does), while every layer still caches all T tokens.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self._cache_layouts: dict[str, tuple] = {}  # mode -> KVCache.layout this model makes
        self.args = args
        self.parallel = ParallelState()  # set by dshal.parallel's transforms
        self.embed = Embedding(args.vocab_size, args.hidden_size, args.dtype)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.dtype)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, dtype=args.dtype)
        #: The checkpoint's multi-token-prediction layers that ``args.mtp_layers`` asks for,
        #: keyed by their layer number in the checkpoint (``mtp.61`` is ``model.layers.61``).
        first = args.num_hidden_layers
        self.mtp = nn.ModuleDict({str(i): MTPLayer(i, args) for i in range(first, first + args.mtp_layers)})
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, rope / 2]
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """What ``.to()``, ``.cuda()``, ``.half()`` ... run: device moves pass; a dtype cast is
        refused. The dtype is a load-time choice that the KV cache (``args.dtype``), the float32
        router and RoPE tables, and FP8 payloads with their scales each follow in their own way;
        a cast converted some and not others (a DTypeError at the first generate, FP8 weights
        turned to floats that their scales no longer fit)."""
        held = {p.dtype for p in self.parameters()} & set(FP8_DTYPES.values())
        device = self.rope_cos.device
        for dtype in (self.args.dtype, *sorted(held, key=str)):
            cast = fn(torch.empty(0, dtype=dtype, device=device)).dtype
            if cast != dtype:
                name, to = (str(d).replace("torch.", "") for d in (dtype, cast))
                instead = ("load it with precision gemm 'high' to dequantize its FP8 weights" if dtype in held else
                           f"load it again with from_pretrained(..., dtype=torch.{to}) (or ModelArgs.dtype)")
                raise ArgumentError(
                    f"Transformer: casting its {name} tensors to {to} (.half(), .float(), .to(dtype)) is not "
                    f"supported, expected device moves only: the dtype is chosen at load; {instead}"
                )
        self._cache_layouts.clear()  # they name the device: a moved model's own caches live on the new one
        return super()._apply(fn, recurse)

    if TYPE_CHECKING:  # nn.Module's __call__ is typed to return Any; what forward returns, per return_hidden
        # Each variant takes forward's parameters as forward does (positional or keyword); a
        # return_hidden only known at run time (a bool variable) gets the union.

        @overload
        def __call__(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                     last_only: bool = False, return_hidden: Literal[False] = False) -> torch.Tensor: ...

        @overload  # return_hidden=True by keyword, the others defaulted or not
        def __call__(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                     last_only: bool = False, *, return_hidden: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

        @overload  # True as the fifth positional argument: every one before it given
        def __call__(self, input_ids: torch.Tensor, start_pos: int, cache: KVCache | None, last_only: bool,
                     return_hidden: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

        @overload
        def __call__(self, input_ids: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                     last_only: bool = False, return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    @own_dtypes
    @inference_only
    def forward(
        self,
        input_ids: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T or 1, vocab]`` (``last_only``: the last position's); with
        ``return_hidden``, ``(logits, hidden)`` where ``hidden`` is the final norm's output
        ``[B, T, D]`` at every position, also with ``last_only`` (what the MTP layer reads)."""
        check_input_ids("Transformer", input_ids, self.rope_cos.device)
        check_start_pos("Transformer", start_pos)
        seqlen = input_ids.shape[1]
        step = cache is not None and seqlen <= MAX_STEP_TOKENS
        # Every decode step repeats the op calls of this model's first one of its length on the
        # cache with new values (only the key count grows), so only that one pays for the input
        # checks. The id range check (a host sync on accelerators) goes with them: under
        # generate(), later steps' ids are the model's own samples.
        if cache is not None:
            self.check_cache(cache)
        trusted = step and cache.decode_checked_for(self, seqlen)
        if not (trusted and cache.vouched(input_ids)):  # ids that generate() did not make are checked
            check_token_ids("Transformer", input_ids, self.args.vocab_size)
        cos, sin = self._positions("Transformer", start_pos, seqlen)  # [T, rope / 2]
        writing = contextlib.nullcontext() if cache is None else cache.writing(start_pos, seqlen, input_ids.shape[0])
        # One position: nothing to select; the hidden states asked for: every position's.
        last = len(self.layers) - 1 if last_only and seqlen > 1 and not return_hidden else None
        with writing, ops.trusted() if trusted else contextlib.nullcontext():  # the embedding too: its TP all-reduce
            h, residual = self.embed(input_ids), None  # [B, T, D]
            selection: dict[str, torch.Tensor | None] = {}  # GLM-5: the keys a full layer kept, for shared ones
            for i, layer in enumerate(self.layers):
                # With last_only, the last layer needs queries, attention output and FFN for
                # the last position only; every layer still caches all T tokens' keys.
                layer_cache = None if cache is None else cache.layers[i]
                h, residual = layer(h, residual, cos, sin, layer_cache, i == last, selection)
            h, _ = self.norm(h, residual)
            logits = self.lm_head(h[:, -1:] if last_only else h)  # [B, T or 1, vocab]
        if step:
            cache.mark_decode_checked(self, seqlen)
        return (logits, h) if return_hidden else logits

    @own_dtypes
    @inference_only
    def draft(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, start_pos: int, cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The first MTP layer's logits ``[B, T, vocab]`` (``last_only``: ``[B, 1, vocab]``, the
        last position's) for the tokens two positions on:
        ``hidden [B, T, D]`` is this model's at positions ``start_pos ..`` (``forward(...,
        return_hidden=True)``), ``next_ids [B, T]`` the token that follows each of them.
        ``cache``: the MTP layer's own (:meth:`new_cache` with ``mtp=True``)."""
        if not len(self.mtp):
            raise ArgumentError(
                "Transformer.draft: this model has no multi-token-prediction layer, expected one "
                "(build it with mtp_layers=1 from a checkpoint whose num_nextn_predict_layers >= 1)"
            )
        check_input_ids("Transformer.draft", next_ids, self.rope_cos.device)
        check_start_pos("Transformer.draft", start_pos)
        bsz, seqlen = next_ids.shape
        if hidden.shape != (bsz, seqlen, self.args.hidden_size):
            raise ShapeError(
                f"Transformer.draft: argument 'hidden' has shape {list(hidden.shape)}, "
                f"expected {[bsz, seqlen, self.args.hidden_size]} (next_ids' [B, T] and the model width)"
            )
        cos, sin = self._positions("Transformer.draft", start_pos, seqlen)
        step = cache is not None and seqlen <= MAX_STEP_TOKENS  # checked once per length, as in forward()
        if cache is not None:
            self.check_cache(cache, mtp=True)
        trusted = step and cache.decode_checked_for(self, seqlen)
        if not (trusted and cache.vouched(next_ids)):
            check_token_ids("Transformer.draft", next_ids, self.args.vocab_size)
        writing = contextlib.nullcontext() if cache is None else cache.writing(start_pos, seqlen, bsz)
        layer = next(iter(self.mtp.values()))
        with writing, ops.trusted() if trusted else contextlib.nullcontext():
            embedded = self.embed(next_ids)  # [B, T, D]
            if start_pos == 0:  # position 0 takes no token embedding, as vLLM runs DeepSeek's MTP weights
                embedded[:, 0] = 0
            logits = layer.predict(hidden, embedded, cos, sin, None if cache is None else cache.layers[0], last_only)
        if step:
            cache.mark_decode_checked(self, seqlen)
        return logits

    def _positions(self, where: str, start_pos: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables' rows for positions ``[start_pos, start_pos + seqlen)``."""
        end = start_pos + seqlen
        if end > self.rope_cos.shape[0]:
            raise ShapeError(f"{where}: positions up to {end} exceed max_position_embeddings ({self.rope_cos.shape[0]})")
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    # ------------------------------------------------------------ inference helpers
    def check_cache(self, cache: Any, mtp: bool = False) -> None:
        """``cache`` must be a KVCache laid out for this model (another model's raises), or
        with ``mtp`` for its MTP layer."""
        if not isinstance(cache, KVCache):
            raise DTypeError(f"Transformer: argument 'cache' is {type(cache).__name__}, expected a KVCache (model.new_cache)")
        key = (cache.mode, mtp)
        want = self._cache_layouts.get(key)
        if want is None:
            # KVCache.layout of this model's new_cache, worked out without allocating one
            # (and without new_cache's memory check, a host call torch.compile cannot trace)
            entries = tuple(tuple(shape) for shape in self._cache_entries(cache.mode))
            want = (self._cached_layers(mtp), cache.mode, entries, self.args.dtype, self.rope_cos.device)
            self._cache_layouts[key] = want
        made = "new_cache(..., mtp=True)" if mtp else "new_cache()"
        if cache.layout != want:
            raise ShapeError(
                f"Transformer: argument 'cache' has layout {cache.layout} (layers, mode, entry shapes, dtype, device), "
                f"expected {want}: it was made for another model or layer; use this model's {made}"
            )
        if cache.owner is not None and cache.owner() is not self:  # same layout, other weights: other keys
            raise ShapeError(f"Transformer: argument 'cache' was made by another model's new_cache (its keys and "
                             f"values come from other weights); use this model's {made}")

    def new_cache(
        self, batch: int, max_len: int, mode: str | None = None, mtp: bool = False, static: bool = False
    ) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens
        (``mode``: "absorb" or "naive"; default ``args.mla_mode``); with ``mtp``, for the MTP
        layer (:meth:`draft`) instead of the main layers. ``static``: for static (graph) decode
        steps (:mod:`dshal.model.decode`), in the "absorb" layout with
        ``KVCache.STATIC_BIAS_COLUMNS`` spare columns for their key mask, so a step does not
        copy the cache. A cache larger than the memory the backend reports free on the
        model's device is refused before any of it is allocated (an ArgumentError with both
        figures)."""
        mode = mode or self.args.mla_mode
        if static and mode != "absorb":
            raise ArgumentError(f"new_cache: argument 'static' is given with mode {mode!r}, expected 'absorb'")
        nbytes, device = self.cache_bytes(batch, max_len, mode, mtp, static), self.rope_cos.device
        what = f"new_cache: batch {batch} x max_len {max_len}"
        check_cache_fits(nbytes, free_memory(device), device, what, "'batch' or 'max_len'", limit_note=lambda: free_memory_note(device))
        a = self.args
        cache = KVCache(
            self._cached_layers(mtp),
            batch,
            max_len,
            self._cache_entries(mode),
            mode,
            a.dtype,
            device,
            a.attention_window,
            a.attention_global_tokens,
            self._spare_columns(static),
        )
        cache.owner = weakref.ref(self)
        return cache

    def _spare_columns(self, static: bool) -> int:
        """A cache's spare key-bias columns: static steps need no window (one slot per position)."""
        return KVCache.STATIC_BIAS_COLUMNS if static and self.args.attention_window is None else 0

    def _cached_layers(self, mtp: bool) -> int:
        return min(len(self.mtp), 1) if mtp else len(self.layers)

    def cache_bytes(
        self, batch: int, max_len: int, mode: str | None = None, mtp: bool = False, static: bool = False
    ) -> int:
        """Bytes :meth:`new_cache` allocates for these arguments (computed, nothing allocated)."""
        mode = mode or self.args.mla_mode
        for arg, value, high in (("batch", batch, None), ("max_len", max_len, self.rope_cos.shape[0])):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > (high or INT64_MAX):
                bound = f"in [1, {high}] (max_position_embeddings)" if high is not None else "in [1, 2**63 - 1]"
                raise ArgumentError(f"new_cache: argument {arg!r} is {value!r}, expected an int {bound}")
        a = self.args
        per_token = sum(math.prod(shape) for shape in self._cache_entries(mode)) + self._spare_columns(static)
        per_token *= a.dtype.itemsize
        slots = KVCache.slots(max_len, a.attention_window, a.attention_global_tokens)
        return self._cached_layers(mtp) * batch * slots * per_token

    def _cache_entries(self, mode: str) -> list[tuple[int, ...]]:
        """Per-token shapes of one layer's cache buffers in ``mode`` (DeepSeek-V3.2: the
        indexer's key ``[index_head_dim]`` after the attention's)."""
        a = self.args
        index_keys = [(a.index_head_dim,)] if a.sparse_attention else []
        if mode == "absorb":
            return [(a.kv_lora_rank + a.qk_rope_head_dim,), *index_keys]
        if mode == "naive":
            heads = self.layers[0].self_attn.kv_b_proj.weight.shape[0] // (a.qk_nope_head_dim + a.v_head_dim)
            return [(heads, a.qk_head_dim), (heads, a.v_head_dim), *index_keys]
        raise ArgumentError(f"new_cache: argument 'mode' is {mode!r}, expected 'absorb' or 'naive'")

    #: ``model.generate(input_ids, max_new_tokens, ...)`` -> ``[B, T + new]``: sampling,
    #: ragged prompts (``prompt_lens``), streaming and caches are keywords of
    #: :func:`dshal.model.generate.generate`, which documents them all.
    generate = generate

    def describe(self) -> dict[str, Any]:
        """Per-layer precision, KV cache bytes per token (and what dynamic attention saves)."""
        return describe_model(self)


# ---------------------------------------------------------------- describe(): precision per layer, KV bytes
def _group_of(path: str, dense_layer: bool) -> str:
    if path.startswith("mtp."):
        return "mtp"
    if path.startswith("embed"):
        return "embed"
    if path.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in path:
        return "attention"
    if ".mlp.gate" == path[path.find(".mlp.") :]:
        return "router gate"
    if ".mlp.shared_experts" in path:
        return "shared experts"
    if ".mlp.experts" in path:
        return "routed experts"
    return "dense mlp" if dense_layer else "mlp"


def kv_cache_report(model: nn.Module) -> dict[str, Any]:
    """KV bytes per token (absorbed latent vs naive per-head keys/values; both with
    DeepSeek-V3.2's indexer keys, ``bytes_per_token_indexer`` of them) and the saving of
    dynamic attention (only ``global_tokens + window`` tokens stay cached)."""
    a = model.args
    elem = torch.empty((), dtype=a.dtype).element_size()
    heads = model.layers[0].self_attn.kv_b_proj.weight.shape[0] // (a.qk_nope_head_dim + a.v_head_dim)
    layers = len(model.layers)
    indexer = layers * a.index_head_dim * elem if a.sparse_attention else 0
    absorbed = layers * (a.kv_lora_rank + a.qk_rope_head_dim) * elem + indexer
    naive = layers * heads * (a.qk_head_dim + a.v_head_dim) * elem + indexer
    per_token = absorbed if a.mla_mode == "absorb" else naive
    report: dict[str, Any] = {
        "mode": a.mla_mode,
        "bytes_per_token": per_token,
        "bytes_per_token_absorbed": absorbed,
        "bytes_per_token_naive": naive,
        "bytes_per_token_indexer": indexer,
        "absorbed_saving": 1 - absorbed / naive,
        "window": a.attention_window,
        "global_tokens": a.attention_global_tokens if a.attention_window else 0,
    }
    if a.attention_window is not None:
        kept = a.attention_global_tokens + a.attention_window
        context = a.max_position_embeddings
        effective = per_token * min(1.0, kept / context)
        report.update(
            max_cached_tokens=kept,
            context=context,
            bytes_per_token_at_context=effective,
            bytes_saved_per_token=per_token - effective,
        )
    return report


def describe_model(model: nn.Module) -> dict[str, Any]:
    """What ``Transformer.describe()`` returns (JSON-friendly)."""
    a = model.args
    layers = []
    groups: dict[str, set[str]] = {"embed": {str(a.dtype).replace("torch.", "")}}
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            label = precision_label(module.weight, module.weight_scale)
            spans = getattr(module, "act_quant", None)  # a TP shard whose quantization groups span ranks
            if spans is not None:
                kept = module.weight_scale is not None
                where = "input quantized across ranks" if kept else "dequantized TP shard"
                label = f"{spans.mode} {spans.fmt} ({where})"
        elif isinstance(module, RoutedExperts):
            label = precision_label(module.w13, module.w13_scale)
        elif isinstance(module, Gate):
            label = "float32"
        else:
            continue
        layer_id = int(path.split(".")[1]) if path.startswith("layers.") else None
        dense = layer_id is not None and not a.is_moe_layer(layer_id)
        groups.setdefault(_group_of(path, dense), set()).add(label)
        if layer_id is not None:
            while len(layers) <= layer_id:
                n = len(layers)
                layers.append({"layer": n, "ffn": "moe" if a.is_moe_layer(n) else "dense", "precision": {}})
            layers[layer_id]["precision"][path.split(".", 2)[2]] = label
    n_params = sum(p.numel() for p in model.parameters())
    unset = {"gemm": None, "mode": None, "why": "no precision policy applied"}
    choice = getattr(model, "precision_choice", None) or unset
    kv_b = model.layers[0].self_attn.kv_b_proj if len(model.layers) else None
    return {
        "dtype": str(a.dtype).replace("torch.", ""),
        "precision": {
            **choice,
            # MLA multiplies kv_b_proj's dequantized weight with the latent (never quantized).
            "weight_only": ["kv_b_proj"] if kv_b is not None and kv_b.weight_scale is not None else [],
        },
        "parameters": n_params,
        "layers_total": a.num_hidden_layers,
        "dense_layers": min(a.first_k_dense_replace, a.num_hidden_layers),
        "precision_groups": {g: " + ".join(sorted(v)) for g, v in groups.items()},
        "layers": layers,
        "kv_cache": kv_cache_report(model),
    }


__all__ = [
    "describe_model",
    "kv_cache_report",
    "Linear",
    "Embedding",
    "RMSNorm",
    "LayerNorm",
    "HeadWeights",
    "Indexer",
    "rope_tables",
    "MLA",
    "MLP",
    "Gate",
    "RoutedExperts",
    "MoE",
    "Block",
    "SharedHead",
    "MTPLayer",
    "Transformer",
]
