"""The model core on an FP8 block checkpoint against DeepSeek-V3's own inference numerics:
the same logits up to summation order, the same greedy tokens; and what quantizing the KV
latent (dshal's expanded path before issue 14) costs.

:class:`DeepSeekFP8Reference` is a test-only float re-implementation of the numerics of
DeepSeek-V3's inference code (``inference/model.py`` + ``kernel.py`` of
deepseek-ai/DeepSeek-V3, MIT), run as its ``gemm_impl = "fp8"`` (an opt-in there: its
default is "bf16", dequantized weights and no activation quantization, which dshal's
``gemm: high`` matches) with ``attn_impl = "absorb"`` (its default), written from reading that code (none of it
copied), in plain torch so it shares nothing with ``dshal.ops``:
- every FP8 linear quantizes its input per 1x128 (``act_quant``: scale = amax / 448,
  e4m3fn) and multiplies with the 128x128 block-scaled weight, accumulating in float32
  (``fp8_gemm``); float weights (embedding, router, ``lm_head``) are plain matmuls;
- absorbed attention: ``kv_b_proj``'s FP8 weight is dequantized (``weight_dequant``) and
  folded into the query and the output; the normalized KV latent and the rotated key
  are cached as they are, never quantized; softmax in float32;
- the router: sigmoid scores, the correction bias for the choice only, groups scored by
  their two best, weights normalized over the chosen experts and scaled;
- experts and the shared expert: ``w2(silu(w1 x) * w3 x)`` with FP8 linears.

Activations run in float32 here (DeepSeek's code runs bf16); rotary is the interleaved
(complex-pair) layout without YaRN. ``quantize_latent=True`` instead quantizes the latent
before ``kv_b_proj`` as an FP8 linear would (what dshal's expanded prefill path did
before issue 14), to show how far that moves the logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dshal
from dshal.config import PrecisionConfig
from dshal.model import DictReader, build_model, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint

E4M3_MAX = 448.0
BLOCK = 128


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` quantized to e4m3fn per 1x128 and back (float32)."""
    k = x.shape[-1]
    pad = (-k) % BLOCK
    blocks = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale).to(torch.float8_e4m3fn).float() * scale
    return q.flatten(-2)[..., :k]


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """An FP8 weight ``[N, K]`` times its 128x128 block scales, float32."""
    n, k = q.shape
    s = scale_inv.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return q.float() * s


class DeepSeekFP8Reference:
    """DeepSeek-V3's forward over a checkpoint dict in the Hugging Face names (FP8 linears
    with ``weight_scale_inv``), for ``args`` (a dshal ``ModelArgs``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], args, quantize_latent: bool = False):
        self.t, self.a, self.quantize_latent = tensors, args, quantize_latent

    def linear(self, x: torch.Tensor, name: str, quantize_input: bool = True) -> torch.Tensor:
        w = self.t[f"{name}.weight"]
        scale = self.t.get(f"{name}.weight_scale_inv")
        if scale is None:
            return x @ w.float().T
        return (act_quant(x) if quantize_input else x) @ weight_dequant(w, scale).T

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.t[f"{name}.weight"].float(), self.a.rms_norm_eps)

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Interleaved pairs as complex numbers times e^{i pos theta_j} (no YaRN)."""
        dim = x.shape[-1]
        freqs = 1.0 / (self.a.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        pos = torch.arange(start, start + x.shape[1], dtype=torch.float32)
        cis = torch.polar(torch.ones(len(pos), len(freqs)), torch.outer(pos, freqs))  # [T, dim / 2]
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
        shape = [1, x.shape[1]] + [1] * (x.dim() - 3) + [dim // 2]
        return torch.view_as_real(z * cis.view(shape)).flatten(-2)

    def attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        a = self.a
        bsz, seqlen, _ = x.shape
        heads, nope, rope, v_dim, rank = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_lora_rank is None:
            q = self.linear(x, f"{p}.q_proj")
        else:
            q = self.linear(self.norm(self.linear(x, f"{p}.q_a_proj"), f"{p}.q_a_layernorm"), f"{p}.q_b_proj")
        q = q.view(bsz, seqlen, heads, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        q_pe = self.rotate(q_pe, 0)
        kv = self.linear(x, f"{p}.kv_a_proj_with_mqa")
        kv, k_pe = kv.split([rank, rope], dim=-1)
        k_pe = self.rotate(k_pe[:, :, None], 0)[:, :, 0]
        latent = self.norm(kv, f"{p}.kv_a_layernorm")  # cached as is
        if self.quantize_latent:
            latent = act_quant(latent)
        w_kv = weight_dequant(self.t[f"{p}.kv_b_proj.weight"], self.t[f"{p}.kv_b_proj.weight_scale_inv"])
        w_kv = w_kv.view(heads, nope + v_dim, rank)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_kv[:, :nope])
        scores = torch.einsum("bshc,btc->bsht", q_latent, latent) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        scores = scores * a.softmax_scale
        mask = torch.full((seqlen, seqlen), float("-inf")).triu_(1)
        scores = (scores + mask[:, None]).softmax(dim=-1, dtype=torch.float32)
        out = torch.einsum("bsht,btc->bshc", scores, latent)
        out = torch.einsum("bshc,hdc->bshd", out, w_kv[:, -v_dim:])
        return self.linear(out.flatten(2), f"{p}.o_proj")

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        return self.linear(F.silu(self.linear(x, f"{p}.gate_proj")) * self.linear(x, f"{p}.up_proj"), f"{p}.down_proj")

    def moe(self, x: torch.Tensor, p: str) -> torch.Tensor:
        a = self.a
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = (x @ self.t[f"{p}.gate.weight"].float().T).sigmoid()
        choice = scores + self.t[f"{p}.gate.e_score_correction_bias"].float()
        if a.n_group > 1:
            grouped = choice.view(x.shape[0], a.n_group, -1)
            kept = grouped.topk(2, dim=-1)[0].sum(dim=-1).topk(a.topk_group, dim=-1)[1]
            dropped = torch.ones(x.shape[0], a.n_group, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        ids = choice.topk(a.num_experts_per_tok, dim=-1)[1]
        weights = scores.gather(1, ids)
        if a.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * a.routed_scaling_factor
        y = torch.zeros_like(x)
        for e in range(a.n_routed_experts):
            rows, slot = torch.where(ids == e)
            if len(rows):
                y[rows] += self.mlp(x[rows], f"{p}.experts.{e}") * weights[rows, slot, None]
        return (y + self.mlp(x, f"{p}.shared_experts")).view(shape)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` (DeepSeek's code returns the last position's only)."""
        h = self.t["model.embed_tokens.weight"].float()[ids]
        for i in range(self.a.num_hidden_layers):
            p = f"model.layers.{i}"
            h = h + self.attention(self.norm(h, f"{p}.input_layernorm"), f"{p}.self_attn")
            x = self.norm(h, f"{p}.post_attention_layernorm")
            h = h + (self.moe(x, f"{p}.mlp") if self.a.is_moe_layer(i) else self.mlp(x, f"{p}.mlp"))
        return self.linear(self.norm(h, "model.norm"), "lm_head")

    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        """Greedy, recomputing the whole sequence each step (absorbed attention is the same
        math for a prefill and a decode step)."""
        for _ in range(new):
            ids = torch.cat((ids, self(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
        return ids


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())



#: Both compute float32 sums of the same products, in other orders: in high precision they
#: agree to 6e-7 here. In FP8, such a rounding difference can flip one activation's e4m3
#: rounding (a step is 1/16 of that value) and the flip propagates: measured 4e-7 to 4e-4
#: over seeds 0-3. Issue 14's bound is 2e-2; this is 10x tighter.
REL = 2e-3
#: Issue 14's bound for matching DeepSeek; the quantized latent must miss it.
ISSUE_BOUND = 2e-2


def _model_and_reference(seed: int, **changes):
    args = tiny_args(
        moe_intermediate_size=128,  # 128-row gate/up parts: the experts stay FP8 when stacked
        rope_scaling=None,
        rope_interleave=True,
        num_hidden_layers=3,
        **changes,
    )
    fp8 = quantize_checkpoint_fp8(random_checkpoint(args, seed=seed))
    model = build_model(args, DictReader(fp8), PrecisionConfig())  # the default, gemm: auto
    return args, fp8, model


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_checkpoint_matches_deepseek_fp8_numerics(seed):
    dshal.use(backend="cpu")
    args, fp8, model = _model_and_reference(seed)
    assert model.describe()["precision"]["mode"] == "fp8-block"
    assert model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert model.describe()["precision"]["weight_only"] == ["kv_b_proj"]
    ids = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    deepseek = DeepSeekFP8Reference(fp8, args)
    want = deepseek(ids)
    rel = relative_error(model(ids), want)
    assert rel <= REL, f"logits {rel:.3g} from DeepSeek's FP8 numerics"
    # the decode path (absorbed, from the cache) equals it too: generate() = prefill + decode
    torch.testing.assert_close(model.generate(ids, 6), deepseek.generate(ids, 6), rtol=0, atol=0)
    # Quantizing the latent before kv_b_proj, as the expanded path did, moves the logits by
    # orders of magnitude more than the summation order does.
    latent_quantized = relative_error(DeepSeekFP8Reference(fp8, args, quantize_latent=True)(ids), want)
    assert latent_quantized > ISSUE_BOUND, (latent_quantized, rel)


def test_fp8_checkpoint_without_q_lora_and_naive_cache_matches_deepseek():
    dshal.use(backend="cpu")
    args, fp8, model = _model_and_reference(2, q_lora_rank=None, mla_mode="naive", n_group=1, topk_group=1)
    ids = torch.randint(0, args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    deepseek = DeepSeekFP8Reference(fp8, args)
    assert relative_error(model(ids), deepseek(ids)) <= REL
    torch.testing.assert_close(model.generate(ids, 5), deepseek.generate(ids, 5), rtol=0, atol=0)
