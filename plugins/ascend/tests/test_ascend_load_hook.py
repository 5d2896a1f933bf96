"""Ascend's load hook (``Backend.prepare_weight``) and its device index, without an NPU.

The hook runs through the signature-checking stand-in (not an NPU: ``npu_format_cast`` is bound
against each release's schema and computed as a plain copy), on the weights the model core
loads from a ``dshal-ascend-convert`` checkpoint. What is asserted: each int8 linear weight is
transposed and cast once, at load, held once (the original is freed, no copy is made at the
first call), and the model's numbers do not change. ``device()`` follows ``LOCAL_RANK`` the way
the GPU backends do; the index is computed here without torch_npu, never by faking an NPU.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import dshal.ops.reference as ref
from dshal.errors import DeviceError
from dshal.model import from_pretrained, tiny_args
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint
from dshal.model.loader import prepare_for_backend
from dshal.model.model import MLA, Linear
from dshal_ascend import AscendBackend, layouts
from dshal_ascend.convert import convert_checkpoint
from dshal_ascend.npu_ops import AscendOps
from dshal_ascend.probe import torch_npu_installed
from dshal_ascend.releases import kernel_features
from dshal_ascend.schema import recorded_releases, recorded_signatures
from dshal_ascend.standin import SignatureCheckingStandIn

RELEASES = recorded_releases()


def _ops(release: str) -> tuple[AscendOps, SignatureCheckingStandIn]:
    stand_in = SignatureCheckingStandIn(recorded_signatures(release))
    return AscendOps(kernel_features(release), stand_in), stand_in


@pytest.mark.parametrize("release", RELEASES)
def test_ascend_int8_linear_weight_cast_to_nz_once_at_load_and_held_once(release):
    ops, stand_in = _ops(release)
    x, bias = torch.randn(5, 96, dtype=torch.bfloat16), torch.randn(40)
    wq, ws = ref.quantize_int8(torch.randn(40, 96) * 0.05)
    original = wq.clone()
    gone = weakref.ref(wq)
    prepared = ops.prepare_weight("layers.0.mlp.down_proj.weight", wq, "linear.weight")
    del wq
    gc.collect()
    assert gone() is None  # the loaded [N, K] tensor is not kept by the hook: the weight is held once
    assert prepared.shape == (40, 96) and prepared.dtype == torch.int8 and torch.equal(prepared, original)
    assert stand_in.was_format_cast(prepared) and prepared.t().is_contiguous()  # an [N, K] view of NZ [K, N]
    cast = stand_in.called("npu_format_cast")
    assert len(cast) == 1 and cast[0].arguments["acl_format"] == 29 and cast[0].arguments["self"].shape == (96, 40)
    for _ in range(2):
        torch.testing.assert_close(ops.linear(x, prepared, bias, ws).float(), ref.linear(x, original, bias, ws).float(),
                                   rtol=1.6e-2, atol=2e-2)
    assert len(stand_in.called("npu_format_cast")) == 1  # no further cast at the first (or any) call
    assert len(ops.prepared) == 0  # and no first-use copy
    x2 = [c.arguments["x2"] for c in stand_in.called("npu_quant_matmul")]
    assert len(x2) == 2 and all(t.data_ptr() == prepared.data_ptr() and t.shape == (96, 40) for t in x2)


def test_ascend_load_hook_leaves_other_weights_alone(monkeypatch):
    ops, stand_in = _ops("7.2.0")
    w13 = torch.randint(-127, 127, (4, 32, 16), dtype=torch.int8)
    assert ops.prepare_weight("layers.1.mlp.experts.w13", w13, "moe_experts.w13") is w13  # a transposed view per call
    bf16 = torch.randn(8, 16, dtype=torch.bfloat16)
    assert ops.prepare_weight("layers.0.self_attn.o_proj.weight", bf16, "linear.weight") is bf16
    fp8, _ = ref.quantize_fp8(torch.randn(128, 128), (128, 128), "e4m3fn")
    assert ops.prepare_weight("layers.0.self_attn.o_proj.weight", fp8, "linear.weight") is fp8  # dtype is the format
    scale = torch.rand(8, 1)
    assert ops.prepare_weight("layers.0.self_attn.o_proj.weight_scale", scale, "linear.weight_scale") is scale
    monkeypatch.setattr(layouts.split_ranges, "__defaults__", (32,))  # a weight past the kernel limit: tiles later
    big = torch.randint(-127, 127, (70, 80), dtype=torch.int8)
    assert ops.prepare_weight("lm_head.weight", big, "linear.weight") is big
    assert not stand_in.called("npu_format_cast")


@pytest.fixture(scope="module")
def w8a8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    args = tiny_args(num_hidden_layers=2, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
    args = args.__class__(**{**args.__dict__, "dtype": torch.bfloat16})
    save_checkpoint(root / "fp8", args, quantize_checkpoint_fp8(random_checkpoint(args, seed=7)))
    convert_checkpoint(root / "fp8", root / "int8")
    return root / "int8"


def test_ascend_load_hook_on_a_converted_w8a8_model(w8a8_checkpoint):
    """The core's load step hands every int8 linear weight but kv_b_proj (MLA reads it directly)
    to Ascend's hook once; the model keeps only the NZ copies and computes the same logits."""
    model = from_pretrained(w8a8_checkpoint, {"backend": "cpu"}, dtype=torch.float32)
    ids = torch.randint(0, model.args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    before = model(ids)
    ops, stand_in = _ops("7.2.0")
    ascend = SimpleNamespace(name="ascend", prepare_weight=ops.prepare_weight)
    runtime = SimpleNamespace(backend=ascend, providers={"linear": "ascend", "moe_experts": "ascend"})
    kv_b = {id(m.kv_b_proj) for m in model.modules() if isinstance(m, MLA)}
    int8_linears = [m for m in model.modules()
                    if isinstance(m, Linear) and m.weight.dtype == torch.int8 and id(m) not in kv_b]
    assert len(int8_linears) >= 8
    loaded = [weakref.ref(m.weight) for m in int8_linears]
    assert prepare_for_backend(model, runtime) == len(int8_linears)
    gc.collect()
    assert all(r() is None for r in loaded)  # the loaded weights are gone: each is held once, as NZ
    assert len(stand_in.called("npu_format_cast")) == len(int8_linears)  # once per weight, at load
    assert all(stand_in.was_format_cast(m.weight) for m in int8_linears)
    assert not any(stand_in.was_format_cast(m.kv_b_proj.weight) for m in model.modules() if isinstance(m, MLA))
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # only the layout changed
    # A backend that does not serve the op is not asked.
    runtime.providers = {"linear": "reference", "moe_experts": "cpu"}
    assert prepare_for_backend(model, runtime) == 0


@pytest.mark.skipif(torch_npu_installed(), reason="torch_npu is installed here: covers hosts without it")
def test_ascend_device_index_follows_local_rank(monkeypatch):
    backend = AscendBackend()
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert backend.local_device_index() == 0
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's 4th rank on this node -> npu:3
    assert backend.local_device_index() == 3
    monkeypatch.setenv("LOCAL_RANK", "-1")
    with pytest.raises(DeviceError, match="LOCAL_RANK is -1"):
        backend.local_device_index()
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(DeviceError, match="no NPU device here .*torch_npu not installed"):
        backend.device()  # the device itself needs torch_npu: a clear error, not a crash
