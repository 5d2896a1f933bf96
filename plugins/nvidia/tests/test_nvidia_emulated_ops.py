"""The nvidia plugin's own op code, emulated (CPU tensors, Triton interpreter,
torch._scaled_mm on CPU), against the reference implementations. Small shapes: the
interpreter is slow. These paths are shared with the amd plugin (dshal.backends.triton_gpu)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import dshal
import dshal.plugin
from dshal.ops import reference as ref

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py


@pytest.fixture
def rt():
    runtime = dshal.use(backend="nvidia", emulate=True)
    assert runtime.emulated and runtime.device == torch.device("cpu")
    return runtime


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def similarity_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's 1 - 2*sum(xy) / sum(x^2 + y^2)."""
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def test_nvidia_emulated_capabilities(rt):
    caps = rt.capabilities
    assert caps.emulated and caps.arch == "sm_90" and caps.fp8_formats == ("e4m3fn", "e5m2")
    assert caps.dist_backend == "gloo"  # CPU tensors cannot travel over NCCL
    assert rt.backend.op_kind("quantize_fp8") == "triton" and rt.backend.op_kind("moe_gate") == "reference"
    assert rt.provider_kind("int8_gemm") == "fallback"


@pytest.mark.parametrize("shape, block", [((3, 300), (1, 128)), ((2, 5, 256), (1, 128)), ((200, 136), (128, 128)), ((130,), (1, 128))])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_nvidia_quantize_fp8_is_bit_identical(rt, shape, block, scale_fmt):
    x = torch.randn(shape, generator=gen(1)) * 3
    x.view(-1)[:7] = 0.0  # zeros keep their sign-free encoding
    q, s = dshal.ops.quantize_fp8(x, block, "e4m3", scale_fmt)
    q_ref, s_ref = ref.quantize_fp8(x, block, "e4m3fn", scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("shape", [(3 * 128,), (2, 3 * 128), (3 * 128 + 5,)])
def test_nvidia_quantize_fp8_rows_past_the_grid_limit(rt, shape, monkeypatch):
    """The kernel's grid puts a row's 128-blocks in grid.y (<= 65535 on CUDA and HIP): a 1-D x
    past 8.4M elements failed to launch on a GPU. Such a row now goes as rows of one block (the
    same blocks, bit for bit); one that does not split into whole blocks goes to the reference.
    The limit is lowered to 2 here: the interpreter is too slow for 8.4M elements."""
    import dshal.backends.triton_gpu as triton_gpu

    monkeypatch.setattr(triton_gpu, "MAX_GRID_Y", 2)
    grids = []
    quant = rt.backend.kernels().quant
    real_launch = quant.launch
    monkeypatch.setattr(quant, "launch", lambda kernel, grid, *a, **kw: (grids.append(grid), real_launch(kernel, grid, *a, **kw)))
    x = torch.randn(shape, generator=gen(4)) * 3
    q, s = dshal.ops.quantize_fp8(x, (1, 128), "e4m3")
    q_ref, s_ref = ref.quantize_fp8(x, (1, 128), "e4m3fn")
    assert q.shape == q_ref.shape and s.shape == s_ref.shape and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert all(grid[1] <= 2 for grid in grids) and (grids != []) == (shape[-1] % 128 == 0)


def test_nvidia_quantize_fp8_rowwise_and_e5m2_use_torch_math(rt):
    x = torch.randn(4, 40, generator=gen(2))
    for block, fmt in (((1, -1), "e4m3"), (None, "e4m3"), ((1, 128), "e5m2")):
        q, s = dshal.ops.quantize_fp8(x, block, fmt)
        q_ref, s_ref = ref.quantize_fp8(x, block, "e4m3fn" if fmt == "e4m3" else fmt)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def _fp8_operands(m: int, n: int, k: int, seed: int, b_fmt: str = "e4m3fn"):
    a = torch.randn(m, k, generator=gen(seed))
    b = torch.randn(n, k, generator=gen(seed + 1)) / math.sqrt(k)
    return ref.quantize_fp8(a, (1, 128), "e4m3fn"), ref.quantize_fp8(b, (128, 128), b_fmt)


@pytest.mark.parametrize("m, n, k", [(4, 256, 256), (33, 200, 300), (1, 16, 64)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_nvidia_fp8_gemm_block_triton(rt, m, n, k, out_dtype):
    (a, sa), (b, sb) = _fp8_operands(m, n, k, seed=3)
    got = dshal.ops.fp8_gemm(a, sa, b, sb, out_dtype)
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    assert got.dtype == out_dtype and got.shape == (m, n)
    tol = dict(rtol=1.6e-2, atol=1e-2) if out_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), want, **tol)
    assert similarity_gap(got, want) < 1e-5


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("m, n, k", [(32, 48, 256), (5, 20, 40)])  # the second is not a multiple of 16
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_nvidia_fp8_gemm_row_and_tensor(rt, granularity, m, n, k, out_dtype):
    block = (1, -1) if granularity == "row" else None
    a, sa = ref.quantize_fp8(torch.randn(m, k, generator=gen(4)), block, "e4m3fn")
    b, sb = ref.quantize_fp8(torch.randn(n, k, generator=gen(5)), block, "e5m2")  # E4M3 x E5M2 mixes
    got = dshal.ops.fp8_gemm(a, sa, b, sb, out_dtype)
    want = ref.fp8_gemm(a, sa, b, sb, torch.float64)
    assert got.dtype == out_dtype
    tol = dict(rtol=1.6e-2, atol=1e-2) if out_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_nvidia_fp8_gemm_row_and_tensor_through_the_block_kernel_do_not_overflow(rt, granularity):
    """K = 40 takes the block kernel with a's scale broadcast and b's applied after: a huge
    a-scale overflowed the float32 partial product before the tiny b-scale came in."""
    block = (1, -1) if granularity == "row" else None
    a, sa = ref.quantize_fp8(torch.randn(5, 40, generator=gen(6)), block, "e4m3fn")
    b, sb = ref.quantize_fp8(torch.randn(20, 40, generator=gen(7)), block, "e4m3fn")
    sa, sb = sa * 1e37, sb * 1e-9
    want = ref.fp8_gemm(a, sa, b, sb, torch.float64)
    assert torch.isfinite(want).all()
    got = dshal.ops.fp8_gemm(a, sa, b, sb, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_nvidia_fp8_gemm_odd_shapes_leave_scaled_mm(rt):
    # K = 40 is no multiple of 16: torch._scaled_mm on CUDA would refuse it. The plugin must
    # take the block path instead; CPU _scaled_mm accepts it, so prove the routing directly.
    backend = rt.backend
    a = torch.zeros(5, 40).to(torch.float8_e4m3fn)
    b = torch.zeros(20, 40).to(torch.float8_e4m3fn)
    plan = backend.gemm_plan()
    assert not backend._scaled_mm_fits(a, b, "row", torch.bfloat16, plan)
    assert backend._scaled_mm_fits(torch.zeros(5, 48).to(torch.float8_e4m3fn), torch.zeros(32, 48).to(torch.float8_e4m3fn), "row", torch.bfloat16, plan)
    e5 = torch.zeros(8, 32).to(torch.float8_e5m2)
    assert not backend._scaled_mm_fits(e5, torch.zeros(16, 32).to(torch.float8_e5m2), "tensor", torch.bfloat16, plan)


@pytest.mark.parametrize("with_bias", [False, True])
def test_nvidia_linear_fp8_block_weights(rt, with_bias):
    x = torch.randn(2, 3, 256, generator=gen(6)).to(torch.bfloat16)
    w, ws = ref.quantize_fp8(torch.randn(192, 256, generator=gen(7)) / 16, (128, 128), "e4m3fn")
    bias = torch.randn(192, generator=gen(8)).to(torch.bfloat16) if with_bias else None
    got = dshal.ops.linear(x, w, bias, ws)
    want = ref.linear(x, w, bias, ws)
    assert got.shape == (2, 3, 192) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)


def test_nvidia_linear_float_weights(rt):
    x = torch.randn(4, 64, generator=gen(9))
    w = torch.randn(32, 64, generator=gen(10))
    torch.testing.assert_close(dshal.ops.linear(x, w), ref.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_nvidia_rms_norm(rt, dtype, with_residual):
    x = torch.randn(3, 5, 96, generator=gen(11)).to(dtype)
    w = torch.randn(96, generator=gen(12)).to(dtype)
    res = torch.randn(3, 5, 96, generator=gen(13)).to(dtype) if with_residual else None
    got = dshal.ops.rms_norm(x, w, 1e-6, res)
    want = ref.rms_norm(x, w, 1e-6, res)
    tol = dict(rtol=1.6e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1.3e-6, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(got[0], want[0], **tol)
        assert torch.equal(got[1], want[1])  # the sum, rounded to x's dtype
    else:
        torch.testing.assert_close(got, want, **tol)


def test_nvidia_silu_and_mul(rt):
    x = torch.randn(4, 7, 2 * 48, generator=gen(14)).to(torch.bfloat16)
    torch.testing.assert_close(dshal.ops.silu_and_mul(x), ref.silu_and_mul(x), rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_nvidia_rotary_embedding(rt, interleaved):
    x = torch.randn(2, 3, 5, 64, generator=gen(15))
    angles = torch.randn(5, 32, generator=gen(16))
    got = dshal.ops.rotary_embedding(x, angles.cos(), angles.sin(), interleaved)
    torch.testing.assert_close(got, ref.rotary_embedding(x, angles.cos(), angles.sin(), interleaved), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize(
    "tq, tk, causal, window, global_tokens",
    [
        (6, 6, True, None, 0),  # SDPA's own causal mask
        (3, 8, True, None, 0),  # end-aligned: explicit mask
        (1, 8, True, None, 0),  # decode: no mask needed
        (8, 5, True, None, 0),  # queries before the first key see nothing -> zeros
        (8, 8, True, 3, 2),  # sliding window + global tokens
        (4, 9, False, 2, 1),  # non-causal band
        (5, 7, False, None, 0),
    ],
)
def test_nvidia_attention_masks(rt, tq, tk, causal, window, global_tokens):
    q = torch.randn(2, 4, tq, 16, generator=gen(17))
    k = torch.randn(2, 2, tk, 16, generator=gen(18))  # GQA: 2 query heads per kv head
    v = torch.randn(2, 2, tk, 8, generator=gen(19))  # Dv != D, as MLA
    got = dshal.ops.attention(q, k, v, causal, None, window, global_tokens)
    want = ref.attention(q, k, v, causal, None, window, global_tokens)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_nvidia_moe_experts(rt, fp8):
    tokens, hidden, inter, experts, top_k = 6, 128, 64, 4, 2
    x = torch.randn(tokens, hidden, generator=gen(20)).to(torch.bfloat16)
    weights = torch.rand(tokens, top_k, generator=gen(21))
    ids = torch.stack([torch.randperm(experts, generator=gen(22 + t))[:top_k] for t in range(tokens)])
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen(30)) / math.sqrt(hidden)
    w2 = torch.randn(experts, hidden, inter, generator=gen(31)) / math.sqrt(inter)
    if fp8:
        w13, s13 = ref.quantize_fp8(w13, (128, 128), "e4m3fn")
        w2, s2 = ref.quantize_fp8(w2, (128, 128), "e4m3fn")
    else:
        w13, w2, s13, s2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16), None, None
    got = dshal.ops.moe_experts(x, weights, ids, w13, w2, s13, s2)
    want = ref.moe_experts(x, weights, ids, w13, w2, s13, s2)
    assert got.shape == (tokens, hidden) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert similarity_gap(got, want) < 1e-4


def test_nvidia_serves_every_valid_input_its_kernels_cannot_take(rt):
    """Valid op inputs past a kernel's reach were a ShapeError / DTypeError naming the
    kernel wrapper: rows wider than rms_norm's block, more leading dims than rotary indexes,
    float64 routing weights and FP8 scales for the grouped MoE kernel."""
    x = torch.randn(2, 70000, generator=gen(40))
    torch.testing.assert_close(dshal.ops.rms_norm(x, torch.ones(70000)), ref.rms_norm(x, torch.ones(70000)))
    x6, cos, sin = torch.randn(2, 1, 2, 2, 3, 8, generator=gen(41)), torch.randn(3, 4, generator=gen(42)), torch.randn(3, 4, generator=gen(43))
    torch.testing.assert_close(dshal.ops.rotary_embedding(x6, cos, sin), ref.rotary_embedding(x6, cos, sin))
    tokens, hidden, inter, experts = 3, 128, 64, 3
    x = torch.randn(tokens, hidden, generator=gen(44)).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    weights = torch.rand(tokens, 2, generator=gen(45), dtype=torch.float64)
    w13, s13 = ref.quantize_fp8(torch.randn(experts, 2 * inter, hidden, generator=gen(46)) / 11, (128, 128), "e4m3fn")
    w2, s2 = ref.quantize_fp8(torch.randn(experts, hidden, inter, generator=gen(47)) / 8, (128, 128), "e4m3fn")
    got = dshal.ops.moe_experts(x, weights, ids, w13, w2, s13.double(), s2.double())
    want = ref.moe_experts(x, weights, ids, w13, w2, s13.double(), s2.double())
    assert similarity_gap(got, want) < 1e-4


def test_nvidia_fp8_nan_codes_propagate_as_on_tensor_cores(rt):
    """The interpreter decodes e4m3fn's NaN code 0x7F as 480: an emulated FP8 GEMM, an FP8
    linear whose activation held a NaN, and FP8 experts gave finite numbers where Hopper
    (and the reference) give NaN."""
    (a, sa), (b, sb) = _fp8_operands(4, 136, 256, seed=50)
    a = a.clone()
    a.view(torch.uint8)[1, 7] = 0x7F
    got, want = dshal.ops.fp8_gemm(a, sa, b, sb, torch.float32), ref.fp8_gemm(a, sa, b, sb, torch.float32)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[1].all() and not got.isnan()[0].any()
    x = torch.randn(3, 256, generator=gen(51))
    x[1, 5] = float("nan")
    w, ws = ref.quantize_fp8(torch.randn(136, 256, generator=gen(52)), (128, 128), "e4m3fn")
    assert torch.equal(dshal.ops.linear(x, w, None, ws).isnan(), ref.linear(x, w, None, ws).isnan())
    tokens, hidden, inter, experts = 3, 128, 64, 3
    x = torch.randn(tokens, hidden, generator=gen(53)).to(torch.bfloat16)
    x[1, 3] = float("nan")
    ids, weights = torch.tensor([[0, 1], [1, 2], [2, 0]]), torch.rand(tokens, 2, generator=gen(54))
    w13, s13 = ref.quantize_fp8(torch.randn(experts, 2 * inter, hidden, generator=gen(55)) / 11, (128, 128), "e4m3fn")
    w2, s2 = ref.quantize_fp8(torch.randn(experts, hidden, inter, generator=gen(56)) / 8, (128, 128), "e4m3fn")
    w2 = w2.clone()
    w2.view(torch.uint8)[2, 5, 0] = 0x7F  # expert 2's output row 5: tokens 1 and 2 route to it
    got, want = dshal.ops.moe_experts(x, weights, ids, w13, w2, s13, s2), ref.moe_experts(x, weights, ids, w13, w2, s13, s2)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[1].all() and got.isnan()[2, 5] and not got.isnan()[0].any()


def test_nvidia_bad_input_is_a_clear_error(rt):
    a = torch.zeros(4, 256).to(torch.float8_e4m3fn)
    with pytest.raises(dshal.ShapeError, match="a_scale"):
        dshal.ops.fp8_gemm(a, torch.ones(4, 3), a, torch.ones(1, 2))
    with pytest.raises(dshal.DeviceError, match="expected a 'cpu' tensor"):
        dshal.ops.rms_norm(torch.ones(2, 8, device="meta"), torch.ones(8, device="meta"))


# ---- what the plugin says serves each weight format of linear is what runs; dshal info shows it
def test_linear_kind_per_weight_format(rt):
    assert all(set(by_format) <= set(dshal.plugin.WEIGHT_FORMATS) for by_format in rt.capabilities.op_paths.values())
    paths = rt.capabilities.op_paths["linear"]
    assert (paths["bf16"].kind, rt.provider_kind("linear", "bf16")) == ("native", "native")
    assert "torch matmul" in paths["bf16"].via and "Triton" not in paths["bf16"].via
    assert (paths["fp8-block"].kind, rt.provider_kind("linear", "fp8-block")) == ("triton", "triton")
    assert "Triton block-FP8 kernel" in paths["fp8-block"].via
    assert paths["fp8-row"].kind == "native" and "torch._scaled_mm rowwise" in paths["fp8-row"].via
    assert paths["int8"].kind == "reference"
    with pytest.raises(dshal.ArgumentError, match="weight_format is 'fp8', expected one of bf16, fp8-block"):
        rt.provider_kind("linear", "fp8")
    # op_kinds keeps one kind per op: the FP8 checkpoint's path (documented on Capabilities).
    assert rt.capabilities.fp8_checkpoint_gemm == "fp8-block" and rt.provider_kind("linear") == "triton"
    assert rt.describe()["providers"]["linear"]["paths"]["bf16"]["kind"] == "native"
    assert "paths" not in rt.describe()["providers"]["rms_norm"]  # one path for every input


def test_the_declared_paths_are_the_ones_that_run(rt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(256, 256, generator=g).to(torch.bfloat16)
    # bf16: exactly torch's matmul.
    assert torch.equal(rt.backend.linear(x, w), torch.nn.functional.linear(x, w))
    # fp8-block: exactly the Triton activation quantization and block GEMM.
    kernels, target = rt.backend.kernels(), rt.backend.target()
    wq, ws = kernels.quant.fp8_quantize_blocks(w.float(), (128, 128), torch.float8_e4m3fn, target=target)
    xq, xs = kernels.quant.fp8_quantize_blocks(x, (1, 128), torch.float8_e4m3fn, target=target)
    want = kernels.gemm.fp8_block_gemm(xq, xs, wq, ws, torch.bfloat16, target=target)
    assert torch.equal(rt.backend.linear(x, wq, None, ws), want)


def test_dshal_info_shows_the_path_per_weight_format():
    env = {k: v for k, v in os.environ.items() if k not in ("DSHAL_CONFIG", "DSHAL_BACKEND", "DSHAL_PLUGINS")}
    proc = subprocess.run([sys.executable, "-m", "dshal", "info", "--backend", "nvidia"],
                          env={**env, "DSHAL_EMULATE": "1"}, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "bf16: native -- torch matmul (torch.nn.functional.linear)" in proc.stdout
    assert "fp8-block: triton -- activations quantized per 1x128 by the Triton kernel" in proc.stdout


def test_conformance_report_records_the_path_per_weight_format():
    runner = pytest.importorskip("dshal_conformance.runner", reason="dshal-conformance is not installed")
    from dshal_conformance import report

    rep = runner.run(runner.resolve("nvidia", emulate=True),
                     runner.Options(cases=["capability/*"], collectives=False, progress=False))
    report.validate(rep)
    assert rep["platform"]["emulated"] is True
    linear = next(c for c in rep["cases"] if c["id"] == "capability/linear")
    assert linear["status"] == "pass" and linear["details"]["kind"] == "triton"
    assert linear["details"]["paths"]["bf16"]["kind"] == "native"
    assert "torch matmul" in linear["details"]["paths"]["bf16"]["via"]
    assert linear["details"]["paths"]["fp8-block"]["kind"] == "triton"
    norm = next(c for c in rep["cases"] if c["id"] == "capability/rms_norm")
    assert norm["details"] == {"provider": "nvidia", "kind": "triton"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nvidia_fp8_gemm_a_bad_row_scale_stays_in_its_row(rt, bad):
    """Row scales through the block kernel are divided by their peak: a NaN or Inf scale in one
    row must not become the peak and spoil every other row (it did, briefly)."""
    a, sa = ref.quantize_fp8(torch.randn(4, 40, generator=gen(8)), (1, -1), "e4m3fn")
    b, sb = ref.quantize_fp8(torch.randn(6, 40, generator=gen(9)), (1, -1), "e4m3fn")
    sa = sa.clone()
    sa[0] = bad
    got, want = dshal.ops.fp8_gemm(a, sa, b, sb, torch.float32), ref.fp8_gemm(a, sa, b, sb, torch.float32)
    assert not torch.isfinite(got[0]).any() and not torch.isfinite(want[0]).any()  # (an Inf scale: inf here, NaN there)
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-4)


def test_nvidia_counts_inputs_its_kernels_leave_to_the_reference(rt):
    """rms_norm on float64 and e4m3fnuz quantization (FNUZ: not Hopper's) compute the reference
    inside the provider: counted for the run report, the kernel's calls not."""
    before = dict(rt.backend.reference_calls())
    dshal.ops.rms_norm(torch.ones(2, 64), torch.ones(64))  # float32: the kernel
    dshal.ops.rms_norm(torch.ones(2, 64, dtype=torch.float64), torch.ones(64, dtype=torch.float64))
    dshal.ops.quantize_fp8(torch.ones(2, 128), (1, 128), "e4m3fnuz")
    after = rt.backend.reference_calls()
    assert {op: after[op] - before.get(op, 0) for op in after if after[op] != before.get(op, 0)} == {
        "rms_norm": 1, "quantize_fp8": 1}
