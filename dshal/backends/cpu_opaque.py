"""The ``cpu`` backend's native ops as opaque torch operators under ``torch.compile``.

The native providers call dshal's C kernels through ctypes, which dynamo cannot trace (it
would hand them fake tensors' pointers), and read values on the host (the attention NaN
guard's sums, a routing's ids). Each such call was a graph break, and dynamo then compiled
the frames between breaks one by one: ``dshal.ops.linear`` and its provider once per weight
shape, past its recompile limit, so a compiled decode step of the tiny model ran about ten
times slower than eager.

Under ``torch.compile`` (:func:`torch.compiler.is_compiling`) each of these ops is one
call of ``torch.ops.dshal_cpu.<op>`` instead: one node in the graph, whose outputs dynamo
and inductor know from the op's declared outputs (``OpSpec.outputs_of``) and which runs the
provider itself, on the real tensors, when the compiled code runs: the same kernels as eager,
so the same numbers. Eager calls go straight to the provider (the dispatcher would add ~5 µs
a call, and calling a torch operator from Python imports dynamo).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dshal.ops.catalogue import SPECS

#: The operator namespace: ``torch.ops.dshal_cpu.<op>``.
NAMESPACE = "dshal_cpu"

#: Each opaque op's schema (torch's operator schema language: ``Tensor?`` is an optional tensor).
#: ``rms_norm`` has two, by its return: the norm alone, or with the fused residual's sum.
SCHEMAS = {
    "linear": "linear(Tensor x, Tensor weight, Tensor? bias, Tensor? weight_scale) -> Tensor",
    "attention": (
        "attention(Tensor q, Tensor k, Tensor v, bool causal, float? scale, int? window, int global_tokens) -> Tensor"
    ),
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "add_rms_norm": "add_rms_norm(Tensor x, Tensor weight, float eps, Tensor residual) -> (Tensor, Tensor)",
    "rotary_embedding": "rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor",
    "moe_gate": (
        "moe_gate(Tensor logits, Tensor? bias, int top_k, int n_group, int topk_group, float routed_scaling_factor, "
        "bool norm_topk_prob) -> (Tensor, Tensor)"
    ),
    "moe_experts": (
        "moe_experts(Tensor x, Tensor weights, Tensor ids, Tensor w13, Tensor w2, Tensor? w13_scale, "
        "Tensor? w2_scale) -> Tensor"
    ),
    "sparse_mla_attention": "sparse_mla_attention(Tensor q, Tensor kv, Tensor indices, float scale, int v_dim) -> Tensor",
}


def _operator(op: str, residual: bool = False) -> str:
    return "add_rms_norm" if op == "rms_norm" and residual else op


def _fresh(out: Any, args: tuple[Any, ...]) -> Any:
    """``out`` with each tensor contiguous (the strides the op's meta outputs promise) and
    never sharing memory with an input (an operator without alias annotations must not)."""
    inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor) and t.numel()}

    def own(t: torch.Tensor) -> torch.Tensor:
        if t.numel() and t.untyped_storage().data_ptr() in inputs:
            return t.clone(memory_format=torch.contiguous_format)
        return t.contiguous()

    return tuple(own(t) for t in out) if isinstance(out, tuple) else own(out)


def _real(op: str, provider: Callable[..., Any]) -> Callable[..., Any]:
    """The operator's CPU kernel: ``provider`` on the real tensors."""

    def run(*args: Any) -> Any:
        if op == "rms_norm" and len(args) == 4:  # add_rms_norm: (x, weight, eps, residual)
            return _fresh(tuple(provider(*args)), args)
        out = provider(*args)
        return _fresh(tuple(out) if isinstance(out, (tuple, list)) else out, args)

    return run


def _meta(op: str) -> Callable[..., Any]:
    """The operator's meta kernel (what dynamo and inductor trace with): empty tensors of the
    op's declared output shapes and dtypes (``moe_gate`` declares shapes only: its weights are
    float32, float64 for float64 logits, and its ids int64)."""
    outputs = SPECS[op].outputs_of

    def shapes(*args: Any) -> Any:
        declared = outputs(*args)
        if op == "moe_gate":
            weights = torch.float64 if args[0].dtype == torch.float64 else torch.float32
            dtypes: tuple[torch.dtype | None, ...] = (weights, torch.int64)
        else:
            dtypes = tuple(o.dtype for o in declared)
        made = tuple(torch.empty(tuple(o.shape), dtype=d, device="meta") for o, d in zip(declared, dtypes))
        return made if len(made) > 1 else made[0]

    return shapes


class _Registered:
    """The library that holds the operators (they live while it does), made once per process."""

    library: torch.library.Library | None = None


def _register(providers: Mapping[str, Callable[..., Any]]) -> None:
    if _Registered.library is not None:
        return
    library = torch.library.Library(NAMESPACE, "DEF")  # ~0.1 ms an operator; no dynamo import
    for name, schema in SCHEMAS.items():
        op = "rms_norm" if name == "add_rms_norm" else name
        library.define(schema)
        library.impl(name, _real(op, providers[op]), "CPU")
        library.impl(name, _meta(op), "Meta")
    _Registered.library = library


def opaque_when_compiled(providers: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """``providers`` (op -> native provider), each of :data:`SCHEMAS`' ops wrapped to call its
    ``torch.ops.dshal_cpu`` operator while dynamo traces it and the provider otherwise."""
    _register(providers)
    ops = getattr(torch.ops, NAMESPACE)
    wrapped = dict(providers)
    for op, provider in providers.items():
        if op in SCHEMAS:
            wrapped[op] = _when_compiled(op, provider, ops)
    return wrapped


def _when_compiled(op: str, provider: Callable[..., Any], ops: Any) -> Callable[..., Any]:
    # (name, default) per parameter, read once: dynamo traces plain lookups, not inspect's binding
    params = [(p.name, p.default) for p in SPECS[op].signature.parameters.values()]

    @functools.wraps(provider)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return provider(*args, **kwargs)
        given = [*args, *(kwargs.get(name, default) for name, default in params[len(args) :])]
        if op == "rms_norm":
            residual = given.pop()
            if residual is None:
                return ops.rms_norm(*given)
            return ops.add_rms_norm(*given, residual)
        return getattr(ops, op)(*given)

    return call


__all__ = ["NAMESPACE", "SCHEMAS", "opaque_when_compiled"]
