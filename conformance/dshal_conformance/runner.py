"""The runner: resolve the backend under test, run the selected cases, collect results.

The backend is resolved the way users get it -- ``dshal.runtime.build_runtime`` with
``backend: NAME`` and ``fallback: error`` -- so an op the backend does not provide must
surface as :class:`dshal.UnsupportedOpError`, and every op goes through the spec's input
checks exactly as ``dshal.ops.<op>`` does.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import dshal
from dshal.config import load_config
from dshal.errors import ArgumentError, BackendUnavailableError, PluginLoadError
from dshal.ops.catalogue import SPECS
from dshal.outputs import console as output_console
from dshal.registry import REGISTRY, misspelling_of
from dshal.runtime import active_kept, build_runtime
from dshal_conformance import __version__, report
from dshal_conformance.cases import all_cases, case_seed
from dshal_conformance.cases.base import Case, Context, NotPlaceable, Outcome, crashed, fail_all, unsupported_outcomes
from dshal_conformance.collectives import run_group
from dshal_conformance.conformance_command import (  # the command's defaults, importable without torch (--help)
    DEFAULT_CASE_TIMEOUT_S,
    DEFAULT_SEED,
    FULL_TIER_CASE_TIMEOUT_S,
)
from dshal_conformance.judge import Verdict
from dshal_conformance.waivers import Waiver, for_case, thresholds


def default_timeout(tier: str) -> float:
    """Per-case timeout for a tier (seconds)."""
    return FULL_TIER_CASE_TIMEOUT_S if tier == "full" else DEFAULT_CASE_TIMEOUT_S


#: Environment variable naming the CI leg a report comes from (the workflow sets it per runner).
LEG_ENV = "DSHAL_CONFORMANCE_LEG"


#: How a case skipped for ``--budget-s`` begins its reason.
TIME_BUDGET = "time budget:"

@dataclass
class Options:
    tier: str = "ci"
    ops: Sequence[str] | None = None
    #: case-id globs; a result id (``.../vs-dequant``) selects its case
    cases: Sequence[str] | None = None
    seed: int = DEFAULT_SEED
    case_timeout_s: float = DEFAULT_CASE_TIMEOUT_S
    collectives: bool = True
    waivers: list[Waiver] = field(default_factory=list)
    #: The waivers file ``--waivers`` named (None: the plugin's own, which a rerun finds again),
    #: recorded so that a rerun of a case is judged as the run judged it.
    waivers_file: str | None = None
    progress: bool = True
    #: The CI runner's name for this leg (``h200``), recorded as ``platform.leg``:
    #: :data:`LEG_ENV` where set. Reports of legs that did not run carry no device name, so
    #: without it an h100 and an h200 leg with no device merge into one; ``dshal matrix
    #: --expect`` finds legs by it.
    leg: str | None = field(default_factory=lambda: os.environ.get(LEG_ENV) or None)
    #: Seconds after which no case starts; the rest are reported skipped (None: no limit).
    budget_s: float | None = None


@dataclass
class Target:
    """The backend under test, resolved."""

    name: str
    emulate: bool
    runtime: Any | None  # dshal.Runtime when available
    plugin_version: str | None
    not_run: str | None = None  # why it could not run (unavailable, not installed)
    #: The plugin is installed but failed to load (a crash, not an absence): never an allowed "not run".
    load_failed: bool = False
    #: Not installed, but close to an installed name (``nvida``): a typo, never an allowed "not run".
    misspelling_of: str | None = None

    @property
    def broken_leg(self) -> str | None:
        """Why this leg fails even where a missing device or plugin is allowed, or None."""
        if self.load_failed:
            return "the plugin failed to load; --allow-unavailable covers a missing device or plugin, not a broken one"
        if self.misspelling_of:
            return (f"no backend {self.name!r} is installed, and {self.misspelling_of!r} is: a misspelled name is "
                    "not a missing plugin")
        return None

    @property
    def emulated(self) -> bool:
        return bool(self.runtime is not None and (self.runtime.emulated or self.runtime.capabilities.emulated))


def resolve(name: str, emulate: bool | None = None, determinism: str | None = None) -> Target:
    """Load backend ``name`` as a user would (``fallback: error``); a backend that cannot
    run here becomes a Target with ``not_run`` set instead of raising."""
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ArgumentError(f"backend: got {name!r}, expected a backend's name (no path separators): it also names "
                            "the report files NAME.json and NAME.junit.xml")
    overrides: dict[str, Any] = {"backend": name, "fallback": "error"}
    if emulate is not None:
        overrides["emulate"] = emulate
    if determinism is not None:  # strict: the determinism family then holds the backend to its promise
        overrides["determinism"] = determinism
    config = load_config({}, overrides_source="--backend", **overrides)
    try:  # this plugin only: probing the others could wait on a hung one (DSHAL_PLUGIN_TIMEOUT_S)
        info = REGISTRY.get(name, emulate=config.emulate)
    except PluginLoadError:  # not installed (or left out by DSHAL_PLUGINS): a leg without its plugin
        info = None
    version = info.version if info is not None else None
    try:
        rt = build_runtime(config)
    except (BackendUnavailableError, PluginLoadError) as err:
        return Target(name, config.emulate, None, version, not_run=str(err), load_failed=info is not None and not info.loaded,
                      misspelling_of=misspelling_of(name) if info is None else None)
    return Target(name, config.emulate, rt, version)


def check_selection(tier: str, ops_text: str | None, cases: Sequence[str] | None, collectives: bool = True,
                    ops_flag: str = "--ops", case_flag: str = "--case") -> list[str] | None:
    """The op names of ``ops_text`` (comma-separated; None: every op). ArgumentError for an
    unknown op name, or a selection of no case in ``tier``: nothing to check is not a pass.
    The flags name the options in messages (the CLI's or pytest's)."""
    known = capability_cases() + all_cases(tier)
    ops = [o.strip() for o in ops_text.split(",") if o.strip()] if ops_text is not None else None
    if ops is not None:
        names = sorted({c.op for c in known})
        unknown = [o for o in ops if o not in names]
        if unknown or not ops:
            raise ArgumentError(f"{ops_flag}: got {ops_text!r}, expected comma-separated op names from: {', '.join(names)}")
    if not select(known, Options(tier=tier, ops=ops, cases=cases, collectives=collectives)):
        chosen = ", ".join(f"{flag} {value}" for flag, value in ((ops_flag, ops_text), (case_flag, cases)) if value)
        raise ArgumentError(
            f"{chosen or 'the options'} select no case of tier {tier!r}; nothing to check is not a pass "
            "(see --list for the case ids)"
        )
    return ops


def select(cases: Iterable[Case], options: Options) -> list[Case]:
    chosen = []
    for case in cases:
        if options.ops and case.op not in options.ops:
            continue
        if options.cases and not any(
            fnmatch.fnmatchcase(i, pat) or i == pat for pat in options.cases for i in [case.id, *case.result_ids()]
        ):
            continue
        if case.kind == "collective" and not options.collectives:
            continue
        chosen.append(case)
    return chosen


def capability_cases() -> list[Case]:
    """``capability/<op>``: a declared op must be served by the backend itself; an
    undeclared one must raise UnsupportedOpError (never a silent fallback)."""
    out = []
    for op in SPECS:

        def body(ctx: Context, op: str = op) -> list[Outcome]:
            if op in ctx.provided:
                served = ctx.served.get(op)  # kind, and the path per weight format where it depends on it
                return [Outcome("", Verdict("pass", "declared", None, None, "declared supported; its cases must pass",
                                            details=dict(served) if served else None))]
            probe = next((c for c in all_cases("ci") if c.op == op and c.kind == "accuracy"), None)
            if probe is None or probe.body is None:
                return fail_all([""], "error", f"no accuracy case to probe {op!r} with")
            outcome = probe.body(ctx)[0]
            if outcome.verdict.status == "unsupported":
                return [Outcome("", Verdict("unsupported", "raises", None, None, outcome.verdict.reason))]
            return [Outcome("", Verdict("fail", "raises", None, None, outcome.verdict.reason))]

        out.append(Case(f"capability/{op}", op, "capability", "", {"op": op}, frozenset({"ci", "full"}), body))
    return out


def with_timeout(fn: Callable[[], list[Outcome]], timeout_s: float, suffixes: Sequence[str]) -> list[Outcome]:
    """Run ``fn`` in a daemon thread; a case that does not finish in time is an error
    (the thread is abandoned; the suite goes on)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with warnings.catch_warnings():
                # NaN/Inf edge cases make numpy (under the Triton interpreter) warn about the
                # arithmetic they ask for; the case judges the result, the warning adds noise.
                warnings.filterwarnings("ignore", r"(invalid value|overflow) encountered", RuntimeWarning)
                box["out"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported as the case's error
            box["err"] = err

    thread = threading.Thread(target=target, daemon=True, name="dshal-conformance-case")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return fail_all(suffixes, "error", f"timed out after {timeout_s:g} s (hang)")
    if "err" in box:
        err = box["err"]
        return crashed(suffixes, "the case itself", err)
    return box["out"]


def _record(case: Case, suffix: str, v: Verdict, seed: int, duration: float, waivers: list[Waiver]) -> dict[str, Any]:
    return {
        "id": case.id + suffix,
        "op": case.op,
        "kind": case.kind,
        "params": dict(case.params),
        "dtype": case.dtype,
        "status": v.status,
        "metric": v.metric,
        "value": v.value,
        "threshold": v.threshold,
        "needed": v.needed,
        "reason": v.reason,
        "seed": seed,
        "duration_s": round(duration, 4),
        "waivers": [w.reason for w in waivers],
        **({"details": v.details} if v.details else {}),
        **({"finding": v.finding} if v.finding else {}),
    }


class Progress:
    """A rich progress bar on stderr (nothing when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self._bar = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("[green]{task.fields[passed]} ok [red]{task.fields[bad]} bad"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[current]}"),
                console=output_console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total, passed=0, bad=0, current="")
        self.passed = self.bad = 0

    def __enter__(self) -> Progress:
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar:
            self._bar.stop()

    def start(self, case: Case) -> None:
        if self._bar:
            self._bar.update(self._task, current=case.id)

    def done(self, records: list[dict[str, Any]]) -> None:
        self.passed += sum(r["status"] in ("pass", "unsupported") for r in records)
        self.bad += sum(r["status"] in ("fail", "error") for r in records)
        if self._bar:
            self._bar.update(self._task, advance=1, passed=self.passed, bad=self.bad)


class Session:
    """One run of the suite against one target: cases are run one by one (or a world
    size of collectives at a time), and :meth:`report` builds the report from what ran.
    Both the CLI runner and the pytest plugin drive it."""

    def __init__(self, target: Target, options: Options):
        self.target, self.options = target, options
        self.started = datetime.now(UTC)
        self._t0 = time.perf_counter()
        self.records: list[dict[str, Any]] = []
        self.cases: list[Case] = []
        if target.runtime is not None:
            rt = target.runtime
            self.provided = frozenset(op for op, p in rt.providers.items() if op not in rt.fallbacks and p == rt.backend.name)
            self.cases = select(capability_cases() + all_cases(options.tier), options)

    def run_case(self, case: Case) -> list[dict[str, Any]]:
        """Run one non-collective case; returns (and keeps) its records."""
        rt = self.target.runtime
        rt.activate()  # ops that call other dshal.ops inside them reach this backend too
        recs = _run_one(case, rt, self.provided, rt.capabilities, self.options)
        self.records += recs
        return recs

    def skip_case(self, case: Case, reason: str) -> list[dict[str, Any]]:
        """Report every result of ``case`` skipped for ``reason``, without running it."""
        suffixes = ("",) if case.kind == "collective" else case.suffixes
        verdict = Verdict("skip", None, None, None, reason)
        seed = self.options.seed if case.kind == "collective" else case_seed(self.options.seed, case.id)  # as run
        recs = [_record(case, s, verdict, seed, 0.0, []) for s in suffixes]
        self.records += recs
        return recs

    def run_collectives(self, world: int, group: list[Case], on_record: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
        """Run the collective cases of one world size in one group of rank processes."""
        out: list[dict[str, Any]] = []
        runnable = []
        waivers = {case.id: for_case(self.options.waivers, case.result_ids()) for case in group}
        for case in group:
            skip = [w for w in waivers[case.id] if w.skip]
            if skip:
                _note(skip, case)
                out.append(_record(case, "", Verdict("skip", None, None, None, f"waived: {skip[0].reason}"), self.options.seed, 0.0, skip))
                on_record(out[-1])
            else:
                runnable.append(case)
        t_group = time.perf_counter()

        def on_done(case: Case, v: Verdict) -> None:
            used = [w for w in waivers[case.id] if set(w.thresholds) & set(v.waived)]
            _note(used, case)
            out.append(_record(case, "", v, self.options.seed, time.perf_counter() - t_group, used))
            on_record(out[-1])

        if runnable:
            timeout = self.options.case_timeout_s + 30 * world
            limits = {case.id: thresholds(waivers[case.id]) for case in runnable}
            run_group(self.target.name, self.target.emulate, world, runnable, timeout, on_done, limits=limits)
        self.records += out
        return out

    def report(self) -> dict[str, Any]:
        duration_s = time.perf_counter() - self._t0
        return report.build(self.target, self.options, self.records, self.started, duration_s, versions(self.target))


def run(target: Target, options: Options) -> dict[str, Any]:
    """Run the suite against ``target`` with a progress bar; returns the report dict. The runtime
    active before (a caller's ``dshal.use()``), or none, is active again after."""
    session = Session(target, options)
    if target.runtime is None:
        return session.report()
    collective: dict[int, list[Case]] = {}
    deadline = None if options.budget_s is None else time.monotonic() + options.budget_s
    spent = f"{TIME_BUDGET} --budget-s {options.budget_s or 0:g} was spent before it started"

    def over() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    with active_kept(), Progress(len(session.cases), f"{target.name} {options.tier}", options.progress) as bar:
        for case in session.cases:
            if case.kind == "collective":
                collective.setdefault(case.world_size, []).append(case)
                continue
            bar.start(case)
            bar.done(session.skip_case(case, spent) if over() else session.run_case(case))
        for world, group in sorted(collective.items()):
            bar.start(group[0])
            if over():
                for case in group:
                    bar.done(session.skip_case(case, spent))
                continue
            session.run_collectives(world, group, lambda rec: bar.done([rec]))
    return session.report()


def _note(waivers: list[Waiver], case: Case) -> None:
    for w in waivers:
        if case.id not in w.used_by:
            w.used_by.append(case.id)


def _run_one(case: Case, rt: Any, provided: frozenset[str], caps: Any, options: Options) -> list[dict[str, Any]]:
    # Per result: a waiver of ``case/vs-prequant`` leaves ``case/vs-dequant`` judged as it is;
    # one matching the case id itself covers all its results.
    waivers = {s: for_case(options.waivers, [case.id, case.id + s]) for s in case.suffixes}
    skips = {s: [w for w in ws if w.skip] for s, ws in waivers.items()}
    seed = case_seed(options.seed, case.id)

    def skipped(suffix: str) -> dict[str, Any]:
        _note(skips[suffix], case)
        reason = f"waived: {skips[suffix][0].reason}"
        return _record(case, suffix, Verdict("skip", None, None, None, reason), seed, 0.0, skips[suffix])

    if all(skips.values()):
        return [skipped(s) for s in case.suffixes]
    ctx = Context(
        table=rt.table,
        provided=provided,
        device=rt.device,
        native_e4m3=caps.native_e4m3,
        fp8_formats=caps.fp8_formats,
        seed=seed,
        fp8_storage=caps.fp8_storage,
        served={case.op: rt.provider_entry(case.op)} if case.kind == "capability" and case.op in provided else None,
        emulated=rt.emulated,
        capabilities=caps,
    )
    for suffix, ws in waivers.items():
        ctx.waived[suffix] = thresholds(ws)
    t0 = time.perf_counter()
    body = case.body
    if body is None:
        raise ValueError(f"case {case.id!r} has no body (collective cases run through Session.run_collectives)")
    def run_body() -> list[Outcome]:
        try:
            return body(ctx)
        except NotPlaceable as err:  # FP8 inputs on a device without fp8_storage
            return unsupported_outcomes(case.suffixes, str(err))

    outcomes = with_timeout(run_body, options.case_timeout_s, case.suffixes)
    duration = time.perf_counter() - t0
    records = []
    for o in outcomes:  # a waiver is used where the judge applied one of its thresholds
        if skips.get(o.suffix):
            records.append(skipped(o.suffix))
            continue
        used = [w for w in waivers.get(o.suffix, []) if set(w.thresholds) & set(o.verdict.waived)]
        _note(used, case)
        records.append(_record(case, o.suffix, o.verdict, seed, duration, used))
    return records


def versions(target: Target) -> dict[str, Any]:
    """What a matrix cell says it ran on: triton, device driver and runtime (CUDA / ROCm /
    CANN), Python and host. Driver and runtime come from the backend's capability notes
    (``driver``, ``runtime``, ``cann``) first, else from torch's build for a device backend;
    an emulated leg names the Triton interpreter as its runtime."""
    out: dict[str, Any] = {"python": platform.python_version(), "host": f"{platform.platform()} {platform.machine()}"}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        out["triton"] = None
    driver = runtime = None
    rt = target.runtime
    if rt is not None:
        notes = rt.capabilities.notes
        driver = notes.get("driver")
        runtime = notes.get("runtime") or (f"CANN {notes['cann']}" if notes.get("cann") else None)
        if rt.emulated:
            runtime = runtime or f"Triton interpreter (triton {out['triton']}) on CPU tensors"
        elif rt.backend.device_type == "cuda":
            hip = getattr(torch.version, "hip", None)
            runtime = runtime or (f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}")
            driver = driver or _nvml_driver()
    out.update(driver=driver, runtime=runtime)
    return out


def _nvml_driver() -> str | None:
    """The NVIDIA driver version through pynvml when it is installed (None otherwise)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no NVML here
        return None


def source_commit(plugin: type | None) -> str | None:
    """The git commit of the checkout ``plugin``'s module is a tracked file of (the suite's own
    without a plugin): what a bundle was built from. None for a package installed from a wheel,
    even one in a venv inside some checkout (not a tracked file there), or where git is missing.
    Not the working folder's commit: that was whatever repository the command ran in."""
    import subprocess

    try:
        source = Path(inspect.getsourcefile(plugin) or "") if plugin is not None else Path(__file__)
    except TypeError:  # a class defined in a shell or a notebook
        return None
    if not source.is_file():
        return None
    try:
        git = ["git", "-C", str(source.parent)]
        subprocess.run([*git, "ls-files", "--error-unmatch", source.name], capture_output=True, timeout=5, check=True)
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, not a tracked file
        return None
    return head.stdout.strip() or None


def environment(target: Target) -> dict[str, Any]:
    """Device, driver/runtime versions (as :func:`versions` gives them to a matrix cell),
    torch, suite version, git commit of the plugin's source (for bundles)."""
    env: dict[str, Any] = {
        "backend": target.name,
        "plugin_version": target.plugin_version,
        "dshal_version": dshal.__version__,
        "suite_version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "python": platform.python_version(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "emulated": target.emulated,
    }
    env.update(versions(target))
    if target.runtime is not None:
        caps = target.runtime.capabilities
        env.update(device=caps.device_name, arch=caps.arch, dist_backend=caps.dist_backend, notes=dict(caps.notes))
    else:
        env["not_run"] = target.not_run
    env["git_commit"] = source_commit(type(target.runtime.backend) if target.runtime is not None else None)
    return env
