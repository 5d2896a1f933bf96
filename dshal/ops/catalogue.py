"""The op catalogue: every op's spec, by name, in the order DESIGN.md lists them."""

from __future__ import annotations

import importlib

from dshal.ops.spec import OpSpec

#: Modules that declare ops (one per op family).
OP_MODULES = (
    "dshal.ops.quant",
    "dshal.ops.gemm",
    "dshal.ops.norm",
    "dshal.ops.activation",
    "dshal.ops.rotary",
    "dshal.ops.attention",
    "dshal.ops.sparse_attention",
    "dshal.ops.moe",
)


def _collect() -> dict[str, OpSpec]:
    specs: dict[str, OpSpec] = {}
    for module_name in OP_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, OpSpec):
                specs[value.name] = value
    return specs


#: op name -> OpSpec
SPECS: dict[str, OpSpec] = _collect()
