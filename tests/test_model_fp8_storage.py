"""FP8 checkpoints on a backend that cannot hold float8 tensors on its device
(``Capabilities.fp8_storage`` False, as Ascend declares for the 910B).

The backend is ``tests/fixtures/core_plugins/no_fp8_storage.py``: the cpu backend's ops under
a plugin that declares no FP8 storage, found through a real entry point. Its device is the CPU,
so where a test needs a device that is not the host it loads onto ``meta`` (shapes and dtypes
only) and checks where each tensor was held on the way; no NPU is faked.
"""

from __future__ import annotations

import json

import pytest
import torch

import dshal
from dshal import cli
from dshal.backend import Capabilities
from dshal.comm import SimulatedGroup
from dshal.config import PrecisionConfig
from dshal.errors import ConfigError, DeviceError
from dshal.model import DictReader, build_model, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint
from dshal.model.loader import load_weights, place_on_device
from dshal.model.model import Transformer
from dshal.model.precision import apply_precision
from dshal.model.weights import conversion_ops
from dshal.ops import reference as ref
from dshal.ops.spec import FP8_DTYPES
from dshal.parallel.groups import ParallelGroups, plan_groups
from dshal.parallel.loading import build_parallel

ARGS = tiny_args(num_hidden_layers=2, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
CHECKPOINT = quantize_checkpoint_fp8(random_checkpoint(ARGS, seed=7))
IDS = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
FP8 = set(FP8_DTYPES.values())


def _reader() -> DictReader:
    return DictReader(CHECKPOINT, path="<fp8 test checkpoint>")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.fixture
def no_fp8_storage(install_plugin):
    install_plugin("no_fp8_storage", {"nofp8test": "NoFp8StorageBackend"})
    yield dshal.use(backend="nofp8test")
    dshal.runtime.reset()


def test_auto_converts_on_the_host_to_int8_and_matches_the_old_conversion(no_fp8_storage):
    """Under ``gemm: auto`` the FP8 checkpoint becomes W8A8 int8 (the backend's
    ``fp8_checkpoint_gemm``), no float8 tensor is left anywhere, and the logits are bit for bit
    those of the same conversion done the old way (FP8 loaded onto the device, then
    ``apply_precision`` with the same declared capabilities, fp8_storage aside)."""
    assert no_fp8_storage.backend.capabilities().fp8_storage is False
    model = build_model(ARGS, _reader())
    assert not [name for name, t in _tensors(model).items() if t.dtype in FP8]
    choice = model.describe()["precision"]
    assert choice["mode"] == "int8" and "cannot hold float8 tensors" in choice["why"], choice
    attn, experts = model.layers[1].self_attn, model.layers[1].mlp.experts
    assert attn.q_b_proj.weight.dtype == torch.int8 and experts.w13.dtype == torch.int8 and experts.w2.dtype == torch.int8
    new = model(IDS)

    dshal.use(backend="cpu")  # the old way: FP8 on the device, converted there by the backend's ops
    old_model = build_model(ARGS, _reader())
    assert old_model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    no_units = Capabilities(fp8_formats=(), fp8_gemm_native=False, fp8_checkpoint_gemm="int8")
    apply_precision(old_model, PrecisionConfig(gemm="auto"), capabilities=no_units)
    assert torch.equal(new, old_model(IDS))


def test_fp8_payloads_stay_on_the_host_until_converted(no_fp8_storage):
    """Loading for a device that is not the host (``meta`` here): the FP8 payloads and their
    scales stay on the host, everything else goes to the device; the precision policy converts
    them on the host (by the op references); ``place_on_device`` then moves only converted
    tensors, and ``build_model`` does all three."""
    with torch.device("meta"):
        model = Transformer(ARGS)
    load_weights(model, _reader(), "meta", fp8_on_host=True)
    held = _tensors(model)
    on_host = {name for name, t in held.items() if t.device.type == "cpu"}
    assert on_host and all(held[n].dtype in FP8 or n.endswith("_scale") for n in on_host), on_host
    assert "layers.1.mlp.experts.w13" in on_host and "layers.1.mlp.experts.w13_scale" in on_host
    assert all(t.device.type == "meta" for n, t in held.items() if n not in on_host)
    assert all(t.device.type == "cpu" for t in held.values() if t.dtype in FP8)

    with pytest.raises(DeviceError, match="cannot hold float8 tensors"):  # never placed as float8
        place_on_device(model, "meta", fp8_storage=False)
    w13, w13_scale = held["layers.1.mlp.experts.w13"], held["layers.1.mlp.experts.w13_scale"]
    apply_precision(model, PrecisionConfig(gemm="auto"), device="meta")
    converted = _tensors(model)
    assert model.layers[1].mlp.experts.w13.dtype == torch.int8 and model.layers[1].mlp.experts.w13.device.type == "cpu"
    # converted on the host in slabs (int8_rows): the composed references' bits
    want_q, want_s = ref.quantize_int8(ref.dequantize_fp8(w13, w13_scale, (128, 128), torch.float32))
    assert torch.equal(converted["layers.1.mlp.experts.w13"], want_q)
    assert torch.equal(converted["layers.1.mlp.experts.w13_scale"], want_s)
    assert place_on_device(model, "meta", fp8_storage=False) > 0
    assert all(t.device.type == "meta" and t.dtype not in FP8 for t in _tensors(model).values())
    assert {n: t.dtype for n, t in converted.items()} == {n: t.dtype for n, t in _tensors(model).items()}

    built = build_model(ARGS, _reader(), device="meta")
    tensors = _tensors(built)
    assert all(t.device.type == "meta" and t.dtype not in FP8 for t in tensors.values())
    assert tensors["layers.1.self_attn.q_b_proj.weight"].dtype == torch.int8


def test_a_large_host_conversion_is_announced_with_its_cost(caplog):
    """Over an hour for DeepSeek-V3 on one thread: the loader says so before converting."""
    from dshal.model.loader import warn_host_conversion

    with torch.device("meta"):
        model = Transformer(ARGS)
    load_weights(model, _reader(), "meta", fp8_on_host=True)
    held = sum(t.numel() for t in _tensors(model).values() if t.dtype in FP8 and t.device.type == "cpu")
    with caplog.at_level("WARNING", logger="dshal"):
        assert warn_host_conversion(model, threshold=held + 1) == held and not caplog.records  # below: silent
        assert warn_host_conversion(model, threshold=held) == held
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "FP8 parameters are converted on the host" in message and "converted to int8 once" in message
    assert f"on {torch.get_num_threads()} thread(s)" in message


def test_host_weights_are_converted_by_the_references():
    """A weight held off the model's device is converted by the op references (the backend's
    providers take only tensors on its device); one on the device by the active runtime.
    Here the "host" is meta and the model's device the cpu backend's."""
    runtime = dshal.use(backend="cpu")
    held_off = torch.ones(2, 8, device="meta")
    with pytest.raises(DeviceError, match="'x' is on device meta"):
        dshal.ops.quantize_int8(held_off)  # the cpu backend's provider
    with conversion_ops(held_off, "cpu"):
        q, scale = dshal.ops.quantize_int8(held_off)  # the reference, wherever the tensor is
        assert q.device.type == "meta" and q.dtype == torch.int8
        assert dshal.current() is runtime  # backend, device and config stay the active runtime's
    assert dshal.current() is runtime
    with conversion_ops(torch.zeros(2, 8), "cpu"), pytest.raises(DeviceError):
        dshal.ops.quantize_int8(held_off)  # a weight on the device: the active runtime's ops


@pytest.mark.parametrize("mode", ["fp8-block", "fp8-row", "fp8-tensor"])
def test_explicit_fp8_mode_is_refused_with_what_to_use(no_fp8_storage, mode):
    with pytest.raises(ConfigError) as info:
        build_model(ARGS, _reader(), PrecisionConfig(gemm=mode))
    message = str(info.value)
    assert isinstance(info.value, dshal.DshalError)
    for fragment in ("precision.gemm", repr(mode), "'nofp8test'", "cannot hold float8 tensors on its device",
                     "auto", "int8", "high"):
        assert fragment in message, (fragment, message)


def test_high_and_int8_run_on_a_backend_without_fp8_storage(no_fp8_storage):
    high = build_model(ARGS, _reader(), PrecisionConfig(gemm="high"))
    assert high.layers[1].mlp.experts.w13.dtype == ARGS.dtype
    assert not [n for n, t in _tensors(high).items() if t.dtype in FP8]
    int8 = build_model(ARGS, _reader(), PrecisionConfig(gemm="int8"))
    assert int8.layers[1].mlp.experts.w13.dtype == torch.int8


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tensor_parallel_rank_converts_on_the_host_then_places_its_shards(no_fp8_storage, device):
    """``build_parallel`` (TP 2, rank 0, a simulated group: no process group needed to build):
    the FP8 checkpoint is converted on the host before sharding (int8 row scales span a
    row-parallel shard), only the shards are placed, none of them float8; on the CPU they are
    the single-process int8 model's slices."""
    groups = ParallelGroups(tp=SimulatedGroup(2, 0, "tp"), ep=None, tp_size=2, ep_size=1, plan=plan_groups(2, 2, 1))
    rank = build_parallel(ARGS, _reader(), groups, device=device)
    tensors = _tensors(rank)
    assert all(t.device.type == device and t.dtype not in FP8 for t in tensors.values())
    q_b = rank.layers[1].self_attn.q_b_proj
    assert q_b.weight.dtype == torch.int8 and rank.describe()["precision"]["mode"] == "int8"
    if device == "cpu":
        whole = build_model(ARGS, _reader()).layers[1].self_attn.q_b_proj
        rows = whole.weight.shape[0] // 2
        assert torch.equal(q_b.weight, whole.weight[:rows]) and torch.equal(q_b.weight_scale, whole.weight_scale[:rows])


def test_info_shows_the_capability(no_fp8_storage, capsys):
    assert cli.main(["info", "--backend", "nofp8test", "--json"]) == 0
    backends = {b["name"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert backends["nofp8test"]["capabilities"]["fp8_storage"] is False
    assert backends["cpu"]["capabilities"]["fp8_storage"] is True
    assert cli.main(["info", "--backend", "nofp8test"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "nofp8test: cpu (test backend declaring no float8 storage" in text
    assert "no float8 tensors on the device (fp8_storage false)" in text


def test_a_backend_declaring_no_fp8_format_refuses_fp8_weights_and_names_high_precision():
    """A plugin that declares FP8 units and storage but no FP8 format (an inconsistent but legal
    declaration): FP8 weights are refused at load, not met as an op's error at the first forward."""
    from dshal.model.precision import refuse_undeclared_fp8_format

    dshal.use(backend="cpu")
    model = Transformer(ARGS)
    load_weights(model, _reader(), "cpu")
    none_declared = Capabilities(fp8_formats=())
    with pytest.raises(ConfigError, match=r"declares the FP8 formats \[\] .*use precision.gemm: high"):
        apply_precision(model, PrecisionConfig(gemm="fp8-block"), capabilities=none_declared)
    refuse_undeclared_fp8_format("e4m3fn", Capabilities(fp8_formats=("e4m3fn",)))  # declared: no error
    # the fix names only formats precision.fp8_format can take (e5m2 is an op's format, not a weight's)
    with pytest.raises(ConfigError, match=r"use precision.fp8_format: auto \(e4m3fn\)$"):
        refuse_undeclared_fp8_format("e4m3fnuz", Capabilities(fp8_formats=("e4m3fn", "e5m2")))
    with pytest.raises(ConfigError, match=r"declares the FP8 formats \['e5m2'\] .*use precision.gemm: high"):
        refuse_undeclared_fp8_format("e4m3fn", Capabilities(fp8_formats=("e5m2",)))
    with pytest.raises(ConfigError, match=r"use precision.fp8_format: e4m3fnuz$"):  # its auto would be refused
        refuse_undeclared_fp8_format("e4m3fn", Capabilities(fp8_formats=("e4m3fnuz",), native_e4m3="e4m3fn"))
    assert apply_precision(model, PrecisionConfig(gemm="high"), capabilities=none_declared)  # stores no FP8
