"""GLM's DeepSeek-V3-class checkpoints against Hugging Face transformers (float32, CPU), loaded through
the real loader from ``save_pretrained``'s folder: GLM-4.7-Flash (``model_type: glm4_moe_lite``,
Glm4MoeLiteForCausalLM) and GLM-5 (``glm_moe_dsa``, GlmMoeDsaForCausalLM: DeepSeek-V3.2 with an
interleaved-RoPE indexer and shared-selection layers); and the config keys GLM reads its own way."""

from __future__ import annotations

import json

import pytest
import torch

import dshal
from dshal.model import ModelArgs, build_model, from_pretrained
from dshal.model.loader import CheckpointReader

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
    dense layer after a MoE one, a mismatched first_k_dense_replace and a partial rotary factor
    are ConfigErrors naming the key, the value and the expectation."""
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
    v32_style = _glm_config(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], first_k_dense_replace=1)
    with pytest.raises(dshal.ConfigError, match="first_k_dense_replace is 1, expected 2: mlp_layer_types"):
        ModelArgs.from_hf_config(v32_style)  # transformers' DeepseekV32Config writes mlp_layer_types too
    with pytest.raises(dshal.ConfigError, match=r"rope_parameters.partial_rotary_factor is 0.5, expected 1.0"):
        ModelArgs.from_hf_config(_glm_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                              "partial_rotary_factor": 0.5}))


# ---------------------------------------------------------------- GLM-5 (glm_moe_dsa)
#: Tiny GLM-5: 6 keys kept per query (prompts of 20), layers 1 and 3 reuse layers 0 and 2's selection.
GLM5 = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
    index_n_heads=16, index_head_dim=32, index_topk=6, first_k_dense_replace=1,
    indexer_types=["full", "shared", "full", "shared"], initializer_range=0.1,
)


def _hf_glm5_from(folder, **overrides):
    return transformers.GlmMoeDsaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32, **overrides
    ).eval()


@pytest.fixture(scope="module")
def glm5(tmp_path_factory):
    """``(folder, hf)``: a random GlmMoeDsaForCausalLM (non-zero correction and k_norm biases) saved
    with save_pretrained and read back eager in float32."""
    if not hasattr(transformers, "GlmMoeDsaForCausalLM"):
        pytest.skip("this transformers has no GlmMoeDsaForCausalLM")
    folder = tmp_path_factory.mktemp("glm5")
    torch.manual_seed(0)
    model = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**GLM5))
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.5)
            if layer.self_attn.indexer is not None:  # none in the shared layers
                layer.self_attn.indexer.k_norm.bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder, _hf_glm5_from(folder)


def _greedy(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


def test_glm5_prefill_logits_and_greedy_tokens_match_hf_with_shared_selection_layers(glm5):
    """GLM-5 with 6 keys kept of 20, layers 1 and 3 attending to layers 0 and 2's choice: logits
    within 1e-4 of transformers', the same greedy tokens; the shared layers have no indexer; the
    indexer's interleaved RoPE decides (DeepSeek-V3.2's half-split gives other logits)."""
    folder, hf = glm5
    model = from_pretrained(folder, CPU, dtype=torch.float32)
    a = model.args
    assert a.indexer_types == ("full", "shared", "full", "shared") and a.index_rope_interleave and a.rope_interleave
    assert [layer.self_attn.indexer is None for layer in model.layers] == [False, True, False, True]
    ids = _prompt(a.vocab_size, length=20)
    with torch.no_grad():
        ref = hf(ids).logits
        dense_ref = _hf_glm5_from(folder, index_topk=ids.shape[1])(ids).logits
    got = model(ids)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale
    assert (dense_ref - ref).abs().max().item() > 1e-2 * scale  # keeping 6 keys changes the answer
    half_split = build_model(ModelArgs.from_file(folder, index_rope_interleave=False), CheckpointReader(folder), device="cpu")
    assert (half_split(ids) - ref).abs().max().item() > 1e-3 * scale
    torch.testing.assert_close(model.generate(ids, NEW_TOKENS), _greedy(hf, ids), rtol=0, atol=0)


def test_glm5_every_cache_mode_and_step_kind_gives_hfs_greedy_tokens(glm5):
    """The naive cache, prefill chunks of 2 and 3, static (graph) decode steps and prompts of
    different lengths: each gives transformers' greedy tokens; speculative decoding (an MTP layer)
    is refused by name."""
    from dshal.model import decode  # lazy: only this test runs static steps

    folder, hf = glm5
    ids = _prompt(512, length=20)
    want = _greedy(hf, ids)
    naive = from_pretrained(folder, CPU, dtype=torch.float32, mla_mode="naive")
    torch.testing.assert_close(naive.generate(ids, NEW_TOKENS), want, rtol=0, atol=0)
    model = from_pretrained(folder, CPU, dtype=torch.float32)
    for chunk in (2, 3):
        torch.testing.assert_close(model.generate(ids, NEW_TOKENS, prefill_chunk=chunk), want, rtol=0, atol=0)
    static, _ = decode.generate_with_graphs(model, ids, NEW_TOKENS, graph=lambda step: step)
    torch.testing.assert_close(static, want, rtol=0, atol=0)
    lens = [20, 11]
    rows = model.generate(ids, NEW_TOKENS, prompt_lens=lens)
    for b, n in enumerate(lens):
        torch.testing.assert_close(rows[b, : n + NEW_TOKENS], _greedy(hf, ids[b : b + 1, :n])[0], rtol=0, atol=0)
    with pytest.raises(dshal.ConfigError, match="mtp_layers is 1, expected 0 for a GLM-5 model with shared"):
        model.args.with_(num_nextn_predict_layers=1, mtp_layers=1)


def test_glm5_config_derives_indexer_types_as_transformers_does():
    """Without ``indexer_types``, ``index_topk_pattern`` (letters) or ``index_topk_freq`` /
    ``index_skip_topk_offset`` give each layer's kind, as GlmMoeDsaConfig derives them; a pattern
    that starts shared or has the wrong length is a ConfigError naming the key; the config
    dshal writes is GLM-5's again."""
    cfg = {k: v for k, v in GLM5.items() if k not in ("initializer_range", "indexer_types")}
    cfg = {"model_type": "glm_moe_dsa", "architectures": ["GlmMoeDsaForCausalLM"], **cfg, "num_hidden_layers": 6}
    for extra in ({"index_topk_freq": 2, "index_skip_topk_offset": 1}, {"index_topk_pattern": "FSFSFS"}, {}):
        want = transformers.GlmMoeDsaConfig(**{**cfg, **extra}).indexer_types
        args = ModelArgs.from_hf_config({**cfg, **extra})
        assert list(args.indexer_types) == want, extra
    assert ModelArgs.from_hf_config({**cfg, "index_topk_freq": 2, "index_skip_topk_offset": 1}).indexer_types == (
        "full", "shared", "full", "shared", "full", "shared")
    back = ModelArgs.from_hf_config(args.to_hf_config())
    assert back == args and args.to_hf_config()["model_type"] == "glm_moe_dsa"
    with pytest.raises(dshal.ConfigError, match=r"index_topk_pattern is \['shared', 'full', .*the first 'full'"):
        ModelArgs.from_hf_config({**cfg, "index_topk_pattern": "SFFFFF"})
    with pytest.raises(dshal.ConfigError, match=r"indexer_types is \['full'\], expected num_hidden_layers \(6\)"):
        ModelArgs.from_hf_config({**cfg, "indexer_types": ["full"]})
