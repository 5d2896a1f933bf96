"""The base of the conformance tests' deliberately wrong backends: the cpu backend under
another name, with some of its ops replaced. Each fixture states only its name, what is
wrong with it (shown as its device name) and the ops it replaces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from dshal.backend import Capabilities
from dshal.backends.cpu import CpuBackend


class CpuVariant(CpuBackend):
    #: The plugin name the fixture registers (its entry point's name too).
    variant_name = ""
    #: What is wrong with it, shown in its device name: ``cpu (<note>)``.
    variant_note = ""

    @property
    def name(self) -> str:
        return self.variant_name

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities(), device_name=f"cpu ({self.variant_note})")

    def replaced_ops(self, cpu_ops: Mapping[str, Callable[..., Any]]) -> Mapping[str, Callable[..., Any]]:
        """The ops this variant serves differently, given the cpu backend's own."""
        return {}

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        table = dict(super().ops())
        table.update(self.replaced_ops(dict(table)))
        return table
