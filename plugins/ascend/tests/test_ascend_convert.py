"""DeepSeek-V3 FP8 block checkpoint -> W8A8 int8 per output channel, on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dshal.ops.reference as ref
from dshal.errors import DTypeError, ShapeError
from dshal_ascend.convert import convert_state_dict, fp8_block_to_int8, main


def _fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Blocks of very different magnitudes, as in real checkpoints.
    block_gain = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.1
    gain = block_gain.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    dense = torch.randn(n, k, generator=g) * 0.02 * gain
    return ref.quantize_fp8(dense, (128, 128), "e4m3fn")


def test_ascend_int8_weight_close_to_fp8_weight():
    w, s = _fp8_weight(300, 520, 0)  # partial blocks on both axes
    q, scale = fp8_block_to_int8(w, s)
    assert q.dtype == torch.int8 and scale.shape == (300, 1) and scale.dtype == torch.float32
    fp8_dense = ref.dequantize_fp8(w, s, (128, 128), torch.float32)
    int8_dense = q.float() * scale
    # Per-channel int8 rounding error is at most half a step of the row's amax / 127.
    step = fp8_dense.abs().amax(dim=1, keepdim=True) / 127
    assert ((int8_dense - fp8_dense).abs() <= step * (0.5 + 1e-5)).all()


@pytest.mark.parametrize(("weight", "error", "said"), [
    (torch.zeros(128, 128, dtype=torch.bfloat16), DTypeError, "argument 'weight' has dtype torch.bfloat16, expected an FP8 dtype"),
    (torch.zeros(2, 64, 128).to(torch.float8_e4m3fn), ShapeError, r"argument 'weight' must be 2-D \[N, K\], got shape \[2, 64, 128\]"),
])
def test_ascend_fp8_block_to_int8_refuses_what_is_no_fp8_matrix(weight, error, said):
    with pytest.raises(error, match=f"fp8_block_to_int8: {said}"):
        fp8_block_to_int8(weight, torch.ones(1, 1))


def test_ascend_convert_refuses_to_write_over_its_source(tmp_path, capsys):
    src = tmp_path / "fp8"
    src.mkdir()
    w, s = _fp8_weight(128, 128, 5)
    save_file({"m.weight": w, "m.weight_scale_inv": s}, str(src / "model-00001-of-00001.safetensors"))
    before = (src / "model-00001-of-00001.safetensors").read_bytes()
    assert main([str(src), str(tmp_path / "." / "fp8"), "--quiet"]) == 1  # the same folder spelled otherwise
    said = capsys.readouterr()
    assert said.err == f"dshal-ascend-convert: error: convert: destination {tmp_path / '.' / 'fp8'} is the source; choose another directory\n"
    assert said.out == ""  # stdout holds the progress lines, and the error was printed there
    assert (src / "model-00001-of-00001.safetensors").read_bytes() == before


def test_ascend_int8_linear_close_to_fp8_linear():
    w, s = _fp8_weight(256, 384, 1)
    q, scale = fp8_block_to_int8(w, s)
    x = torch.randn(7, 384, dtype=torch.bfloat16)
    with_int8 = ref.linear(x, q, None, scale).float()  # W8A8: int8 weight, per-token int8 x
    with_fp8 = ref.linear(x, w, None, s).float()  # the FP8 path (x rounded to e4m3 per 1x128)
    exact = x.float() @ ref.dequantize_fp8(w, s, (128, 128), torch.float32).t()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(with_int8, exact) < 2e-2  # conversion + W8A8 + bf16 output rounding
    assert rel(with_int8, with_fp8) < 5e-2  # the FP8 path's own e4m3 activation error dominates
    assert rel(with_int8, exact) < rel(with_fp8, exact)


def test_ascend_convert_state_dict_pairs_and_passthrough():
    w, s = _fp8_weight(128, 256, 2)
    norm = torch.ones(256, dtype=torch.bfloat16)
    out = convert_state_dict({"l.0.q_proj.weight": w, "l.0.q_proj.weight_scale_inv": s, "l.0.norm.weight": norm})
    assert set(out) == {"l.0.q_proj.weight", "l.0.q_proj.weight_scale", "l.0.norm.weight"}
    assert out["l.0.q_proj.weight"].dtype == torch.int8 and out["l.0.norm.weight"] is norm
    with pytest.raises(ShapeError, match="no block scale"):
        convert_state_dict({"a.weight": w})
    with pytest.raises(ShapeError, match="no weight"):
        convert_state_dict({"a.weight_scale_inv": s})


def test_ascend_convert_checkpoint_directory(tmp_path):
    src, dst = tmp_path / "fp8", tmp_path / "int8"
    src.mkdir()
    w, s = _fp8_weight(128, 128, 3)
    save_file({"m.weight": w, "m.weight_scale_inv": s, "e.weight": torch.zeros(4, 8)}, str(src / "model-00001-of-00001.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}))
    (src / "tokenizer.json").write_text("{}")
    assert main([str(src), str(dst)]) == 0
    tensors = load_file(str(dst / "model-00001-of-00001.safetensors"))
    assert tensors["m.weight"].dtype == torch.int8 and tensors["m.weight_scale"].shape == (128, 1)
    assert "m.weight_scale_inv" not in tensors
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["dshal_quantization"]["scheme"] == "w8a8-int8"
    assert (dst / "tokenizer.json").exists()
    assert main([str(tmp_path / "missing"), str(dst)]) == 1


def test_ascend_convert_reads_config_and_index_before_the_shards(tmp_path, capsys):
    """A config.json that is not a JSON object crashed with a TypeError traceback after every
    shard was converted (an hour on DeepSeek-V3), leaving shards and no config. It is refused
    first, with a message and exit 1, and nothing is written."""
    src, dst = tmp_path / "fp8", tmp_path / "int8"
    src.mkdir()
    w, s = _fp8_weight(128, 128, 4)
    save_file({"m.weight": w, "m.weight_scale_inv": s}, str(src / "model-00001-of-00001.safetensors"))
    for name, text, said in (("config.json", '["not an object"]', "a JSON list, expected an object"),
                             ("model.safetensors.index.json", "{not json", "not a readable JSON file")):
        (src / name).write_text(text)
        assert main([str(src), str(dst), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert said in err and name in err and not dst.exists(), err
        (src / name).unlink()


def test_ascend_convert_reports_each_shard_with_an_estimate(tmp_path, capsys):
    """Hours on a full checkpoint: one line per shard, with what is left."""
    src, dst = tmp_path / "fp8", tmp_path / "int8"
    src.mkdir()
    for i, rows in ((1, 128), (2, 256)):
        w, s = _fp8_weight(rows, 128, i)
        save_file({f"m{i}.weight": w, f"m{i}.weight_scale_inv": s}, str(src / f"model-0000{i}-of-00002.safetensors"))
    assert main([str(src), str(dst)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] model-00001-of-00002.safetensors: 1 weights -> int8 in ") and "left" in lines[0]
    assert lines[1].startswith("[2/2] model-00002-of-00002.safetensors: 1 weights -> int8 in ") and "in all" in lines[1]
    assert lines[2].startswith("converted 2 weights to int8")
    assert main([str(src), str(tmp_path / "again"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("converted 2 weights")


def test_ascend_convert_estimate_is_the_mean_shard_so_far():
    from dshal_ascend.convert import ShardDone

    assert ShardDone(1, 4, "a", 3, 10.0, 10.0).line() == "[1/4] a: 3 weights -> int8 in 10.0 s; ~30 s left"
    assert ShardDone(2, 163, "b", 5, 50.0, 100.0).line().endswith("; ~2.2 h left")  # 50 s x 161 shards = 8050 s
    assert ShardDone(3, 3, "c", 0, 1.0, 90.0).line().endswith("; 1.5 min in all")


def test_ascend_convert_bf16_checkpoint_layout():
    """A bf16 checkpoint: every projection (experts in the per-expert HF layout included) becomes
    int8 [N, K] + float32 weight_scale [N, 1]; embedding, lm_head, router and norms stay."""
    torch.manual_seed(2)
    names = {
        "model.embed_tokens.weight": (32, 16),
        "lm_head.weight": (32, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (12, 16),
        "model.layers.0.self_attn.o_proj.weight": (16, 24),
        "model.layers.1.mlp.gate.weight": (4, 16),
        "model.layers.1.mlp.experts.3.gate_proj.weight": (8, 16),
        "model.layers.1.mlp.experts.3.down_proj.weight": (16, 8),
        "model.layers.1.mlp.shared_experts.up_proj.weight": (8, 16),
    }
    tensors = {n: torch.randn(*shape, dtype=torch.bfloat16) for n, shape in names.items()}
    out = convert_state_dict(tensors)
    for name, shape in names.items():
        if name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight"):
            scale = out[name[: -len("weight")] + "weight_scale"]
            assert out[name].dtype == torch.int8 and out[name].shape == shape
            assert scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
            err = (out[name].float() * scale - tensors[name].float()).abs()
            assert bool((err <= scale / 2 + 1e-6).all())  # half an int8 step per row
        else:
            assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], tensors[name])
