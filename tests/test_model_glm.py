"""GLM's DeepSeek-V3-class checkpoints (``model_type: glm4_moe_lite``: GLM-4.7-Flash) against Hugging
Face transformers' Glm4MoeLiteForCausalLM (float32, CPU), loaded through the real loader from
``save_pretrained``'s folder; and the config keys where GLM's reading differs from DeepSeek-V3's."""

from __future__ import annotations

import json

import pytest
import torch

import dshal
from dshal.model import ModelArgs, from_pretrained

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Glm4MoeLiteForCausalLM"):
    pytest.skip("this transformers has no Glm4MoeLiteForCausalLM (added in 5.x)", allow_module_level=True)

CPU = {"backend": "cpu"}
NEW_TOKENS = 8
#: Tiny GLM-4.7-Flash shapes: 2 expert groups (1 kept), two dense layers first, attention biases.
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=2, topk_group=1,
    max_position_embeddings=4096, mlp_layer_types=["dense", "dense", "sparse", "sparse"], attention_bias=True,
    initializer_range=0.1,
)
CONFIGS = {
    # GLM's own defaults (routed_scaling_factor 1.8, rms_norm_eps 1e-5) with grouping, biases, 2 dense layers
    "grouped": {},
    # transformers' rotate_half layout, YaRN, tied embeddings, no top-k normalization
    "yarn_tied": dict(rope_interleave=False, tie_word_embeddings=True, norm_topk_prob=False,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 1024, "mscale": 1.0,
                                       "mscale_all_dim": 1.0}),
}


def _hf_glm(folder, **changes):
    torch.manual_seed(len(changes))
    model = transformers.Glm4MoeLiteForCausalLM(transformers.Glm4MoeLiteConfig(**{**TINY, **changes}))
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.5)
            for name, p in layer.self_attn.named_parameters():
                if name.endswith(".bias"):  # HF initializes them to 0: no test of their use
                    p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return transformers.Glm4MoeLiteForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _prompt(vocab: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_glm4_moe_lite_prefill_logits_and_greedy_tokens_match_hf(name, tmp_path):
    """A random Glm4MoeLiteForCausalLM saved by transformers: dshal reads its config (GLM's defaults,
    ``mlp_layer_types``) and weights, its float32 logits are within 1e-4 of transformers', and the
    greedy tokens are the same (absorbed and naive caches)."""
    hf = _hf_glm(tmp_path, **CONFIGS[name])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "glm4_moe_lite" and "first_k_dense_replace" not in saved
    model = from_pretrained(tmp_path, CPU, dtype=torch.float32)
    a = model.args
    assert (a.first_k_dense_replace, a.n_group, a.routed_scaling_factor, a.rms_norm_eps) == (2, 2, 1.8, 1e-5)
    assert a.tie_word_embeddings == (name == "yarn_tied") and a.attention_bias
    assert (a.rope_scaling is not None, a.rope_interleave) == ((True, False) if name == "yarn_tied" else (False, True))
    ids = _prompt(a.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
    got = model(ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(model.generate(ids, NEW_TOKENS), want, rtol=0, atol=0)
    if name == "grouped":
        naive = from_pretrained(tmp_path, CPU, dtype=torch.float32, mla_mode="naive")
        torch.testing.assert_close(naive.generate(ids, NEW_TOKENS), want, rtol=0, atol=0)


def _glm_config(**changes) -> dict:
    cfg = {k: v for k, v in TINY.items() if k != "initializer_range"}
    return {"model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"], **cfg, **changes}


def test_glm4_moe_lite_config_reads_glms_defaults_and_refuses_what_dshal_cannot_build():
    """Keys a GLM config.json leaves out mean Glm4MoeLiteConfig's defaults (not DeepSeek-V3's); a
    dense layer after a MoE one, a mismatched first_k_dense_replace, a partial rotary factor and
    GLM-5's ``glm_moe_dsa`` are ConfigErrors naming the key, the value and the expectation."""
    bare = _glm_config()
    for key in ("n_group", "topk_group", "mlp_layer_types", "rms_norm_eps", "q_lora_rank"):
        bare.pop(key, None)
    args = ModelArgs.from_hf_config(bare)
    assert (args.n_group, args.topk_group, args.first_k_dense_replace) == (1, 1, 1)
    assert (args.routed_scaling_factor, args.rms_norm_eps, args.q_lora_rank) == (1.8, 1e-5, 768)
    # the architecture alone (model_type of its own) is read the same way
    assert ModelArgs.from_hf_config({**_glm_config(), "model_type": "glm4_lite_x"}).first_k_dense_replace == 2
    with pytest.raises(dshal.ConfigError, match=r"mlp_layer_types is \['dense', 'sparse', 'dense', 'sparse'\], "
                       r"expected 'dense' layers first"):
        ModelArgs.from_hf_config(_glm_config(mlp_layer_types=["dense", "sparse", "dense", "sparse"]))
    with pytest.raises(dshal.ConfigError, match=r"mlp_layer_types is \['dense'\], expected a list of "
                       r"num_hidden_layers \(4\) entries"):
        ModelArgs.from_hf_config(_glm_config(mlp_layer_types=["dense"]))
    with pytest.raises(dshal.ConfigError, match="first_k_dense_replace is 1, expected 2: mlp_layer_types"):
        ModelArgs.from_hf_config(_glm_config(first_k_dense_replace=1))
    with pytest.raises(dshal.ConfigError, match=r"rope_parameters.partial_rotary_factor is 0.5, expected 1.0"):
        ModelArgs.from_hf_config(_glm_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                              "partial_rotary_factor": 0.5}))
    with pytest.raises(dshal.ConfigError, match=r"model_type is 'glm_moe_dsa'.*interleaved pairs.*'shared'"):
        ModelArgs.from_hf_config(_glm_config(model_type="glm_moe_dsa", architectures=["GlmMoeDsaForCausalLM"]))
