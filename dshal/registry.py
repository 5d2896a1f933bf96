"""Backend discovery through the ``dshal.backends`` entry-point group (stevedore).

Discovery is lazy (nothing happens at ``import dshal``) and isolated: each plugin is
imported, constructed, version-checked, signature-checked and asked for its availability
inside its own ``try``. A broken plugin becomes a :class:`BackendInfo` carrying its error;
it never breaks the others. Asking for that one backend by name raises its error.

Misbehaving plugins are contained too: ``availability()`` and ``capabilities()`` get
``DSHAL_PLUGIN_TIMEOUT_S`` seconds each (default 60) and a plugin that overruns is listed
as unavailable (its import, constructor and ``ops()`` run on the caller's thread: past that
time a warning names the plugin, Ctrl-C and ``DSHAL_PLUGINS`` being the ways out); ``sys.exit()``, ``KeyboardInterrupt`` or any other ``BaseException`` raised
by a plugin is that plugin's failure (a real Ctrl-C is logged, then re-raised); asking for
one backend by name loads only that plugin.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any, get_args

from dshal import __version__
from dshal.backend import API_VERSION, WEIGHT_FORMATS, Availability, Backend, Capabilities, OpKind
from dshal.config import REFERENCE_PROVIDER, REFUSED_PROVIDER, emulate_from_env, env_number
from dshal.errors import BackendUnavailableError, ConfigError, DshalError, PluginLoadError
from dshal.lifetime import Terminated
from dshal.ops.catalogue import SPECS
from dshal.ops.spec import FP8_DTYPES

ENTRY_POINT_GROUP = "dshal.backends"
#: Seconds a plugin's availability() / capabilities() may take (DSHAL_PLUGIN_TIMEOUT_S); an import,
#: constructor or ops() past it is warned about.
DEFAULT_PLUGIN_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class BackendInfo:
    """What discovery learned about one plugin. Broken plugins are listed too."""

    name: str
    entry_point: str
    version: str | None
    loaded: bool
    available: bool
    reason: str
    #: The exception behind ``reason`` when the plugin cannot be used: it failed to load, or its
    #: ``availability()`` overran (None when it loaded and answered).
    error: BaseException | None = field(default=None, repr=False)
    backend: Backend | None = field(default=None, repr=False)
    capabilities: Capabilities | None = field(default=None, repr=False)
    emulated: bool = False

    def require(self) -> Backend:
        """The backend, or the error that explains why it cannot be used."""
        if not self.loaded:
            raise PluginLoadError(f"backend {self.name!r} ({self.entry_point}) failed to load: {self.reason}") from self.error
        if not self.available or self.backend is None:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {self.reason}") from self.error
        return self.backend

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entry_point": self.entry_point,
            "version": self.version,
            "loaded": self.loaded,
            "available": self.available,
            "emulated": self.emulated,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Decision:
    """One step of ``backend: auto``: a candidate and why it was taken or passed over."""

    name: str
    taken: bool
    reason: str


def allowed_plugins() -> frozenset[str] | None:
    """Names allowed by ``DSHAL_PLUGINS=a,b`` (None: no limit)."""
    raw = os.environ.get("DSHAL_PLUGINS", "").strip()
    if not raw:
        return None
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    if not names:  # "," would exclude every plugin, the built-in cpu one included
        raise ConfigError(f"environment variable DSHAL_PLUGINS is {raw!r}, expected backend names separated by commas "
                          f"(installed: {', '.join(installed_names()) or 'none'}), or unset for all")
    return names


def excluded_reason(name: str) -> str | None:
    """Why DSHAL_PLUGINS leaves out the installed backend ``name`` (its value), or None when it
    does not."""
    allow = allowed_plugins()
    if allow is None or name in allow or name not in installed_names():
        return None
    return f"excluded by DSHAL_PLUGINS={os.environ['DSHAL_PLUGINS'].strip()!r}"


def allow_list_typos() -> str:
    """``"; DSHAL_PLUGINS names no installed plugin: nvida ('nvida' -> 'nvidia'?)"``, or ""."""
    allow = allowed_plugins()
    unknown = sorted(allow - set(installed_names())) if allow is not None else []
    if not unknown:
        return ""
    guesses = [f"{n!r} -> {m!r}?" for n in unknown if (m := misspelling_of(n))]
    return f"; DSHAL_PLUGINS names no installed plugin: {', '.join(unknown)}" + (f" ({', '.join(guesses)})" if guesses else "")


class Registry:
    """Discovers and validates backends once per (allow-list, emulate) setting. A backend
    asked for by name (:meth:`get`) is loaded alone; :meth:`infos` loads every plugin."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cache: dict[tuple[frozenset[str] | None, bool], dict[str, BackendInfo]] = {}
        #: Plugins loaded one at a time by get(), per setting; infos() reuses them.
        self._single: dict[tuple[frozenset[str] | None, bool], dict[str, BackendInfo]] = {}

    def refresh(self) -> None:
        """Forget every discovery result (e.g. after installing a plugin in-process)."""
        with self._lock:
            self._cache.clear()
            self._single.clear()
            importlib.invalidate_caches()  # importlib.metadata's directory listings

    def infos(self, *, emulate: bool | None = None) -> dict[str, BackendInfo]:
        emulate = bool(emulate_from_env()) if emulate is None else emulate
        key = (allowed_plugins(), emulate)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._discover(*key, known=self._single.get(key, {}))
            return self._cache[key]

    def get(self, name: str, *, emulate: bool | None = None) -> BackendInfo:
        """The backend ``name`` (loading only that plugin when the full listing is not cached)."""
        emulate = bool(emulate_from_env()) if emulate is None else emulate
        allow = allowed_plugins()
        key = (allow, emulate)
        with self._lock:
            infos = self._cache.get(key)
            if infos is None:
                single = self._single.setdefault(key, {})
                if name not in single:
                    single.update(self._discover(allow, emulate, only=name))
                infos = single
        if name not in infos:
            excluded = excluded_reason(name)
            if excluded:
                raise PluginLoadError(f"backend {name!r} is installed but {excluded}{allow_list_typos()}")
            hint = f" (DSHAL_PLUGINS limits discovery to {sorted(allow)})" if allow is not None else ""
            installed = installed_names()
            close = misspelling_of(name)
            guess = f" Did you mean {close!r}?" if close else ""
            raise PluginLoadError(
                f"backend {name!r} is not installed{hint}; installed: {installed or 'none'}.{guess} "
                f"Plugins register under the {ENTRY_POINT_GROUP!r} entry-point group."
            )
        return infos[name]

    # ------------------------------------------------------------------ discovery
    def _discover(
        self,
        allow: frozenset[str] | None,
        emulate: bool,
        *,
        only: str | None = None,
        known: dict[str, BackendInfo] | None = None,
    ) -> dict[str, BackendInfo]:
        # A plugin's prints go to stderr: stdout carries what commands print (`dshal info --json`).
        with _WATCH.active(), contextlib.redirect_stdout(sys.stderr):
            return self._discover_watched(allow, emulate, only, known or {})

    def _discover_watched(
        self,
        allow: frozenset[str] | None,
        emulate: bool,
        only: str | None,
        known: dict[str, BackendInfo],
    ) -> dict[str, BackendInfo]:
        timeout = plugin_timeout()
        entry_points, clashes = _entry_points()
        if only is not None:
            clashes = {n: eps for n, eps in clashes.items() if n == only}
        wanted = [
            ep
            for ep in entry_points
            if (allow is None or ep.name in allow) and (only is None or ep.name == only) and ep.name not in known
        ]
        loaded, failures = _import_plugins(wanted)
        infos: dict[str, BackendInfo] = {n: i for n, i in known.items() if allow is None or n in allow}
        for name, (ep, err) in failures.items():
            infos[name] = BackendInfo(
                name=name,
                entry_point=ep.value,
                version=_version_of(ep),
                loaded=False,
                available=False,
                reason=f"import failed: {type(err).__name__}: {err}{_raised_at(err)}{_later_dshal_hint(err)}",
                error=err,
            )
        for ep, plugin in loaded:
            infos[ep.name] = _validate(ep.name, ep.value, _version_of(ep), plugin, emulate, timeout)
        for name, eps in clashes.items():
            if allow is None or name in allow:
                infos[name] = _clash(name, eps)
        for name, info in infos.items():
            if name not in known:
                log.debug("dshal: plugin %r (%s): loaded %s, available %s: %s", name, info.entry_point, info.loaded,
                          info.available, info.reason)
        return dict(sorted(infos.items()))


def _later_dshal_hint(err: BaseException) -> str:
    """Where a plugin could not import a name from dshal: it was likely written for another
    dshal than the one installed (a later one adds names to :mod:`dshal.plugin`)."""
    if isinstance(err, ImportError) and (err.name or "").split(".")[0] == "dshal":
        return (f"; the plugin may be written for another dshal than the {__version__} installed here "
                "(check the dshal version it requires)")
    return ""


def _raised_at(err: BaseException) -> str:
    """`` (at FILE:LINE)`` of the innermost frame ``err`` (or what it wraps) was raised in."""
    while err.__traceback__ is None and err.__cause__ is not None:
        err = err.__cause__
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ is not None else []
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _clash(name: str, eps: list[importlib.metadata.EntryPoint]) -> BackendInfo:
    """A name that several distributions claim: neither is imported (which one would win
    depends on sys.path order), and the listing says who claims it."""
    claims = "; ".join(f"{ep.value} (from {_dist_label(ep)})" for ep in eps)
    builtin = [ep for ep in eps if ep.value.split(":")[0].split(".")[0] == "dshal"]
    fix = ("it is the name of dshal's built-in backend: register the others under another name" if builtin
           else "uninstall all but one")
    reason = (
        f"{len(eps)} installed distributions register the backend name {name!r} in {ENTRY_POINT_GROUP!r}: "
        f"{claims}; {fix}"
    )
    return BackendInfo(
        name=name,
        entry_point=" | ".join(ep.value for ep in eps),
        version=None,
        loaded=False,
        available=False,
        reason=reason,
        error=PluginLoadError(reason),
    )


def _dist_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"


class _PluginCrash(Exception):
    """Carries what a plugin's import raised that stevedore would let escape (AssertionError,
    SystemExit, KeyboardInterrupt, any BaseException): isolation must hold for those too."""


class _SigintWatch:
    """Tells a real Ctrl-C from a plugin that raises KeyboardInterrupt itself: while active
    (main thread only), SIGINT sets :attr:`real` before raising as usual."""

    real = False

    @contextlib.contextmanager
    def active(self) -> Iterator[_SigintWatch]:
        self.real = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        try:
            previous = signal.getsignal(signal.SIGINT)
        except ValueError:  # signals unavailable here (e.g. a sub-interpreter)
            yield self
            return

        if previous is signal.SIG_IGN:  # Ctrl-C is ignored in this process: keep it so
            yield self
            return

        def on_sigint(signum: int, frame: Any) -> None:
            self.real = True
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _contain(err: BaseException, plugin: str, where: str, watch: _SigintWatch) -> None:
    """Re-raise ``err`` when it is a real Ctrl-C (after saying where it struck) or a SIGTERM /
    SIGHUP; return for anything a plugin raised itself, which the caller reports as that
    plugin's failure."""
    if isinstance(err, KeyboardInterrupt) and watch.real:
        log.warning("dshal: interrupted (Ctrl-C) during %s of plugin %r", where, plugin)
        raise err
    if isinstance(err, Terminated):  # SIGTERM / SIGHUP to this process, not the plugin's own SystemExit
        raise err


def _entry_points() -> tuple[list[importlib.metadata.EntryPoint], dict[str, list[importlib.metadata.EntryPoint]]]:
    """The group's entry points, read fresh from importlib.metadata, one per name, and the
    names that several distributions claim with *different* targets (each with every claim).
    The same target listed twice (a path on ``sys.path`` twice) is no conflict.

    stevedore's own listing is not used: it memoizes per sys.path in-process and on disk
    (keyed by mtimes packed as float32, i.e. ~2 minutes of resolution), so a plugin
    installed or rewritten in-process could be missed after :meth:`Registry.refresh`.
    """
    claims: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if all(ep.value != other.value for other in claims.setdefault(ep.name, [])):
            claims[ep.name].append(ep)
    clashes = {name: eps for name, eps in claims.items() if len(eps) > 1}
    return [eps[0] for eps in claims.values() if len(eps) == 1], clashes


class _IsolatedEntryPoint:
    """An entry point whose ``load()`` reports whatever the plugin's import raises as an
    ordinary ``Exception``. stevedore loads each plugin in its own try but lets
    ``AssertionError``, ``KeyboardInterrupt`` and other ``BaseException``s escape it;
    wrapped like this, they reach the manager's ``on_load_failure_callback`` like any
    import error (a real Ctrl-C is still re-raised)."""

    def __init__(self, entry_point: importlib.metadata.EntryPoint):
        self.entry_point = entry_point
        self.name, self.value, self.group = entry_point.name, entry_point.value, entry_point.group

    @property
    def dist(self) -> importlib.metadata.Distribution | None:
        return self.entry_point.dist

    def load(self) -> Any:
        try:  # on this thread (a plugin may set signal handlers as it imports), watched
            return _watched(self.entry_point.load, self.name, "the import", plugin_timeout())
        except AssertionError as err:
            raise _PluginCrash(str(err)) from err
        except Exception:
            raise
        except BaseException as err:  # noqa: BLE001 - SystemExit, KeyboardInterrupt...: the plugin's failure
            _contain(err, self.name, "the import", _WATCH)
            raise _PluginCrash(f"{type(err).__name__}: {err}") from err

    def __repr__(self) -> str:
        return f"{self.name} = {self.value}"


def _import_plugins(
    entry_points: list[EntryPoint],
) -> tuple[list[tuple[EntryPoint, object]], dict[str, tuple[EntryPoint, BaseException]]]:
    """Import each entry point's target through stevedore, each in its own try: the
    ``(entry point, plugin class)`` pairs that imported, and name -> ``(entry point, error)``
    for those that did not. Only stevedore's public API: the manager lists the given entry
    points (``list_entry_points``), constructs nothing (``invoke_on_load=False``) and hands
    each failure to ``on_load_failure_callback``."""
    from stevedore import ExtensionManager  # lazy third-party import: ~0.15 s, paid on the first discovery only

    isolated = [_IsolatedEntryPoint(ep) for ep in entry_points]

    class _GivenEntryPoints(ExtensionManager):
        def list_entry_points(self) -> list[Any]:
            return list(isolated)

    failures: dict[str, tuple[EntryPoint, BaseException]] = {}

    def on_failure(_manager: Any, ep: _IsolatedEntryPoint, err: BaseException) -> None:
        # Unwrap what _IsolatedEntryPoint.load wrapped so the reason shows the plugin's own error.
        failures[ep.name] = (ep.entry_point, err.__cause__ if isinstance(err, _PluginCrash) else err)

    manager = _GivenEntryPoints(ENTRY_POINT_GROUP, invoke_on_load=False, on_load_failure_callback=on_failure)
    return [(ext.entry_point.entry_point, ext.plugin) for ext in manager], failures


def _version_of(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


def plugin_timeout() -> float:
    """``DSHAL_PLUGIN_TIMEOUT_S`` (seconds a plugin's availability() / capabilities() may take;
    past it an import, constructor or ops() is warned about)."""
    return env_number("DSHAL_PLUGIN_TIMEOUT_S", DEFAULT_PLUGIN_TIMEOUT_S, 0, 3600)


class _Overran(Exception):
    """A plugin call did not return within the plugin timeout."""


def _watched(fn: Callable[[], Any], plugin: str, what: str, timeout_s: float) -> Any:
    """``fn()`` on this thread; if it has not returned after ``timeout_s``, a warning names the
    plugin and the way out. The import, constructor and ``ops()`` are not moved to a worker
    thread as the probes are: a plugin may install signal handlers (main thread only) or set
    per-thread state there, and an abandoned import would keep its module lock."""

    def warn() -> None:
        log.warning("dshal: %s of plugin %r has not returned after %g s (DSHAL_PLUGIN_TIMEOUT_S); it may hang: "
                    "Ctrl-C stops it, and DSHAL_PLUGINS=a,b (the plugins to load) leaves it out", what, plugin, timeout_s)

    timer = threading.Timer(timeout_s, warn)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        timer.cancel()


def _bounded(fn: Callable[[], Any], plugin: str, timeout_s: float) -> Any:
    """``fn()`` in a daemon thread, given ``timeout_s``; a call that overruns is abandoned
    (:class:`_Overran`) so one hung plugin cannot block discovery. What ``fn`` raises,
    BaseException included, is re-raised here as the plugin's own failure."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"dshal-plugin-{plugin}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _Overran(f"did not return within {timeout_s:g} s (DSHAL_PLUGIN_TIMEOUT_S)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _validate(
    name: str, value: str, version: str | None, plugin: object, emulate: bool, timeout_s: float = DEFAULT_PLUGIN_TIMEOUT_S
) -> BackendInfo:
    """Construct one plugin and check it against the interface; never raises (but a real
    Ctrl-C is re-raised)."""

    def broken(reason: str, err: BaseException) -> BackendInfo:
        return BackendInfo(name, value, version, loaded=False, available=False, reason=reason, error=err)

    if name in (REFERENCE_PROVIDER, REFUSED_PROVIDER):
        meaning = ("the ops' reference implementations (ops: {op: reference})" if name == REFERENCE_PROVIDER
                   else "the provider of an op no one serves (Runtime.providers)")
        err = PluginLoadError(f"the backend name {name!r} is reserved: it names {meaning}; "
                              "register the plugin under another name")
        return broken(str(err), err)
    if not (isinstance(plugin, type) and issubclass(plugin, Backend)):
        err = PluginLoadError(f"entry point {value!r} must name a dshal.Backend subclass, got {plugin!r}")
        return broken(str(err), err)
    declared = getattr(plugin, "api_version", None)
    if str(declared) != API_VERSION:
        err = PluginLoadError(
            f"plugin {name!r} was built for dshal api_version {declared!r}, "
            f"but this dshal implements api_version {API_VERSION!r}"
        )
        return broken(str(err), err)
    try:  # on this thread (per-thread state such as the current device must stay), watched
        backend = _watched(lambda: plugin(emulate=emulate), name, "the constructor", timeout_s)
        if backend.name != name:
            raise PluginLoadError(
                f"plugin registered as {name!r} reports name {backend.name!r}; the entry-point name must match"
            )
        ops = _watched(lambda: dict(backend.ops()), name, "ops()", timeout_s)
        check_op_signatures(name, ops)
    except BaseException as err:  # noqa: BLE001 - isolation is the point
        _contain(err, name, "construction", _WATCH)
        reason = str(err) if isinstance(err, DshalError) else f"{type(err).__name__}: {err}"
        return broken(reason if isinstance(err, PluginLoadError) else f"construction failed: {reason}", err)
    try:
        avail = _bounded(backend.availability, name, timeout_s)
        if not isinstance(avail, Availability):
            err = PluginLoadError(f"availability() must return dshal.Availability, got {type(avail).__name__}")
            return broken(str(err), err)
    except _Overran as err:
        return BackendInfo(
            name, value, version, loaded=True, available=False, reason=f"availability() {err}", error=err,
        )
    except BaseException as err:  # noqa: BLE001
        _contain(err, name, "availability()", _WATCH)
        return BackendInfo(
            name, value, version, loaded=False, available=False,
            reason=f"availability() raised {type(err).__name__}: {err}", error=err, backend=None,
        )
    caps = None
    if avail.ok:
        try:
            caps = _bounded(backend.capabilities, name, timeout_s)
        except BaseException as err:  # noqa: BLE001
            _contain(err, name, "capabilities()", _WATCH)
            verb = "" if isinstance(err, _Overran) else f"raised {type(err).__name__}: "
            return BackendInfo(
                name, value, version, loaded=False, available=False,
                reason=f"capabilities() {verb}{err}", error=err,
            )
        try:
            check_capabilities(name, caps, ops)
        except PluginLoadError as err:
            return broken(str(err), err)
    return BackendInfo(
        name, value, version, loaded=True, available=avail.ok,
        reason=avail.reason or ("available" if avail.ok else "unavailable"),
        backend=backend, capabilities=caps, emulated=avail.emulated,
    )


def check_capabilities(plugin: str, caps: object, ops: Iterable[str]) -> None:
    """Raise PluginLoadError when ``capabilities()`` returned something other than a
    :class:`~dshal.Capabilities`, or one whose op and format names the core cannot act on:
    every later use (``dshal info``, the loader, conformance) reads these fields."""
    if not isinstance(caps, Capabilities):
        raise PluginLoadError(f"plugin {plugin!r}: capabilities() must return dshal.Capabilities, got {type(caps).__name__}")
    provided, problems = set(ops), []
    formats = caps.fp8_formats
    if isinstance(formats, str) or not isinstance(formats, (tuple, list)) or not set(formats) <= set(FP8_DTYPES):
        problems.append(f"fp8_formats is {formats!r}, expected a tuple of {', '.join(FP8_DTYPES)}")
    if caps.native_e4m3 not in ("e4m3fn", "e4m3fnuz"):
        problems.append(f"native_e4m3 is {caps.native_e4m3!r}, expected 'e4m3fn' or 'e4m3fnuz'")
    kinds = get_args(OpKind)
    for op, kind in dict(caps.op_kinds).items():
        if op not in provided:
            problems.append(f"op_kinds names {op!r}, which ops() does not provide")
        elif kind not in kinds:
            problems.append(f"op_kinds[{op!r}] is {kind!r}, expected one of {', '.join(kinds)}")
    for op, paths in dict(caps.op_paths).items():
        if op not in provided:
            problems.append(f"op_paths names {op!r}, which ops() does not provide")
        elif not set(paths) <= set(WEIGHT_FORMATS):
            problems.append(f"op_paths[{op!r}] has formats {sorted(paths)}, expected some of {', '.join(WEIGHT_FORMATS)}")
    notes = caps.notes
    if not isinstance(notes, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
        shown = {k: type(v).__name__ for k, v in notes.items()} if isinstance(notes, Mapping) else type(notes).__name__
        problems.append(f"notes is {shown}, expected a mapping of str to str (reports and dshal info print them)")
    for name in ("device_name", "arch", "dist_backend"):
        if not isinstance(getattr(caps, name), str):
            problems.append(f"{name} is {getattr(caps, name)!r}, expected a str")
    if problems:
        raise PluginLoadError(f"plugin {plugin!r}: capabilities() " + "; ".join(problems))


def check_op_signatures(plugin: str, ops: dict) -> None:
    """Raise PluginLoadError when a provided op is unknown or its signature differs from the spec."""
    problems = []
    for op, impl in ops.items():
        spec = SPECS.get(op)
        if spec is None:
            problems.append(f"op {op!r} is not in the catalogue (known: {', '.join(sorted(SPECS))})")
            continue
        mismatch = spec.signature_mismatch(impl)
        if mismatch:
            problems.append(f"op {op!r}: {mismatch}")
    if problems:
        raise PluginLoadError(f"plugin {plugin!r} declares ops that do not match their specs: " + "; ".join(problems))


def select(
    backend: str,
    prefer: Sequence[str],
    *,
    emulate: bool,
    registry: Registry,
    origin: str | None = None,
) -> tuple[Backend, list[Decision]]:
    """Pick the backend named in the config, or the first usable one in ``prefer`` for ``auto``.
    ``origin`` (e.g. "backend, set by environment variable DSHAL_BACKEND") ends the error of
    a named backend that cannot be used, so the user knows which setting to fix."""
    if backend != "auto":
        chosen, info = require_named(registry, backend, emulate, origin or "backend")
        return chosen, [Decision(backend, True, f"named in config ({info.reason})")]
    trace: list[Decision] = []
    for name in prefer:  # loads candidates one by one: none after the first usable is probed
        try:
            info = registry.get(name, emulate=emulate)
        except PluginLoadError:  # not installed, or excluded by DSHAL_PLUGINS
            info = None
        if info is None:
            trace.append(Decision(name, False, excluded_reason(name) or "not installed"))
        elif not info.loaded:
            trace.append(Decision(name, False, f"failed to load: {info.reason}"))
        elif not info.available:
            trace.append(Decision(name, False, f"unavailable: {info.reason}"))
        else:
            trace.append(Decision(name, True, info.reason))
            return info.backend, trace  # type: ignore[return-value]
    summary = "; ".join(f"{d.name}: {d.reason}" for d in trace) or "prefer is empty"
    raise BackendUnavailableError(f"backend: auto found no usable backend in prefer={list(prefer)} ({summary}){allow_list_typos()}")


def require_named(registry: Registry, name: str, emulate: bool, origin: str) -> tuple[Backend, BackendInfo]:
    """The usable backend ``name`` and its info; its error otherwise, naming ``origin`` (the
    setting that asked for it: "backend, set by dshal.yaml:2", "ops.attention, set by <dict>")."""
    try:
        info = registry.get(name, emulate=emulate)
        return info.require(), info
    except (PluginLoadError, BackendUnavailableError) as err:
        raise type(err)(f"{err} (requested by {origin})") from (err.__cause__ or err)  # keeps the plugin's error


_WATCH = _SigintWatch()

#: The process-wide registry; ``dshal.backends()`` and ``dshal.use()`` read it.
REGISTRY = Registry()


def backends(*, emulate: bool | None = None, refresh: bool = False) -> list[BackendInfo]:
    """Every discovered backend, broken ones included, with the reason for each."""
    if refresh:
        REGISTRY.refresh()
    return list(REGISTRY.infos(emulate=emulate).values())


def installed_names() -> list[str]:
    """The backend names registered under the entry-point group (nothing is loaded)."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def misspelling_of(name: str) -> str | None:
    """The installed backend ``name`` is most likely a misspelling of (``nvida`` -> ``nvidia``),
    or None: a name close to none of them is taken as a plugin this machine lacks."""
    if name in installed_names():
        return None
    close = difflib.get_close_matches(name, installed_names(), n=1, cutoff=0.75)
    return close[0] if close else None


def names(infos: Iterable[BackendInfo]) -> list[str]:
    return [i.name for i in infos]
