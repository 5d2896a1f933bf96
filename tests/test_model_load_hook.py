"""The model core's load hook: ``Backend.prepare_weight`` is called once per weight the model
hands to an op the backend serves, after the precision policy, and what it returns is kept.

The cpu backend's default returns each weight unchanged; here its hook is replaced by one that
changes only the layout (a transposed copy viewed back), the kind of thing a device backend
does (Ascend's NZ cast: plugins/ascend/tests/test_ascend_load_hook.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dshal.backends.cpu import CpuBackend
from dshal.errors import DeviceError, DTypeError, ShapeError
from dshal.model import from_pretrained, tiny_args
from dshal.model.checkpoint import random_checkpoint, save_checkpoint
from dshal.model.loader import prepare_for_backend

ARGS = tiny_args(num_hidden_layers=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hook")
    save_checkpoint(root, ARGS, random_checkpoint(ARGS, seed=1))
    return root


def test_default_hook_keeps_every_weight(checkpoint):
    backend = CpuBackend()
    weight = torch.randn(4, 8)
    assert backend.prepare_weight("layers.0.mlp.down_proj.weight", weight, "linear.weight") is weight
    model = from_pretrained(checkpoint, {"backend": "cpu"})
    runtime = SimpleNamespace(backend=backend, providers={"linear": "cpu", "moe_experts": "cpu"})
    assert prepare_for_backend(model, runtime) == 0


def test_build_model_hands_each_op_weight_to_the_hook_once(checkpoint, monkeypatch):
    seen: list[tuple[str, str]] = []

    def transposed_layout(self, name, weight, role):
        seen.append((name, role))
        return weight.t().contiguous().t() if weight.dim() == 2 else weight

    reference = from_pretrained(checkpoint, {"backend": "cpu"})
    monkeypatch.setattr(CpuBackend, "prepare_weight", transposed_layout)
    model = from_pretrained(checkpoint, {"backend": "cpu"})
    names = [n for n, _ in seen]
    assert len(names) == len(set(names))  # once each
    roles = dict(seen)
    assert roles["layers.0.self_attn.o_proj.weight"] == "linear.weight"
    assert roles["lm_head.weight"] == "linear.weight"
    assert roles["layers.1.mlp.experts.w13"] == "moe_experts.w13" and roles["layers.1.mlp.experts.w2"] == "moe_experts.w2"
    assert not any("kv_b_proj" in n for n in names)  # MLA reads kv_b_proj's weight itself
    assert not any(n.endswith("_scale") for n in names)  # high precision: no scales to hand over
    o_proj = model.layers[0].self_attn.o_proj.weight
    assert o_proj.t().is_contiguous() and not o_proj.is_contiguous()  # the hook's result is what the model holds
    ids = torch.randint(0, ARGS.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (lambda w: w.t(), ShapeError, (r"prepare_weight\('layers.0.self_attn.o_proj.weight', role linear.weight\) "
                                       r"returned shape \[\d+, \d+\], expected")),
        (lambda w: w.to(torch.float16), DTypeError, "returned dtype torch.float16, expected"),
        (lambda w: w.to("meta"), DeviceError, "returned a tensor on meta, expected cpu"),
    ],
)
def test_a_hook_that_changes_more_than_the_layout_is_refused(checkpoint, bad, error, message):
    model = from_pretrained(checkpoint, {"backend": "cpu"})
    o_proj = model.layers[0].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)  # not square: a transpose shows
    backend = SimpleNamespace(name="dev", prepare_weight=lambda name, w, role: bad(w) if "o_proj" in name else w)
    with pytest.raises(error, match=message):
        prepare_for_backend(model, SimpleNamespace(backend=backend, providers={"linear": "dev"}))
