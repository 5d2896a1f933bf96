"""The active runtime: selected backend, device, and the op -> provider table.

:func:`use` selects a backend from a config, resolves every op's provider *once*, and
installs the result into the ops' dispatcher (:data:`dshal.ops.dispatch.DISPATCHER`), so a
``dshal.ops.<op>`` call costs a dict lookup and the provider's own work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dshal.backend import Backend, Capabilities, host_memory_note
from dshal.backends.invariant import CONTRACT_BATCH_VARIANT
from dshal.config import REFERENCE_PROVIDER, REFUSED_PROVIDER, Config, load_config
from dshal.errors import DeviceError, UnsupportedOpError
from dshal.ops.catalogue import SPECS
from dshal.ops.dispatch import DISPATCHER, Hook
from dshal.registry import REGISTRY, Decision, require_named, select

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """The result of :func:`dshal.use`: what runs where."""

    config: Config
    backend: Backend
    device: torch.device
    #: op name -> name of the backend whose implementation serves it, ``reference``
    #: (:data:`~dshal.config.REFERENCE_PROVIDER`: the op's reference, as fallback or override),
    #: or ``none`` (:data:`~dshal.config.REFUSED_PROVIDER`: an op in :attr:`refused`).
    providers: dict[str, str]
    #: ops served by the fallback provider because the backend lacks them.
    fallbacks: frozenset[str]
    #: ``backend: auto`` decisions, in the order tried.
    selection: list[Decision]
    #: op name -> checked callable (what dispatch calls).
    table: dict[str, Callable[..., Any]] = field(repr=False)
    #: op name -> the same provider without the input checks (dispatched inside ``ops.trusted()``).
    unchecked: dict[str, Callable[..., Any]] = field(repr=False)
    #: ``determinism: strict``: ops served by a batch-invariant provider of the backend ...
    batch_invariant: frozenset[str] = frozenset()
    #: ... and, for each batch-sensitive op without one, why not; for an op in
    #: ``batch_invariant`` whose contract couples the rows of some calls (``linear`` with a
    #: tensorwise-FP8 weight: :data:`dshal.backends.invariant.CONTRACT_BATCH_VARIANT`), which
    #: calls stay batch-variant and why.
    determinism_gaps: dict[str, str] = field(default_factory=dict)
    #: ``moe_experts``' provider serves ``NO_EXPERT`` ids itself: the reference does, a
    #: backend's provider where it declares ``Capabilities.moe_no_expert_ids``; another
    #: backend's (an ``ops:`` override) is not assumed to.
    moe_skips_no_expert: bool = False
    #: op name -> why its calls raise UnsupportedOpError: the backend lacks it and the config
    #: says ``fallback: error``, or it has no reference to fall back to.
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities()

    @property
    def emulated(self) -> bool:
        return bool(self.backend.emulate and self.capabilities.emulated)

    def op(self, name: str) -> Callable[..., Any]:
        """The checked provider callable for ``name``."""
        try:
            return self.table[name]
        except KeyError:
            raise UnsupportedOpError(f"op {name!r} is not in the catalogue") from None

    def provider_kind(self, name: str, weight_format: str | None = None) -> str:
        """How ``name`` is served: native / triton / emulated / reference, "fallback" or "override".
        Where the backend's path depends on the weight format (``Capabilities.op_paths``), the
        kind for ``weight_format`` (``bf16``, ``fp8-block``, ...); without one, its main path's."""
        if name in self.refused:
            return "refused"
        if name in self.fallbacks:
            return "fallback"
        if self.providers[name] != self.backend.name:
            return "override"
        return self.backend.op_kind(name, weight_format) or "native"

    def provider_paths(self, name: str) -> dict[str, dict[str, str]]:
        """Weight format -> ``{"kind", "via"}`` for ``name`` when the backend serves it and its
        path depends on the format (``Capabilities.op_paths``); empty otherwise."""
        if name in self.fallbacks or self.providers[name] != self.backend.name:
            return {}
        paths = self.capabilities.op_paths.get(name, {})
        return {fmt: path.as_dict() for fmt, path in paths.items()}

    def provider_entry(self, name: str) -> dict[str, Any]:
        """``{"provider", "kind"}`` of ``name``, plus ``"paths"`` per weight format where the
        path depends on it (what ``describe``, ``dshal run`` and run reports record per op)."""
        entry: dict[str, Any] = {"provider": self.providers[name], "kind": self.provider_kind(name)}
        paths = self.provider_paths(name)
        if paths:
            entry["paths"] = paths
        return entry

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (what ``dshal info`` prints for the active runtime)."""
        return {
            "backend": self.backend.name,
            "device": str(self.device),
            "emulated": self.emulated,
            "providers": {op: self.provider_entry(op) for op in self.providers},
            "fallbacks": sorted(self.fallbacks),
            "selection": [{"name": d.name, "taken": d.taken, "reason": d.reason} for d in self.selection],
            "config": self.config.to_dict(),
            "determinism": {"mode": self.config.determinism, "batch_invariant": sorted(self.batch_invariant),
                            "gaps": dict(self.determinism_gaps)},
        }

    def __repr__(self) -> str:
        # One line for a notebook cell or a log, asking the backend nothing; the whole record
        # (config, the selection trace, kinds, paths) is describe()'s, as `dshal info` prints it.
        served: dict[str, list[str]] = {}
        for op, provider in self.providers.items():
            served.setdefault(provider, []).append(op)
        own = served.pop(self.backend.name, [])
        parts = [f"{len(own)} ops served by {self.backend.name}"]
        parts += [f"{provider} serves {', '.join(ops)}" for provider, ops in served.items()]
        return f"<Runtime backend {self.backend.name!r} on {self.device}, config {self.config.source}: {'; '.join(parts)}>"

    def activate(self) -> Runtime:
        """Make this the runtime ``dshal.ops`` dispatches to."""
        with _lock:
            _state["active"] = self
            _install(self)
        return self


def format_paths(paths: Mapping[str, Mapping[str, str]]) -> str:
    """``Runtime.provider_paths`` in one line for tables: ``bf16: native; fp8-block: triton``."""
    return "; ".join(f"{fmt}: {path['kind']}" for fmt, path in paths.items())


OpHook = Hook

_lock = threading.RLock()
_state: dict[str, Any] = {"active": None}


def _install(runtime: Runtime) -> None:
    """Install ``runtime``'s providers into the ops' dispatcher (through the op hook, if one is set)."""
    DISPATCHER.install(runtime.table, runtime.unchecked)


@contextlib.contextmanager
def op_hook(hook: OpHook) -> Iterator[None]:
    """While active, every ``dshal.ops.<op>`` call, from any thread and inside
    :func:`reference_ops` too, goes through ``hook(op_name, provider)``'s wrapper (used by
    ``dshal profile``, run reports, ``dshal plan`` and the conformance model traces). Hooks
    do not nest. When no hook is set the dispatch tables hold the providers themselves, so
    the off state costs nothing."""
    current()  # the default runtime's providers are what the hook wraps, not the first-call entries
    with DISPATCHER.hooked(hook):
        yield


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """While active, this thread's ``dshal.ops`` calls run each op's reference behind its
    input checks, on tensors of any device (meta, or the host while the backend's device is
    elsewhere). Other threads keep the active runtime's providers; the backend, device and
    config stay the active runtime's. Nests; a ``dshal.use`` inside the block stays active
    after it."""
    references = {name: spec.reference_impl for name, spec in SPECS.items() if spec.has_reference}
    with DISPATCHER.overlay({name: SPECS[name].checked(fn) for name, fn in references.items()}, references):
        yield


def _fallback_caller(op: str, backend: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    """Serve ``op`` from the reference, warning once (``fallback: warn``)."""
    warned = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not warned:
            warned.append(True)
            log.warning("dshal: backend %r lacks op %r; serving it with the op's reference (provider %r, fallback: warn)",
                        backend, op, REFERENCE_PROVIDER)
        return impl(*args, **kwargs)

    call.__name__ = op
    return call


def _refusing(op: str, backend: str, why: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOpError(f"backend {backend!r} does not provide op {op!r} and {why}")

    call.__name__ = op
    return call


def build_runtime(config: Config) -> Runtime:
    """Select the backend and resolve each op's provider (no activation)."""
    backend, trace = select(
        config.backend, config.prefer, emulate=config.emulate, registry=REGISTRY,
        origin=f"backend, set by {config.origin('backend')}",
    )
    # This rank's device (LOCAL_RANK) becomes current before anything below allocates on it.
    device = backend.bind_device()
    device_type = backend.device_type
    own_ops: Mapping[str, Callable[..., Any]] = backend.ops()
    other_ops: dict[str, Mapping[str, Callable[..., Any]]] = {backend.name: own_ops}  # ops: overrides
    providers: dict[str, str] = {}
    unchecked: dict[str, Callable[..., Any]] = {}  # op -> provider; the table gets it behind the checks
    refused: dict[str, str] = {}  # op -> why its calls raise
    fallbacks = set()
    for name, spec in SPECS.items():
        override = config.ops.get(name)
        if override == REFERENCE_PROVIDER:  # config validation made sure the op has a reference
            providers[name] = REFERENCE_PROVIDER
            unchecked[name] = spec.reference_impl
        elif override is not None:
            # Naming the selected backend itself is checked too: it must really provide the op.
            if override not in other_ops:
                where = f"ops.{name}, set by {config.origin(f'ops.{name}')}"
                other_ops[override] = require_named(REGISTRY, override, config.emulate, where)[0].ops()
            if name not in other_ops[override]:
                raise config.error(
                    f"ops.{name}",
                    f"ops.{name}: backend {override!r} does not provide op {name!r} "
                    f"(it provides: {', '.join(sorted(other_ops[override])) or 'none'})",
                )
            providers[name] = override
            unchecked[name] = other_ops[override][name]
        elif name in own_ops:
            providers[name] = backend.name
            unchecked[name] = own_ops[name]
        elif config.fallback == "error" or not spec.has_reference:  # no reference must not break use() either
            refused[name] = (
                f"the config says fallback: error (set fallback: warn, or ops: {{{name}: {REFERENCE_PROVIDER}}} "
                "to serve it with the reference)" if config.fallback == "error"
                else "the op has no reference implementation to fall back to"
            )
            providers[name] = REFUSED_PROVIDER
            unchecked[name] = _refusing(name, backend.name, refused[name])
        else:
            providers[name] = REFERENCE_PROVIDER
            fallbacks.add(name)
            unchecked[name] = _fallback_caller(name, backend.name, spec.reference_impl)
    invariant, gaps = _strict_providers(config, backend, providers, unchecked) if config.determinism == "strict" else (frozenset(), {})
    for decision in trace:  # why auto passed a plugin over (it failed to load, no device...): -v says
        if not decision.taken:
            log.info("dshal: backend: auto passed over %r: %s", decision.name, decision.reason)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("dshal: op providers: %s", ", ".join(f"{op}: {who}" for op, who in sorted(providers.items())))
    # A refusal needs no input checks: it is the answer whatever the inputs. The reference's
    # outputs are the contract's by construction: only a backend's are checked per call.
    table = {
        name: fn if name in refused else SPECS[name].checked(
            fn, device_type, None if providers[name] == REFERENCE_PROVIDER else providers[name])
        for name, fn in unchecked.items()
    }
    return Runtime(
        config=config,
        backend=backend,
        device=device,
        providers=providers,
        fallbacks=frozenset(fallbacks),
        selection=trace,
        table=table,
        unchecked=unchecked,
        batch_invariant=invariant,
        determinism_gaps=gaps,
        moe_skips_no_expert=providers["moe_experts"] == REFERENCE_PROVIDER
        or (providers["moe_experts"] == backend.name and backend.capabilities().moe_no_expert_ids),
        refused=refused,
    )


#: Ops whose results may depend on the batch around a row (reduction splits and tiles follow M).
BATCH_SENSITIVE_OPS = ("linear", "fp8_gemm", "int8_gemm", "rms_norm", "attention", "moe_experts")


def _strict_providers(
    config: Config, backend: Backend, providers: dict[str, str], unchecked: dict[str, Callable[..., Any]]
) -> tuple[frozenset[str], dict[str, str]]:
    """``determinism: strict``: swap in the backend's batch-invariant providers (in place)
    for the ops it serves itself; return those ops and, for the others, why not. An op whose
    contract couples the rows of some calls (:data:`~dshal.backends.invariant.CONTRACT_BATCH_VARIANT`)
    is batch-invariant but for those calls, which its gap names: no provider can be both."""
    offered = backend.batch_invariant_ops()
    invariant, gaps = set(), {}
    for op in BATCH_SENSITIVE_OPS:
        if op in config.ops:
            gaps[op] = f"served by {providers[op]!r} through the ops: override"
        elif providers.get(op) != backend.name:
            gaps[op] = f"backend {backend.name!r} does not provide it (served by {providers.get(op)!r})"
        elif op not in offered:
            gaps[op] = f"backend {backend.name!r} has no batch-invariant provider for it"
        else:
            unchecked[op] = offered[op]
            invariant.add(op)
    if gaps:
        log.warning("dshal: determinism: strict: no batch-invariant provider for %s",
                    "; ".join(f"{op} ({why})" for op, why in gaps.items()))
    for op in sorted(invariant & CONTRACT_BATCH_VARIANT.keys()):
        gaps[op] = CONTRACT_BATCH_VARIANT[op]
        # Loud where the model will make such calls (precision.gemm: fp8-tensor); a checkpoint
        # stored per tensor under precision auto is named in the model's precision report.
        log.log(logging.WARNING if config.precision.gemm == "fp8-tensor" else logging.INFO,
                "dshal: determinism: strict: %s: %s", op, gaps[op])
    return frozenset(invariant), gaps


def use(
    config: str | os.PathLike | Mapping[str, Any] | Config | None = None,
    *,
    overrides_source: str = "<keyword arguments>",
    **overrides: Any,
) -> Runtime:
    """Load ``config`` (path, dict, Config or None = defaults + env), apply keyword
    overrides (``overrides_source``: what messages say set them), select the backend, and
    make the result the active runtime."""
    runtime = build_runtime(load_config(config, overrides_source=overrides_source, **overrides))
    log.info(
        "dshal: backend %s on %s; fallbacks: %s%s",
        runtime.backend.name,
        runtime.device,
        ", ".join(sorted(runtime.fallbacks)) or "none",
        f"; refused (calls raise UnsupportedOpError): {', '.join(sorted(runtime.refused))}" if runtime.refused else "",
    )
    return runtime.activate()


def use_for_command(
    config: str | os.PathLike | None, backend: str | None, flag: str = "--backend", *, emulate: bool | None = None
) -> Runtime:
    """:func:`use` for a command: ``config`` (its ``--config``; None: DSHAL_CONFIG or the
    defaults) with ``backend`` (its ``flag``'s value; None: the config's) and ``emulate`` (its
    ``--emulate``; None: the config's) winning, and messages naming the flags that set them."""
    overrides: dict[str, Any] = {"backend": backend} if backend else {}
    if emulate is not None:
        overrides["emulate"] = emulate
    flags = [name for name, given in ((flag, backend), ("--emulate", emulate is not None)) if given]
    return use(config, overrides_source=" / ".join(flags) or flag, **overrides)


def current() -> Runtime:
    """The active runtime; activates the default one (config from the environment) if none is."""
    active = _state["active"]
    if active is None:
        with _lock:
            active = _state["active"]
            if active is None:
                active = use()
    return active


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation on ``device`` can still get, as the active runtime's backend
    reports them (``memory_stats()["free"]``); None when unknown: ``device`` is not the
    runtime's (meta, another device) or the backend does not say."""
    runtime = current()
    if torch.device(device) != runtime.device:
        return None
    free = runtime.backend.memory_stats().get("free")
    return None if free is None else int(free)


def free_memory_note(device: torch.device | str) -> str:
    """What holds :func:`free_memory` of ``device`` below the memory it sees, for messages:
    on the host (cpu, or a backend emulated on it), a container's cgroup limit where its
    headroom is what is left (``the container's memory limit (memory.max = 8.00 GiB, ...)``),
    else "" (the device's own memory)."""
    return host_memory_note() if torch.device(device).type == "cpu" else ""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation the device (or the host) refused: torch's
    ``OutOfMemoryError`` (CUDA, HIP, NPU), or the CPU allocator's "can't allocate memory"."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in str(err) or "out of memory" in str(err).lower()
    )


@contextlib.contextmanager
def out_of_memory_as_error(device: torch.device | str, what: str, lower: str) -> Iterator[None]:
    """Turn an allocation that ``device`` refuses inside the block into a DeviceError that
    names the request (``what``) and the arguments that shrink it (``lower``), in the
    caller's terms, with torch's own first line; any other error passes unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        said = " ".join(str(err).split())[:300]
        raise DeviceError(f"{what} ran out of memory on {device} ({said}): lower {lower}") from None


def reset() -> None:
    """Forget the active runtime (the next op call activates the default again)."""
    with _lock:
        _state["active"] = None
        DISPATCHER.reset()


@contextlib.contextmanager
def active_kept() -> Iterator[None]:
    """Gives back on exit the runtime that was active on entry, or none: for code that
    activates others on its way (a command or the conformance suite run in-process), so a
    caller's own ``dshal.use()`` still holds afterwards."""
    with _lock:
        was = _state["active"]
    try:
        yield
    finally:
        if was is None:
            reset()
        else:
            was.activate()
