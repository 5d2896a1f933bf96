"""The amd plugin emulated as gfx942 (MI300X): native E4M3 is e4m3fnuz (max 240, no
negative zero) through the plugin's quantize and GEMM paths; ROCm's rowwise _scaled_mm
writes bf16 only. The op code shared with nvidia is tested in test_nvidia_emulated_ops."""

from __future__ import annotations

import math

import pytest
import torch

import dshal
from dshal.ops import reference as ref
from dshal.plugin import lookup_peaks
from dshal_amd import AMD_PEAKS, AmdBackend
from dshal_amd.backend import arch_from_gcn

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

ON_ROCM = torch.cuda.is_available() and torch.version.hip is not None



@pytest.fixture
def rt():
    runtime = dshal.use(backend="amd", emulate=True)
    assert runtime.emulated
    return runtime


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_amd_emulated_capabilities(rt):
    caps = rt.capabilities
    assert caps.arch == "gfx942" and caps.native_e4m3 == "e4m3fnuz" and caps.fp8_formats == ("e4m3fnuz",)
    assert rt.backend.kernel_target().fp8_e4m3 == torch.float8_e4m3fnuz
    assert "rowwise -> bfloat16)" in caps.notes["fp8_gemm row/tensor path"]


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_amd_quantize_is_fnuz_with_max_240_and_no_negative_zero(rt, block):
    x = torch.randn(130, 256, generator=gen(1)) * 100
    x[0, :64] = -0.0
    x[1, :128] = -1e-30  # rounds to zero: must not become FNUZ's NaN pattern 0x80
    q, s = dshal.ops.quantize_fp8(x, block)  # fmt="e4m3" = the backend's native E4M3
    assert q.dtype == torch.float8_e4m3fnuz
    assert float(q.float().abs().max()) == 240.0
    assert not (q.view(torch.uint8) == 0x80).any() and not torch.isnan(q.float()).any()
    q_ref, s_ref = ref.quantize_fp8(x, block, "e4m3fnuz")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_amd_fnuz_block_gemm_matches_reference(rt):
    a, sa = ref.quantize_fp8(torch.randn(9, 256, generator=gen(2)), (1, 128), "e4m3fnuz")
    b, sb = ref.quantize_fp8(torch.randn(130, 256, generator=gen(3)) / 16, (128, 128), "e4m3fnuz")
    got = dshal.ops.fp8_gemm(a, sa, b, sb, torch.float32)
    torch.testing.assert_close(got, ref.fp8_gemm(a, sa, b, sb, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_amd_rowwise_scaled_mm_is_bf16_only(rt, out_dtype):
    backend = rt.backend
    a, sa = ref.quantize_fp8(torch.randn(16, 64, generator=gen(4)), (1, -1), "e4m3fnuz")
    b, sb = ref.quantize_fp8(torch.randn(32, 64, generator=gen(5)), (1, -1), "e4m3fnuz")
    uses_scaled_mm = backend._scaled_mm_fits(a, b, "row", out_dtype, backend.gemm_plan())
    assert uses_scaled_mm is (out_dtype == torch.bfloat16)  # float32 goes through the block path
    got = dshal.ops.fp8_gemm(a, sa, b, sb, out_dtype)
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    tol = dict(rtol=1.6e-2, atol=1e-2) if out_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.float(), want, **tol)


def test_amd_linear_with_fnuz_weights(rt):
    x = torch.randn(3, 256, generator=gen(6)).to(torch.bfloat16)
    w, ws = ref.quantize_fp8(torch.randn(128, 256, generator=gen(7)) / math.sqrt(256), (128, 128), "e4m3fnuz")
    torch.testing.assert_close(dshal.ops.linear(x, w, None, ws).float(), ref.linear(x, w, None, ws).float(), rtol=1.6e-2, atol=1e-2)


def test_amd_arch_and_peaks():
    assert arch_from_gcn("gfx942:sramecc+:xnack-") == "gfx942"
    row = lookup_peaks("AMD Instinct MI300X", AMD_PEAKS)
    assert row is not None and row.bandwidth == 5.3e12 and row.fp8_flops == 2614.9e12
    assert lookup_peaks("AMD Instinct MI325X", AMD_PEAKS).bandwidth == 6.0e12
    # gfx950 parts had no row: no roofline peaks on an MI355X
    mi355 = lookup_peaks("AMD Instinct MI355X", AMD_PEAKS)
    assert mi355.fp8_flops == 5033.2e12 and mi355.bandwidth == 8.0e12
    assert lookup_peaks("AMD Instinct MI350X", AMD_PEAKS).fp8_flops == 4613.7e12


def test_amd_partition_peaks_scale_with_its_compute_units():
    """An MI300X in CPX mode shows 38 of its 304 CUs under the same name: it got the whole
    chip's FLOP/s (8x too high for its roofline). The row scales to the CUs a device shows."""
    row = lookup_peaks("AMD Instinct MI300X", AMD_PEAKS)
    cpx = row.for_units(38)
    assert cpx.fp8_flops == pytest.approx(2614.9e12 / 8) and cpx.bf16_flops == pytest.approx(1307.4e12 / 8)
    assert cpx.bandwidth == row.bandwidth and "38 of 304 CUs" in cpx.source
    assert row.for_units(304) is row and row.for_units(0) is row


@pytest.mark.skipif(ON_ROCM, reason="a ROCm GPU is present: the 'no ROCm' reason cannot be shown")
def test_amd_unavailable_without_rocm_says_why():
    avail = AmdBackend().availability()
    assert not avail.ok and "torch.version.hip is None" in avail.reason and "DSHAL_EMULATE=1" in avail.reason


@pytest.mark.skipif(not ON_ROCM, reason="needs an AMD GPU with a ROCm build of torch (none here)")
def test_amd_real_device_arch_and_topology():
    backend = AmdBackend()
    caps = backend.capabilities()
    assert caps.arch == arch_from_gcn(torch.cuda.get_device_properties(0).gcnArchName)
    assert caps.dist_backend == "nccl"
    pytest.importorskip("amdsmi", reason="amdsmi not installed")
    topo = backend.topology()
    assert topo is not None and topo.num_devices == torch.cuda.device_count()


def test_amd_linear_path_per_weight_format(rt):
    # A bf16 linear is torch's matmul (hipBLASLt on ROCm), whatever serves FP8 blocks (Triton here).
    paths = rt.capabilities.op_paths["linear"]
    assert (rt.provider_kind("linear", "bf16"), rt.provider_kind("linear", "fp8-block")) == ("native", "triton")
    assert "torch matmul" in paths["bf16"].via and "blockwise scaled_mm is CUDA-only" in paths["fp8-block"].via
    x = torch.randn(3, 256, generator=gen(5)).to(torch.bfloat16)
    w = torch.randn(64, 256, generator=gen(6)).to(torch.bfloat16)
    assert torch.equal(rt.backend.linear(x, w), torch.nn.functional.linear(x, w))
    # FP8 experts and float experts: the grouped Triton kernel; int8 experts: the reference.
    moe = rt.capabilities.op_paths["moe_experts"]
    assert (moe["bf16"].kind, moe["fp8-block"].kind, moe["int8"].kind) == ("triton", "triton", "reference")
