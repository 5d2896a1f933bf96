"""A subtly wrong backend: the cpu backend whose ``linear`` adds a small systematic bias.

The bias is a quarter of what the op's own tolerance allows -- ``0.25 x atol x K`` with
torch.testing's ``atol`` (1e-5) scaled by the reduction length, as the suite judges
matmuls -- so every ``linear`` case passes. In the model the same positive offset enters
every projection of every layer and compounds; the ``model`` family and ``dshal diff``
must catch it. Registered as the plugin ``biased`` through a throw-away ``dist-info``
(see the tests), found like any vendor plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cpu_variant import CpuVariant

#: Fraction of the op tolerance's absolute part the bias uses.
FRACTION = 0.25
#: torch.testing's atol for float32, bfloat16 and float16 (tolerances.CLOSENESS).
ATOL = 1e-5


def biased(linear: Callable[..., Any]) -> Callable[..., Any]:
    def biased_linear(x, weight, bias=None, weight_scale=None):
        out = linear(x, weight, bias, weight_scale)
        return out + FRACTION * ATOL * x.shape[-1]

    return biased_linear


class BiasedBackend(CpuVariant):
    variant_name, variant_note = "biased", "linear biased within tolerance"

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        return {"linear": biased(cpu_ops["linear"])}
