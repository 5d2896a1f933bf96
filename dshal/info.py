"""``dshal info``: what is installed, what is usable here, and who serves each op."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--config", metavar="F", help="dshal.yaml to select with (default: $DSHAL_CONFIG or built-in defaults)")
    parser.add_argument("--backend", metavar="NAME", help="select this backend instead of the config's")


def collect(config: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """Everything ``dshal info`` shows, as a JSON-friendly dict."""
    import dshal
    from dshal.errors import DshalError

    overrides = {"backend": backend} if backend else {}
    cfg = dshal.load_config(config, **overrides)
    infos = dshal.backends(emulate=cfg.emulate)
    out: dict[str, Any] = {"dshal_version": dshal.__version__, "api_version": dshal.API_VERSION, "backends": []}
    for info in infos:
        entry = info.as_dict()
        if info.capabilities is not None:
            caps = asdict(info.capabilities)
            caps["op_kinds"] = dict(info.capabilities.op_kinds)
            entry["capabilities"] = caps
            entry["ops"] = sorted(info.backend.ops()) if info.backend is not None else []
        out["backends"].append(entry)
    try:
        rt = dshal.runtime.build_runtime(cfg)
        out["runtime"] = rt.describe()
    except DshalError as err:
        out["runtime"] = None
        out["runtime_error"] = str(err)
    return out


def main(args: argparse.Namespace) -> int:
    data = collect(args.config, args.backend)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        _print_tables(data)
    if data["runtime"] is None:
        # The tables above still list what was found; the reason goes to stderr as one line.
        print(f"dshal info: error: {data['runtime_error']}", file=sys.stderr)
        return 1
    return 0


def _print_tables(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Piped output (CI logs) gets a wide console instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    table = Table(title=f"dshal {data['dshal_version']} backends (api_version {data['api_version']})")
    for col in ("name", "version", "entry point", "loaded", "available", "reason"):
        table.add_column(col, overflow="fold")
    for b in data["backends"]:
        avail = ("yes (emulated)" if b["emulated"] else "yes") if b["available"] else "no"
        table.add_row(
            b["name"], b["version"] or "?", b["entry_point"], "yes" if b["loaded"] else "[red]no[/red]",
            avail if b["available"] else "[yellow]no[/yellow]", escape(b["reason"]),
        )
    console.print(table)
    for b in data["backends"]:
        caps = b.get("capabilities")
        if not caps:
            continue
        notes = "; ".join(f"{k}: {v}" for k, v in caps["notes"].items())
        console.print(
            f"[bold]{b['name']}[/bold]: {caps['device_name']} {caps['arch']}, fp8 {','.join(caps['fp8_formats']) or 'none'} "
            f"(e4m3 = {caps['native_e4m3']}), process group {caps['dist_backend']}"
            + (", emulated" if caps["emulated"] else "") + (f"; {notes}" if notes else "")
        )
    rt = data["runtime"]
    if rt is None:
        return
    console.print("\n[bold]selection[/bold] (backend: %s)" % rt["config"]["backend"])
    for d in rt["selection"]:
        console.print(f"  {'[green]taken[/green]' if d['taken'] else 'passed'}  {d['name']}: {escape(d['reason'])}")
    ops = Table(title=f"op providers on {rt['backend']} ({rt['device']})")
    ops.add_column("op")
    ops.add_column("provider")
    ops.add_column("kind")
    for op, p in rt["providers"].items():
        kind = p["kind"]
        ops.add_row(op, p["provider"], f"[yellow]{kind}[/yellow]" if kind == "fallback" else kind)
    console.print(ops)
