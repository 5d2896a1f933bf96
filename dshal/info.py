"""``dshal info``: what is installed, what is usable here, and who serves each op."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

import dshal
from dshal.errors import ArgumentError, DshalError, PluginLoadError
from dshal.outputs import console as output_console
from dshal.versions import stack_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--config", metavar="F", help="dshal.yaml to select with (default: $DSHAL_CONFIG or built-in defaults)")
    parser.add_argument("--backend", metavar="NAME", help="select this backend instead of the config's")
    parser.add_argument(
        "--standin", metavar="RELEASE",
        help="with --backend NAME: that backend's dry view of RELEASE of its vendor runtime (e.g. ascend's "
             "op-plugin 7.2.0): the path each op would take, found on a stand-in without the device "
             "(Backend.standin_capabilities); not a device run, never in a conformance report",
    )


def collect(config: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """Everything ``dshal info`` shows, as a JSON-friendly dict."""
    overrides = {"backend": backend} if backend else {}
    cfg = dshal.load_config(config, overrides_source="--backend", **overrides)
    infos = dshal.backends(emulate=cfg.emulate)
    out: dict[str, Any] = {"dshal_version": dshal.__version__, "api_version": dshal.API_VERSION,
                           "versions": stack_report(), "backends": []}
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


def collect_standin(backend: str, release: str) -> dict[str, Any]:
    """``dshal info --backend NAME --standin RELEASE`` as a JSON-friendly dict: the backend's
    :meth:`~dshal.Backend.standin_capabilities` for ``release`` (loaded whether or not its device
    is here; its availability is reported unchanged)."""
    from dshal.registry import REGISTRY  # lazy: start-up time (dshal info --help loads no torch)

    info = REGISTRY.get(backend)
    if not info.loaded or info.backend is None:
        raise PluginLoadError(f"--backend {backend!r} ({info.entry_point}) failed to load: {info.reason}")
    caps = info.backend.standin_capabilities(release)
    if caps is None:
        raise ArgumentError(
            f"--standin: backend {backend!r} offers no stand-in view (its Backend.standin_capabilities returns None)"
        )
    view = asdict(caps)
    view["op_kinds"] = dict(caps.op_kinds)
    return {
        "standin": {
            "backend": backend,
            "release": release,
            "device_run": False,
            "label": f"{backend} on a stand-in for release {release}: NOT a device run; nothing here ran on "
                     f"the device, and the backend's availability is unchanged",
            "available": info.available,
            "reason": info.reason,
            "capabilities": view,
        }
    }


def _console() -> Any:
    return output_console()  # piped output (CI logs): unbounded width, not rich's 80-column default


def _print_standin(data: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    view = data["standin"]
    caps = view["capabilities"]
    console = _console()
    console.print(f"[bold]{escape(view['label'])}[/bold]")
    console.print(f"stand-in: {escape(caps['device_name'])}")
    console.print(f"{view['backend']} itself: available {'yes' if view['available'] else 'no'} ({escape(view['reason'])})")
    table = Table(title=f"{view['backend']} per op on release {view['release']} (stand-in, not a device)")
    table.add_column("what", overflow="fold")
    table.add_column("path / calls", overflow="fold")
    for key, value in caps["notes"].items():
        table.add_row(escape(key), escape(str(value)))
    console.print(table)


def main(args: argparse.Namespace) -> int:
    if args.standin is not None:
        try:
            if not args.backend:
                raise ArgumentError("--standin: needs --backend NAME (the backend whose stand-in view to show)")
            data = collect_standin(args.backend, args.standin)
        except DshalError as err:
            print(f"dshal info: error: {err}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            _print_standin(data)
        return 0
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
    from rich.markup import escape
    from rich.table import Table

    console = _console()
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
    stack = []
    for package, v in data["versions"].items():
        if v["installed"] is not None:
            note = "" if v["in_range"] else f" [yellow](outside the checked {v['supported']}: may work, not tested)[/yellow]"
            stack.append(f"{package} {v['installed']}{note}")
    console.print("stack: " + ", ".join(stack))
    for b in data["backends"]:
        caps = b.get("capabilities")
        if not caps:
            continue
        notes = "; ".join(f"{k}: {v}" for k, v in caps["notes"].items())
        device = " ".join(filter(None, (caps["device_name"], caps["arch"])))  # a plugin may leave arch empty
        console.print(
            f"[bold]{b['name']}[/bold]: {device}, fp8 {','.join(caps['fp8_formats']) or 'none'} "
            f"(e4m3 = {caps['native_e4m3']}), process group {caps['dist_backend']}"
            + (", emulated" if caps["emulated"] else "")
            + ("" if caps["fp8_storage"] else ", no float8 tensors on the device (fp8_storage false)")
            + (f"; {notes}" if notes else "")
        )
    rt = data["runtime"]
    if rt is None:
        return
    console.print(f"\n[bold]selection[/bold] (backend: {rt['config']['backend']})")
    for d in rt["selection"]:
        console.print(f"  {'[green]taken[/green]' if d['taken'] else 'passed'}  {d['name']}: {escape(d['reason'])}")
    ops = Table(title=f"op providers on {rt['backend']} ({rt['device']})")
    ops.add_column("op")
    ops.add_column("provider")
    ops.add_column("kind (main path)")
    ops.add_column("per weight format (where the path depends on it)", overflow="fold")
    for op, p in rt["providers"].items():
        kind = p["kind"]
        paths = p.get("paths", {})
        formats = "\n".join(f"{fmt}: {path['kind']} -- {escape(path['via'])}" for fmt, path in paths.items())
        ops.add_row(op, p["provider"], f"[yellow]{kind}[/yellow]" if kind in ("fallback", "refused") else kind, formats)
    console.print(ops)
    det = rt.get("determinism") or {}
    if det.get("mode") == "strict":
        console.print(f"\n[bold]determinism: strict[/bold]: batch-invariant: {', '.join(det['batch_invariant']) or 'none'}")
        for op, why in det["gaps"].items():
            console.print(f"  [yellow]{op}[/yellow]: {escape(why)}")
