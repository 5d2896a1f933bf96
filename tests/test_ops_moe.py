"""moe_gate against HF transformers' DeepseekV3TopkRouter; moe_experts against HF's
DeepseekV3Experts and a per-token loop."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

import dshal
from dshal.errors import ArgumentError, DeviceError, DshalError, DTypeError, ShapeError
from dshal.ops import SPECS, reference as ref


def hf_config(experts=16, top_k=4, n_group=4, topk_group=2, scale=2.5, norm=True, hidden=16, inter=8):
    return DeepseekV3Config(
        hidden_size=hidden,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=norm,
        moe_intermediate_size=inter,
    )


def hf_route(logits, bias, cfg):
    """HF's router with an identity weight, so its router logits are ``logits``."""
    router = hf.DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.n_routed_experts))
        if bias is not None:
            router.e_score_correction_bias.copy_(bias)
    _, weights, ids = router(logits)
    return weights, ids


def by_id(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize(
    "experts, top_k, n_group, topk_group, norm, with_bias",
    [(16, 4, 4, 2, True, True), (16, 4, 4, 2, False, False), (64, 8, 8, 4, True, True), (8, 2, 1, 1, True, True), (12, 6, 3, 3, True, False)],
)
def test_moe_gate_matches_hf_router(experts, top_k, n_group, topk_group, norm, with_bias):
    g = torch.Generator().manual_seed(experts + top_k)
    logits = torch.randn(33, experts, generator=g)
    bias = torch.randn(experts, generator=g) * 0.5 if with_bias else None
    weights, ids = ref.moe_gate(logits, bias, top_k, n_group, topk_group, 2.5, norm)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (33, top_k)
    cfg = hf_config(experts, top_k, n_group, topk_group, 2.5, norm, hidden=experts)
    hw, hi = hf_route(logits, bias, cfg)
    w1, i1 = by_id(weights, ids)
    w2, i2 = by_id(hw, hi)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)
    # Best first by choice score; weights sum to the scaling factor when normalized.
    choice = torch.sigmoid(logits) + (0 if bias is None else bias)
    assert (choice.gather(1, ids).diff(dim=-1) <= 0).all()
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.full((33,), 2.5))


def test_moe_gate_bias_only_steers_choice_and_edge_sizes():
    logits = torch.zeros(2, 4)
    bias = torch.tensor([0.0, 5.0, 0.0, 3.0])
    weights, ids = ref.moe_gate(logits, bias, 2, 1, 1, 1.0, False)
    assert ids.tolist() == [[1, 3], [1, 3]]
    assert weights.tolist() == [[0.5, 0.5], [0.5, 0.5]]  # sigmoid(0), no bias
    w, i = ref.moe_gate(torch.empty(0, 8), None, 2, 2, 1, 1.0)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    w64, _ = SPECS["moe_gate"].run_oracle(logits, bias, 2, 1, 1, 1.0, True)
    assert w64.dtype == torch.float64


def moe_weights(experts, hidden, inter, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(experts, 2 * inter, hidden, generator=g) / 4).to(dtype), (torch.randn(experts, hidden, inter, generator=g) / 4).to(dtype)


def loop_experts(x, weights, ids, w13, w2):
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            gate, up = w13[e, :inter].double() @ x[t].double(), w13[e, inter:].double() @ x[t].double()
            out[t] += weights[t, slot].double() * (w2[e].double() @ (gate * torch.sigmoid(gate) * up))
    return out


def test_moe_experts_matches_loop_and_hf_experts():
    torch.manual_seed(0)
    tokens, hidden, inter, experts = 11, 16, 8, 16
    x = torch.randn(tokens, hidden)
    weights, ids = ref.moe_gate(torch.randn(tokens, experts), None, 4, 4, 2, 2.5)
    w13, w2 = moe_weights(experts, hidden, inter, 1)
    got = ref.moe_experts(x, weights, ids, w13, w2)
    torch.testing.assert_close(got.double(), loop_experts(x, weights, ids, w13, w2), rtol=1e-5, atol=1e-5)
    hf_experts = hf.DeepseekV3Experts(hf_config(experts, 4, 4, 2, hidden=hidden, inter=inter))
    with torch.no_grad():
        hf_experts.gate_up_proj.copy_(w13)
        hf_experts.down_proj.copy_(w2)
        torch.testing.assert_close(got, hf_experts(x, ids, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SPECS["moe_experts"].run_oracle(x, weights, ids, w13, w2), loop_experts(x, weights, ids, w13, w2))


def test_moe_experts_bf16_repeated_ids_and_empty():
    x = torch.randn(5, 16).to(torch.bfloat16)
    w13, w2 = moe_weights(4, 16, 8, 2, torch.bfloat16)
    ids = torch.tensor([[0, 0], [3, 1], [3, 3], [1, 0], [2, 2]])
    weights = torch.rand(5, 2)
    got = ref.moe_experts(x, weights, ids.to(torch.int32), w13, w2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), loop_experts(x, weights, ids, w13, w2), rtol=3e-2, atol=3e-2)
    assert ref.moe_experts(x[:0], weights[:0], ids[:0], w13, w2).shape == (0, 16)


def test_moe_experts_fp8_weights_equal_per_expert_fp8_linear():
    torch.manual_seed(3)
    experts, hidden, inter = 3, 256, 136
    x = torch.randn(6, hidden)
    w13, w2 = moe_weights(experts, hidden, inter, 4)
    q13, s13 = ref.quantize_fp8(w13, (128, 128))
    q2, s2 = ref.quantize_fp8(w2, (128, 128))
    assert s13.shape == (3, 3, 2) and s2.shape == (3, 2, 2)
    ids, weights = torch.tensor([[0, 2]] * 3 + [[1, 0]] * 3), torch.rand(6, 2)
    got = ref.moe_experts(x, weights, ids, q13, q2, s13, s2)
    want = torch.zeros(6, hidden)
    for t in range(6):
        for slot in range(2):
            e = int(ids[t, slot])
            h = ref.linear(x[t : t + 1], q13[e], None, s13[e])
            y = ref.linear(ref.silu_and_mul(h), q2[e], None, s2[e])
            want[t] += weights[t, slot] * y[0]
    # Batched vs one-row matmuls round differently, which can flip an activation's FP8 rounding.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    exact = loop_experts(x, weights, ids, w13, w2)
    assert (got.double() - exact).abs().max() < 0.1 * exact.abs().max()


def test_moe_experts_int8_weights_equal_per_expert_w8a8():
    """int8 experts with per-channel scales ([E, 2I, 1], [E, H, 1]): each expert is two
    W8A8 products (activations quantized per token, as int8_gemm), on the reference and
    on the cpu backend; within int8's error of the float experts."""
    torch.manual_seed(4)
    experts, hidden, inter = 3, 64, 24
    x = torch.randn(5, hidden)
    w13, w2 = moe_weights(experts, hidden, inter, 6)
    q13, s13 = ref.quantize_int8(w13)
    q2, s2 = ref.quantize_int8(w2)
    assert s13.shape == (3, 48, 1) and s2.shape == (3, 64, 1)
    ids, weights = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]]), torch.rand(5, 2)
    got = ref.moe_experts(x, weights, ids, q13, q2, s13, s2)
    want = torch.zeros(5, hidden)
    for t in range(5):
        for slot in range(2):
            e = int(ids[t, slot])
            xq, xs = ref.quantize_int8(x[t : t + 1])
            h = ref.int8_gemm(xq, xs, q13[e], s13[e], torch.float32)
            aq, as_ = ref.quantize_int8(ref.silu_and_mul(h))
            want[t] += weights[t, slot] * ref.int8_gemm(aq, as_, q2[e], s2[e], torch.float32)[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    dshal.use(backend="cpu")
    torch.testing.assert_close(dshal.ops.moe_experts(x, weights, ids, q13, q2, s13, s2), got, rtol=1e-5, atol=1e-6)
    exact = loop_experts(x, weights, ids, w13, w2)
    assert (got.double() - exact).abs().max() < 0.05 * exact.abs().max()


X, W13, W2 = torch.ones(3, 16), torch.ones(4, 16, 16), torch.ones(4, 16, 8)
I13, I2 = torch.ones(4, 16, 16, dtype=torch.int8), torch.ones(4, 16, 8, dtype=torch.int8)
IDS, WTS = torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
BAD = [
    (lambda: ref.moe_gate(torch.ones(2, 8, dtype=torch.int32), None, 2, 2, 1, 1.0), DTypeError, "'logits' has dtype torch.int32"),
    (lambda: ref.moe_gate(torch.ones(2, 8), torch.ones(7), 2, 2, 1, 1.0), ShapeError, "'bias' has size 7"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 2, 3, 1, 1.0), ShapeError, "'n_group' is 3, expected a divisor of the 8 experts"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 2, 2, 3, 1.0), DshalError, "'topk_group' is 3, expected an int in [1, 2]"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 5, 2, 1, 1.0), DshalError, "'top_k' is 5, expected an int in [1, 4]"),
    (lambda: ref.moe_gate(torch.ones(2, 8), torch.ones(8, device="meta"), 2, 2, 1, 1.0), DeviceError, "'bias' is on meta"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 2, 2, 1, float("nan")), ArgumentError,
     "'routed_scaling_factor' is nan, expected a finite positive float"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 2, 2, 1, -2.5), ArgumentError, "'routed_scaling_factor' is -2.5"),
    (lambda: ref.moe_gate(torch.ones(2, 8), None, 2, 2, 1, 0.0), ArgumentError, "'routed_scaling_factor' is 0.0"),
    (lambda: ref.moe_experts(X.long(), WTS, IDS, W13, W2), DTypeError, "'x' has dtype torch.int64"),
    (lambda: ref.moe_experts(X, WTS, IDS.float(), W13, W2), DTypeError, "'ids' has dtype torch.float32"),
    (lambda: ref.moe_experts(X, WTS, IDS, W13, W2[:, :, :4]), ShapeError, "'w2' has shape [4, 16, 4], expected [4, 16, 8]"),
    (lambda: ref.moe_experts(X, WTS[:2], IDS, W13, W2), ShapeError, "'weights' has size 2 in dim 0"),
    (lambda: ref.moe_experts(X, WTS, IDS, W13.to(torch.float8_e4m3fn), W2), DshalError, "needs 'w13_scale'"),
    (lambda: ref.moe_experts(X, WTS, IDS, W13.to(torch.float8_e4m3fn), W2, torch.ones(4, 1, 2)), ShapeError, "expected [4, 1, 1]"),
    (lambda: ref.moe_experts(X, WTS, IDS, W13, W2.to("meta")), DeviceError, "'w2' is on meta"),
    (lambda: ref.moe_experts(X, WTS, IDS, I13, I2, None, torch.ones(4, 16, 1)), DshalError, "needs 'w13_scale' (per-channel scales)"),
    (lambda: ref.moe_experts(X, WTS, IDS, I13, I2, torch.ones(4, 1, 1), torch.ones(4, 16, 1)), ShapeError,
     "'w13_scale' has shape [4, 1, 1], expected [4, 16, 1] (one scale per output channel"),
    (lambda: ref.moe_experts(X, WTS, IDS, I13, W2.to(torch.float8_e4m3fn), torch.ones(4, 16, 1), torch.ones(4, 1, 1)), DTypeError,
     "mix int8 and other weights"),
    (lambda: ref.moe_experts(X, WTS, IDS + 4, W13, W2), ShapeError, "expert id 4, expected ids in [-1, 4)"),
    (lambda: ref.moe_experts(X, WTS, IDS - 2, W13, W2), ShapeError, "expert id -2"),
]


def test_moe_ops_reject_bad_inputs(bad_input):
    """Each call of the module's ``BAD`` raises its error class, with the fragment in the message."""
    bad_input.check()


def test_moe_ops_dispatch_on_cpu_backend():
    dshal.use(backend="cpu")
    logits, x = torch.randn(4, 16), torch.randn(4, 16)
    weights, ids = dshal.ops.moe_gate(logits, None, 4, 4, 2, 1.0)
    w13, w2 = moe_weights(16, 16, 8, 5)
    torch.testing.assert_close(dshal.ops.moe_experts(x, weights, ids, w13, w2), ref.moe_experts(x, weights, ids, w13, w2))
    assert SPECS["moe_experts"].cost_of(x, weights, ids, w13, w2).flops > 0


def test_ids_check_on_a_device_without_an_async_assert_reads_the_ids(monkeypatch):
    """Inside ``ops.trusted()`` the expert-id check is ``torch._assert_async``; on a device torch
    has no kernel for it (its dispatcher raises NotImplementedError, as for an out-of-tree
    backend without one) the check reads the ids on the host instead of failing the step.
    torch._assert_async is replaced by a function that raises that error: no device is faked."""
    from dshal.ops.spec import check_ids_in_range

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_assert_async' with arguments from the 'PrivateUse1' backend")

    monkeypatch.setattr(torch, "_assert_async", no_kernel)
    with dshal.ops.trusted():
        check_ids_in_range("moe_experts", "ids", torch.tensor([[0, 3]]), 4, "expert id", "w13 has 4 experts")
        with pytest.raises(ShapeError, match=r"'ids' holds an expert id outside \[0, 4\)"):
            check_ids_in_range("moe_experts", "ids", torch.tensor([[0, 4]]), 4, "expert id", "w13 has 4 experts")


@pytest.mark.parametrize("dtype,hidden,inter", [(torch.float32, 130, 66), (torch.bfloat16, 12, 10), ("fp8", 130, 66),
                                                (torch.float32, 64, 0)], ids=str)
def test_moe_experts_on_cpu_takes_rows_grouped_gemm_cannot(dtype, hidden, inter):
    """Widths whose rows are not a multiple of 16 bytes (and empty experts) are valid for the
    op: the cpu backend's grouped GEMM raised "strides should be multiple of 16 bytes" for
    them, from a model whose moe_intermediate_size was 66 as soon as a prompt had 2 tokens."""
    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(3)
    experts, tokens = 4, 5
    x = torch.randn(tokens, hidden, generator=gen)
    weights, ids = torch.rand(tokens, 2, generator=gen), torch.randint(0, experts, (tokens, 2), generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    scales = ()
    if dtype == "fp8":
        pairs = [[ref.quantize_fp8(w, (128, 128), "e4m3fn") for w in ws] for ws in (w13, w2)]
        (w13, s13), (w2, s2) = ((torch.stack([q for q, _ in p]), torch.stack([s for _, s in p])) for p in pairs)
        scales = (s13, s2)
    else:
        x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    got = dshal.ops.moe_experts(x, weights, ids, w13, w2, *scales)
    want = ref.moe_experts(x, weights, ids, w13, w2, *scales)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)
