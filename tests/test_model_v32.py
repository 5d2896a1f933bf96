"""DeepSeek-V3.2 (DeepSeek Sparse Attention) against Hugging Face transformers' DeepseekV32ForCausalLM
(float32, CPU): a random tiny model whose lightning indexer keeps fewer keys (``index_topk``) than
the prompt holds, loaded through the real loader from ``save_pretrained``'s folder."""

from __future__ import annotations

import json

import pytest
import torch

import dshal
from dshal.model import ModelArgs, build_model, decode, from_pretrained, tiny_args
from dshal.model.checkpoint import (
    dequantize_checkpoint_fp8,
    quantize_checkpoint_fp8,
    random_checkpoint,
    save_checkpoint,
)
from dshal.model.loader import CheckpointReader, DictReader
from dshal.model.run import kv_cache_line
from dshal.model.speculative import generate_speculative
from dshal.plan.plan import default_config

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV32ForCausalLM (added in 5.x)", allow_module_level=True)

CPU = {"backend": "cpu"}
HIGH_PRECISION = {"backend": "cpu", "precision": {"gemm": "bf16"}}
#: Keys each query keeps: fewer than the 20-token prompts below, so the selection decides.
TOPK = 6
#: 16 index heads: a key's score sums 16 relu terms, so ties (all heads at 0) are unlikely.
SPARSE = dict(index_n_heads=16, index_head_dim=32, index_topk=TOPK, num_hidden_layers=2)
NEW_TOKENS = 8


def _prompt(vocab: int, batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(hf, ids: torch.Tensor, new: int = NEW_TOKENS) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


def _hf_v32(args: ModelArgs, directory, **overrides):
    return transformers.DeepseekV32ForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, **overrides
    ).eval()


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """``(args, folder, hf)``: a random DeepseekV32ForCausalLM (non-zero correction and k_norm
    biases) saved with save_pretrained, and read back eager in float32."""
    args = tiny_args(**SPARSE)
    folder = tmp_path_factory.mktemp("v32")
    cfg = args.to_hf_config()
    assert (cfg.pop("model_type"), cfg.pop("architectures")) == ("deepseek_v32", ["DeepseekV32ForCausalLM"])
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**cfg, initializer_range=0.1))
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.5)
            layer.self_attn.indexer.k_norm.bias.normal_(0.0, 0.5)  # HF initializes it to 0: no test of its use
    model.save_pretrained(folder)
    return args, folder, _hf_v32(args, folder)


def test_v32_prefill_logits_and_greedy_tokens_match_hf_with_fewer_keys_kept_than_the_prompt(v32):
    """Prompts of 20 tokens, 6 keys kept per query: logits within 1e-4 of transformers', the same
    greedy tokens; and the selection decides (HF keeping every key gives other logits)."""
    args, folder, hf = v32
    model = from_pretrained(folder, CPU, dtype=torch.float32)
    assert model.args.sparse_attention and model.args.index_topk == TOPK
    assert model.layers[1].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    ids = _prompt(args.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        dense_ref = _hf_v32(args, folder, index_topk=ids.shape[1])(ids).logits
    got = model(ids)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-4 * scale
    assert (dense_ref - ref).abs().max().item() > 1e-2 * scale  # keeping 6 keys changes the answer
    torch.testing.assert_close(model.generate(ids, NEW_TOKENS), _hf_greedy(hf, ids), rtol=0, atol=0)


def test_v32_every_cache_mode_and_step_kind_gives_hfs_greedy_tokens(v32):
    """The indexer's keys cached in the "naive" layout too, a prefill in chunks of 2 and 3, prompts of
    different lengths (rows at their own positions: the static steps' per-row key mask), and
    static (graph) decode steps: each gives transformers' greedy tokens."""
    args, folder, hf = v32
    ids = _prompt(args.vocab_size)
    want = _hf_greedy(hf, ids)
    naive = from_pretrained(folder, CPU, dtype=torch.float32, mla_mode="naive")
    with torch.no_grad():
        ref = hf(ids).logits
    assert (naive(ids) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(naive.generate(ids, NEW_TOKENS), want, rtol=0, atol=0)
    model = from_pretrained(folder, CPU, dtype=torch.float32)
    for chunk in (2, 3):  # 2: steps of two queries attend in the absorbed form, masked
        torch.testing.assert_close(model.generate(ids, NEW_TOKENS, prefill_chunk=chunk), want, rtol=0, atol=0)
    static, _ = decode.generate_with_graphs(model, ids, NEW_TOKENS, graph=lambda step: step)  # no device graphs on CPU
    torch.testing.assert_close(static, want, rtol=0, atol=0)
    lens = [20, 11]
    rows = model.generate(ids, NEW_TOKENS, prompt_lens=lens)
    for b, n in enumerate(lens):
        torch.testing.assert_close(rows[b, : n + NEW_TOKENS], _hf_greedy(hf, ids[b : b + 1, :n])[0], rtol=0, atol=0)


def test_v32_keeping_at_least_every_key_is_the_dense_v3_model(tmp_path):
    """With ``index_topk`` >= the keys a query has, DeepSeek-V3.2 is DeepSeek-V3 with the same
    weights, bit for bit (the dense path runs); with fewer kept, the logits move."""
    args = tiny_args(**SPARSE)
    tensors = random_checkpoint(args, seed=3, std=0.1)
    save_checkpoint(tmp_path / "v32", args, tensors)
    dense = args.with_(index_n_heads=0, index_head_dim=0, index_topk=0)
    save_checkpoint(tmp_path / "v3", dense, {n: t for n, t in tensors.items() if ".indexer." not in n})
    ids = _prompt(args.vocab_size, length=12)
    v3 = from_pretrained(tmp_path / "v3", CPU)(ids)
    reader = CheckpointReader(tmp_path / "v32")
    keep_all = build_model(ModelArgs.from_file(tmp_path / "v32", index_topk=12), reader, device="cpu")
    full = keep_all(ids)
    assert torch.equal(full, v3), (full - v3).abs().max()
    kept = build_model(ModelArgs.from_file(tmp_path / "v32", index_topk=4), reader, device="cpu")(ids)
    # the first 4 positions have at most 4 keys, all kept (through the masked path: not bit for bit)
    torch.testing.assert_close(kept[:, :4], v3[:, :4], rtol=0, atol=1e-5)
    assert (kept[:, 4:] - v3[:, 4:]).abs().amax(dim=-1).min() > 0  # every later position loses keys


def test_v32_fp8_checkpoint_loads_its_indexer_quantized_and_matches_hf_dequantized(tmp_path):
    """An FP8 checkpoint (the indexer's wq_b and wk as 128x128 e4m3fn blocks + weight_scale_inv,
    weights_proj and k_norm high precision, as DeepSeek-V3.2 ships them): kept FP8 under the
    default precision, and dequantized at load it matches transformers on the dequantized weights."""
    args = tiny_args(**SPARSE)
    fp8 = quantize_checkpoint_fp8(random_checkpoint(args, seed=0, std=0.02))
    index = "model.layers.1.self_attn.indexer"
    assert fp8[f"{index}.wq_b.weight"].dtype == torch.float8_e4m3fn and f"{index}.wk.weight_scale_inv" in fp8
    assert fp8[f"{index}.weights_proj.weight"].dtype == torch.float32
    save_checkpoint(tmp_path / "fp8", args, fp8)
    save_checkpoint(tmp_path / "hf", args, dequantize_checkpoint_fp8(fp8, torch.float32))
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    stored = from_pretrained(tmp_path / "fp8", CPU).layers[1].self_attn.indexer
    assert stored.wq_b.weight.dtype == stored.wk.weight.dtype == torch.float8_e4m3fn
    assert stored.wq_b.weight_scale is not None
    ids = _prompt(args.vocab_size, seed=5)
    with torch.no_grad():
        ref = hf(ids).logits
    model = from_pretrained(tmp_path / "fp8", HIGH_PRECISION)
    assert (model(ids) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(model.generate(ids, NEW_TOKENS), _hf_greedy(hf, ids), rtol=0, atol=0)


def _v32_config() -> dict:
    """DeepSeek-V3's published config.json as DeepSeek-V3.2's (its index_* keys added)."""
    official = json.loads(default_config().read_text())
    return {**official, "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
            "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 64}


def test_v32_config_is_read_and_its_index_keys_checked():
    """A V3.2 config.json gives the indexer sizes (a V3 one none, even with index_* keys); a
    missing or impossible index key, or a setting the indexer cannot run with, is a ConfigError
    naming it, the value and what was expected."""
    cfg = _v32_config()
    args = ModelArgs.from_hf_config(cfg)
    assert (args.index_n_heads, args.index_head_dim, args.index_topk, args.sparse_attention) == (64, 128, 2048, True)
    assert ModelArgs.from_hf_config({**cfg, "model_type": "kimi_k2"}).sparse_attention  # by its architecture
    v3 = ModelArgs.from_hf_config({**cfg, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]})
    assert not v3.sparse_attention and "index_topk" not in v3.to_hf_config()
    back = args.to_hf_config()
    assert (back["model_type"], back["index_topk"], "rope_interleave" in back) == ("deepseek_v32", 2048, False)
    assert ModelArgs.from_hf_config(back) == args
    with pytest.raises(dshal.ConfigError, match="index_topk is missing, expected every one of index_n_heads"):
        ModelArgs.from_hf_config({k: v for k, v in cfg.items() if k != "index_topk"})
    with pytest.raises(dshal.ConfigError, match=r"index_head_dim: got 0, expected an integer in \[1, "):
        ModelArgs.from_hf_config({**cfg, "index_head_dim": 0})
    with pytest.raises(dshal.ConfigError, match="index_n_heads: got 'x', expected an integer"):
        ModelArgs.from_hf_config({**cfg, "index_n_heads": "x"})
    with pytest.raises(dshal.ConfigError, match="index_head_dim is 32, expected at least qk_rope_head_dim \\(64\\)"):
        ModelArgs.from_hf_config({**cfg, "index_head_dim": 32})
    with pytest.raises(dshal.ConfigError, match="q_lora_rank is null, expected a positive integer"):
        ModelArgs.from_hf_config({**cfg, "q_lora_rank": None})
    with pytest.raises(dshal.ConfigError, match="rope_interleave is false, expected true"):
        ModelArgs.from_hf_config({**cfg, "rope_interleave": False})
    with pytest.raises(dshal.ConfigError, match="index_topk is 0, expected a positive integer"):
        tiny_args(index_n_heads=4, index_head_dim=32)
    with pytest.raises(dshal.ConfigError, match="attention.window is 64, expected null for a DeepSeek-V3.2 model"):
        ModelArgs.from_hf_config(cfg, attention_window=64)
    assert ModelArgs.from_hf_config(cfg, mtp_layers=1).mtp_layers == 1  # its MTP layer, with an indexer too


def test_v32_caches_and_reports_the_indexer_keys(v32):
    """Each layer caches one indexer key per token next to the latent (or the naive keys and
    values): new_cache allocates what cache_bytes and kv_cache_report say."""
    args, folder, _ = v32
    model = from_pretrained(folder, CPU, dtype=torch.float32)
    latent, index_key = args.kv_lora_rank + args.qk_rope_head_dim, args.index_head_dim
    per_token = args.num_hidden_layers * (latent + index_key) * 4
    cache = model.new_cache(2, 16)
    assert cache.bytes_per_token == per_token == model.cache_bytes(1, 1)
    assert [tuple(b.shape) for b in cache.buffers[0]] == [(2, 16, latent), (2, 16, index_key)]
    report = model.describe()["kv_cache"]
    assert report["bytes_per_token"] == per_token
    assert report["bytes_per_token_indexer"] == args.num_hidden_layers * index_key * 4
    naive = model.new_cache(1, 4, "naive")
    assert naive.bytes_per_token == report["bytes_per_token_naive"]
    assert kv_cache_line(report).endswith(f"of which the sparse-attention indexer's keys: {2 * index_key * 4}")
    static = model.new_cache(2, 16, static=True)  # the static steps' spare key-bias columns: after the latent only
    assert [tuple(b.shape) for b in static._allocated[0]] == [(2, 16, latent + 8), (2, 16, index_key)]
    assert static.bytes_per_token == model.cache_bytes(1, 1, static=True) == per_token + args.num_hidden_layers * 8 * 4


def test_v32_w8a8_checkpoint_of_the_ascend_converter_loads_weights_proj_back_to_float32(tmp_path):
    """``dshal-ascend-convert`` makes int8 of every ``*_proj`` weight, the indexer's
    ``weights_proj`` too: the loader reads it back into float32 (within int8 rounding of the
    original), the indexer's wq_b / wk stay int8, and the model runs."""
    convert = pytest.importorskip("dshal_ascend.convert")
    args = tiny_args(**SPARSE)
    tensors = random_checkpoint(args, seed=0, std=0.02)
    save_checkpoint(tmp_path / "fp8", args, quantize_checkpoint_fp8(tensors))
    convert.convert_checkpoint(tmp_path / "fp8", tmp_path / "int8")
    model = from_pretrained(tmp_path / "int8", CPU)
    indexer = model.layers[1].self_attn.indexer
    assert indexer.wq_b.weight.dtype == indexer.wk.weight.dtype == torch.int8
    original = tensors["model.layers.1.self_attn.indexer.weights_proj.weight"]
    assert indexer.weights_proj.weight.dtype == torch.float32
    torch.testing.assert_close(indexer.weights_proj.weight, original, rtol=0, atol=original.abs().max().item() / 127)
    assert model.generate(_prompt(args.vocab_size), 2).shape == (2, 22)


def test_v32_speculative_decoding_with_its_mtp_layer_gives_the_greedy_tokens():
    """The MTP layer of a DeepSeek-V3.2 checkpoint is a layer with its own indexer (its keys in
    the MTP cache); the main model verifies each draft in two-token steps past ``index_topk``.
    Greedy speculative decoding gives ``generate``'s tokens, one prompt or prompts of different
    lengths (static steps, a key mask per row), drafts kept and rejected both."""
    args = tiny_args(**{**SPARSE, "index_topk": 4}, num_nextn_predict_layers=1, mtp_layers=1)
    tensors = random_checkpoint(args, seed=1, std=0.05)
    mtp = f"model.layers.{args.num_hidden_layers}"
    assert f"{mtp}.self_attn.indexer.wk.weight" in tensors
    # A draft that repeats its input token (MTP attention and FFN add nothing; its head is the
    # embedding): right wherever the random model repeats itself, so some drafts are kept.
    d = args.hidden_size
    tensors[f"{mtp}.eh_proj.weight"] = torch.cat((torch.eye(d), torch.zeros(d, d)), 1)
    for name in [n for n in tensors if n.startswith(mtp) and n.endswith(("o_proj.weight", "down_proj.weight"))]:
        tensors[name] = torch.zeros_like(tensors[name])
    tensors[f"{mtp}.shared_head.head.weight"] = tensors["model.embed_tokens.weight"].clone()
    model = build_model(args, DictReader(tensors), device="cpu")
    assert model.new_cache(1, 8, mtp=True).buffers[0][1].shape[-1] == args.index_head_dim
    ids = _prompt(args.vocab_size, length=9, seed=3)
    got, stats = generate_speculative(model, ids, 12, prefill_chunk=4)
    assert torch.equal(got, model.generate(ids, 12))
    lens = [9, 6]
    rows, ragged = generate_speculative(model, ids, 12, prompt_lens=lens)
    for b, n in enumerate(lens):
        assert torch.equal(rows[b, : n + 12], model.generate(ids[b : b + 1, :n], 12)[0])
    assert stats.accepted >= 3 and ragged.accepted >= 3 and stats.steps > stats.accepted  # kept and rejected
