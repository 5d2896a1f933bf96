"""Bench cases: what to run for each op, at which shapes, and its ``torch`` direct rival.

Every benchable op has an :class:`OpBench`: its shape parameters (with defaults), an
input builder, the dtype whose peak bounds it, and, where torch has one, a direct torch
call computing the same thing (``F.linear``, ``F.rms_norm``,
``F.scaled_dot_product_attention``...). Shape sets are ``ci`` (small: seconds on 2 CPU
cores), ``full`` (DeepSeek-V3's real dimensions) or a YAML file::

    cases:
      - {op: linear, M: 64, N: 7168, K: 2048, dtype: bfloat16}
      - op: attention
        B: 1
        Hq: 16
        Tq: 512
        Tk: 512

validated with file:line errors (the config loader's YAML-with-lines machinery).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dshal.errors import ConfigError
from dshal.ops.attention import visible_keys
from dshal.ops.catalogue import SPECS
from dshal.ops.gemm import GRANULARITY_BLOCKS
from dshal.ops.spec import FP8_DTYPES
from dshal.perf.timing import Inputs

_FLOAT_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One shape parameter of a bench case."""

    name: str
    #: "int" (>= 1), "count" (>= 0), "bool", "choice", "block" (null or [bm, bk]), "window" (null or int >= 1).
    kind: str
    default: Any = _REQUIRED
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> str | None:
        """None when ``value`` fits, else what was expected."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "int":
            return None if is_int and value >= 1 else "an integer >= 1"
        if self.kind == "count":
            return None if is_int and value >= 0 else "an integer >= 0"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "true or false"
        if self.kind == "choice":
            return None if value in self.choices else f"one of: {', '.join(self.choices)}"
        if self.kind == "window":
            return None if value is None or (is_int and value >= 1) else "null or an integer >= 1"
        if self.kind == "block":
            ok = value is None or (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and (b > 0 or b == -1) for b in value)
            )
            return None if ok else "null (tensorwise) or a pair [bm, bk] of ints > 0 or -1, e.g. [1, 128]"
        raise AssertionError(f"unknown param kind {self.kind!r}")  # a programming error in this module


def _dtype(name: str) -> Param:
    return Param(name, "choice", "bfloat16", tuple(_FLOAT_NAMES))


Builder = Callable[[Mapping[str, Any], torch.device, torch.Generator], Inputs]
#: Given the case's params: (name of the torch call, callable with the op's arguments), or None.
Direct = Callable[[Mapping[str, Any]], "tuple[str, Callable[..., Any]] | None"]


@dataclass(frozen=True)
class OpBench:
    """How to bench one op."""

    op: str
    params: tuple[Param, ...]
    build: Builder
    #: The dtype whose peak FLOP/s bounds this case.
    compute_dtype: Callable[[Mapping[str, Any]], torch.dtype]
    direct: Direct = field(default=lambda p: None)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# ---------------------------------------------------------------- input helpers
def _randn(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator, std: float = 1.0
) -> torch.Tensor:
    return (torch.randn(*shape, device=device, generator=gen) * std).to(dtype)


def _random_fp8(
    shape: Sequence[int], block: tuple[int, int], device: torch.device, gen: torch.Generator, fmt: str = "e4m3fn"
):
    """Random FP8 weights ``shape`` with plausible block scales, built one leading slice at a
    time so DeepSeek-V3-sized expert stacks never exist in float32 at once."""
    dtype = FP8_DTYPES[fmt]
    q = torch.empty(*shape, dtype=dtype, device=device)
    lead = shape[:-2]
    rows, cols = shape[-2:]
    scale = torch.empty(
        *lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]), dtype=torch.float32, device=device
    )
    q2, s2 = q.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:])
    for i in range(q2.shape[0]):
        qi, si = SPECS["quantize_fp8"].reference_impl(_randn((rows, cols), torch.float32, device, gen, cols**-0.5), block, fmt)
        q2[i].copy_(qi)
        s2[i].copy_(si)
    return q, scale


def _weight(
    p: Mapping[str, Any], n: int, k: int, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear weight ``[n, k]`` in the case's ``weight`` format and its scale (or None)."""
    if p["weight"] == "fp8-block":
        return _random_fp8((n, k), (128, 128), device, gen)
    w = _randn((n, k), torch.float32, device, gen, k**-0.5)
    if p["weight"] == "int8":
        return SPECS["quantize_int8"].reference_impl(w)
    return w.to(_FLOAT_NAMES[p["dtype"]]), None


# ---------------------------------------------------------------- per-op benches
def _linear_build(p, device, gen):
    w, scale = _weight(p, p["N"], p["K"], device, gen)
    x = _randn((p["M"], p["K"]), _FLOAT_NAMES[p["dtype"]], device, gen)
    bias = _randn((p["N"],), x.dtype, device, gen) if p["bias"] else None
    return (x, w, bias, scale), {}


def _linear_direct(p):
    if p["weight"] != "float":
        return None
    return "F.linear", lambda x, weight, bias=None, weight_scale=None: F.linear(x, weight, bias)


def _linear_dtype(p):
    return {"fp8-block": torch.float8_e4m3fn, "int8": torch.int8}.get(p["weight"], _FLOAT_NAMES[p["dtype"]])


def _fp8_gemm_build(p, device, gen):
    a_block, b_block = GRANULARITY_BLOCKS[p["granularity"]]
    a, a_scale = SPECS["quantize_fp8"].reference_impl(_randn((p["M"], p["K"]), torch.float32, device, gen), a_block, "e4m3fn")
    b, b_scale = SPECS["quantize_fp8"].reference_impl(_randn((p["N"], p["K"]), torch.float32, device, gen), b_block, "e4m3fn")
    return (a, a_scale, b, b_scale, _FLOAT_NAMES[p["out_dtype"]]), {}


def _fp8_gemm_direct(p):
    if p["granularity"] == "block":
        return None  # torch has no portable 1x128 / 128x128 block-scaled GEMM

    def scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        # _scaled_mm wants b column-major ([K, N] view of b [N, K]) and b's scales as [1, N].
        return torch._scaled_mm(a, b.t(), a_scale, b_scale.t() if b_scale.dim() == 2 else b_scale, out_dtype=out_dtype)

    return "torch._scaled_mm", scaled_mm


def _int8_gemm_build(p, device, gen):
    a = torch.randint(-127, 128, (p["M"], p["K"]), dtype=torch.int8, device=device, generator=gen)
    b = torch.randint(-127, 128, (p["N"], p["K"]), dtype=torch.int8, device=device, generator=gen)
    a_scale = torch.rand(p["M"], 1, device=device, generator=gen) * 1e-2 + 1e-3
    b_scale = torch.rand(p["N"], 1, device=device, generator=gen) * 1e-2 + 1e-3
    return (a, a_scale, b, b_scale, _FLOAT_NAMES[p["out_dtype"]]), {}


def _int8_gemm_direct(p):
    def int_mm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        return (torch._int_mm(a, b.t()).float() * a_scale * b_scale.t()).to(out_dtype)

    return "torch._int_mm", int_mm


def _block(p) -> tuple[int, int] | None:
    return None if p["block"] is None else tuple(p["block"])


def _quantize_fp8_build(p, device, gen):
    return (_randn((p["M"], p["K"]), _FLOAT_NAMES[p["dtype"]], device, gen), _block(p), p["fmt"]), {}


def _dequantize_fp8_build(p, device, gen):
    q, scale = SPECS["quantize_fp8"].reference_impl(_randn((p["M"], p["K"]), torch.float32, device, gen), _block(p), "e4m3fn")
    return (q, scale, _block(p), _FLOAT_NAMES[p["out_dtype"]]), {}


def _quantize_int8_build(p, device, gen):
    return (_randn((p["M"], p["K"]), _FLOAT_NAMES[p["dtype"]], device, gen),), {}


def _rms_norm_build(p, device, gen):
    dtype = _FLOAT_NAMES[p["dtype"]]
    x = _randn((p["T"], p["H"]), dtype, device, gen)
    w = _randn((p["H"],), dtype, device, gen, 0.1) + 1
    residual = _randn((p["T"], p["H"]), dtype, device, gen) if p["residual"] else None
    return (x, w, 1e-6, residual), {}


def _rms_norm_direct(p):
    def rms_norm(x, weight, eps=1e-6, residual=None):
        if residual is None:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        s = x + residual
        return F.rms_norm(s, (s.shape[-1],), weight, eps), s

    return "F.rms_norm", rms_norm


def _silu_build(p, device, gen):
    return (_randn((p["T"], 2 * p["I"]), _FLOAT_NAMES[p["dtype"]], device, gen),), {}


def _silu_direct(p):
    def silu_and_mul(x):
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    return "F.silu(gate) * up", silu_and_mul


def _rotary_build(p, device, gen):
    dtype = _FLOAT_NAMES[p["dtype"]]
    x = _randn((p["B"], p["T"], p["H"], p["D"]), dtype, device, gen)  # the model's [B, T, H, rope] layout
    angles = torch.rand(p["T"], 1, p["D"] // 2, device=device, generator=gen) * 6.28
    return (x, angles.cos(), angles.sin(), p["interleaved"]), {}


def _rotary_direct(p):
    def rotary_complex(x, cos, sin, interleaved=True):
        # DeepSeek-V3's own formulation: pairs as complex numbers times e^{i theta}.
        if interleaved:
            xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
            return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
        xc = torch.complex(*x.float().chunk(2, dim=-1))
        r = xc * torch.complex(cos, sin)
        return torch.cat((r.real, r.imag), dim=-1).to(x.dtype)

    return "torch.view_as_complex rotation", rotary_complex


def _attention_build(p, device, gen):
    dtype = _FLOAT_NAMES[p["dtype"]]
    q = _randn((p["B"], p["Hq"], p["Tq"], p["D"]), dtype, device, gen)
    k = _randn((p["B"], p["Hk"], p["Tk"], p["D"]), dtype, device, gen)
    v = _randn((p["B"], p["Hk"], p["Tk"], p["Dv"] or p["D"]), dtype, device, gen)
    return (q, k, v, p["causal"], None, p["window"], 0), {}


def _attention_direct(p):
    plain_causal = p["causal"] and p["window"] is None and p["Tq"] == p["Tk"]
    masks: dict[torch.device, torch.Tensor | None] = {}

    def sdpa(q, k, v, causal=True, scale=None, window=None, global_tokens=0):
        gqa = q.shape[1] != k.shape[1]
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        if q.device not in masks:  # the mask is shape-only: built once, outside the timed calls after warm-up
            mask = visible_keys(q.shape[2], k.shape[2], causal, window, global_tokens, q.device)
            masks[q.device] = None if mask is None or bool(mask.all()) else mask  # all visible: SDPA's fast path
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[q.device], scale=scale, enable_gqa=gqa)

    return "F.scaled_dot_product_attention", sdpa


def _moe_gate_build(p, device, gen):
    logits = _randn((p["T"], p["E"]), torch.float32, device, gen)
    bias = _randn((p["E"],), torch.float32, device, gen, 0.01)
    return (logits, bias, p["top_k"], p["n_group"], p["topk_group"], 2.5, True), {}


def _moe_experts_build(p, device, gen):
    dtype = _FLOAT_NAMES[p["dtype"]]
    t, h, i, e, k = p["T"], p["H"], p["I"], p["E"], p["top_k"]
    x = _randn((t, h), dtype, device, gen)
    ids = torch.rand(t, e, device=device, generator=gen).topk(k, dim=-1).indices  # k distinct experts per token
    weights = torch.rand(t, k, device=device, generator=gen)
    if p["weight"] == "fp8-block":
        w13, w13_scale = _random_fp8((e, 2 * i, h), (128, 128), device, gen)
        w2, w2_scale = _random_fp8((e, h, i), (128, 128), device, gen)
    else:
        w13, w13_scale = _randn((e, 2 * i, h), dtype, device, gen, h**-0.5), None
        w2, w2_scale = _randn((e, h, i), dtype, device, gen, i**-0.5), None
    return (x, weights, ids, w13, w2, w13_scale, w2_scale), {}


def _float(p) -> torch.dtype:
    return _FLOAT_NAMES[p["dtype"]]


_WEIGHT = Param("weight", "choice", "float", ("float", "fp8-block", "int8"))
_EXPERT_WEIGHT = Param("weight", "choice", "float", ("float", "fp8-block"))
_BLOCK = Param("block", "block", [1, 128])

BENCHES: dict[str, OpBench] = {
    b.op: b
    for b in (
        OpBench(
            "linear",
            (
                Param("M", "int"),
                Param("N", "int"),
                Param("K", "int"),
                _dtype("dtype"),
                _WEIGHT,
                Param("bias", "bool", False),
            ),
            _linear_build,
            _linear_dtype,
            _linear_direct,
        ),
        OpBench(
            "fp8_gemm",
            (
                Param("M", "int"),
                Param("N", "int"),
                Param("K", "int"),
                Param("granularity", "choice", "block", tuple(GRANULARITY_BLOCKS)),
                _dtype("out_dtype"),
            ),
            _fp8_gemm_build,
            lambda p: torch.float8_e4m3fn,
            _fp8_gemm_direct,
        ),
        OpBench(
            "int8_gemm",
            (Param("M", "int"), Param("N", "int"), Param("K", "int"), _dtype("out_dtype")),
            _int8_gemm_build,
            lambda p: torch.int8,
            _int8_gemm_direct,
        ),
        OpBench(
            "quantize_fp8",
            (
                Param("M", "int"),
                Param("K", "int"),
                _BLOCK,
                Param("fmt", "choice", "e4m3", ("e4m3", *FP8_DTYPES)),
                _dtype("dtype"),
            ),
            _quantize_fp8_build,
            _float,
        ),
        OpBench(
            "dequantize_fp8",
            (Param("M", "int"), Param("K", "int"), _BLOCK, _dtype("out_dtype")),
            _dequantize_fp8_build,
            lambda p: _FLOAT_NAMES[p["out_dtype"]],
        ),
        OpBench("quantize_int8", (Param("M", "int"), Param("K", "int"), _dtype("dtype")), _quantize_int8_build, _float),
        OpBench(
            "rms_norm",
            (Param("T", "int"), Param("H", "int"), _dtype("dtype"), Param("residual", "bool", False)),
            _rms_norm_build,
            _float,
            _rms_norm_direct,
        ),
        OpBench(
            "silu_and_mul", (Param("T", "int"), Param("I", "int"), _dtype("dtype")), _silu_build, _float, _silu_direct
        ),
        OpBench(
            "rotary_embedding",
            (
                Param("B", "int", 1),
                Param("T", "int"),
                Param("H", "int"),
                Param("D", "int", 64),
                _dtype("dtype"),
                Param("interleaved", "bool", True),
            ),
            _rotary_build,
            _float,
            _rotary_direct,
        ),
        OpBench(
            "attention",
            (
                Param("B", "int", 1),
                Param("Hq", "int"),
                Param("Hk", "int", 0),
                Param("Tq", "int"),
                Param("Tk", "int", 0),
                Param("D", "int", 128),
                Param("Dv", "count", 0),
                _dtype("dtype"),
                Param("causal", "bool", True),
                Param("window", "window", None),
            ),
            _attention_build,
            _float,
            _attention_direct,
        ),
        OpBench(
            "moe_gate",
            (
                Param("T", "int"),
                Param("E", "int"),
                Param("top_k", "int", 8),
                Param("n_group", "int", 8),
                Param("topk_group", "int", 4),
            ),
            _moe_gate_build,
            lambda p: torch.float32,
        ),
        OpBench(
            "moe_experts",
            (
                Param("T", "int"),
                Param("H", "int"),
                Param("I", "int"),
                Param("E", "int"),
                Param("top_k", "int", 8),
                _dtype("dtype"),
                _EXPERT_WEIGHT,
            ),
            _moe_experts_build,
            _float,
        ),
    )
}


# ---------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One op at one shape."""

    op: str
    #: Every parameter, defaults filled in.
    params: Mapping[str, Any]
    #: The parameters the shape set spelled out (shown in labels).
    given: tuple[str, ...]

    @property
    def bench(self) -> OpBench:
        return BENCHES[self.op]

    @property
    def label(self) -> str:
        return f"{self.op}(" + ", ".join(f"{k}={_show(self.params[k])}" for k in self.given) + ")"

    def inputs(self, device: torch.device, seed: int) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(seed)
        return self.bench.build(self.params, device, gen)


def _show(v: Any) -> str:
    return (
        "null"
        if v is None
        else str(list(v))
        if isinstance(v, (list, tuple))
        else str(v).lower()
        if isinstance(v, bool)
        else str(v)
    )


def _resolve_defaults(op: str, params: dict[str, Any]) -> None:
    """Parameters whose default depends on others (attention: Hk = Hq, Tk = Tq, Dv = D)."""
    if op == "attention":
        params["Hk"] = params["Hk"] or params["Hq"]
        params["Tk"] = params["Tk"] or params["Tq"]
        params["Dv"] = params["Dv"] or params["D"]


def make_case(
    op: str, given: Mapping[str, Any], error: Callable[[tuple[str, ...], str], ConfigError] | None = None
) -> Case:
    """A validated :class:`Case`; ``error(key_path, message)`` builds the error to raise
    (the YAML loader passes one that adds file:line)."""
    error = error or (lambda path, msg: ConfigError(f"{'.'.join(path)}: {msg}" if path else msg, file="<shapes>"))
    bench = BENCHES.get(op)
    if bench is None:
        raise error(("op",), f"got {op!r}, expected one of: {', '.join(BENCHES)}")
    params: dict[str, Any] = {}
    for key, value in given.items():
        param = bench.param(key)
        if param is None:
            raise error(
                (str(key),), f"unknown parameter of {op}, expected one of: {', '.join(p.name for p in bench.params)}"
            )
        problem = param.check(value)
        if problem:
            raise error((key,), f"got {value!r}, expected {problem}")
        params[key] = value
    for param in bench.params:
        if param.name not in params:
            if param.default is _REQUIRED:
                raise error(
                    (), f"{op} needs parameter {param.name!r} (parameters: {', '.join(p.name for p in bench.params)})"
                )
            params[param.name] = param.default
    _resolve_defaults(op, params)
    return Case(op, params, tuple(given))


def _ci_shapes() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("linear", dict(M=16, N=512, K=512, dtype="bfloat16")),
        ("linear", dict(M=128, N=512, K=512, dtype="float32")),
        ("linear", dict(M=16, N=512, K=512, dtype="bfloat16", weight="fp8-block")),
        ("fp8_gemm", dict(M=64, N=256, K=512, granularity="block")),
        ("fp8_gemm", dict(M=64, N=256, K=512, granularity="row")),
        ("int8_gemm", dict(M=64, N=256, K=512)),
        ("quantize_fp8", dict(M=64, K=1024, block=[1, 128])),
        ("dequantize_fp8", dict(M=64, K=1024, block=[1, 128])),
        ("quantize_int8", dict(M=64, K=1024)),
        ("rms_norm", dict(T=64, H=1024, dtype="bfloat16")),
        ("rms_norm", dict(T=64, H=1024, dtype="float32", residual=True)),
        ("silu_and_mul", dict(T=64, I=1024)),
        ("rotary_embedding", dict(T=64, H=16, D=64)),
        ("attention", dict(B=1, Hq=8, Tq=128, D=64)),
        ("attention", dict(B=4, Hq=16, Hk=1, Tq=1, Tk=256, D=96, Dv=64)),
        ("moe_gate", dict(T=64, E=64, top_k=6, n_group=8, topk_group=4)),
        ("moe_experts", dict(T=32, H=256, I=128, E=16, top_k=4)),
    ]


def _full_shapes() -> list[tuple[str, dict[str, Any]]]:
    from dshal.model.args import ModelArgs

    a = ModelArgs()  # its defaults are DeepSeek-V3 (671B)
    d, inter, q_lora, vocab = a.hidden_size, a.intermediate_size, a.q_lora_rank, a.vocab_size
    heads, rope, kv_lora = a.num_attention_heads, a.qk_rope_head_dim, a.kv_lora_rank
    prefill, decode = 4096, 64
    return [
        ("linear", dict(M=prefill, N=q_lora, K=d, weight="fp8-block")),  # q_a_proj
        ("linear", dict(M=prefill, N=2 * inter, K=d, weight="fp8-block")),  # dense gate_up_proj
        ("linear", dict(M=prefill, N=d, K=inter, weight="fp8-block")),  # dense down_proj
        ("linear", dict(M=decode, N=d, K=inter, weight="fp8-block")),
        ("linear", dict(M=decode, N=vocab, K=d, dtype="bfloat16")),  # lm_head (kept bf16)
        ("fp8_gemm", dict(M=prefill, N=d, K=inter, granularity="block")),
        ("fp8_gemm", dict(M=prefill, N=d, K=inter, granularity="row")),
        ("int8_gemm", dict(M=prefill, N=d, K=inter)),
        ("quantize_fp8", dict(M=prefill, K=d, block=[1, 128])),
        ("dequantize_fp8", dict(M=d, K=inter, block=[128, 128])),
        ("quantize_int8", dict(M=prefill, K=d)),
        ("rms_norm", dict(T=prefill, H=d, residual=True)),
        ("rms_norm", dict(T=prefill, H=kv_lora)),
        ("silu_and_mul", dict(T=prefill, I=inter)),
        ("rotary_embedding", dict(T=prefill, H=heads, D=rope)),
        # prefill: expanded MLA heads; decode: absorbed MLA, one latent + rope head shared by all
        ("attention", dict(B=1, Hq=heads, Tq=prefill, D=a.qk_head_dim, Dv=a.v_head_dim)),
        ("attention", dict(B=decode, Hq=heads, Hk=1, Tq=1, Tk=prefill, D=kv_lora + rope, Dv=kv_lora)),
        (
            "moe_gate",
            dict(
                T=prefill, E=a.n_routed_experts, top_k=a.num_experts_per_tok, n_group=a.n_group, topk_group=a.topk_group
            ),
        ),
        (
            "moe_experts",
            dict(
                T=256,
                H=d,
                I=a.moe_intermediate_size,
                E=a.n_routed_experts,
                top_k=a.num_experts_per_tok,
                weight="fp8-block",
            ),
        ),
    ]


SHAPE_SETS: dict[str, Callable[[], list[tuple[str, dict[str, Any]]]]] = {"ci": _ci_shapes, "full": _full_shapes}


def load_shapes_file(path: str | os.PathLike) -> list[Case]:
    """Cases from a YAML file (``cases:`` list, or a top-level list, of ``{op: ..., <params>}``);
    every error names ``file:line``."""
    from dshal.config import read_yaml  # the config loader: bounded YAML with line marks

    doc = read_yaml(path, "shapes file")
    data, root = doc.data, ()
    if isinstance(data, Mapping):
        unknown = [k for k in data if k != "cases"]
        if unknown:
            raise doc.error((str(unknown[0]),), "unknown key, expected 'cases' (a list of {op: NAME, <shape params>})")
        data, root = data.get("cases"), ("cases",)
    if not isinstance(data, list) or not data:
        raise doc.error(root, f"got {data!r}, expected a non-empty list of cases, each {{op: NAME, <shape params>}}")
    cases = []
    for index, item in enumerate(data):
        at = root + (f"[{index}]",)
        if not isinstance(item, Mapping) or "op" not in item:
            raise doc.error(at, f"got {item!r}, expected a mapping with an 'op' key and shape parameters")
        given = {k: v for k, v in item.items() if k != "op"}
        cases.append(make_case(item["op"], given, lambda p, msg, at=at: doc.error(at + p, msg)))
    return cases


def shape_cases(shapes: str, ops: Sequence[str] | None = None) -> list[Case]:
    """The cases of shape set ``shapes`` (``ci``, ``full`` or a YAML path), limited to ``ops``."""
    if shapes in SHAPE_SETS:
        cases = [make_case(op, given) for op, given in SHAPE_SETS[shapes]()]
    elif shapes.endswith((".yaml", ".yml")) or os.path.exists(shapes):
        cases = load_shapes_file(shapes)
    else:
        raise ConfigError(f"--shapes: got {shapes!r}, expected ci, full, or a YAML file of cases")
    if ops:
        unknown = [op for op in ops if op not in SPECS]
        if unknown:
            raise ConfigError(f"--ops: got {unknown[0]!r}, expected op names from: {', '.join(SPECS)}")
        cases = [c for c in cases if c.op in ops]
        if not cases:
            raise ConfigError(f"--ops: none of {', '.join(ops)} has a case in shape set {shapes!r}")
    return cases


__all__ = ["BENCHES", "Case", "OpBench", "Param", "SHAPE_SETS", "load_shapes_file", "make_case", "shape_cases"]
