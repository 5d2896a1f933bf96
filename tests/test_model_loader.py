"""Checkpoint loading: safetensors single file / sharded, per-expert and fused expert
layouts, MTP layers skipped, lazy slices, and clear errors for bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import dshal
from dshal.model import CheckpointError, CheckpointReader, DictReader, build_model, from_pretrained, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint
from dshal.model.loader import load_weights
from dshal.model.model import Transformer
from dshal.model.precision import convert_fp8_format, dequantize_weight

CONFIG = {"backend": "cpu", "precision": {"gemm": "bf16"}}
ARGS = tiny_args(num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_checkpoint(ARGS, seed=0, std=0.1)


def _ids() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))


def _logits(path) -> torch.Tensor:
    return from_pretrained(path, CONFIG)(_ids())


def test_model_loader_single_sharded_and_in_memory_agree(state, tmp_path):
    save_checkpoint(tmp_path / "one", ARGS, state)
    save_checkpoint(tmp_path / "shards", ARGS, state, max_shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "shards").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    want = _logits(tmp_path / "one")
    torch.testing.assert_close(_logits(tmp_path / "shards"), want, rtol=0, atol=0)
    dshal.use(CONFIG)
    in_memory = build_model(ARGS, DictReader(state))
    torch.testing.assert_close(in_memory(_ids()), want, rtol=0, atol=0)


def test_model_loader_reads_fused_expert_layout_and_skips_mtp_layers(state, tmp_path):
    save_checkpoint(tmp_path / "ref", ARGS, state)
    fused = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    prefix = "model.layers.1.mlp.experts"
    per = lambda proj: [state[f"{prefix}.{e}.{proj}.weight"] for e in range(ARGS.n_routed_experts)]  # noqa: E731
    fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(per("gate_proj"), per("up_proj"))])
    fused[f"{prefix}.down_proj"] = torch.stack(per("down_proj"))
    # an MTP layer (layer index == num_hidden_layers), as DeepSeek-V3's checkpoint has
    fused["model.layers.2.eh_proj.weight"] = torch.zeros(4, 4)
    fused["model.layers.2.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)
    save_checkpoint(tmp_path / "fused", ARGS.with_(num_nextn_predict_layers=1), fused)
    torch.testing.assert_close(_logits(tmp_path / "fused"), _logits(tmp_path / "ref"), rtol=0, atol=0)


def test_model_loader_reports_its_progress_in_order(state, tmp_path):
    """``from_pretrained(progress=...)`` (what ``dshal run``'s load bar draws) hears every
    module read, in order up to the total, then each module the precision policy converted
    (that phase was one step, 0/1 for most of a load converted on the host), then the
    placement and backend-layout phases, each started and done; the model is the one loaded
    without it."""
    from dshal.model.loader import LOADED_MODULES
    from dshal.model.model import Linear, RoutedExperts

    save_checkpoint(tmp_path, ARGS, state)
    calls: list[tuple[str, int, int]] = []
    model = from_pretrained(tmp_path, CONFIG, progress=lambda *call: calls.append(call))
    modules = sum(isinstance(m, LOADED_MODULES) for m in model.modules())
    assert modules > 10
    assert calls[:modules] == [("read", done, modules) for done in range(1, modules + 1)]
    converted = sum(isinstance(m, (Linear, RoutedExperts)) for m in model.modules())
    precision = [("precision", 0, 1)] + [("precision", done, converted) for done in range(1, converted + 1)]
    assert calls[modules : modules + converted + 1] == precision
    assert calls[modules + converted + 1 :] == [(phase, done, 1) for phase in ("place", "prepare") for done in (0, 1)]
    torch.testing.assert_close(model(_ids()), _logits(tmp_path), rtol=0, atol=0)


def test_model_reader_is_lazy_and_slices(state, tmp_path):
    save_checkpoint(tmp_path, ARGS, state, max_shard_bytes=300_000)
    reader = CheckpointReader(tmp_path)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    assert reader.shape(name) == tuple(state[name].shape) and reader.dtype(name) == torch.float32
    torch.testing.assert_close(reader.get_slice(name, (slice(8, 24), slice(None))), state[name][8:24])
    torch.testing.assert_close(reader.get(name), state[name])
    assert set(reader.names()) == set(state)


def _save_broken(tmp_path, state, **edits):
    broken = dict(state)
    for name, value in edits.items():
        if value is None:
            broken.pop(name)
        else:
            broken[name] = value
    save_checkpoint(tmp_path, ARGS, broken)
    return tmp_path


def test_model_loader_missing_tensor(state, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    path = _save_broken(tmp_path, state, **{name: None})
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}' \(expected shape \[64, 128\]"):
        from_pretrained(path, CONFIG)


def test_model_loader_mis_shaped_tensor(state, tmp_path):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    path = _save_broken(tmp_path, state, **{name: torch.zeros(10, 96)})
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[10, 96\], expected \[192, 96\]"):
        from_pretrained(path, CONFIG)


def test_model_loader_unexpected_tensor(state, tmp_path):
    path = _save_broken(tmp_path, state, **{"model.layers.0.mlp.surprise.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.mlp.surprise.weight"):
        from_pretrained(path, CONFIG)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.2.self_attn.q_a_proj.weight",  # an MTP layer config.json does not declare
        "model.layers.7.input_layernorm.weight",  # past the model's layers
        "model.layers.1.mlp.experts.8.up_proj.weight",  # an expert past n_routed_experts (8)
        "model.layers.0.mlp.surprise.weight",  # under no module
    ],
)
def test_model_loader_refuses_a_tensor_no_module_reads_before_reading_any(state, extra):
    """A tensor no module of the model can read needs no data to be refused: it was found
    after the whole checkpoint was read (~673 GB on DeepSeek-V3). Now before the first
    module is read, with the message the check after reading gives."""
    reads: list[str] = []

    class CountingReader(DictReader):
        def get(self, name):
            reads.append(name)
            return super().get(name)

    steps: list[tuple[str, int, int]] = []
    dshal.use(CONFIG)
    reader = CountingReader({**state, extra: torch.zeros(4)})
    with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\) '{extra}', not part of a DeepSeek-V3 model with 2 layers"):
        build_model(ARGS, reader, progress=lambda *step: steps.append(step))
    assert not [step for step in steps if step[0] == "read"] and reads == []


def test_model_loader_missing_tensor_names_the_shard_the_index_places_it_in(state, tmp_path):
    """A tensor the index places in a shard that lacks it (a shard re-written, or half
    downloaded): the message says which shard to fetch again. An index that lists a tensor
    no shard has, and that the model does not need, still loads."""
    from safetensors.torch import load_file

    save_checkpoint(tmp_path, ARGS, state, max_shard_bytes=200_000)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    shard = data["weight_map"][name]
    # copies: the shard is rewritten below, and safetensors < 0.8 keeps loaded tensors mapped (SIGBUS)
    tensors = {key: t.clone() for key, t in load_file(str(tmp_path / shard)).items()}
    tensors.pop(name)
    save_file(tensors, str(tmp_path / shard), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=rf"missing tensor '{name}' \(expected shape \[64, 128\] for .*; model.safetensors.index.json places it in {shard}, ",
    ):
        from_pretrained(tmp_path, CONFIG)
    save_file({**tensors, name: state[name]}, str(tmp_path / shard), metadata={"format": "pt"})
    data["weight_map"]["model.layers.0.not_in_any_shard.weight"] = shard
    index.write_text(json.dumps(data))
    assert from_pretrained(tmp_path, CONFIG) is not None


def test_model_loader_wrong_dtype_and_missing_scale(state, tmp_path):
    name = "model.norm.weight"
    path = _save_broken(tmp_path / "dtype", state, **{name: torch.zeros(128, dtype=torch.int64)})
    with pytest.raises(CheckpointError, match=rf"'{name}' has dtype torch.int64, expected one of float32"):
        from_pretrained(path, CONFIG)
    fp8 = quantize_checkpoint_fp8(state)
    scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    fp8.pop(scale)
    save_checkpoint(tmp_path / "scale", ARGS, fp8)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{scale}' \(expected shape \[1, 1\]"):
        from_pretrained(tmp_path / "scale", CONFIG)


def test_model_loader_bad_directories(tmp_path, state):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(ARGS.to_hf_config()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_pretrained(tmp_path / "empty", CONFIG)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "config.json").write_text(json.dumps(ARGS.to_hf_config()))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "index" / "a.safetensors"))
    weight_map = {"x": "a.safetensors", "y": "b.safetensors"}
    (tmp_path / "index" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="shard 'b.safetensors' is listed but missing"):
        from_pretrained(tmp_path / "index", CONFIG)
    with pytest.raises(dshal.ConfigError, match="cannot read model config"):
        from_pretrained(tmp_path / "nowhere", CONFIG)


def test_model_precision_policy_and_fp8_formats(state):
    dshal.use(backend="cpu")
    from dshal.config import PrecisionConfig

    fp8 = quantize_checkpoint_fp8(state)
    row = build_model(
        ARGS, DictReader(fp8), PrecisionConfig(gemm="fp8-row", keep_high_precision=("*.o_proj", "lm_head"))
    )
    attn = row.layers[0].self_attn
    assert attn.q_b_proj.weight_scale.shape == (attn.q_b_proj.out_features, 1)
    assert attn.o_proj.weight.dtype == torch.float32 and attn.o_proj.weight_scale is None
    groups = row.describe()["precision_groups"]
    assert groups["routed experts"] == "fp8-block e4m3fn"  # moe_experts takes block scales only
    assert groups["attention"] == "float32 + fp8-row e4m3fn"
    layer0 = row.describe()["layers"][0]["precision"]
    assert layer0["self_attn.o_proj"] == "float32" and layer0["self_attn.q_a_proj"] == "fp8-row e4m3fn"

    fnuz = build_model(ARGS, DictReader(fp8), PrecisionConfig(gemm="fp8-block", fp8_format="e4m3fnuz"))
    assert fnuz.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fnuz
    w = fnuz.layers[1].self_attn.kv_b_proj
    assert w.weight.dtype == torch.float8_e4m3fnuz
    # e4m3fn -> e4m3fnuz of the checkpoint's weights is exact: same values after dequantization
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    torch.testing.assert_close(
        dequantize_weight(w.weight, w.weight_scale, torch.float32),
        dequantize_weight(fp8[name], fp8[name + "_scale_inv"], torch.float32),
        rtol=0,
        atol=0,
    )
    q = torch.tensor([[0x80, 0x01, 0x7E]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    converted, s = convert_fp8_format(q, torch.ones(1, 1), "e4m3fnuz")
    assert converted.float().mul(s).tolist() == [[0.0, q.float()[0, 1].item(), 448.0]]
    # every one of the 256 codes: the same value after the doubled scale (NaN stays NaN: fn's
    # 0x7F / 0xFF read as fnuz are +-240, and the loader's conversion made them so)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(1, 256)
    converted, s = convert_fp8_format(every, torch.ones(1, 1), "e4m3fnuz")
    want, got = every.float(), converted.float() * s
    assert torch.equal(want.isnan(), got.isnan()) and torch.equal(want.nan_to_num(), got.nan_to_num())


def test_gemm_auto_runs_each_checkpoint_in_its_own_format(state):
    """auto: FP8-block stays FP8 (the checkpoint's bits), float stays high; explicit modes
    quantize on load; 'bf16' is the older name of 'high'; each choice says why."""
    from dshal.config import PrecisionConfig

    dshal.use(backend="cpu")
    fp8 = quantize_checkpoint_fp8(state)
    auto_fp8 = build_model(ARGS, DictReader(fp8), PrecisionConfig())
    choice = auto_fp8.describe()["precision"]
    assert choice["mode"] == "fp8-block" and "128x128 block scales" in choice["why"], choice
    attn = auto_fp8.layers[1].self_attn
    assert torch.equal(attn.o_proj.weight.view(torch.uint8), fp8["model.layers.1.self_attn.o_proj.weight"].view(torch.uint8))
    assert auto_fp8.lm_head.weight.dtype == torch.float32  # keep_high_precision still applies
    auto_float = build_model(ARGS, DictReader(state), PrecisionConfig())
    assert auto_float.describe()["precision"]["mode"] == "high"
    assert auto_float.layers[1].self_attn.o_proj.weight.dtype == torch.float32
    explicit = build_model(ARGS, DictReader(state), PrecisionConfig(gemm="fp8-block"))
    assert explicit.layers[1].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert "quantized on load" in explicit.describe()["precision"]["why"]
    for name in ("high", "bf16"):
        high = build_model(ARGS, DictReader(fp8), PrecisionConfig(gemm=name))
        assert high.describe()["precision"]["mode"] == "high" and high.layers[1].self_attn.o_proj.weight.dtype == torch.float32
    assert "'bf16' is the older name of 'high'" in high.describe()["precision"]["why"]


def test_gemm_auto_says_why_an_fp8_checkpoint_with_other_blocks_runs_high(state):
    """FP8 weights in 64x64 blocks are dequantized on load (the FP8 ops take 128x128): the
    reason said the checkpoint stored float32 + FP8 weights, as if it were high precision."""
    from dataclasses import replace

    from dshal.config import PrecisionConfig

    dshal.use(backend="cpu")
    args = replace(ARGS, weight_block_size=(64, 64))
    model = build_model(args, DictReader(quantize_checkpoint_fp8(state, 64)), PrecisionConfig())
    choice = model.describe()["precision"]
    assert choice["mode"] == "high" and "FP8 weights have 64x64 blocks" in choice["why"], choice
    assert "precision.gemm: fp8-block re-quantizes them" in choice["why"]
    requantized = build_model(args, DictReader(quantize_checkpoint_fp8(state, 64)), PrecisionConfig(gemm="fp8-block"))
    assert requantized.layers[1].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn


def test_a_random_model_follows_the_runtime_attention_window():
    """``attention:`` applied to checkpoints only: the built-in tiny model (``dshal run``,
    ``profile``, ``run --tp``) ran with full attention under a windowed config."""
    from dshal.model import random_model

    dshal.use(backend="cpu", attention={"window": 8, "global_tokens": 2})
    model = random_model(tiny_args(num_hidden_layers=1))
    assert (model.args.attention_window, model.args.attention_global_tokens) == (8, 2)
    assert model.describe()["kv_cache"]["window"] is not None
    assert random_model(tiny_args(num_hidden_layers=1, attention_window=4)).args.attention_window == 4  # its own


@pytest.mark.parametrize("gemm", ["high", "fp8-block", "int8"])
def test_weights_loaded_into_a_model_that_already_ran_are_the_ones_it_computes_with(gemm):
    """MLA keeps kv_b_proj's dequantized per-head form, and the cpu backend a float32 copy of
    FP8 weights: both were keyed on the parameter object, so ``load_state_dict`` (which copies
    into the same parameters) into a model that had run left it computing with the old weights
    (1.2 relative off, no warning). They follow in-place writes now. A model built under
    ``torch.inference_mode()`` (whose tensors keep no write counter) still runs."""
    from dshal.config import PrecisionConfig
    from dshal.model import random_model

    dshal.use(backend="cpu")
    precision = PrecisionConfig(gemm=gemm)
    source, warm = random_model(ARGS, seed=1, precision=precision), random_model(ARGS, seed=2, precision=precision)
    ids = torch.randint(0, ARGS.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    before = warm(ids)
    warm.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(warm(ids), source(ids)) and not torch.equal(before, source(ids))
    with torch.inference_mode():
        assert torch.isfinite(random_model(ARGS, seed=1, precision=precision)(ids)).all()


def test_a_moved_model_takes_its_own_new_cache_after_it_ran_on_the_old_device():
    """The layouts a model checks caches against name their device; a model that had run once
    kept them after ``.to(device)``, so every cache it made on the new device was refused as
    "made for another model" (a model built on the CPU, run, then moved to a GPU). The meta
    device stands in for the new device (the same code path)."""
    from dshal.model import random_model
    from dshal.runtime import reference_ops

    dshal.use(backend="cpu")
    model = random_model(ARGS, seed=1)
    ids = torch.tensor([[1, 2, 3]])
    model.generate(ids, max_new_tokens=2)  # checks a CPU cache: its layout is kept
    left_behind = model.new_cache(1, 8)
    model.to("meta")
    with reference_ops():  # the cpu backend takes no meta tensor
        logits = model(ids.to("meta"), 0, model.new_cache(1, 8))
        assert logits.device.type == "meta" and logits.shape == (1, 3, ARGS.vocab_size)
        with pytest.raises(dshal.ShapeError, match="made for another model"):  # a cache on the old device is refused
            model(ids.to("meta"), 0, left_behind)


def test_dtype_casts_of_a_loaded_model_are_refused_and_device_moves_pass():
    """``.bfloat16()`` converted the weights and the router but not ``args.dtype`` (the KV cache
    then refused bf16 queries with a DTypeError naming 'k'); on an FP8 model ``.float()``
    turned FP8 payloads into floats their scales no longer fit. Casts are refused, naming what
    to do; a cast to the same dtype and device moves pass."""
    from dshal.config import PrecisionConfig
    from dshal.model import random_model

    dshal.use(backend="cpu")
    model = random_model(ARGS, seed=1)
    ids = torch.randint(0, ARGS.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    want = model(ids)
    for cast in (model.bfloat16, model.half, model.double, lambda: model.to(torch.bfloat16)):
        with pytest.raises(dshal.ArgumentError, match=r"casting its float32 tensors to .*dtype=torch\."):
            cast()
    assert torch.equal(model.float().to("cpu")(ids), want)  # nothing was converted by the refused casts
    fp8 = random_model(ARGS, seed=1, precision={"gemm": "fp8-block"})  # a config's precision section
    with pytest.raises(dshal.ArgumentError, match="casting its float8_e4m3fn tensors to float32 .*gemm 'high'"):
        fp8.float()
    with pytest.raises(dshal.ArgumentError, match="argument 'precision': got int, expected a PrecisionConfig"):
        random_model(ARGS, precision=3)
    assert random_model(ARGS, precision="int8").describe()["precision"]["mode"] == PrecisionConfig(gemm="int8").gemm


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-row", "int8"])
@pytest.mark.parametrize("source", ["float32", "bfloat16", "fp8-block"])
def test_quantize_on_load_converts_an_expert_stack_one_expert_at_a_time(mode, source):
    """A whole layer's expert stack was dequantized to float32 and quantized in one call: 3-15x
    the stack in temporaries (~105 GiB for a DeepSeek-V3 w13). One expert at a time gives the
    same bits; the converter only ever sees one expert."""
    from dshal.model import precision as P
    from dshal.model.weights import dequantize_weight, int8_rows

    dshal.use(backend="cpu")
    w = torch.randn(5, 256, 384, generator=torch.Generator().manual_seed(0)) * 0.05
    weight, scale = (w, None) if source == "float32" else (w.bfloat16(), None)
    if source == "fp8-block":
        weight, scale = dshal.ops.reference.quantize_fp8(w, (128, 128), "e4m3fn")
    got = P._quantize(weight, scale, mode, "e4m3fnuz")
    if mode == "int8":
        want = int8_rows(weight, scale)
    elif mode == source:  # the checkpoint's own layout: its bits, re-expressed in the format
        want = P.convert_fp8_format(weight, scale, "e4m3fnuz")
    else:
        want = dshal.ops.quantize_fp8(dequantize_weight(weight, scale, torch.float32), P.WEIGHT_BLOCKS[mode], "e4m3fnuz")
    as_bits = lambda t: t if t.dtype == torch.int8 else t.view(torch.uint8)  # noqa: E731
    assert torch.equal(as_bits(got[0]), as_bits(want[0])) and torch.equal(got[1], want[1])
    seen = []

    def record(part, part_scale):
        seen.append(part.shape[0])
        return int8_rows(part, part_scale)

    P.per_expert(record, weight, scale)
    assert seen == [1] * 5
    # one value for the whole stack, of any rank, is shared (slicing it per expert left it empty)
    for one in (torch.tensor(0.01), torch.tensor([0.01]), torch.full((1, 1, 1), 0.01)):
        stack = (w / 0.01).clamp(-127, 127).round().to(torch.int8)
        q, s = P.per_expert(int8_rows, stack, one)
        torch.testing.assert_close(q.float() * s, stack.float() * 0.01, atol=2e-3, rtol=0)  # requantized per row


def _shards(folder, *shards: dict[str, torch.Tensor]):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ARGS.to_hf_config()))
    for number, tensors in enumerate(shards):
        save_file(tensors, str(folder / f"part{number}.safetensors"))
    return folder


def test_model_loader_bad_shards_name_the_file_and_the_tensor(tmp_path, state):
    """Shards without an index, a file that is no safetensors, a dtype safetensors has and dshal
    does not read: each a CheckpointError naming the checkpoint, the file or tensor, and why."""
    twice = _shards(tmp_path / "twice", dict(state), {"model.norm.weight": state["model.norm.weight"]})
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is in both part0.safetensors and part1.safetensors"):
        from_pretrained(twice, CONFIG)
    garbage = _shards(tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not a safetensors header")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file \("):
        from_pretrained(garbage, CONFIG)
    int16 = _shards(tmp_path / "int16", {**state, "model.norm.weight": state["model.norm.weight"].to(torch.int16)})
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' has dtype I16, which dshal cannot read"):
        from_pretrained(int16, CONFIG)


@pytest.mark.parametrize("make_reader", [lambda folder, state: CheckpointReader(folder),
                                         lambda folder, state: DictReader(state, path=str(folder))],
                         ids=["files", "in-memory"])
def test_reader_asked_for_a_tensor_it_lacks_names_it(tmp_path, state, make_reader):
    reader = make_reader(_shards(tmp_path / "ckpt", dict(state)), state)
    for read in (reader.get, reader.shape):
        with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path / 'ckpt'}: missing tensor 'model.nope.weight'"):
            read("model.nope.weight")


def test_load_weights_names_a_parameter_no_checkpoint_tensor_fills(state):
    """A model given a parameter of its own (an adapter) before loading: loading it would leave
    that parameter on the meta device, unloaded, and fail at the first forward."""
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.adapter = torch.nn.Parameter(torch.empty(4, device="meta"), requires_grad=False)
    with pytest.raises(CheckpointError, match="checkpoint <in-memory>: parameters left unloaded: adapter"):
        load_weights(model, DictReader(state))


def test_fp8_blocks_other_than_128x128_dequantize_each_tile_with_its_own_scale(state):
    """FP8 weights in 32-row x 64-column blocks (``weight_block_size [32, 64]``, partial tiles
    at the edges) load as each tile times its own ``weight_scale_inv``: the earlier test of such
    checkpoints (square 64x64 blocks) checked only the mode, so scales spread with the two
    block sizes swapped loaded other weights unseen."""
    from dataclasses import replace

    from dshal.config import PrecisionConfig
    from dshal.model.checkpoint import is_quantized_linear

    rows, cols = 32, 64
    stored, want = {}, {}
    for name, w in state.items():
        if not is_quantized_linear(name):
            stored[name] = w
            continue
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
        dense = torch.empty(w.shape)
        scale = torch.empty(-(-w.shape[0] // rows), -(-w.shape[1] // cols))
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = (slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols))
                scale[i, j] = w[tile].abs().amax() / 448
                q[tile] = (w[tile] / scale[i, j]).to(torch.float8_e4m3fn)
                dense[tile] = q[tile].float() * scale[i, j]
        stored[name], stored[name[: -len("weight")] + "weight_scale_inv"], want[name] = q, scale, dense
    model = build_model(replace(ARGS, weight_block_size=(rows, cols)), DictReader(stored), PrecisionConfig())
    attn, experts = model.layers[1].self_attn, model.layers[1].mlp.experts
    layer = "model.layers.1"
    for module, name in ((attn.q_b_proj, "self_attn.q_b_proj"), (attn.kv_a_proj_with_mqa, "self_attn.kv_a_proj_with_mqa"),
                         (attn.o_proj, "self_attn.o_proj")):
        assert torch.equal(module.weight, want[f"{layer}.{name}.weight"]), name
    gate_up = torch.cat([want[f"model.layers.0.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
    assert torch.equal(model.layers[0].mlp.gate_up_proj.weight, gate_up)
    for e in (0, 5):
        expert = f"{layer}.mlp.experts.{e}"
        assert torch.equal(experts.w13[e], torch.cat([want[f"{expert}.{p}.weight"] for p in ("gate_proj", "up_proj")]))
        assert torch.equal(experts.w2[e], want[f"{expert}.down_proj.weight"])


def test_a_random_model_with_attention_biases_reads_them():
    """random_checkpoint wrote no attention biases, so ``random_model`` of a config with
    ``attention_bias`` raised CheckpointError (missing ``q_a_proj.bias``)."""
    from dshal.model import random_model

    dshal.use(backend="cpu")
    args = tiny_args(num_hidden_layers=2, attention_bias=True)
    state = random_checkpoint(args, seed=1)
    attn = random_model(args, seed=1).layers[1].self_attn
    for module, proj in ((attn.q_a_proj, "q_a_proj"), (attn.kv_a_proj_with_mqa, "kv_a_proj_with_mqa"), (attn.o_proj, "o_proj")):
        bias = state[f"model.layers.1.self_attn.{proj}.bias"]
        assert bias.abs().sum() > 0 and torch.equal(module.bias, bias), proj
