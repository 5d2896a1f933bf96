"""Hostile checkpoints and generation requests (issue #16, classes 1, 2 and 6): every bad
input ends in a typed dshal error that names the key / tensor / argument, the value and
what was expected -- never a raw Python error, a terabyte allocation or garbage tokens."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import dshal
from dshal.errors import ArgumentError, CheckpointError, ConfigError, ShapeError
from dshal.model import ModelArgs, from_pretrained, tiny_args
from dshal.model.args import MAX_POSITIONS, validate_hf_config
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint

CONFIG = {"backend": "cpu", "precision": {"gemm": "bf16"}}
ARGS = tiny_args(num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_checkpoint(ARGS, seed=0, std=0.1)


@pytest.fixture(scope="module")
def checkpoint(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, ARGS, state)
    return path


def _config_file(tmp_path, cfg) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


# ----------------------------------------------------------------- class 1: config.json
BAD_KEYS = [
    ("intermediate_size", 256.5, "an integer"),
    ("vocab_size", True, "an integer"),
    ("hidden_size", "128", "an integer"),
    ("num_hidden_layers", -2, "an integer in [1,"),
    ("max_position_embeddings", 10**12, f"an integer in [1, {MAX_POSITIONS}]"),
    ("rope_theta", 0, "a finite number > 0"),
    ("rope_theta", -1.0, "a finite number > 0"),
    ("rms_norm_eps", float("nan"), "a finite number"),
    ("rope_scaling", "yarn", "a JSON object"),
    ("rope_scaling", {"type": "yarn", "factor": 0, "original_max_position_embeddings": 1024}, "factor: got 0, expected a finite number > 0"),
    ("rope_scaling", {"type": "yarn", "factor": -4, "original_max_position_embeddings": 1024}, "factor: got -4, expected"),
    ("rope_scaling", {"type": "yarn", "factor": float("nan")}, "factor: got nan, expected a finite"),
    ("rope_scaling", {"type": "yarn", "factor": 4, "original_max_position_embeddings": "1k"}, "embeddings: got '1k', expected an integer"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [128]}, "got [128], expected two positive integers"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [0, 128]}, "got [0, 128], expected two positive"),
    ("quantization_config", [1, 2], "a JSON object"),
    ("tie_word_embeddings", "no", "true or false"),
    ("model_type", 3, "a string"),
    ("rope_scaling", {"type": 3, "factor": 4}, "rope_scaling.type: got 3, expected a string"),  # named rope_type before
    ("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 1024}, "factor: got None, expected a finite"),
    # rope_type null beside type yarn: the reader takes YaRN, the checks took it for plain RoPE
    ("rope_scaling", {"rope_type": None, "type": "yarn", "factor": -4}, "factor: got -4, expected a finite number > 0"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_KEYS, ids=[f"{k}={v!r:.20}" for k, v, _ in BAD_KEYS])
def test_config_json_bad_value_names_key_value_expectation_and_file(tmp_path, key, value, expected):
    cfg = {**ARGS.to_hf_config(), key: value}
    path = _config_file(tmp_path, cfg)
    with pytest.raises(ConfigError) as caught:
        ModelArgs.from_file(tmp_path)
    msg = str(caught.value)
    assert msg.startswith(path), msg  # the file (and the line of the key)
    assert caught.value.line is not None and caught.value.key.split(".")[0] == key
    assert key in msg and expected in msg, msg
    if not isinstance(value, dict):  # nested values: `expected` quotes the leaf value
        shown = repr(value) if not isinstance(value, float) or not math.isnan(value) else "nan"
        assert f"got {shown}" in msg, msg


@pytest.mark.parametrize(("keys", "said"), [
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim is 15, expected a positive even integer"),
    ({"n_group": 3}, "n_group is 3, expected a positive divisor of n_routed_experts (8)"),
    ({"topk_group": 3}, "topk_group is 3, expected 1..n_group (2)"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok is 5, expected 1..topk_group * experts per group (4)"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu', expected 'silu' (SwiGLU)"),
    ({"dtype": "float64"}, "dtype is 'float64', expected one of float32, bfloat16, float16"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type is 'linear', expected 'yarn' or 'default'"),
])
def test_config_json_values_each_valid_alone_but_not_for_deepseek_v3_name_the_file(tmp_path, keys, said):
    """Checks past the per-key ones (a value of the right type that DeepSeek-V3 cannot be, or
    keys that must agree): the message names the file, the key, the value and what was expected."""
    path = _config_file(tmp_path, {**ARGS.to_hf_config(), **keys})
    with pytest.raises(ConfigError, match=re.escape(said)) as caught:
        ModelArgs.from_file(tmp_path)
    assert caught.value.file == path and str(caught.value).startswith(f"{path}: "), str(caught.value)


def test_config_json_that_is_not_json_names_the_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "vocab_size": 512,\n  "hidden_size": \n}')
    with pytest.raises(ConfigError, match=r"config\.json:4: invalid JSON: Expecting value") as caught:
        ModelArgs.from_file(tmp_path)
    assert caught.value.line == 4


@pytest.mark.parametrize("checkpoint_path", [123, None, b"/tmp/ckpt"])
def test_a_checkpoint_that_is_not_a_path_is_a_config_error(checkpoint_path):
    with pytest.raises(ConfigError, match=rf"checkpoint: got {re.escape(repr(checkpoint_path))} "
                                          rf"\({type(checkpoint_path).__name__}\), expected a folder path"):
        from_pretrained(checkpoint_path, CONFIG)


@pytest.mark.parametrize(("sizes", "said"), [
    ({"num_hidden_layers": 10**6}, "num_hidden_layers is 1000000, expected at most 4096"),
    ({"qk_rope_head_dim": 4096, "max_position_embeddings": 2**21}, "max_position_embeddings x qk_rope_head_dim is"),
    ({"vocab_size": 2**31 - 1, "hidden_size": 2**31 - 1}, "vocab_size x hidden_size (the embedding) is"),
])
def test_config_json_sizes_that_multiply_past_what_can_be_built_are_refused_at_once(tmp_path, sizes, said):
    """Each size in range, together too large: 10**6 layers took minutes and gigabytes to fail
    (every layer is built before a weight is read), a 140 KB checkpoint asked for 17 GB of
    rotary tables, and vocab x hidden crashed in torch ("Storage size calculation overflowed")."""
    import time

    _config_file(tmp_path, {**ARGS.to_hf_config(), **sizes})
    start = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(said)):
        ModelArgs.from_file(tmp_path)
    assert time.monotonic() - start < 5


def test_config_json_missing_size_is_an_error_not_a_default(tmp_path):
    cfg = ARGS.to_hf_config()
    del cfg["hidden_size"]
    path = _config_file(tmp_path, cfg)
    with pytest.raises(ConfigError, match="missing required key.*hidden_size") as caught:
        ModelArgs.from_file(tmp_path)
    assert caught.value.file == path


@pytest.mark.parametrize("document", [[1, 2], "text", 3])
def test_config_json_that_is_not_an_object(tmp_path, document):
    _config_file(tmp_path, document)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelArgs.from_file(tmp_path)


def test_config_json_file_level_errors_each_say_what_is_wrong(tmp_path, checkpoint):
    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "config.json").write_bytes(b'{"model_type": "deepseek_v3", "name": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 0xe9 at line 1"):
        ModelArgs.from_file(bad)
    with pytest.raises(ConfigError, match="checkpoint path is a file, expected a folder"):
        from_pretrained(checkpoint / "model.safetensors", CONFIG)
    runtime_config = tmp_path / "dshal.yaml"  # `dshal plan --config dshal.yaml`: the other kind of config
    runtime_config.write_text("backend: cpu\n")
    with pytest.raises(ConfigError, match=r"a \.yaml is a dshal runtime config \(dshal\.yaml\), not a model's config"):
        ModelArgs.from_file(runtime_config)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(ConfigError, match="symlink loop"):
        from_pretrained(loop, CONFIG)
    with pytest.raises(ConfigError, match="no such file"):
        from_pretrained(tmp_path / "nowhere", CONFIG)
    if os.geteuid() != 0:  # root reads anything: the permission case cannot be staged
        locked = tmp_path / "locked"
        locked.mkdir()
        (locked / "config.json").write_text("{}")
        (locked / "config.json").chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            ModelArgs.from_file(locked)


def test_validate_hf_config_accepts_what_to_hf_config_writes():
    cfg = ARGS.to_hf_config()
    assert validate_hf_config(json.loads(json.dumps(cfg))) == cfg
    assert ModelArgs.from_hf_config(json.loads(json.dumps(cfg))) == ARGS


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"x": 3}, {"x": "../elsewhere.safetensors"}])
def test_index_file_weight_map_must_map_names_to_shard_files(tmp_path, checkpoint, weight_map):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        from_pretrained(tmp_path, CONFIG)


# ----------------------------------------------------------------- class 2: non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_non_finite_weights_raise_checkpoint_error_naming_the_tensor(tmp_path, state, bad, fp8, monkeypatch):
    tensors = dict(state)
    name = "model.layers.1.self_attn.o_proj.weight"
    if fp8:
        tensors = quantize_checkpoint_fp8(tensors)
        name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = bad
    save_checkpoint(tmp_path, ARGS, tensors)
    config = {**CONFIG, "precision": {"gemm": "fp8-block" if fp8 else "bf16"}}
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* non-finite .* index \[0, 0\]"):
        from_pretrained(tmp_path, config)
    monkeypatch.setenv("DSHAL_CHECK_FINITE", "0")  # the documented opt-out loads it as it is
    assert from_pretrained(tmp_path, config) is not None


def _spoiled_tensors(t: torch.Tensor):
    """Wrong versions of one checkpoint tensor, named (None: the tensor is missing)."""
    yield "missing", None
    yield "int64", t.to(torch.int64) if t.dtype != torch.int64 else t.float()
    yield "a leading dim added", t.unsqueeze(0)
    if t.shape[0] > 1:
        yield "first dim one short", t[:-1]
    if t.dim() >= 2 and t.shape[0] != t.shape[1]:  # a square one transposed has the right shape
        yield "transposed", t.t().contiguous()
    if t.dim() >= 2 and t.shape[-1] > 1:
        yield "last dim one short", t[..., :-1]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_every_checkpoint_tensor_missing_or_misshapen_is_refused_naming_it(state, fp8):
    """Each tensor of the checkpoint, spoiled one at a time, fails the load with a DshalError
    that names it (never a crash in a later matmul, never a silent load)."""
    from dshal.errors import DshalError
    from dshal.model.loader import DictReader, build_model

    dshal.use({"backend": "cpu"})
    tensors = quantize_checkpoint_fp8(state) if fp8 else dict(state)
    problems = []
    for name, tensor in tensors.items():
        for what, spoiled in _spoiled_tensors(tensor):
            checkpoint = {k: v for k, v in tensors.items() if k != name}
            if spoiled is not None:
                checkpoint[name] = spoiled
            try:
                build_model(ARGS, DictReader(checkpoint, "<spoiled>"))
            except DshalError as err:
                if name not in str(err):
                    problems.append(f"{name} {what}: the error does not name it: {err}")
            except Exception as err:  # noqa: BLE001 - the finding this test exists for
                problems.append(f"{name} {what}: {type(err).__name__}: {err}")
            else:
                problems.append(f"{name} {what}: loaded")
    assert not problems, "\n".join(problems[:20])


def test_fp8_nan_bit_pattern_in_weight_is_found(tmp_path, state):
    tensors = quantize_checkpoint_fp8(state)
    name = "model.layers.0.mlp.down_proj.weight"
    raw = tensors[name].clone().view(torch.uint8)
    raw[1, 2] = 0x7F  # e4m3fn NaN
    tensors[name] = raw.view(torch.float8_e4m3fn)
    save_checkpoint(tmp_path, ARGS, tensors)
    with pytest.raises(CheckpointError, match=rf"'{name}'.*index \[1, 2\]"):
        from_pretrained(tmp_path, {**CONFIG, "precision": {"gemm": "fp8-block"}})


# ----------------------------------------------------------------- class 6: generation bounds
@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint, CONFIG)


def _prompt(batch: int = 1, length: int = 4) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"max_new_tokens": 10**12}, ArgumentError, r"'max_new_tokens' is 1000000000000, expected at most 4092"),
        ({"max_new_tokens": -1}, ArgumentError, "'max_new_tokens' is -1"),
        ({"max_new_tokens": 2, "temperature": float("nan")}, ArgumentError, "'temperature' is nan"),
        ({"max_new_tokens": 2, "temperature": float("inf")}, ArgumentError, "'temperature' is inf"),
        ({"max_new_tokens": 2, "eos_token_id": 10**6}, ArgumentError, "'eos_token_id' is 1000000"),
    ],
)
def test_generate_rejects_bad_arguments_up_front(model, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        model.generate(_prompt(), **kwargs)


def test_generate_empty_batch_is_a_shape_error(model):
    with pytest.raises(ShapeError, match=r"input_ids' has shape \[0, 4\], expected \[B, T\] with B >= 1"):
        model.generate(torch.zeros(0, 4, dtype=torch.int64), 2)


def test_decode_step_with_out_of_range_id_is_checked_even_after_trusted_steps(model):
    prompt = _prompt()
    cache = model.new_cache(1, 16)
    model(prompt, 0, cache)
    good = torch.tensor([[3]])
    model(good, 4, cache)  # first decode step: checked, later ones run trusted
    model(good, 5, cache)
    for bad in (ARGS.vocab_size, -1):
        with pytest.raises(dshal.DshalError, match="token id"):
            model(torch.tensor([[bad]]), 6, cache)
    # and generate() still produces the same tokens with its own trusted steps
    torch.testing.assert_close(model.generate(prompt, 3), model.generate(prompt, 3), rtol=0, atol=0)


def test_cache_of_another_model_is_refused(model, tmp_path, state):
    other_args = ARGS.with_(kv_lora_rank=32)
    other = from_pretrained(save_checkpoint(tmp_path, other_args, random_checkpoint(other_args)), CONFIG)
    cache = other.new_cache(1, 16)
    with pytest.raises(ShapeError, match="made for another model"):
        model(_prompt(), 0, cache)


def test_cache_of_another_model_with_the_same_layout_is_refused(tmp_path):
    """Same dims, other weights: the layout matches, so the cache was taken and generation ran
    on keys and values another model wrote (its tokens silently differed from the model's own)."""
    from dshal.model import random_model, tiny_args
    from dshal.model.decode import StaticDecoder

    first, second = random_model(tiny_args(), seed=0), random_model(tiny_args(), seed=1)
    ids = torch.tensor([[1, 2, 3]])
    cache = first.new_cache(1, 10)
    first.generate(ids, 2, cache=cache)
    with pytest.raises(ShapeError, match="made by another model's new_cache"):
        second.generate(ids, 2, cache=cache, cached=2)
    with pytest.raises(ShapeError, match="made by another model's new_cache"):
        StaticDecoder(second, first.new_cache(1, 10, "absorb", static=True), lambda step: step)
    with pytest.raises(dshal.DTypeError, match="'cache' is str, expected a KVCache"):
        StaticDecoder(second, "x", lambda step: step)
    with pytest.raises(ArgumentError, match="argument 'cache' is a str, expected a KVCache"):
        second.generate(ids, 2, cache="x")
    assert second.generate(ids, 2, cache=second.new_cache(1, 10)).shape == (1, 5)  # its own still works


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda m: m.new_cache(1, 10**12), ArgumentError, r"'max_len' is 1000000000000, expected an int in \[1, 4096\]"),
        (lambda m: m.new_cache(0, 8), ArgumentError, "'batch' is 0"),
        (lambda m: m.new_cache(1, 8, "paged"), ArgumentError, "argument 'mode' is 'paged', expected 'absorb' or 'naive'"),
        (lambda m: m.new_cache(10**30, 8), ArgumentError, r"'batch' is 1000000000000000000000000000000, expected an int in \[1, 2\*\*63 - 1\]"),
        (lambda m: m(_prompt(), -1), ArgumentError, "'start_pos' is -1"),
        (lambda m: m(_prompt(), 0, {}), dshal.DTypeError, "'cache' is dict, expected a KVCache"),
        (lambda m: m.generate(torch.zeros(1, 5000, dtype=torch.int64), 0), ShapeError, "has 5000 tokens, expected at most"),
        # callbacks and generators of the wrong type: refused before the prefill (they failed after it)
        (lambda m: m.generate(_prompt(), 2, stream=5), ArgumentError, "argument 'stream' is a int, expected a callable"),
        (lambda m: m.generate(_prompt(), 2, on_token="x"), ArgumentError, "argument 'on_token' is a str, expected a callable"),
        (lambda m: m.generate(_prompt(), 2, 1.0, generator=5), ArgumentError, "'generator' is a int, expected a torch.Generator"),
    ],
)
def test_model_entry_points_reject_impossible_requests(model, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(model)


def test_static_decoder_checks_the_token_and_the_position_it_is_given():
    """A host position outside the cache was an IndexError from inside the step; a token count
    that is not the cache's batch, a torch copy error."""
    from dshal.model import random_model, tiny_args
    from dshal.model.decode import StaticDecoder

    model = random_model(tiny_args())
    decoder = StaticDecoder(model, model.new_cache(1, 8, "absorb", static=True), lambda step: step)
    for pos in (10**6, -1, 8, 2.0, True):
        with pytest.raises(ArgumentError, match=rf"argument 'pos' is {pos!r}, expected an int in \[0, 7\]"):
            decoder(torch.tensor([1]), pos)
    with pytest.raises(ArgumentError, match=r"argument 'token' is \[2\], expected 1 token id\(s\), one per row"):
        decoder(torch.tensor([1, 2]), 0)
    with pytest.raises(ArgumentError, match=r"argument 'token' has dtype torch.float32, expected integer token ids"):
        decoder(torch.tensor([1.7]), 0)  # was truncated to token 1
    assert decoder(torch.tensor([1]), 0).shape == (1, model.args.vocab_size)
    rows = StaticDecoder(model, model.new_cache(2, 8, "absorb", static=True), lambda step: step, per_row=True)
    with pytest.raises(ArgumentError, match=r"argument 'pos' holds a position outside \[0, 7\]"):
        rows(torch.tensor([1, 2]), torch.tensor([3, 99]))  # a host tensor: was an IndexError from index_copy_
    with pytest.raises(ArgumentError, match=r"argument 'pos' is a torch.int64 tensor of shape \[3\], expected 2"):
        rows(torch.tensor([1, 2]), torch.tensor([3, 4, 5]))
    with pytest.raises(ArgumentError, match=r"argument 'pos' is a torch.complex64 tensor"):
        rows(torch.tensor([1, 2]), torch.tensor([3, 4], dtype=torch.complex64))  # was "holds a position outside"
    assert rows(torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (2, model.args.vocab_size)
    hook_returning_none = StaticDecoder(model, model.new_cache(1, 8, "absorb", static=True), lambda step: None)
    with pytest.raises(ArgumentError, match=r"argument 'graph': the hook returned a NoneType, expected a callable"):
        hook_returning_none(torch.tensor([1]), 0)  # was TypeError: 'NoneType' object is not callable


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        (dict(rope_theta=0.0), "rope_theta is 0.0, expected a finite number > 0"),  # was math domain error
        (dict(rms_norm_eps=float("nan")), "rms_norm_eps is nan, expected a finite number > 0"),
        (dict(n_shared_experts=-1), "n_shared_experts is -1, expected an integer >= 0"),  # was a torch RuntimeError
        (dict(qk_nope_head_dim=-4), "qk_nope_head_dim is -4, expected an integer >= 0"),
        (dict(attention_window=2.5), r"attention.window is 2.5, expected null or an integer >= 1"),  # was TypeError
        (dict(attention_window=0), r"attention.window is 0, expected null or an integer >= 1"),  # was about global_tokens
        (dict(vocab_size=0), "vocab_size is 0, expected a positive integer"),
        (dict(hidden_size=128.0), "hidden_size is 128.0, expected a positive integer"),
        (dict(max_position_embeddings=0), r"max_position_embeddings is 0, expected an integer in \[1, 2097152\]"),
        (dict(q_lora_rank=-1), "q_lora_rank is -1, expected null or a positive integer"),
        (dict(mla_mode="paged"), "mla_mode is 'paged', expected 'absorb' or 'naive'"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers is -1, expected an integer >= 0"),
        (dict(attention_window=4, attention_global_tokens=4),
         r"attention.global_tokens is 4, expected fewer than attention.window \(4\)"),
    ],
)
def test_model_args_built_in_python_are_checked_like_config_json(changes, said):
    """ModelArgs made in Python (tiny_args(...), ModelArgs(...)) skip config.json's checks:
    these values got as far as a math domain error, a TypeError or a torch error."""
    with pytest.raises(ConfigError, match=said):
        tiny_args(**changes)


def test_rope_tables_on_meta_are_float32_whatever_the_default_dtype():
    """The meta path (shapes only, so a model build imports no triton) followed torch's
    default dtype, where the tables are float32 on every device."""
    from dshal.model import tiny_args
    from dshal.model.model import rope_tables

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        cos, sin = rope_tables(tiny_args(), "meta")
    finally:
        torch.set_default_dtype(previous)
    assert cos.is_meta and cos.dtype == sin.dtype == torch.float32
    assert cos.shape == rope_tables(tiny_args(), "cpu")[0].shape


def test_json_nested_past_the_decoders_limit_is_a_config_error(tmp_path):
    """A config.json, an index or a generation_config.json of "[[[[...]]]]" crashed with a
    RecursionError traceback (only JSONDecodeError was caught)."""
    from dshal.config import read_json_file

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(deep)
    with pytest.raises(ConfigError, match="checkpoint index: JSON nested too deeply"):
        read_json_file(tmp_path / "model.safetensors.index.json", "checkpoint index")
