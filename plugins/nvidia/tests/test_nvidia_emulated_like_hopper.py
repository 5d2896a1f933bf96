"""Emulated nvidia behaves as real Hopper would: the same FP8 dtypes accepted or refused, the
cuBLASLt blockwise refusal recorded per output dtype, and safe to call from several threads
(the Triton interpreter is not reentrant)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dshal.errors import UnsupportedOpError
from dshal.ops import reference as ref
from dshal.plugin import GemmPlan, shipped_target
from dshal_nvidia import NvidiaBackend

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py


def test_emulated_target_accepts_the_fp8_dtypes_hopper_does():
    emulated = NvidiaBackend(emulate=True).kernel_target()
    hopper = shipped_target("nvidia-sm90")
    assert set(emulated.fp8_dtypes) == set(hopper.fp8_dtypes)
    assert set(emulated.fp8_dot_dtypes) == set(hopper.fp8_dot_dtypes)
    assert torch.float8_e4m3fnuz not in emulated.fp8_dtypes


def test_fnuz_kernel_refused_and_quantize_falls_back_to_the_reference():
    backend = NvidiaBackend(emulate=True)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    quant = backend.kernels().quant
    with pytest.raises(UnsupportedOpError, match="float8_e4m3fnuz"):
        quant.fp8_quantize_blocks(x, (1, 128), torch.float8_e4m3fnuz, target=backend.kernel_target())
    # the op contract takes fmt="e4m3fnuz" everywhere: Hopper serves it with the reference math
    q, s = backend.quantize_fp8(x, (1, 128), "e4m3fnuz")
    want_q, want_s = ref.quantize_fp8(x, (1, 128), "e4m3fnuz")
    assert q.dtype == torch.float8_e4m3fnuz
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)


def test_fnuz_gemm_falls_back_to_the_reference():
    backend = NvidiaBackend(emulate=True)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 256, generator=g).to(torch.float8_e4m3fnuz)
    b = torch.randn(128, 256, generator=g).to(torch.float8_e4m3fnuz)
    sa, sb = torch.rand(8, 2, generator=g) + 0.5, torch.rand(1, 2, generator=g) + 0.5
    got = backend.fp8_gemm(a, sa, b, sb, torch.float32)
    assert torch.equal(got, ref.fp8_gemm(a, sa, b, sb, torch.float32))


def test_blockwise_refusal_is_recorded_per_output_dtype():
    """A plan that says cuBLASLt blockwise works for bf16 and float32 outputs; on CPU the call is
    refused, and that refusal must disable only the output dtype that was refused."""
    backend = NvidiaBackend(emulate=True)
    backend._cache["gemm_plan"] = GemmPlan(
        block_path="native", native_out_dtypes=(torch.bfloat16, torch.float32), why="test plan"
    )
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 512, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(128, 512, generator=g).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(4, 4, generator=g) + 0.5, torch.rand(1, 4, generator=g) + 0.5
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    got = backend.fp8_gemm(a, sa, b, sb, torch.bfloat16)  # refused -> Triton kernel
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1e-2)
    assert backend.blockwise_refused() == {torch.bfloat16}
    got = backend.fp8_gemm(a, sa, b, sb, torch.float32)  # float32 output still tried: refused now
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert backend.blockwise_refused() == {torch.bfloat16, torch.float32}


def test_emulated_plan_names_blockwise_output_dtypes():
    plan = NvidiaBackend(emulate=True).gemm_plan()
    assert plan.block_path == "triton" and plan.native_out_dtypes == ()


THREADS = textwrap.dedent(
    """
    import threading, torch
    from dshal.ops import reference as ref
    from dshal_nvidia import NvidiaBackend

    backend = NvidiaBackend(emulate=True)  # nothing imported yet: the first calls race
    start = threading.Barrier(4)
    errors, ok = [], []

    def work(seed):
        x = torch.randn(32, 512, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        want_q, want_s = ref.quantize_fp8(x, (1, 128), "e4m3fn")
        start.wait()
        try:
            for _ in range(3):
                q, s = backend.quantize_fp8(x, (1, 128), "e4m3")
                assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
            ok.append(seed)
        except BaseException as err:
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("ERRORS", errors)
    assert not errors and len(ok) == 4
    """
)


@pytest.mark.parametrize("attempt", range(2))
def test_four_threads_quantize_at_first_use(attempt):
    """Fresh process each time (first use is what races): no crash, no false 'imported before
    TRITON_INTERPRET=1', bit-identical results."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", THREADS], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fp8_experts_run_the_grouped_kernel_not_the_per_expert_loop(monkeypatch):
    """FP8 routed experts go through the Triton grouped kernel (no per-expert Python loop,
    no dequantized weights); the result matches the contract's W8A8 reference."""
    import dshal.ops.moe as moe_ops

    backend = NvidiaBackend(emulate=True)
    g = torch.Generator().manual_seed(3)
    T, H, inter, E, k = 6, 256, 128, 4, 2
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w13, s13 = ref.quantize_fp8(torch.randn(E * 2 * inter, H, generator=g) * 0.05, (128, 128), "e4m3fn")
    w2, s2 = ref.quantize_fp8(torch.randn(E * H, inter, generator=g) * 0.05, (128, 128), "e4m3fn")
    w13, s13 = w13.view(E, 2 * inter, H), s13.view(E, 2 * inter // 128, H // 128)
    w2, s2 = w2.view(E, H, inter), s2.view(E, H // 128, inter // 128)
    ids = torch.randint(0, E, (T, k), generator=g)
    weights = torch.rand(T, k, generator=g)
    want = ref.moe_experts(x, weights, ids, w13, w2, s13, s2).float()

    def no_loop(*args, **kwargs):
        raise AssertionError("the per-expert reference loop ran")

    monkeypatch.setattr(moe_ops, "_expert_groups", no_loop)
    got = backend.moe_experts(x, weights, ids, w13, w2, s13, s2).float()
    gap = 1 - 2 * (got * want).sum() / (got * got + want * want).sum()
    assert float(gap) < 1e-4
    assert backend.capabilities().op_kinds["moe_experts"] == "triton"
    assert "FP8 weights" in backend.capabilities().notes["moe_experts"]
