"""The ``cpu`` backend's native providers: the same ops as the references, in fewer and
faster calls.

The references (:mod:`dshal.ops`) stay the oracle: they spell the math out step by step
in float32/float64, which costs a pass over memory per step and a Python call per torch
op. These providers compute the same functions with torch's fused CPU kernels
(``scaled_dot_product_attention``, ``linalg.vector_norm``, ``_grouped_mm``), skip the
float32 round trip where the input already is float32, and hand float32 work that torch
spreads over many small calls (or reads memory badly for) to dshal's C kernels
(:mod:`dshal.kernels.cpu`): decode-step GEMVs (float32, and FP8 block-scaled weights),
a decode step's expert loop, the router, the expert grouping, RMSNorm and rotary. Without a
C compiler those cases take the torch path.
The conformance suite judges these providers against the references like any plugin's ops
(``dshal conformance --backend cpu``).

Every function takes the op's arguments after the op spec has checked them (the runtime
wraps each provider with its spec's checks).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref

import torch
import torch.nn.functional as F

from dshal.backend import OpPath, host_physical_memory
from dshal.backends.cpu_opaque import opaque_when_compiled
from dshal.config import dequant_cache_gib
from dshal.errors import ShapeError
from dshal.kernels import cpu as cpu_kernels
from dshal.ops.attention import guarded_attention, sdpa, visible_keys
from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import GRANULARITY_BLOCKS, linear_quantized, weight_quant_mode
from dshal.ops.moe import NO_EXPERT, check_expert_ids, moe_experts_on_kept_slots
from dshal.ops.quant import dequantize_to
from dshal.ops.sparse_attention import CHUNK_ELEMENTS, NO_KEY, check_key_indices, gather_rows
from dshal.ops.spec import FP8_FORMAT_OF, write_count

#: Dtypes torch's CPU kernels already compute in at full precision (no upcast needed).
_WIDE = (torch.float32, torch.float64)
#: torch's fused CPU attention that also returns each row's log-sum-exp (an aten op of torch
#: >= 2.3, not a public API), looked up once; None where this torch has none.
FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; a tensor already in it is returned without a call into torch
    (``Tensor.to`` costs about a microsecond even when it has nothing to do)."""
    return t if t.dtype == dtype else t.to(dtype)


#: Longest weight row (K) the C GEMV takes: MKL's GEMV streams long rows as well or better
#: (K = 5120 and 7168 ran 15-20 % faster on MKL, K <= 4096 faster in C; benchmarks/RESULTS.md).
GEMV_MAX_K = 4096
#: Most rows the C GEMV takes (a decode step's batch): it reads the weight once but does
#: the dot products per row; MKL's GEMM was faster from 16 rows (benchmarks/RESULTS.md).
GEMV_MAX_ROWS = 8


def _few_f32_rows(x: torch.Tensor) -> bool:
    """``x [..., K]`` is float32 with at most ``GEMV_MAX_ROWS`` rows of ``0 < K <= GEMV_MAX_K``."""
    k = x.shape[-1]
    return x.dtype == torch.float32 and 0 < k <= GEMV_MAX_K and x.numel() <= GEMV_MAX_ROWS * k


#: Most rows the C FP8 kernel takes: it reads the weight once but does the work per row;
#: the reference's dequantize-then-GEMM caught up at ~64 rows (benchmarks/RESULTS.md).
FP8_GEMM_MAX_ROWS = 32


def _fp8_block_rows(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> bool:
    """A few 16/32-bit rows times an E4M3 weight with float32 128x128 block scales (the
    shape test is the op's own: block scales win when the shapes coincide)."""
    return (
        weight.dtype in cpu_kernels.FP8_E4M3
        and weight_scale is not None
        and weight_scale.dtype == torch.float32
        and x.dtype != torch.float64
        and 0 < x.shape[-1]
        and x.numel() <= FP8_GEMM_MAX_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and tuple(weight_scale.shape) == (math.ceil(weight.shape[0] / 128), math.ceil(weight.shape[1] / 128))
    )


#: The dequantized-copy budget (GiB) where the machine's memory is unknown (no os.sysconf).
UNKNOWN_MEMORY_DEQUANT_GIB = 2.0


class DequantizedWeights:
    """float32 copies of FP8 weights, made on a weight's first prefill-sized product and kept
    while the weight lives (unchanged: same tensor, same version counter, same scale), up to
    a byte budget.

    Beyond ``FP8_GEMM_MAX_ROWS`` rows the op's math is "quantize the activations, dequantize
    the weight, one float32 GEMM"; dequantizing every FP8 weight on every call made an FP8
    model's prefill ~3x slower than the same model in float32. A copy costs 4 bytes per
    weight element next to the FP8 byte, so unbounded an FP8 model would come to hold 5x its
    FP8 weight bytes. The copies therefore share a budget (:meth:`limit`:
    ``DSHAL_CPU_DEQUANT_CACHE_GIB``, default a quarter of physical memory). Once it is full,
    a weight without a copy is dequantized per call and nothing is evicted: a forward pass
    visits the weights in the same order every time, so keeping the first ones makes the
    budget's share of them hit on every pass, where evicting the least recently used would
    make every one miss. A slower prefill, never an out-of-memory. Decode steps never make a
    copy (they run on the C kernels, which read the FP8 bytes)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor, int, torch.Tensor]] = {}
        self._bytes = 0  # kept as copies come and go: summing while another thread inserts raised
        # Reentrant: a weight's death callback may run inside a locked block on this thread.
        self._lock = threading.RLock()
        self.max_bytes = max_bytes  # None: read limit() from the environment on each miss

    def limit(self) -> int:
        """The byte budget: ``max_bytes`` when set, else ``DSHAL_CPU_DEQUANT_CACHE_GIB`` (a
        ConfigError names it when malformed), else a quarter of physical memory."""
        if self.max_bytes is not None:
            return self.max_bytes
        physical = host_physical_memory()
        quarter_gib = physical / 4 / 2**30 if physical is not None else UNKNOWN_MEMORY_DEQUANT_GIB
        return int(dequant_cache_gib(quarter_gib) * 2**30)

    def get(self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
        """``weight``'s float32 copy (safe from several threads: a service's requests). A
        tensor made under ``torch.inference_mode()`` has no write counter, so a refill in place
        could not be seen: its copy is made per call, never kept."""
        if write_count(weight) is None or write_count(scale) is None:
            return dequantize_to(weight, scale.reshape(()) if block is None else scale, block, torch.float32).contiguous()
        key = id(weight)
        with self._lock:
            held = self._copies.get(key)
            if held is not None:
                ref, version, held_scale, scale_version, dense = held
                if ref() is weight and version == write_count(weight) and held_scale is scale and scale_version == write_count(scale):
                    return dense
                self._drop(key)  # changed in place: its stale copy goes
        dense = dequantize_to(weight, scale.reshape(()) if block is None else scale, block, torch.float32)
        dense = dense.contiguous()  # K not a multiple of 128: a view into the block-padded product
        with self._lock:
            self._drop(key)  # another thread may have made one meanwhile
            if self._bytes + dense.numel() * 4 > self.limit():
                return dense  # the budget is full: this weight is dequantized per call
            ref = weakref.ref(weight, functools.partial(_forget_copy, weakref.ref(self), key))
            self._copies[key] = (ref, write_count(weight), scale, write_count(scale), dense)
            self._bytes += dense.numel() * 4
        return dense

    def _drop(self, key: int, only: weakref.ref | None = None) -> None:
        with self._lock:
            entry = self._copies.get(key)
            if entry is not None and (only is None or entry[0] is only):
                del self._copies[key]
                self._bytes -= entry[4].numel() * 4

    def clear(self) -> None:
        """Drop every copy (they are remade on next use)."""
        with self._lock:
            self._copies.clear()
            self._bytes = 0

    def nbytes(self) -> int:
        """Bytes held by the copies (for memory reports)."""
        return self._bytes


def _forget_copy(cache: weakref.ref, key: int, dead: weakref.ref) -> None:
    """A weight died: drop its copy (only its own: a new tensor may reuse the id)."""
    owner = cache()
    if owner is not None:
        owner._drop(key, only=dead)


#: The cpu backend's dequantized FP8 weights (see :class:`DequantizedWeights`).
DEQUANTIZED = DequantizedWeights()


def _fp8_weight_block(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[int, int] | None:
    return GRANULARITY_BLOCKS[weight_quant_mode("linear", weight, weight_scale)][1]


#: FP8 dtype -> its 256 values as float32, by bit pattern. Looking codes up is ~10x faster
#: than torch's FP8 -> float32 cast on the CPU (90 vs 960 µs for 128k values here) and exact.
_FP8_VALUES = {dt: torch.arange(256, dtype=torch.uint8, device="cpu").view(dt).to(torch.float32) for dt in FP8_FORMAT_OF}


def _fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    codes = q.view(torch.uint8).reshape(-1).to(torch.int32)
    return _FP8_VALUES[q.dtype].index_select(0, codes).view(q.shape)


def _quantized_activations(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """``x [..., K]`` quantized per (1, 128) to ``fp8`` and dequantized again, float32: the
    values the op multiplies, bit for bit the reference's. With the C kernels: one pass per
    128-value block (:func:`dshal.kernels.cpu.fp8_fake_quant_rows`, 4-20x the torch steps
    below). Without them: the reference's steps in fewer passes, or the reference itself
    where a row has non-finite values or K is not a multiple of 128."""
    if x.dtype != torch.float64 and fp8 in cpu_kernels.FP8_E4M3 and cpu_kernels.library() is not None:
        return cpu_kernels.fp8_fake_quant_rows(x, fp8)  # the E4M3 formats (e5m2: the torch steps)
    return _quantized_activations_torch(x, fp8)


def _quantized_activations_torch(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """:func:`_quantized_activations` on torch alone."""
    k = x.shape[-1]
    rows = _as(x, torch.float32).reshape(-1, k)
    if k % 128 == 0 and rows.numel():
        blocks = rows.view(rows.shape[0], k // 128, 128)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        if math.isfinite(amax.max().item()):  # NaN and Inf reach the max
            qmax = float(torch.finfo(fp8).max)
            # An all-zero block gets scale 1 in the op, `tiny` here: its values are 0 either way.
            scale = (amax / qmax).clamp_(min=torch.finfo(torch.float32).tiny)
            q = (blocks / scale).clamp_(-qmax, qmax).to(fp8)
            return _fp8_to_float32(q).mul_(scale).reshape(x.shape)
    q, s = SPECS["quantize_fp8"].reference_impl(rows, (1, 128), FP8_FORMAT_OF[fp8])
    return dequantize_to(q, s, (1, 128), torch.float32).reshape(x.shape)


def linear(x, weight, bias=None, weight_scale=None):
    """Decode-step products on dshal's C kernels (:mod:`dshal.kernels.cpu`):

    - up to ``GEMV_MAX_ROWS`` float32 rows times a float32 weight: a GEMV that reads the
      weight as one stream (~2x MKL's GEMV on short-row weights that come from memory);
    - up to ``FP8_GEMM_MAX_ROWS`` rows times an E4M3 weight with 128x128 block scales: the
      rows quantized per 128 values as the op defines, the weight decoded on the fly
      (10-16x the reference's dequantize-then-GEMM for one row).

    More rows times an FP8 weight (a prefill): the op's activation quantization and one
    float32 GEMM with the weight's cached float32 copy (:class:`DequantizedWeights`).
    Everything else, and every product when the C kernels are unavailable, is the
    reference (``F.linear``, or the FP8/int8 path). Figures: benchmarks/RESULTS.md."""
    if (
        weight_scale is None
        and _few_f32_rows(x)
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and (bias is None or bias.dtype == torch.float32)
        and cpu_kernels.library() is not None
    ):
        return cpu_kernels.gemv(x, weight, bias)
    if _fp8_block_rows(x, weight, weight_scale) and cpu_kernels.library() is not None:
        return _as(cpu_kernels.fp8_block_gemm(x, weight, weight_scale, bias), x.dtype)
    if weight.dtype in FP8_FORMAT_OF and x.dtype != torch.float64:  # prefill: the cached float32 weight
        block = _fp8_weight_block(weight, weight_scale)
        dense = DEQUANTIZED.get(weight, weight_scale, block)
        if block != (128, 128):
            return linear_quantized(x, weight, bias, weight_scale, dense)
        y = _quantized_activations(x, weight.dtype) @ dense.T  # float32, as the op accumulates
        if bias is not None:
            y = y + _as(bias, torch.float32)
        return _as(y, x.dtype)
    return SPECS["linear"].reference_impl(x, weight, bias, weight_scale)


def attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    """No mask (a decode step, or non-causal): :func:`_attention_folded`; otherwise torch's
    fused ``scaled_dot_product_attention`` with the op's end-aligned mask."""
    batch, hq, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    if tq == 0 or tk == 0:  # nothing to attend to: the op's "no visible key" rows are zeros
        return q.new_zeros(batch, hq, tq, dv)
    return guarded_attention(_attention_kernels, q, k, v, causal, scale, window, global_tokens)  # the NaN rule


def _attention_kernels(q, k, v, causal, scale, window, global_tokens):  # noqa: ANN001, ANN202
    """:func:`attention` past its non-finite guard (``q``, ``k``, ``v`` as the guard hands them)."""
    batch, hq, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if window is None and (not causal or tq == 1):
        return _attention_folded(q, k, v, scale)
    if dv < d:
        # The fused (flash) CPU kernel needs equal q/k/v head dims, else torch falls back to
        # unfused math ~2x slower; zero columns of v only add zero columns to the output.
        v = F.pad(v, (0, d - dv))
    if causal and window is None and tq == tk:
        out = sdpa(q, k, v, is_causal=True, scale=scale)
    elif causal and window is None and tq < tk and dv <= d and FLASH_WITH_LSE is not None:  # flash: one head dim
        out = _attention_after_cached(q, k, v, scale)
    else:
        seen = visible_keys(tq, tk, causal, window, global_tokens, q.device)  # [Tq, Tk]
        out = sdpa(q, k, v, attn_mask=seen, scale=scale)
        blind = ~seen.any(dim=-1)  # queries that see no key output zeros, whatever the kernel does
        if bool(blind.any()):
            out.masked_fill_(blind[:, None], 0.0)
    return out[..., :dv] if dv < d else out


def _attention_after_cached(q, k, v, scale: float) -> torch.Tensor:
    """Causal attention of the last ``Tq`` of ``Tk`` positions (a prefill chunk after cached
    tokens): each query sees the ``Tk - Tq`` cached keys, all of them, and its chunk's keys up
    to itself. Two fused calls, the cached part unmasked and the chunk's square causal,
    merged by their log-sum-exps: one call with the end-aligned mask makes the kernel compute
    every block (benchmarks/prefill_chunks.py measured both)."""
    batch, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if hk != hq:  # the kernel pairs query head h with key head h
        k, v = (t[:, :, None].expand(batch, hk, hq // hk, tk, t.shape[3]).reshape(batch, hq, tk, t.shape[3]) for t in (k, v))
    cached = tk - tq
    out_cached, lse_cached = FLASH_WITH_LSE(q, k[:, :, :cached], v[:, :, :cached], 0.0, False, scale=scale)
    out_chunk, lse_chunk = FLASH_WITH_LSE(q, k[:, :, cached:], v[:, :, cached:], 0.0, True, scale=scale)
    top = torch.maximum(lse_cached, lse_chunk)
    w_cached, w_chunk = (lse_cached - top).exp_()[..., None], (lse_chunk - top).exp_()[..., None]
    acc = q.dtype if q.dtype in _WIDE else torch.float32
    out = (_as(out_cached, acc) * w_cached + _as(out_chunk, acc) * w_chunk) / (w_cached + w_chunk)
    return _as(out, q.dtype)


def _attention_folded(q, k, v, scale: float) -> torch.Tensor:
    """Unmasked attention with the query heads that share a kv head folded into rows: one
    GEMM pair per kv head (float32 for 16-bit inputs). At Tq = 1 (MLA's absorbed decode:
    all heads on one latent head) torch's SDPA measured 2.7x slower with v padded to q's
    width and 70x slower without (benchmarks/RESULTS.md)."""
    batch, hq, tq, d = q.shape
    hk = k.shape[1]
    acc = q.dtype if q.dtype in _WIDE else torch.float32
    rows = _as(q.reshape(batch, hk, hq // hk * tq, d), acc)  # [B, Hk, G*Tq, D]
    probs = torch.softmax((rows @ _as(k, acc).transpose(-1, -2)).mul_(scale), dim=-1)  # [B, Hk, G*Tq, Tk]
    return _as((probs @ _as(v, acc)).reshape(batch, hq, tq, v.shape[3]), q.dtype)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """The mean square from one ``linalg.vector_norm`` reduction, then two multiplies
    (float32 for 16-bit inputs, rounded once at the end as the reference does).
    ``torch.rms_norm`` on CPU is a composite of ~16 aten calls, which cost more than the
    math for the few rows of a decode step. float32 inputs take dshal's C kernel (one
    call, add and norm fused) when it is built."""
    if (
        x.dtype == weight.dtype == torch.float32
        and (residual is None or residual.dtype == torch.float32)
        and cpu_kernels.library() is not None
    ):
        return cpu_kernels.rms_norm(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rms_norm_torch(x, weight, eps=1e-6, residual=None):
    """:func:`rms_norm` on torch alone (any float dtype)."""
    if residual is not None:
        x = x + residual if x.dtype in _WIDE else (x.float() + residual.float()).to(x.dtype)
    h = x if x.dtype in _WIDE else x.float()
    inv_rms = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(h.shape[-1]).add_(eps).rsqrt_()
    y = _as((h * inv_rms).mul_(_as(weight, h.dtype)), x.dtype)
    return (y, x) if residual is not None else y


def silu_and_mul(x):
    """``silu(gate) * up`` in place of the reference's upcast copies when ``x`` is float32/64."""
    if x.dtype not in _WIDE:
        gate, up = x.float().chunk(2, dim=-1)
        return F.silu(gate).mul_(up).to(x.dtype)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rotary_embedding(x, cos, sin, interleaved=True):
    """Rotation of pairs. Interleaved pairs are complex numbers in memory already, so the
    rotation is one complex multiply (3-4x faster than the real-valued steps at
    DeepSeek-V3's shapes); the half-split layout is rotated into one output tensor."""
    if x.dtype == cos.dtype == sin.dtype == torch.float32 and cpu_kernels.library() is not None:
        rotated = cpu_kernels.rotary(x, cos, sin, interleaved)  # one C call
        if rotated is not None:
            return rotated
    return rotary_embedding_torch(x, cos, sin, interleaved)


def rotary_embedding_torch(x, cos, sin, interleaved=True):
    """:func:`rotary_embedding` on torch alone (any float dtype, any broadcast)."""
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    xf, c, s = _as(x, acc), _as(cos, acc), _as(sin, acc)
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))
        try:
            z = torch.view_as_complex(pairs)
        except RuntimeError:  # strides or offset not pair-aligned
            z = torch.view_as_complex(pairs.contiguous())
        out = torch.view_as_real(z * torch.complex(c, s)).flatten(-2)
    elif torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        a, b = xf.chunk(2, dim=-1)  # out= writes into views are not differentiable: new tensors
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    else:
        out = torch.empty(xf.shape, dtype=acc, device=x.device)
        a, b = xf.chunk(2, dim=-1)
        ra, rb = out.chunk(2, dim=-1)
        torch.mul(a, c, out=ra).sub_(b * s)
        torch.mul(b, c, out=rb).add_(a * s)
    return _as(out, x.dtype)


def sparse_mla_attention(q, kv, indices, scale, v_dim):
    """Each query's named rows gathered, then :func:`attention` (no mask: a decode step's fused
    path) with the queries folded into the batch: ~1.8x faster than the reference's batched
    products at DeepSeek-V3.2's decode shape (``benchmarks/sparse_attention.py``). Calls that name
    no row somewhere (a -1: the kernel has no per-key mask), are empty or on meta (``dshal plan``):
    the reference. Its NaN
    rule is the op's: the values are the keys' first columns, so a non-finite value is a
    non-finite key, which poisons the query's row."""
    check_key_indices(indices, kv.shape[1])
    batch, heads, tq, dim = q.shape
    keys = indices.shape[-1]
    if keys == 0 or q.numel() == 0 or indices.is_meta or bool((indices == NO_KEY).any()):
        return SPECS["sparse_mla_attention"].reference_impl(q, kv, indices, scale, v_dim)
    out = q.new_empty(batch, tq, heads, v_dim)
    step = max(1, CHUNK_ELEMENTS // (batch * keys * dim))  # gathered rows [B, c, K, D] per chunk
    for t in range(0, tq, step):
        part = slice(t, t + step)
        rows = gather_rows(kv, indices[:, part])  # [B, c, K, D]
        chunk = rows.shape[1]
        rows = rows.reshape(batch * chunk, 1, keys, dim)
        queries = q[:, :, part].transpose(1, 2).reshape(batch * chunk, heads, 1, dim)
        got = attention(queries, rows, rows[..., :v_dim], False, scale, None, 0)  # [B * c, H, 1, v]
        out[:, part] = got.view(batch, chunk, heads, v_dim)
    return out.transpose(1, 2)


def moe_gate(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    """The router in one C call (sigmoid, group scores, both selections and the weights per
    token) in place of the reference's ~15 torch ops: ~50 µs -> a few µs per decode step
    here. float64 logits, non-finite values (NaN ordering is the reference's), or no C
    kernels: the reference."""
    if logits.dtype != torch.float64 and cpu_kernels.library() is not None:
        routed = cpu_kernels.moe_gate(
            _as(logits, torch.float32), None if bias is None else _as(bias, torch.float32),
            top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob,
        )  # fmt: skip
        if routed is not None:
            return routed
    reference = SPECS["moe_gate"].reference_impl
    return reference(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


#: torch's grouped GEMM (one call for every expert's rows; private, present since torch 2.8).
_GROUPED_MM = getattr(torch, "_grouped_mm", None)
#: Dtypes its CPU kernel takes.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_takes(dtype: torch.dtype, hidden: int, inter: int, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs the experts' two products in ``dtype``: it refuses
    (RuntimeError "strides should be multiple of 16 bytes") rows of H or I values that are not
    a multiple of 16 bytes, and empty ones; and of ``weights`` (the expert tensors it reads
    as given) it takes the contiguous layout the model holds, not every view the op allows
    (a strided or expanded one: "Invalid strides/sizes"). Elsewhere the expert loop serves."""
    size = torch.empty((), dtype=dtype).element_size()
    return (_GROUPED_MM is not None and dtype in _GROUPED_MM_DTYPES and hidden > 0 and inter > 0
            and hidden * size % 16 == 0 and inter * size % 16 == 0 and all(w.is_contiguous() for w in weights))


@contextlib.contextmanager
def _op_id_errors(ids: torch.Tensor, experts: int):
    """A C kernel's out-of-range id error, re-raised in the op's own words (the kernel
    finds the bad id while it reads the ids anyway; the op names the expert count)."""
    try:
        yield
    except ShapeError:
        check_expert_ids(ids, experts)  # raises the op's message when an id is the cause
        raise


#: Up to this many tokens (a decode step's batch, as :data:`GEMV_MAX_ROWS`), float32 experts run
#: as one C call for all of them (:func:`dshal.kernels.cpu.moe_tokens`): each expert's weights read
#: once for its tokens, and each token's result computed from its own row alone, so the rows of a
#: decode step do not change each other's numbers. Past it, torch's grouped GEMM (faster there).
#: On the tiny and model_vs_hf models' experts the C call ran at 1.1-3.5x the grouped GEMM's
#: speed from 1 to 8 tokens; on wider ones (64 experts, H=1024, I=512) the grouped GEMM was 1.1x
#: faster from 2 tokens and 1.5x at one, which took the C call before too
#: (benchmarks/moe_decode_tokens.py; RESULTS.md, 2026-12-07, twenty-fifth session).
FEW_TOKENS = 8
#: The same for FP8 block-scaled experts (:func:`dshal.kernels.cpu.moe_tokens_fp8`): a token, or
#: a token and its speculative draft. From 3 tokens the grouped GEMM on the weights' cached float32
#: copies was as fast, and faster from 4 (up to 1.45x at 8 tokens, 1.4x on the wider experts), so
#: FP8 decode steps of more rows take it.
FEW_FP8_TOKENS = 2


def _decode_step_kernel(x, ids, w13, w2, w13_scale, w2_scale):  # noqa: ANN001, ANN202
    """The C kernel that runs these experts as one call for all tokens (a decode step), or None:
    up to :data:`FEW_FP8_TOKENS` tokens of float32/bf16 activations with E4M3 block-scaled
    experts, or up to :data:`FEW_TOKENS` float32 tokens with float32 experts. Both take
    ``NO_EXPERT`` slots themselves."""
    if not 0 < ids.shape[0] or cpu_kernels.library() is None or not (w13.is_contiguous() and w2.is_contiguous()):
        return None
    if (
        ids.shape[0] <= FEW_FP8_TOKENS
        and x.dtype in (torch.float32, torch.bfloat16)
        and w13.dtype in cpu_kernels.FP8_E4M3
        and w2.dtype == w13.dtype
        and w13_scale is not None
        and w2_scale is not None
        and w13_scale.dtype == w2_scale.dtype == torch.float32
    ):  # a decode step of FP8 experts (DeepSeek-V3's format)
        return cpu_kernels.moe_tokens_fp8
    if (
        ids.shape[0] <= FEW_TOKENS
        and w13_scale is None
        and w2_scale is None
        and x.dtype == w13.dtype == w2.dtype == torch.float32
    ):
        return cpu_kernels.moe_tokens
    return None


def moe_experts(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    """Routed SwiGLU experts with the per-expert Python work taken out of the token loop.

    With the C kernels built: the tokens of a decode step (up to :data:`FEW_TOKENS` float32
    tokens, :data:`FEW_FP8_TOKENS` with FP8 block-scaled experts and float32/bf16 activations)
    are one C call for all their experts, each token's result independent of the others', slots
    marked ``NO_EXPERT`` (an expert-parallel rank's share) skipped inside the call; more
    float32 tokens are grouped by expert in C (counting sort + row gather), run as one
    ``torch._grouped_mm`` per projection, and summed back per token in C. Everything else: :func:`moe_experts_torch`.
    Off the decode-step kernels, slots marked ``NO_EXPERT`` are dropped first (reading ids costs
    nothing on the CPU).
    """
    decode_step = _decode_step_kernel(x, ids, w13, w2, w13_scale, w2_scale)
    if decode_step is not None:
        scales = () if w13_scale is None else (w13_scale, w2_scale)
        with _op_id_errors(ids, w13.shape[0]):
            return _as(decode_step(x, weights, ids, w13, w2, *scales), x.dtype)
    if ids.numel() and bool((ids == NO_EXPERT).any()):
        return moe_experts_on_kept_slots(moe_experts, x, weights, ids, w13, w2, w13_scale, w2_scale)
    if (
        ids.shape[0] > 1
        and x.dtype in (torch.float32, torch.bfloat16)
        and w13.dtype in FP8_FORMAT_OF
        and w2.dtype == w13.dtype
        and _grouped_mm_takes(torch.float32, w13.shape[2], w2.shape[2])
        and cpu_kernels.library() is not None
    ):  # a prefill of FP8 experts: cached float32 weights, grouped GEMMs
        with _op_id_errors(ids, w13.shape[0]):
            return _moe_experts_fp8_grouped(x, weights, ids, w13, w2, w13_scale, w2_scale)
    if (
        w13_scale is None
        and w2_scale is None
        and x.dtype == w13.dtype == w2.dtype == torch.float32
        and ids.numel()
        and cpu_kernels.library() is not None
    ):
        experts = w13.shape[0]
        if ids.shape[0] > 1 and _grouped_mm_takes(x.dtype, w13.shape[2], w2.shape[2], w13, w2):
            with _op_id_errors(ids, experts):
                xs, order, ends = cpu_kernels.moe_group(x, ids, experts)
            h = _GROUPED_MM(xs, w13.transpose(1, 2), offs=ends)  # [T * k, 2I]
            y = _GROUPED_MM(silu_and_mul(h), w2.transpose(1, 2), offs=ends)  # [T * k, H]
            return cpu_kernels.moe_combine(y, order, weights)
    return moe_experts_torch(x, weights, ids, w13, w2, w13_scale, w2_scale)


def _moe_experts_fp8_grouped(x, weights, ids, w13, w2, w13_scale, w2_scale):
    """FP8 block-scaled experts for many tokens, as the op defines them: activations (``x``
    and the SwiGLU output) quantized per (1, 128) and multiplied with the dequantized
    weights in float32, each expert's output rounded to ``x``'s dtype, summed per token in
    expert order. The weights' float32 copies are cached (:class:`DequantizedWeights`), and
    each product is one grouped GEMM over all experts' rows."""
    def quantized(t: torch.Tensor) -> torch.Tensor:
        return _quantized_activations(t, w13.dtype)

    d13 = DEQUANTIZED.get(w13, w13_scale, (128, 128))  # [E, 2I, H] float32
    d2 = DEQUANTIZED.get(w2, w2_scale, (128, 128))  # [E, H, I]
    xs, order, ends = cpu_kernels.moe_group(quantized(x), ids, w13.shape[0])
    h = _as(_GROUPED_MM(xs, d13.transpose(1, 2), offs=ends), x.dtype)  # [T * k, 2I]
    y = _GROUPED_MM(quantized(silu_and_mul(h)), d2.transpose(1, 2), offs=ends)  # [T * k, H]
    y = _as(_as(y, x.dtype), torch.float32).contiguous()  # each expert's output in x's dtype, as the op rounds it
    return _as(cpu_kernels.moe_combine(y, order, weights), x.dtype)


def moe_experts_torch(x, weights, ids, w13, w2, w13_scale=None, w2_scale=None):
    """:func:`moe_experts` on torch alone. One token: its k experts one after another, two
    GEMVs each, the weighted sum accumulated in place. More tokens: the slots are sorted
    by expert once, the rows gathered once, both expert GEMMs run as one grouped GEMM
    each, and one ``index_add_`` scatters the weighted rows back. FP8 weights (with
    scales), or weights in another dtype than ``x``, take the reference.
    """
    if w13_scale is not None or w2_scale is not None or not (x.dtype == w13.dtype == w2.dtype):
        return SPECS["moe_experts"].reference_impl(x, weights, ids, w13, w2, w13_scale, w2_scale)
    tokens, k = ids.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if ids.numel() == 0:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if tokens == 1:
        chosen = ids[0].tolist()
        if min(chosen) < 0 or max(chosen) >= w13.shape[0]:  # the list is at hand: no tensor reduction
            check_expert_ids(ids, w13.shape[0])
        out = None
        for e, w in zip(chosen, weights[0].tolist()):
            y = F.linear(silu_and_mul(F.linear(x, w13[e])), w2[e])  # [1, H]
            out = _as(y, acc).mul_(w) if out is None else out.add_(y, alpha=w)
        return _as(out, x.dtype)
    check_expert_ids(ids, w13.shape[0])
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    rows = order // k  # the token of each sorted slot
    counts = torch.bincount(flat, minlength=w13.shape[0])
    xs = x.index_select(0, rows)  # [T * k, H]; ~6x faster than x[rows] on CPU
    if _grouped_mm_takes(x.dtype, w13.shape[2], w2.shape[2], w13, w2):
        ends = counts.cumsum(0).to(torch.int32)
        h = _GROUPED_MM(xs, w13.transpose(1, 2), offs=ends)  # [T * k, 2I]
        y = _GROUPED_MM(silu_and_mul(h), w2.transpose(1, 2), offs=ends)  # [T * k, H]
    else:
        y = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                part = slice(start, start + n)
                y[part] = F.linear(silu_and_mul(F.linear(xs[part], w13[e])), w2[e])
                start += n
    weighted = _as(y, acc).mul_(_as(weights.reshape(-1, 1).index_select(0, order), acc))
    return _as(torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, rows, weighted), x.dtype)


def weight_format_paths() -> dict[str, dict[str, OpPath]]:
    """``Capabilities.op_paths`` of the cpu backend: what :func:`linear` and :func:`moe_experts`
    run per weight format (int8 weights are the reference's W8A8 math on every path)."""
    c_kernels = cpu_kernels.library() is not None
    w8a8 = OpPath("reference", "reference math (W8A8)")
    prefill = "activations quantized per the weight's scheme, float32 GEMM with a cached dequantized weight"
    fp8_experts = (
        OpPath("native", "decode step: one dshal C call; prefill: grouped GEMMs on cached float32 weights"
               + ("" if _GROUPED_MM is not None else " (no torch._grouped_mm here: prefill is the reference)"))
        if c_kernels else OpPath("reference", "reference math (no dshal C kernels built)")
    )
    return {
        "linear": {
            "bf16": OpPath("native", "torch matmul (torch.nn.functional.linear)"
                           + ("; few float32 rows: dshal C GEMV" if c_kernels else "")),
            "fp8-block": OpPath("native", ("decode rows: dshal C FP8 block kernel; more rows: " if c_kernels else "")
                                + prefill),
            "fp8-row": OpPath("native", prefill),
            "fp8-tensor": OpPath("native", prefill),
            "int8": w8a8,
        },
        "moe_experts": {
            "bf16": OpPath("native", "tokens sorted by expert, torch grouped GEMMs"
                           + ("; float32: dshal C grouping kernels" if c_kernels else "")),
            "fp8-block": fp8_experts,
            "int8": w8a8,
        },
    }


#: op name -> native provider; every other op is served by its reference. Under torch.compile the
#: providers with C kernels or host reads run as opaque operators (:mod:`dshal.backends.cpu_opaque`).
NATIVE_OPS = opaque_when_compiled({
    "linear": linear,
    "attention": attention,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": rotary_embedding,
    "moe_gate": moe_gate,
    "moe_experts": moe_experts,
    "sparse_mla_attention": sparse_mla_attention,
})
