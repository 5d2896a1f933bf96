"""The ``cpu`` backend's native providers: the same ops as the references, on torch's own
fused CPU kernels.

The references (:mod:`dshal.ops`) stay the oracle: they spell the math out step by step
in float32/float64, which costs a pass over memory per step and a Python call per torch
op. These providers compute the same functions with fewer, fused torch calls
(``scaled_dot_product_attention``, ``rms_norm``) and skip the float32 round trip where
the input already is float32. ``moe_experts`` and the GEMMs stay on their references, which
already group tokens by expert and call ``F.linear`` (a native copy measured 1.02x at T=32).
The conformance suite judges these providers against the references like any plugin's ops
(``dshal conformance --backend cpu``).

Every function takes the op's arguments after the op spec has checked them (the runtime
wraps each provider with its spec's checks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dshal.ops.attention import visible_keys

#: Dtypes torch's CPU kernels already compute in at full precision (no upcast needed).
_WIDE = (torch.float32, torch.float64)


def attention(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
    """No mask (a decode step, or non-causal): :func:`_attention_folded`; otherwise torch's
    fused ``scaled_dot_product_attention`` with the op's end-aligned mask."""
    batch, hq, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[3]
    if tq == 0 or tk == 0:  # nothing to attend to: the op's "no visible key" rows are zeros
        return q.new_zeros(batch, hq, tq, dv)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if window is None and (not causal or tq == 1):
        return _attention_folded(q, k, v, scale)
    if dv < d:
        # The fused (flash) CPU kernel needs equal q/k/v head dims, else torch falls back to
        # unfused math ~2x slower; zero columns of v only add zero columns to the output.
        v = F.pad(v, (0, d - dv))
    gqa = hq != k.shape[1]
    if causal and window is None and tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        seen = visible_keys(tq, tk, causal, window, global_tokens, q.device)  # [Tq, Tk]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale, enable_gqa=gqa)
        blind = ~seen.any(dim=-1)  # queries that see no key output zeros, whatever the kernel does
        if bool(blind.any()):
            out.masked_fill_(blind[:, None], 0.0)
    return out[..., :dv] if dv < d else out


def _attention_folded(q, k, v, scale: float) -> torch.Tensor:
    """Unmasked attention with the query heads that share a kv head folded into rows: one
    GEMM pair per kv head (float32 for 16-bit inputs). At Tq = 1 (MLA's absorbed decode:
    all heads on one latent head) torch's SDPA measured 2.7x slower with v padded to q's
    width and 70x slower without (benchmarks/RESULTS.md)."""
    batch, hq, tq, d = q.shape
    hk = k.shape[1]
    acc = q.dtype if q.dtype in _WIDE else torch.float32
    rows = q.reshape(batch, hk, hq // hk * tq, d).to(acc)  # [B, Hk, G*Tq, D]
    probs = torch.softmax((rows @ k.to(acc).transpose(-1, -2)).mul_(scale), dim=-1)  # [B, Hk, G*Tq, Tk]
    return (probs @ v.to(acc)).reshape(batch, hq, tq, v.shape[3]).to(q.dtype)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """``torch.rms_norm`` (one fused kernel; float32 statistics for 16-bit inputs)."""
    if residual is not None:
        x = x + residual if x.dtype in _WIDE else (x.float() + residual.float()).to(x.dtype)
    if x.dtype in _WIDE:
        y = torch.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    else:  # the reference rounds once, after the weight: keep float32 through it
        y = torch.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    return (y, x) if residual is not None else y


def silu_and_mul(x):
    """``silu(gate) * up`` in place of the reference's upcast copies when ``x`` is float32/64."""
    if x.dtype not in _WIDE:
        gate, up = x.float().chunk(2, dim=-1)
        return F.silu(gate).mul_(up).to(x.dtype)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rotary_embedding(x, cos, sin, interleaved=True):
    """Rotation of pairs, written back into one output tensor (no stack / cat)."""
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    xf = x if x.dtype == acc else x.to(acc)
    c, s = cos.to(acc), sin.to(acc)
    out = torch.empty(xf.shape, dtype=acc, device=x.device)
    if interleaved:
        a, b, ra, rb = xf[..., 0::2], xf[..., 1::2], out[..., 0::2], out[..., 1::2]
    else:
        a, b = xf.chunk(2, dim=-1)
        ra, rb = out.chunk(2, dim=-1)
    torch.mul(a, c, out=ra).sub_(b * s)
    torch.mul(b, c, out=rb).add_(a * s)
    return out if x.dtype == acc else out.to(x.dtype)


#: op name -> native provider; every other op is served by its reference.
NATIVE_OPS = {
    "attention": attention,
    "rms_norm": rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding": rotary_embedding,
}
