"""Extra memory while quantizing one expert stack on load, the whole stack at once vs one
expert at a time (``dshal.model.precision.per_expert``, what the loader does), side by side.

Quantize-on-load (``precision.gemm: fp8-block | fp8-row | int8`` on a checkpoint stored in
another format) converts each weight to float32 and quantizes it. A routed-experts weight is
one layer's whole ``[E, N, K]`` stack (DeepSeek-V3's w13: 256 x 4096 x 7168), whose float32
temporaries were several times its size in one call. The peak resident set is the kernel's
(``VmHWM``, reset before each conversion); both give the same bits (checked here).

    python benchmarks/quantize_on_load_memory.py [--experts 32] [--rows 1024] [--cols 1024]
"""

from __future__ import annotations

import argparse
import gc
import platform

import torch
from process_memory import reset_peak, status_kib

import dshal
from dshal import ops
from dshal.model import precision
from dshal.model.weights import dequantize_weight, int8_rows


def peak_extra_mib(fn) -> tuple[float, object]:
    """``fn()``'s result and the most the resident set rose above its start while it ran (the
    kernel's own peak, ``VmHWM``, reset first)."""
    gc.collect()
    reset_peak()
    base = status_kib("VmRSS")
    out = fn()
    return (status_kib("VmHWM") - base) / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    args = parser.parse_args()
    dshal.use(backend="cpu")
    stack = (torch.randn(args.experts, args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    size = stack.numel() * stack.element_size() / 2**20
    print(f"{platform.node()} ({platform.machine()}, torch {torch.__version__}): bf16 stack "
          f"{list(stack.shape)} = {size:.0f} MiB; extra resident MiB while converting")
    print(f"{'mode':<10} {'whole stack':>12} {'per expert':>12} {'ratio':>7}  same bits")
    for mode in ("fp8-block", "fp8-row", "int8"):
        if mode == "int8":
            def convert(w, s):
                return int8_rows(w, s)
        else:
            def convert(w, s, block=precision.WEIGHT_BLOCKS[mode]):
                return ops.quantize_fp8(dequantize_weight(w, s, torch.float32), block, "e4m3fn")
        whole, (q1, s1) = peak_extra_mib(lambda: convert(stack, None))
        sliced, (q2, s2) = peak_extra_mib(lambda: precision.per_expert(convert, stack, None))
        as_bits = (lambda t: t) if mode == "int8" else (lambda t: t.view(torch.uint8))
        same = torch.equal(as_bits(q1), as_bits(q2)) and torch.equal(s1, s2)
        print(f"{mode:<10} {whole:>12.0f} {sliced:>12.0f} {whole / max(sliced, 1):>6.1f}x  {same}")
        del q1, s1, q2, s2


if __name__ == "__main__":
    main()
