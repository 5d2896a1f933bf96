"""What does ``dshal.ops.<op>`` dispatch cost on top of the op itself?

Times, side by side in one run, on a small tensor (so the math is cheap and the
overheads show), the ``cpu`` backend's ``rms_norm`` provider:

1. ``dshal.ops.rms_norm``                  -- dispatch: table lookup + input checks + device check
                                              + the check of the outputs against the op's declared ones
2. ``runtime.table["rms_norm"]``           -- the same checked provider, called without dispatch
3. ``runtime.unchecked["rms_norm"]``       -- the bare provider: no checks
4. ``dshal.ops.rms_norm`` in ``ops.trusted()`` -- dispatch without the checks (model decode steps)

and prints the differences in microseconds. Goal: (1) - (2) <= 1 us. Then (1) again with
``dshal profile``'s op hook installed, and after it is removed (the hook's off-cost: 0 by
construction, the dispatch table holds the bare providers again).

    python benchmarks/dispatch_overhead.py [--number 10000] [--repeat 15]
"""

from __future__ import annotations

import argparse
import contextlib
import timeit

import torch

import dshal
from dshal.perf.measure import Recorder
from dshal.perf.report import platform_info


def per_call_us(
    fns: dict[str, object], args: tuple, number: int, repeat: int, batched: set[str] = frozenset()
) -> dict[str, float]:
    """Best-of-``repeat`` time per call in microseconds for each function (those named in
    ``batched`` make all ``number`` calls themselves). The functions take turns within each
    round, so clock or thermal drift hits them all alike; the minimum is the least noisy
    estimate."""
    for name, fn in fns.items():
        if name not in batched:
            fn(*args)  # warm up (the first dispatch may activate a runtime)
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            calls = 1 if name in batched else number
            seconds = timeit.timeit(lambda fn=fn: fn(*args), number=calls)
            best[name] = min(best[name], seconds / number * 1e6)
    return best


def machine() -> str:

    p = platform_info()
    return f"{p['cpu']}, {p['cores']} cores, torch {p['torch']}, Python {p['python']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--number", type=int, default=10000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=15, help="rounds; the best is reported")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 64], help="shape of x")
    args = parser.parse_args()

    torch.set_num_threads(1)  # small-tensor timings are steadier single-threaded
    rt = dshal.use(backend="cpu")
    x = torch.randn(*args.shape)
    w = torch.ones(args.shape[-1])
    inputs = (x, w)

    checked, bare_provider = rt.table["rms_norm"], rt.unchecked["rms_norm"]

    def trusted_dispatch(*a):
        with dshal.ops.trusted():
            for _ in range(args.number):
                dshal.ops.rms_norm(*a)

    rows = per_call_us(
        {
            "dshal.ops.rms_norm (dispatch)": dshal.ops.rms_norm,
            "runtime.table['rms_norm'] (checked provider)": checked,
            "runtime.unchecked['rms_norm'] (provider)": bare_provider,
            # One context entry per timing, not per call: what a decode step's calls pay.
            "dshal.ops.rms_norm in ops.trusted()": trusted_dispatch,
        },
        inputs,
        args.number,
        args.repeat,
        batched={"dshal.ops.rms_norm in ops.trusted()"},
    )

    # ---- PROFILING HOOK OFF-COST: the profiling helper adds its row(s) here --------------
    # (time dshal.ops.rms_norm after a `with dshal.runtime.op_hook(...)` block has exited,
    #  and inside one, against the "dispatch" row above.)

    recorder = Recorder(rt.backend.synchronize)  # dshal profile's op hook
    timed = {"on": lambda: dshal.ops.rms_norm(*inputs), "off": lambda: dshal.ops.rms_norm(*inputs),
             "checked": lambda: checked(*inputs)}
    hook_rows = dict.fromkeys(timed, float("inf"))
    for _ in range(args.repeat):  # interleaved rounds: hook on, hook off again, checked provider
        for name, fn in timed.items():
            with dshal.runtime.op_hook(recorder.wrap_op) if name == "on" else contextlib.nullcontext():
                fn()  # warm-up
                hook_rows[name] = min(hook_rows[name], timeit.timeit(fn, number=args.number) / args.number * 1e6)
    bare = all(dshal.ops.DISPATCHER.provider(name) is fn for name, fn in rt.table.items())
    # -------------------------------------------------------------------------------------

    print(f"machine: {machine()}")
    print(f"backend: {rt.backend.name}; x {list(x.shape)} {x.dtype}; best of {args.repeat} x {args.number} calls")
    width = max(map(len, rows))
    for name, us in rows.items():
        print(f"  {name:<{width}}  {us:8.3f} us/call")
    dispatch, direct, raw, trusted = rows.values()
    added = dispatch - direct
    print(f"added by dispatch (dispatch - checked provider): {added:+.3f} us  (goal <= 1 us: {'met' if added <= 1 else 'MISSED'})")
    print(f"input + output checks (checked provider - provider): {direct - raw:+.3f} us")
    print(f"dispatch in ops.trusted() (trusted - provider): {trusted - raw:+.3f} us")
    off_added = hook_rows["off"] - hook_rows["checked"]
    print(f"profiling hook off again: dispatch - checked provider = {off_added:+.3f} us (before any hook: {added:+.3f} us); "
          f"hook off-cost {off_added - added:+.3f} us; dispatch table holds the bare providers: {bare}")
    on_added = hook_rows["on"] - hook_rows["off"]
    print(f"profiling hook on: {hook_rows['on']:.3f} us/call "
          f"({on_added:+.3f} us over hook off: sync, clock, cost lookup, tally)")


if __name__ == "__main__":
    main()
