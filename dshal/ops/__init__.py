"""``dshal.ops.<op>(...)``: the op catalogue, dispatched to the active runtime.

Each public function below is a thin dispatcher with the op's signature: it calls the
provider the active runtime chose (backend kernel, or the op's reference) through
:data:`DISPATCHER` (:mod:`dshal.ops.dispatch`). Providers are resolved once, when
:func:`dshal.use` activates a runtime; a call costs a thread-local attribute and a dict
lookup. Calling an op before any ``dshal.use()`` activates the default runtime first
(config from the environment).

Every call checks its inputs against the op's spec first (``SPECS[name]``: the full
description of shapes, dtypes and errors), except inside :func:`trusted`, where the
calling thread's ops go straight to their providers.

``dshal.ops.reference.<op>`` calls the checked reference implementation directly, and
``dshal.ops.SPECS`` holds every :class:`~dshal.ops.spec.OpSpec`.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, overload

import torch

from dshal.ops import reference
from dshal.ops.catalogue import SPECS
from dshal.ops.dispatch import DISPATCHER, Dispatcher
from dshal.ops.mode import checking
from dshal.ops.spec import Cost, OpSpec

#: An FP8 block shape (rows, columns), each > 0 or -1 (the whole dim); None: one scale per tensor.
_Block = tuple[int, int] | list[int] | None

_thread = DISPATCHER.thread  # ``_thread.table``: op name -> provider, for the calling thread


def trusted() -> contextlib.AbstractContextManager[None]:
    """Skip the ops' input checks for this thread's calls inside the block.

    For a caller that builds every op input itself and has already had the same calls
    checked once, as the model core does for its decode steps: the checks are Python and
    cost more than the math for the small tensors of one token. The Triton kernel wrappers
    (:mod:`dshal.kernels.triton`) skip their own input checks too. The providers' own value
    checks (e.g. expert ids in range) still run, device-side (no host sync: see
    :func:`dshal.ops.spec.check_ids_in_range`), and :mod:`dshal.comm` skips its cross-rank
    agreement check. Nests; other threads are unaffected (asyncio tasks of one thread share
    its mode: do not await inside the block). Blocks may close in any order and on any
    thread (a generator finished elsewhere): each close ends its own block on the thread
    that opened it.
    """
    return DISPATCHER.trusted()


# ---------------------------------------------------------------- quantization (dshal.ops.quant)
def quantize_fp8(
    x: torch.Tensor, block: _Block = (1, 128), fmt: str = "e4m3", scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., M, K]`` to FP8 with one float32 scale per block -> ``(q, scale)``."""
    return _thread.table["quantize_fp8"](x, block, fmt, scale_fmt)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: _Block = (1, 128), out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``q.float() * scale`` broadcast per block, cast to ``out_dtype`` (inverse of :func:`quantize_fp8`)."""
    return _thread.table["dequantize_fp8"](q, scale, block, out_dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row -> ``(q int8 [..., K], scale float32 [..., 1])``."""
    return _thread.table["quantize_int8"](x)


# ---------------------------------------------------------------- GEMM (dshal.ops.gemm)
def fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale).T`` with FP32 accumulation -> ``[M, N]`` in ``out_dtype``."""
    return _thread.table["fp8_gemm"](a, a_scale, b, b_scale, out_dtype)


def int8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """W8A8: ``(a @ b.T) * a_scale * b_scale.T`` -> ``[M, N]`` in ``out_dtype``."""
    return _thread.table["int8_gemm"](a, a_scale, b, b_scale, out_dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.T (+ bias)`` -> ``[..., N]``. An FP8 ``weight``'s ``weight_scale`` shape
    picks how ``x`` is quantized for :func:`fp8_gemm`: block ``[ceil(N/128), ceil(K/128)]`` per
    (1, 128), rowwise ``[N, 1]`` per row, 0-dim per tensor; an int8 ``weight`` with ``[N, 1]``
    scales runs W8A8 through :func:`int8_gemm`."""
    return _thread.table["linear"](x, weight, bias, weight_scale)


# ---------------------------------------------------------------- norm, activation, rotary
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: None = None) -> torch.Tensor: ...
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim -> ``y``, or with ``residual`` the pair ``(y, x + residual)``."""
    return _thread.table["rms_norm"](x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: ``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` -> ``[..., d]``."""
    return _thread.table["silu_and_mul"](x)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of ``x [..., D]`` by the angles whose cosine/sine are given -> ``x'``."""
    return _thread.table["rotary_embedding"](x, cos, sin, interleaved)


# ---------------------------------------------------------------- attention (dshal.ops.attention)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    global_tokens: int = 0,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` -> ``[B, Hq, Tq, Dv]`` in ``q``'s dtype."""
    return _thread.table["attention"](q, k, v, causal, scale, window, global_tokens)


# ---------------------------------------------------------------- sparse attention (dshal.ops.sparse_attention)
def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, topk: int, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3.2's lightning indexer: per query, the ``topk`` visible keys of highest
    ``sum_h weights[h] * relu(q[h] . k)`` -> ``indices [B, T, topk]`` int64 (-1 past the keys it sees)."""
    return _thread.table["indexer_topk"](q, weights, k, topk, visible)


def sparse_mla_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float, v_dim: int) -> torch.Tensor:
    """Absorbed MLA attention of ``q [B, H, T, D]`` over the rows ``indices [B, T, K]`` of the
    shared latent ``kv [B, S, D]`` (values: its first ``v_dim`` columns) -> ``[B, H, T, v_dim]``."""
    return _thread.table["sparse_mla_attention"](q, kv, indices, scale, v_dim)


# ---------------------------------------------------------------- MoE (dshal.ops.moe)
def moe_gate(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router: ``logits [T, E]`` -> ``(weights [T, top_k] float32, ids [T, top_k] int64)``."""
    return _thread.table["moe_gate"](logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts: ``out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`` -> ``[T, H]``."""
    return _thread.table["moe_experts"](x, weights, ids, w13, w2, w13_scale, w2_scale)


class _OpsModule(types.ModuleType):
    """``dshal.ops`` itself, with its op names read-only: an op's function must stay the
    one that reads the active runtime's table (what ``rt.providers`` reports). A plugin or
    script that assigns ``dshal.ops.rms_norm = ...`` gets an error, not a silent takeover;
    a backend provides an op through ``Backend.ops()``, a config through ``ops:``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SPECS:
            raise AttributeError(
                f"dshal.ops.{name} is read-only: it dispatches to the provider the active runtime chose "
                f"(see dshal.current().providers); provide {name!r} from a backend's ops() or set "
                f"`ops: {{{name}: BACKEND}}` in the config"
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in SPECS:
            raise AttributeError(f"dshal.ops.{name} is read-only and cannot be deleted")
        super().__delattr__(name)

    def __dir__(self) -> list[str]:
        # What tab completion offers: the ops and the public names, with the op-family
        # submodules; not the helpers this file imports (torch, sys, types, Any...).
        submodules = {name for name, value in vars(self).items() if getattr(value, "__name__", None) == f"{__name__}.{name}"}
        return sorted({*__all__, *submodules})


sys.modules[__name__].__class__ = _OpsModule
# Written out, not computed from SPECS: type checkers read a literal list only, and under
# `mypy --strict` (no implicit re-export) a name missing here is an error in users' code.
__all__ = [
    "DISPATCHER", "SPECS", "Cost", "Dispatcher", "OpSpec", "checking", "reference", "trusted",
    "attention", "dequantize_fp8", "fp8_gemm", "indexer_topk", "int8_gemm", "linear", "moe_experts", "moe_gate",
    "quantize_fp8", "quantize_int8", "rms_norm", "rotary_embedding", "silu_and_mul", "sparse_mla_attention",
]
