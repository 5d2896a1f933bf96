"""``dshal.ops``' public op functions and the dispatcher behind them (dshal.ops.dispatch)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import dshal
import dshal.ops
from dshal.ops.catalogue import SPECS
from dshal.ops.dispatch import DISPATCHER, Dispatcher

HELPERS = {"trusted"}  # public functions of dshal.ops that are not ops


def public_functions() -> dict[str, object]:
    return {
        name: value
        for name, value in vars(dshal.ops).items()
        if inspect.isfunction(value) and value.__module__ == "dshal.ops" and not name.startswith("_")
    }


def _without_annotations(signature: inspect.Signature) -> inspect.Signature:
    empty = inspect.Parameter.empty
    return signature.replace(
        parameters=[p.replace(annotation=empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )


def test_every_spec_has_exactly_one_public_function_with_its_signature() -> None:
    functions = public_functions()
    missing, extra = sorted(set(SPECS) - set(functions)), sorted(set(functions) - HELPERS - set(SPECS))
    assert not missing, (
        f"dshal.ops has no public function for {missing}: write `def {missing[0]}(...)` out in dshal/ops/__init__.py "
        f"with the spec's parameters, annotated, returning `_thread.table[{missing[0]!r}](...)` (as silu_and_mul does)"
    )
    assert not extra, f"dshal/ops/__init__.py: public functions {extra} have no op spec (add the spec, or a leading _)"
    for name, spec in SPECS.items():
        fn = functions[name]
        signature = inspect.signature(fn)
        # The spec's checker is unannotated; the public function carries the types users'
        # checkers read (tests/test_core_typing.py runs mypy on them): same names, kinds, defaults.
        assert _without_annotations(signature) == spec.signature, name
        unannotated = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not unannotated and signature.return_annotation is not inspect.Signature.empty, (name, unannotated)
        assert fn.__doc__ and fn.__doc__.strip(), f"dshal.ops.{name} has no docstring"
        assert fn.__name__ == name
    unlisted = sorted((set(SPECS) | HELPERS) - set(dshal.ops.__all__))
    assert not unlisted, (
        f"{unlisted} missing from dshal.ops.__all__ (the literal list at the end of dshal/ops/__init__.py): "
        f"under `mypy --strict` a user's `dshal.ops.{unlisted[0]}` is then an error"
    )


@pytest.fixture
def recording() -> dict[str, list]:
    """Every op served by a recorder of (op name, positional args, keyword args)."""
    seen: dict[str, list] = {}

    def recorder(name: str):
        def call(*args, **kwargs):
            seen.setdefault(name, []).append((args, kwargs))
            return name

        return call

    table = {name: recorder(name) for name in SPECS}
    DISPATCHER.install(table, table)
    yield seen
    dshal.runtime.reset()


def test_each_public_function_dispatches_to_its_own_op_with_its_arguments_in_order(recording) -> None:
    for name, spec in SPECS.items():
        args = [object() for _ in spec.signature.parameters]
        assert getattr(dshal.ops, name)(*args) == name
        assert recording[name] == [(tuple(args), {})], name
        # defaults reach the provider as the spec declares them
        required = [object() for p in spec.signature.parameters.values() if p.default is inspect.Parameter.empty]
        getattr(dshal.ops, name)(*required)
        defaults = [p.default for p in spec.signature.parameters.values() if p.default is not inspect.Parameter.empty]
        assert recording[name][-1] == ((*required, *defaults), {}), name


def test_install_needs_every_op_and_reset_restores_the_first_call_entries() -> None:
    dispatcher = Dispatcher(["a", "b"], activate_default=lambda: None)
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        dispatcher.install({"a": len, "c": len}, {"a": len, "b": len})
    activated = []

    def activate() -> None:
        activated.append(True)
        dispatcher.install({"a": lambda x: ("checked", x), "b": len}, {"a": lambda x: ("bare", x), "b": len})

    dispatcher = Dispatcher(["a", "b"], activate_default=activate)
    assert dispatcher.thread.table["a"](1) == ("checked", 1) and activated == [True]  # first call activates
    with dispatcher.trusted():
        assert dispatcher.thread.table["a"](2) == ("bare", 2)
        assert dispatcher.provider("a", checked=False) is dispatcher.thread.table["a"]
    assert dispatcher.thread.table["a"](3) == ("checked", 3) and activated == [True]
    dispatcher.reset()
    assert dispatcher.thread.table["a"](4) == ("checked", 4) and activated == [True, True]


def test_an_op_called_first_in_a_fresh_process_activates_the_default_runtime() -> None:
    """The bootstrap: ``dshal.ops`` imports nothing of the runtime; its first call reaches it
    through ``dshal.current()``."""
    code = textwrap.dedent("""
        import json, sys
        import torch
        import dshal.ops
        before = "dshal.runtime" in sys.modules
        y = dshal.ops.rms_norm(torch.ones(2, 8), torch.ones(8))
        print(json.dumps({"runtime_before": before, "runtime_after": "dshal.runtime" in sys.modules,
                          "backend": dshal.current().backend.name, "shape": list(y.shape)}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env["DSHAL_BACKEND"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out.splitlines()[-1]) == {
        "runtime_before": False, "runtime_after": True, "backend": "cpu", "shape": [2, 8],
    }


def test_an_overlay_serves_only_its_own_thread_keeps_the_trusted_mode_and_is_hooked() -> None:
    """``Dispatcher.overlay``: per thread, nested inside or around ``trusted()``, and reached
    by a hook set before or after it."""
    dispatcher = Dispatcher(["a"], activate_default=lambda: None)
    dispatcher.install({"a": lambda: "base"}, {"a": lambda: "base, bare"})
    with pytest.raises(ValueError, match=r"Dispatcher.overlay: checked table .* missing \['a'\]"):
        with dispatcher.overlay({}, {"a": len}):
            pass
    entered, leave, seen_elsewhere = threading.Event(), threading.Event(), []

    def in_an_overlay() -> None:
        with dispatcher.overlay({"a": lambda: "overlay"}, {"a": lambda: "overlay, bare"}):
            entered.set()
            leave.wait(10)
            seen_elsewhere.append(dispatcher.thread.table["a"]())

    worker = threading.Thread(target=in_an_overlay)
    worker.start()
    assert entered.wait(10)
    assert dispatcher.thread.table["a"]() == "base"  # this thread is not in the overlay
    leave.set()
    worker.join(10)
    assert seen_elsewhere == ["overlay"]

    with dispatcher.overlay({"a": lambda: "overlay"}, {"a": lambda: "overlay, bare"}):
        with dispatcher.trusted():
            assert dispatcher.thread.table["a"]() == "overlay, bare"
        with dispatcher.hooked(lambda name, fn: lambda: f"hooked {fn()}"):
            assert dispatcher.thread.table["a"]() == "hooked overlay"
            with pytest.raises(dshal.DshalError, match="do not nest"):
                with dispatcher.hooked(lambda name, fn: fn):
                    pass
        assert dispatcher.thread.table["a"]() == "overlay"
    with dispatcher.trusted():
        with dispatcher.hooked(lambda name, fn: lambda: f"hooked {fn()}"):
            with dispatcher.overlay({"a": lambda: "overlay"}, {"a": lambda: "overlay, bare"}):
                assert dispatcher.thread.table["a"]() == "hooked overlay, bare"
            assert dispatcher.thread.table["a"]() == "hooked base, bare"
    assert dispatcher.thread.table["a"]() == "base"


def test_blocks_closed_out_of_order_or_on_another_thread_leave_each_thread_consistent() -> None:
    """A ``trusted()`` or overlay block held open by a generator (a streamed response) may end
    after a block opened later, or on another thread (the generator finished there). Each
    block saved the thread's table on entry and wrote it back on exit: two trusted streams
    finished in turn left the thread unchecked for good (trusted depth 0 with the unchecked
    table), an overlay's table outlived it, and a close on another thread set that thread's
    depth to -1. A block's close now removes it from the thread that opened it."""
    from dshal.ops.mode import MODE, checking

    dispatcher = Dispatcher(["a"], activate_default=lambda: None)
    dispatcher.install({"a": lambda: "base"}, {"a": lambda: "base, bare"})

    def held(block, n):  # a streaming generator keeping its block open across yields
        with block:
            yield from range(n)

    def serving() -> str:
        return dispatcher.thread.table["a"]()

    first, second = held(dispatcher.trusted(), 1), held(dispatcher.trusted(), 2)
    next(first), next(second)
    list(first)  # the block opened first closes first
    assert serving() == "base, bare" and not checking()  # the second block is still open
    list(second)
    assert serving() == "base" and checking() and MODE.trusted_depth == 0

    overlay = held(dispatcher.overlay({"a": lambda: "overlay"}, {"a": lambda: "overlay, bare"}), 1)
    trusted = held(dispatcher.trusted(), 2)
    next(overlay), next(trusted)
    assert serving() == "overlay, bare"
    list(overlay)
    assert serving() == "base, bare"
    list(trusted)
    assert serving() == "base"

    opened, handed = threading.Event(), []

    def open_one() -> None:  # a worker opens a trusted stream and hands it over
        stream = held(dispatcher.trusted(), 2)
        next(stream)
        handed.append(stream)
        opened.set()

    worker = threading.Thread(target=open_one)
    worker.start()
    assert opened.wait(10)
    worker.join(10)
    handed.pop().close()  # the main thread finishes it
    assert serving() == "base" and checking() and MODE.trusted_depth == 0


def test_blocks_closed_on_another_thread_while_this_one_opens_blocks_race_nothing() -> None:
    """A close from another thread rebuilt the opening thread's block list from an old copy
    while that thread opened and closed its own: overlays served by the base table, and a
    thread left trusted (unchecked) for good with stale blocks. Each thread's blocks are
    changed under its lock now."""
    import queue
    import sys

    from dshal.ops.mode import MODE

    dispatcher = Dispatcher(["a"], activate_default=lambda: None)
    dispatcher.install({"a": lambda: "base"}, {"a": lambda: "base, bare"})
    overlay = ({"a": lambda: "overlay"}, {"a": lambda: "overlay, bare"})

    def held(block):
        with block:
            yield

    handed: queue.Queue = queue.Queue()
    wrong = []

    def closing() -> None:
        while (stream := handed.get()) is not None:
            stream.close()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, where the race lives
    closer = threading.Thread(target=closing)
    closer.start()
    try:
        for _ in range(20000):
            stream = held(dispatcher.trusted())
            next(stream)
            handed.put(stream)
            with dispatcher.overlay(*overlay):
                if not dispatcher.thread.table["a"]().startswith("overlay"):
                    wrong.append("overlay")
    finally:
        handed.put(None)
        closer.join(60)
        sys.setswitchinterval(interval)
    assert not wrong and dispatcher.thread.table["a"]() == "base" and MODE.trusted_depth == 0
    assert dispatcher.thread.blocks == []


def test_a_block_the_garbage_collector_closes_while_its_thread_opens_one_does_not_hang() -> None:
    """A generator paused inside ``trusted()`` and dropped in a reference cycle is closed by the
    garbage collector, which may run inside the thread's own open of another block (any
    allocation there can start a collection): a plain lock taken twice by one thread hung the
    process for good. Run in a child with a deadline, the collector set to run often."""
    script = textwrap.dedent("""
        import gc, sys
        from dshal.ops.dispatch import Dispatcher
        from dshal.ops.mode import MODE
        dispatcher = Dispatcher(["a"], activate_default=lambda: None)
        dispatcher.install({"a": lambda: "base"}, {"a": lambda: "base, bare"})
        def held():
            with dispatcher.trusted():
                yield
        for threshold in range(1, 60):
            for _ in range(3):
                stream = held(); next(stream)
                cycle = [stream]; cycle.append(cycle)
                del stream, cycle
                gc.set_threshold(threshold)
                with dispatcher.trusted():
                    pass
                gc.set_threshold(700)
        gc.collect()
        print(MODE.trusted_depth, len(dispatcher.thread.blocks), dispatcher.thread.table["a"]())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "0", "base"], proc.stdout


def test_reference_ops_is_per_thread_and_a_use_inside_it_stays_active() -> None:
    """``dshal.runtime.reference_ops`` serves the calling thread only: another thread keeps the
    backend's providers (the cpu backend takes no meta tensor), and a runtime activated inside
    the block is the active one after it."""
    from dshal.errors import DshalError
    from dshal.runtime import current, op_hook, reference_ops

    dshal.use({"backend": "cpu"})
    x, w = torch.ones(2, 8, device="meta"), torch.ones(8, device="meta")
    inside, leave, results = threading.Event(), threading.Event(), []

    def with_references() -> None:
        with reference_ops():
            results.append(tuple(dshal.ops.rms_norm(x, w).shape))
            inside.set()
            leave.wait(10)
            results.append(tuple(dshal.ops.rms_norm(x, w).shape))

    worker = threading.Thread(target=with_references)
    worker.start()
    try:
        assert inside.wait(10)
        with pytest.raises(DshalError, match="device"):  # the cpu backend's provider, checked
            dshal.ops.rms_norm(x, w)
    finally:
        leave.set()
        worker.join(10)
    assert results == [(2, 8), (2, 8)]

    calls: list[str] = []
    with reference_ops():
        with op_hook(lambda name, fn: lambda *a, **k: (calls.append(name), fn(*a, **k))[1]):
            dshal.ops.rms_norm(x, w)  # the hook reaches the references
        chosen = dshal.use({"backend": "cpu", "fallback": "error"})
        assert dshal.ops.rms_norm(x, w).device.type == "meta"  # still the references here
    assert calls == ["rms_norm"]
    assert current() is chosen
    with pytest.raises(DshalError, match="device"):
        dshal.ops.rms_norm(x, w)
    dshal.runtime.reset()


def test_a_providers_wrong_output_is_named_at_the_op_that_made_it(install_plugin) -> None:
    """A plugin's rms_norm that drops a column was met by the next op ("linear: argument 'x'
    has size ...") or, decoding under trusted(), by nothing at all. Checked dispatch now
    names the provider and the output; trusted() calls pay nothing for it."""
    install_plugin("backends", {"wrongout": "WrongOutputBackend"})
    dshal.use(backend="wrongout")
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(dshal.ProviderError, match=r"rms_norm: provider 'wrongout' returned its output with shape \[3, 7\], expected \[3, 8\]"):
        dshal.ops.rms_norm(x, w)
    with pytest.raises(dshal.ProviderError, match=r"rms_norm: provider 'wrongout' returned \(Tensor\), expected 2 tensor\(s\)"):
        dshal.ops.rms_norm(x, w, 1e-6, torch.zeros(3, 8))
    with dshal.ops.trusted():
        assert dshal.ops.rms_norm(x, w).shape == (3, 7)  # unchecked: the decode steps' path
    for op, spec in SPECS.items():
        assert spec._outputs is not None, f"{op} declares no outputs"


def test_output_rules_match_the_references_on_every_example_row() -> None:
    """Each op's declared outputs are what its reference returns on every shape row."""
    from dshal.ops.examples import Draw
    from dshal.ops.spec import check_outputs

    draw = Draw(torch.Generator().manual_seed(0), "cpu", "e4m3fn")
    for op, spec in SPECS.items():
        for row in spec.rows:
            if "ci" not in row.tiers or row.kind == "bench":  # the ci rows: small shapes
                continue
            kwargs = spec.example_inputs(draw, row).kwargs
            out = spec.reference_impl(**kwargs)
            first = next(iter(spec.signature.parameters))
            check_outputs(op, "reference", out, spec._outputs(**kwargs), kwargs[first].device)
