"""A fragile backend: the cpu backend whose ``silu_and_mul`` assumes a contiguous input.

Every ``silu_and_mul`` accuracy case passes (the suite builds contiguous inputs), but a
transposed or strided ``x``, which the op accepts, makes its ``.view`` raise torch's
RuntimeError: the ``silu_and_mul/bad_input/spoiled`` case must fail on it. Registered as the
plugin ``fragile`` through a throw-away ``dist-info`` (see the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from cpu_variant import CpuVariant


def silu_and_mul(x):
    """Bug: ``.view`` needs a contiguous ``x``."""
    rows = x.view(-1).view(-1, x.shape[-1])  # flattening a non-contiguous tensor: RuntimeError
    gate, up = rows.chunk(2, dim=-1)
    return (F.silu(gate) * up).reshape(*x.shape[:-1], x.shape[-1] // 2)


class FragileBackend(CpuVariant):
    variant_name, variant_note = "fragile", "silu_and_mul needs a contiguous input"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return {"silu_and_mul": silu_and_mul}
