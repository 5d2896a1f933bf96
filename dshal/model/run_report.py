"""A run report: which provider served each op and how often, every fallback and why, and
the precision mode of each layer.

    from dshal.model.run_report import RunReport
    report = RunReport(dshal.current(), model)
    with report.recording():
        model.generate(ids, 16)
    report.to_dict()          # JSON-friendly
    report.print()            # a table on the terminal
    report.write("run.json")

``dshal run --report F`` does the same around its timed generation. Calls are counted
through :func:`dshal.runtime.op_hook` (one counter increment per call, and for a ``linear``
a look at its weight's dtype: an FP8 weight with one scale couples the call's rows, which a
strict run cannot keep apart); the hook is gone when the block ends.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dshal.backends.invariant import CONTRACT_BATCH_VARIANT, couples_rows
from dshal.outputs import atomic_write, console as output_console
from dshal.runtime import format_paths, op_hook


def _weight_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``weight`` and ``weight_scale`` of a ``linear(x, weight, bias, weight_scale)`` call,
    all :func:`couples_rows` reads (no signature binding per call)."""
    return {"weight": args[1] if len(args) > 1 else kwargs.get("weight"),
            "weight_scale": args[3] if len(args) > 3 else kwargs.get("weight_scale")}


class RunReport:
    """Collects op calls while :meth:`recording`; describes providers, fallbacks, precision."""

    def __init__(self, runtime: Any, model: Any | None = None):
        self.runtime = runtime
        self.model = model
        self.calls: Counter[str] = Counter()
        #: calls whose contract couples the rows (``couples_rows``: batch-variant under strict)
        self.coupled: Counter[str] = Counter()
        #: calls the backend's own providers served with the reference math while recording
        #: (Backend.reference_calls: the process's, other threads' included)
        self.inside: Counter[str] = Counter()
        self._thread = threading.get_ident()

    def _count(self, name: str, provider: Callable[..., Any]) -> Callable[..., Any]:
        calls, coupled, mine = self.calls, self.coupled, self._thread
        may_couple = name in CONTRACT_BATCH_VARIANT  # linear: its weight decides

        def counted(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == mine:  # this request's calls, not another thread's
                calls[name] += 1
                if may_couple and couples_rows(name, _weight_args(args, kwargs)):
                    coupled[name] += 1
            return provider(*args, **kwargs)

        counted.__name__ = name
        counted.__wrapped__ = provider  # type: ignore[attr-defined]
        return counted

    @contextlib.contextmanager
    def recording(self) -> Iterator[RunReport]:
        """Count every ``dshal.ops`` call this thread makes inside the block (on the active
        runtime). One recording at a time per process: the op hook does not nest."""
        self._thread = threading.get_ident()
        before = Counter(self.runtime.backend.reference_calls())
        try:
            with op_hook(self._count):
                yield self
        finally:
            self.inside += Counter(self.runtime.backend.reference_calls()) - before

    # ------------------------------------------------------------ contents
    def fallbacks(self) -> list[dict[str, Any]]:
        """Every op not served by the selected backend itself, with the reason."""
        rt = self.runtime
        out = []
        for op, provider in rt.providers.items():
            if op in getattr(rt, "refused", {}):
                out.append({"op": op, "provider": provider, "kind": "refused", "calls": self.calls.get(op, 0),
                            "reason": f"backend {rt.backend.name!r} does not provide {op!r}; its calls raise "
                                      f"UnsupportedOpError: {rt.refused[op]}"})
            elif op in rt.fallbacks:
                why = (f"backend {rt.backend.name!r} does not provide {op!r}; served by its reference "
                       f"(provider {provider!r}, fallback: {rt.config.fallback})")
                out.append({"op": op, "provider": provider, "kind": "fallback", "reason": why, "calls": self.calls.get(op, 0)})
            elif op in rt.config.ops or provider != rt.backend.name:
                out.append({"op": op, "provider": provider, "kind": "override", "reason": f"config ops.{op}: {provider}",
                            "calls": self.calls.get(op, 0)})
        for op, served in sorted(self.inside.items()):
            out.append({"op": op, "provider": rt.backend.name, "kind": "reference inside", "calls": served,
                        "reason": f"{served} {op} computations (of {self.calls.get(op, 0)} {op} calls; one op may "
                                  f"run another inside) used dshal's reference math inside backend "
                                  f"{rt.backend.name!r}, not its kernel: inputs the kernel does not take "
                                  f"(`dshal info --backend {rt.backend.name}` notes which)"})
        for op, why in getattr(rt, "determinism_gaps", {}).items():
            calls = self.calls.get(op, 0)
            if op in getattr(rt, "batch_invariant", frozenset()):  # a contract's coupling: only its own calls
                calls = self.coupled.get(op, 0)
                if not calls:
                    continue
            out.append({"op": op, "provider": rt.providers.get(op), "kind": "determinism",
                        "reason": f"determinism: strict, but {why}", "calls": calls})
        return out

    def to_dict(self) -> dict[str, Any]:
        rt = self.runtime
        ops = {
            op: {**rt.provider_entry(op), "calls": self.calls.get(op, 0),
                 "batch_invariant": op in getattr(rt, "batch_invariant", frozenset())}
            for op in rt.providers
        }
        out: dict[str, Any] = {
            "backend": rt.backend.name,
            "device": str(rt.device),
            "emulated": rt.emulated,
            "determinism": getattr(rt.config, "determinism", "default"),
            "ops": ops,
            "calls_total": sum(self.calls.values()),
            "fallbacks": self.fallbacks(),
        }
        if self.model is not None:
            desc = self.model.describe()
            out["precision"] = {
                "config": rt.config.precision.gemm,
                "groups": desc["precision_groups"],
                "layers": [{"layer": layer["layer"], "ffn": layer["ffn"], "precision": layer["precision"],
                            "modes": sorted(set(layer["precision"].values()))} for layer in desc["layers"]],
            }
        return out

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    def print(self, console: Any = None) -> None:
        """The report as tables: op -> provider, kind, calls; fallbacks; modes per layer."""
        from rich.table import Table

        console = console or output_console(soft_wrap=True)
        data = self.to_dict()
        ops = Table(title=f"run report: ops served on {data['backend']} ({data['calls_total']} calls)", show_edge=False)
        for h in ("op", "provider", "kind", "calls"):
            ops.add_column(h)
        for op, row in sorted(data["ops"].items(), key=lambda kv: -kv[1]["calls"]):
            kind = row["kind"] + (f" ({format_paths(row['paths'])})" if row.get("paths") else "")
            kind += " (batch-invariant)" if row["batch_invariant"] else ""
            ops.add_row(op, row["provider"], kind, str(row["calls"]))
        console.print(ops)
        if data["fallbacks"]:
            fb = Table(title="fallbacks and overrides", show_edge=False)
            for h in ("op", "provider", "kind", "calls", "reason"):
                fb.add_column(h)
            for row in data["fallbacks"]:
                fb.add_row(row["op"], str(row["provider"]), row["kind"], str(row["calls"]), row["reason"])
            console.print(fb)
        else:
            console.print("fallbacks: none (every op served by the backend itself)")
        if "precision" in data:
            prec = Table(title=f"precision per layer (precision.gemm: {data['precision']['config']})", show_edge=False)
            prec.add_column("layer")
            prec.add_column("ffn")
            prec.add_column("modes")
            for layer in data["precision"]["layers"]:
                prec.add_row(str(layer["layer"]), layer["ffn"], ", ".join(layer["modes"]))
            console.print(prec)


__all__ = ["RunReport"]
