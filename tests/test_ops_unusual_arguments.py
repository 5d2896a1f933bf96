"""Arguments a fuzzer over every op found mishandled: valid but unusual ones must give the
reference's answer, impossible ones an error in the op's own words."""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal.errors import ArgumentError, ShapeError


def _moe_inputs(seed=0, experts=4, hidden=64, inter=32, tokens=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    weights = torch.rand(tokens, 2, generator=gen)
    ids = torch.randint(0, experts, (tokens, 2), generator=gen)
    return x, weights, ids, torch.randn(experts, 2 * inter, hidden, generator=gen) / 8


def test_cpu_moe_experts_takes_expert_weights_in_any_layout(clean_dshal_env):
    """torch._grouped_mm was chosen from the weights' sizes alone, and raised on strided or
    expanded ones ("strides should be multiple of 16 bytes", "Invalid strides/sizes")."""
    dshal.use(backend="cpu")
    x, weights, ids, w13 = _moe_inputs()
    w2_padded = torch.randn(4, 64, 33, generator=torch.Generator().manual_seed(1))[..., :32] / 8
    w13_expanded = w13[:, :1].expand(4, 64, 64)
    for a, b in ((w13, w2_padded), (w13_expanded, w2_padded.contiguous()), (w13.bfloat16(), w2_padded.bfloat16())):
        xs = x.to(a.dtype)
        got = dshal.ops.moe_experts(xs, weights, ids, a, b)
        want = dshal.ops.reference.moe_experts(xs, weights, ids, a, b)
        torch.testing.assert_close(got, want, rtol=1e-2 if a.dtype == torch.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("call", [
    lambda: dshal.ops.rms_norm(torch.randn(4, 256), torch.ones(256), 10**400),
    lambda: dshal.ops.attention(*(torch.randn(1, 2, 4, 16) for _ in range(3)), True, 10**400),
    lambda: dshal.ops.moe_gate(torch.randn(4, 8), None, 2, 1, 1, 10**400),
], ids=["rms_norm-eps", "attention-scale", "moe_gate-routed_scaling_factor"])
def test_a_huge_int_option_is_an_argument_error(call, clean_dshal_env):
    """math.isfinite(10**400) raised a bare OverflowError before the int bound was tested."""
    dshal.use(backend="cpu")
    with pytest.raises(ArgumentError, match="is 1000000000"):
        call()


@pytest.mark.parametrize("scale", [5e-324, 1e-46, 1e39, 1e308])
def test_an_attention_scale_float32_cannot_hold_is_refused(scale, clean_dshal_env):
    """Computed in float32, such a scale is 0 or inf: SDPA's causal path gave NaN everywhere where
    the reference gave a finite average (5e-324), or NaN in other places (1e308)."""
    dshal.use(backend="cpu")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ArgumentError, match="argument 'scale' is .*, expected a positive float that float32 holds"):
        dshal.ops.attention(q, q, q, True, scale)
    with pytest.raises(ArgumentError, match="float32 holds"):
        dshal.ops.reference.attention(q, q, q, True, scale)
    q64 = q.double()  # float64 attention computes in float64, which holds it
    torch.testing.assert_close(dshal.ops.attention(q64, q64, q64, True, scale),
                               dshal.ops.reference.attention(q64, q64, q64, True, scale), equal_nan=True)
    dshal.ops.attention(q, q, q, True, 1e-39)  # a float32 subnormal: held


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inputs_that_require_grad_are_refused_in_grad_mode_and_served_without_it(dtype, clean_dshal_env):
    """No op has a backward: in grad mode a tensor that requires grad lost its autograd for some
    shapes and dtypes and kept it for others (wrong gradients, no word); it is an ArgumentError
    naming the argument now. Under no_grad the same tensors are served: the cpu backend's
    half-split rotary path wrote with out= into views, which autograd refuses (a raw
    RuntimeError where the reference answers)."""
    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 8, 32, generator=gen).to(dtype)
    cos, sin = (torch.randn(8, 16, generator=gen).to(dtype) for _ in range(2))
    want = dshal.ops.reference.rotary_embedding(x, cos, sin, False)
    for name, args in (("x", (x.clone().requires_grad_(), cos, sin)), ("sin", (x, cos, sin.clone().requires_grad_()))):
        with pytest.raises(ArgumentError, match=rf"^rotary_embedding: argument '{name}' requires grad, .*inference-only"):
            dshal.ops.rotary_embedding(*args, False)
        with torch.no_grad():
            torch.testing.assert_close(dshal.ops.rotary_embedding(*args, False), want)
    weight = torch.nn.Linear(32, 4).weight  # a Parameter: requires grad
    with pytest.raises(ArgumentError, match="^linear: argument 'weight' requires grad"):
        dshal.ops.linear(x.float(), weight=weight)


def test_ops_under_autocast_keep_their_dtypes(clean_dshal_env):
    """torch.autocast turned the cpu provider's matmul to bf16 from 64 rows on: a ProviderError
    that blamed the provider ("returned its output as torch.bfloat16"). An op's dtypes are its
    contract: autocast is off inside it; the model under autocast gives its float32 logits."""
    from dshal.model import random_model, tiny_args

    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=gen)
    model = random_model(tiny_args(), seed=1)
    ids = torch.randint(0, model.args.vocab_size, (1, 5), generator=gen)
    want = model(ids)
    for rows in (2, 64):
        x = torch.randn(rows, 32, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dshal.ops.linear(x, w)
        assert got.dtype == torch.float32 and torch.equal(got, dshal.ops.linear(x, w))
    tokens = model.generate(ids, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids), want)
        assert torch.equal(model.generate(ids, 4), tokens)  # trusted decode steps too


@pytest.mark.needs_interpreter
def test_emulated_moe_experts_names_a_bad_id_in_the_ops_words(clean_dshal_env):
    """The Triton wrapper's check said 'grouped_moe_experts: ...', an internal name."""
    pytest.importorskip("dshal_nvidia", reason="the dshal-nvidia plugin is not installed")
    dshal.use(backend="nvidia", emulate=True)
    x, weights, ids, w13 = _moe_inputs(experts=4, hidden=64, inter=32)
    ids[3, 1] = -2
    with pytest.raises(ShapeError, match=r"^moe_experts: argument 'ids' holds expert id"):
        dshal.ops.moe_experts(x, weights, ids, w13, torch.randn(4, 64, 32) / 8)


def test_a_dtype_taken_from_another_argument_is_named_so(clean_dshal_env):
    """'argument 'k' has dtype torch.bfloat16, expected one of float64' did not say that q set it."""
    from dshal.errors import DTypeError

    dshal.use(backend="cpu")
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(DTypeError, match=r"argument 'k' has dtype torch.bfloat16, expected torch.float64 \(the dtype of 'q'\)"):
        dshal.ops.attention(q, k, k)
    with pytest.raises(DTypeError, match=r"argument 'residual' has dtype torch.float64, expected torch.float32 \(the dtype of 'x'\)"):
        dshal.ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, torch.randn(2, 8, dtype=torch.float64))


def test_a_moe_weight_shape_error_says_where_the_expected_shape_comes_from(clean_dshal_env):
    """A w13 with no intermediate rows blamed w2 ("expected [8, 128, 0]") without saying why."""
    dshal.use(backend="cpu")
    x, weights, ids, _ = _moe_inputs(experts=8, hidden=128)
    with pytest.raises(ShapeError, match=r"argument 'w2' has shape \[8, 128, 64\], expected \[8, 128, 0\] "
                                         r"\(\[E, H, I\]: E and 2I from 'w13' \[8, 0, 128\], H from 'x'\)"):
        dshal.ops.moe_experts(x, weights, ids, torch.randn(8, 0, 128), torch.randn(8, 128, 64))
