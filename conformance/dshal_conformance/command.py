"""``dshal conformance --backend NAME [--ops a,b] [--tier ci|full] [--report-dir DIR]``.

Writes ``DIR/NAME.json`` (schema ``dshal.conformance/1``) and ``DIR/NAME.junit.xml``;
exit 0 only when nothing failed or errored. A backend that cannot run here (no device,
plugin missing) still gets a report whose ``platform.not_run`` says why; the exit code
is then 0 only with ``--allow-unavailable`` (for matrix legs without the hardware).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dshal.errors import ArgumentError
from dshal.lifetime import Terminated
from dshal.outputs import check_writable, console as output_console, is_terminal
from dshal_conformance import report, runner, waivers
from dshal_conformance.cases import all_cases
from dshal_conformance.cases.base import CRASH_LOG
from dshal_conformance.conformance_command import add_arguments  # its options, importable without torch (--help)


@contextlib.contextmanager
def show_crashes(stream: Any) -> Iterator[None]:
    """While the block runs, write each case crash's traceback
    (:data:`~dshal_conformance.cases.base.CRASH_LOG`) to ``stream``; undone after (a program
    calling the command in-process again printed each traceback once more per earlier run)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("crash: %(message)s"))
    level = CRASH_LOG.level
    CRASH_LOG.addHandler(handler)
    CRASH_LOG.setLevel(logging.ERROR)
    try:
        yield
    finally:
        CRASH_LOG.removeHandler(handler)
        CRASH_LOG.setLevel(level)


def main(args: argparse.Namespace) -> int:
    """Run the suite. A Ctrl-C while cases run exits 130 and writes no report; SIGTERM / SIGHUP
    (at any point: `dshal` turns them into :class:`Terminated`) exit 143 / 129 the same way,
    the collective ranks' folder removed."""
    try:
        with show_crashes(sys.stderr) if getattr(args, "traceback", False) else contextlib.nullcontext():
            return _main(args)
    except (KeyboardInterrupt, Terminated) as err:
        code = err.code if isinstance(err, Terminated) else 130
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"dshal conformance: {what}; no report written for {args.backend!r}", file=sys.stderr)
        # Leave at once: torch work may still run in a case's thread, or in threads a case
        # started (torch's pools, gloo), and tearing the interpreter down around them can abort
        # in C++ ("terminate called without an active exception", exit 134). Nothing is left
        # to clean up: reports are only ever written whole, after the run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _main(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = output_console(stderr=True)  # a log's report paths on one line, not cut at 80 columns
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ArgumentError(f"--timeout: got {args.timeout!r}, expected a positive finite number of seconds")
    budget_s = getattr(args, "budget_s", None)
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s >= 0):
        raise ArgumentError(f"--budget-s: got {budget_s!r}, expected a finite number of seconds >= 0")
    ops = runner.check_selection(args.tier, args.ops, args.case, collectives=not args.no_collectives)
    options = runner.Options(
        tier=args.tier,
        ops=ops,
        cases=args.case,
        seed=args.seed,
        case_timeout_s=args.timeout or runner.default_timeout(args.tier),
        collectives=not args.no_collectives,
        progress=not args.quiet and is_terminal(sys.stderr),
        budget_s=budget_s,
    )
    selected = runner.select(runner.capability_cases() + all_cases(args.tier), options)
    if args.list:
        for case in selected:
            print("\n".join(case.result_ids()))
        return 0
    out_dir = check_writable(args.report_dir, "--report-dir", directory=True)
    if args.bundle:
        check_writable(args.bundle, "--bundle", directory=True)
        check_writable(report.bundle_archive(Path(args.bundle)), "--bundle's archive")  # beside the folder: after the run was too late
    target = runner.resolve(args.backend, args.emulate, getattr(args, "determinism", None))
    waiver_path = Path(args.waivers) if args.waivers else (
        waivers.default_path(target.runtime.backend, args.backend) if target.runtime is not None else None
    )
    if waiver_path is not None:
        options.waivers = waivers.load(waiver_path)
    options.waivers_file = args.waivers
    result = runner.run(target, options)
    report.validate(result)
    json_path = report.write_json(result, out_dir / f"{args.backend}.json")
    junit_path = report.write_junit(result, out_dir / f"{args.backend}.junit.xml")
    _print_summary(console, result, json_path, junit_path, waiver_path)
    if args.bundle:
        archive = report.write_bundle(result, runner.environment(target), [json_path, junit_path], Path(args.bundle))
        console.print(f"bundle: {escape(str(args.bundle))} ({escape(str(archive))})")
    if target.broken_leg:  # a broken plugin or a typo fails the leg, whatever --allow-unavailable says
        console.print(f"[red]{escape(args.backend)}: {escape(target.broken_leg)}[/]", highlight=False, soft_wrap=True)
        return 1
    if target.not_run:
        return 0 if args.allow_unavailable else 1
    if report.all_skipped(result):
        console.print("[red]every selected case was skipped[/]: nothing was checked, and nothing to check is not a pass",
                      highlight=False, soft_wrap=True)
    cut = sum(c["reason"].startswith(runner.TIME_BUDGET) for c in result["cases"] if c["status"] == "skip")
    if cut:  # a run cut short is not a passing run, whatever the cases that ran say
        console.print(f"[red]{cut} results not run[/]: --budget-s {budget_s:g} was spent first (reported skipped)",
                      highlight=False, soft_wrap=True)
        return 1
    return 0 if report.ok(result) else 1


def _print_summary(console, result: dict, json_path: Path, junit_path: Path, waiver_path: Path | None) -> None:  # noqa: ANN001
    from rich.markup import escape
    # Reasons, ids and names are text, not markup: rich dropped "[triton]" from an install hint.
    p = {k: escape(v) if isinstance(v, str) else v for k, v in result["platform"].items()}
    backend = escape(result["backend"])
    tier = f"tier {result['tier']}, seed {result['seed']}"
    if "not_run" in p:
        console.print(f"[bold]{backend}[/]: [yellow]not run[/], {tier}", soft_wrap=True)
        console.print(f"reason: {p['not_run']}", highlight=False, soft_wrap=True)
    else:
        kind = "emulated" if p["emulated"] else "hardware"
        console.print(f"[bold]{backend}[/] on {p['device']} ({p['arch'] or '-'}, {kind}), {tier}", highlight=False, soft_wrap=True)
    for c in result["cases"]:
        if c["status"] in ("fail", "error"):
            console.print(f"[red]{c['status'].upper()}[/] {escape(c['id'])}: {escape(c['reason'])}", highlight=False, soft_wrap=True)
    s = result["summary"]
    console.print(
        f"passed {s['passed']}, failed {s['failed']}, errors {s['errors']}, unsupported {s['unsupported']}, "
        f"skipped {s['skipped']} in {result['duration_s']:.1f} s"
    )
    used = [w for w in result["waivers"] if w["cases"]]
    if waiver_path is not None:
        console.print(f"waivers: {escape(str(waiver_path))} ({len(used)} of {len(result['waivers'])} used)")
    console.print(f"report: {escape(str(json_path))}\njunit:  {escape(str(junit_path))}")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="dshal conformance")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
