"""cuBLASLt blockwise FP8 scaling through ``torch.nn.functional.scaled_mm``: the call, and the
probe that decides on which device, torch and CUDA it is used (SM90, CUDA >= 12.9)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from dshal.plugin import BLOCK, SPECS

#: cuBLASLt's blockwise FP8 scaling (1x128 activations, 128x128 weights) needs CUDA 12.9.
MIN_CUDA = (12, 9)
#: The compute capabilities torch runs it on: ``_check_deepseek_support`` in
#: aten/src/ATen/native/cuda/ScaledBlas.cpp raises NotImplementedError ("DeepSeek style (1x128,
#: 128x128) scaling only supported in CUDA for SM90") for any other major, in every revision
#: read (pytorch/pytorch 2bec3bd and 0174dfa, the latter with ROCm 7.14's paths); reported
#: refused by torch 2.13 on B300 and RTX 5090. Blackwell parts take dshal's Triton kernel.
BLOCKWISE_CAPABILITIES = ((9, 0),)


def version_tuple(text: str | None) -> tuple[int, ...]:
    """``"12.9.1"`` -> ``(12, 9, 1)``: each piece's leading digits (``"9rc1"`` -> 9); stops at
    the first piece that does not start with one (``None`` -> ``()``)."""
    parts = []
    for piece in (text or "").split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def torch_blockwise_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """DeepSeek-style block FP8 GEMM through ``torch.nn.functional.scaled_mm`` (cuBLASLt
    1x128 x 128x128 scaling; CUDA SM90 with cuBLASLt >= 12.9).

    torch checks ``a``'s 1x128 scales as ``[M, K/128]`` with strides ``(1, M)`` (M-major),
    and ``b_scale.t()`` against ``b.t()`` as a row-major ``[N/128, K/128]``, so ``b``'s
    scales go in transposed. cuBLASLt wants M a multiple of 4: ``a`` is zero-padded
    (scales 1) and the result sliced back. Callers keep K a multiple of 512.
    """
    F = torch.nn.functional
    m = a.shape[0]
    pad = -m % 4
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        a_scale = torch.cat([a_scale, a_scale.new_ones(pad, a_scale.shape[1])])
    sa = a_scale.float().t().contiguous().t()
    out = F.scaled_mm(
        a.contiguous(),
        b.contiguous().t(),
        sa,
        F.ScalingType.BlockWise1x128,
        b_scale.float().contiguous().t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=out_dtype,
    )
    return out[:m]


def blockwise_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Operands cuBLASLt's blockwise path takes here: both e4m3fn, K a multiple of 4 blocks
    (torch versions differ on the padding of the 128x128 scales' row stride otherwise;
    DeepSeek-V3's K are all multiples of 512), N a multiple of 128, M > 0."""
    return (
        a.dtype == b.dtype == torch.float8_e4m3fn
        and a.shape[1] % (4 * BLOCK) == 0
        and b.shape[0] % BLOCK == 0
        and a.shape[0] > 0
    )


def probe_torch_blockwise(
    device: torch.device, out_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32)
) -> tuple[tuple[torch.dtype, ...], str]:
    """For which of ``out_dtypes`` this torch + cuBLASLt runs DeepSeek-style blockwise
    ``scaled_mm`` correctly on ``device``. Checks the prerequisites, then runs one small GEMM
    per output dtype against the dequantized float32 product (DeepGEMM's similarity < 1e-3):
    cuBLASLt may take one output dtype and refuse another. Returns (usable dtypes, reason)."""
    F = torch.nn.functional
    if not (hasattr(F, "scaled_mm") and hasattr(getattr(F, "ScalingType", None), "BlockWise1x128")):
        return (), f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with BlockWise1x128 scaling"
    if torch.version.hip is not None or torch.version.cuda is None:
        return (), "blockwise scaled_mm is a cuBLASLt (CUDA) feature"
    if version_tuple(torch.version.cuda) < MIN_CUDA:
        return (), f"CUDA {torch.version.cuda} < 12.9 (cuBLASLt blockwise FP8 scaling needs 12.9)"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability not in BLOCKWISE_CAPABILITIES:
        return (), (f"torch {torch.__version__} runs blockwise scaled_mm on SM90 only (ScaledBlas.cpp refuses "
                    f"sm_{capability[0]}{capability[1]}); the Triton kernel serves block scales")
    gen = torch.Generator(device=device).manual_seed(0)
    m, n, k = 96, 256, 512
    a = (torch.randn(m, k, device=device, generator=gen)).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, device=device, generator=gen)).to(torch.float8_e4m3fn)
    sa = torch.rand(m, k // BLOCK, device=device, generator=gen) + 0.5
    sb = torch.rand(n // BLOCK, k // BLOCK, device=device, generator=gen) + 0.5
    want = SPECS["fp8_gemm"].reference_impl(a, sa, b, sb, torch.float32)
    usable, notes = [], []
    for out_dtype in out_dtypes:
        name = str(out_dtype).replace("torch.", "")
        try:
            got = torch_blockwise_gemm(a, sa, b, sb, out_dtype).float()
            sim = float(1 - 2 * (got * want).sum() / (got * got + want * want).sum())
            torch.cuda.synchronize(device)
        except (RuntimeError, TypeError, ValueError) as err:
            notes.append(f"{name}: refused ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        if sim < 1e-3:
            usable.append(out_dtype)
            notes.append(f"{name}: OK")
        else:
            notes.append(f"{name}: differs from the dequantized product (1 - similarity = {sim:.2e})")
    return tuple(usable), f"probed (torch {torch.__version__}, CUDA {torch.version.cuda}): " + "; ".join(notes)


__all__ = ["BLOCKWISE_CAPABILITIES", "MIN_CUDA", "blockwise_fits", "probe_torch_blockwise", "torch_blockwise_gemm", "version_tuple"]
