"""A subtly wrong backend: the cpu backend whose ``linear`` adds a small systematic bias.

The bias is half of what the op's own tolerance allows -- ``0.5 x atol x K``: the atol the
suite judges ``linear`` with (1e-7 for float32 inputs and weights, ``FLOAT32_MATMUL``;
torch.testing's 1e-5 otherwise), scaled by the reduction length -- so every ``linear`` case
passes. In the model the same positive offset enters
every projection of every layer and compounds; the ``model`` family and ``dshal diff``
must catch it. Registered as the plugin ``biased`` through a throw-away ``dist-info``
(see the tests), found like any vendor plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from cpu_variant import CpuVariant

from dshal_conformance.tolerances import FLOAT32_MATMUL

#: Fraction of the op tolerance's absolute part the bias uses (0.5: the model case's drift
#: is ~14x its float32 bound; a quarter of the float32 matmul row's atol gave ~7x).
FRACTION = 0.5
#: torch.testing's atol (tolerances.CLOSENESS): linear's, K-scaled, for every input but float32 x float32.
ATOL = 1e-5


def biased(linear: Callable[..., Any]) -> Callable[..., Any]:
    def biased_linear(x, weight, bias=None, weight_scale=None):
        out = linear(x, weight, bias, weight_scale)
        atol = FLOAT32_MATMUL.atol if x.dtype == weight.dtype == torch.float32 else ATOL
        return out + FRACTION * atol * x.shape[-1]

    return biased_linear


class BiasedBackend(CpuVariant):
    variant_name, variant_note = "biased", "linear biased within tolerance"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return {"linear": biased(cpu_ops["linear"])}
