"""One rank of the collective tests (started by tests/test_comm_dist.py, never by pytest).

Usage: ``python comm_worker.py SCENARIO OUT_DIR [TIMEOUT_S]`` with torchrun's environment.
Each rank writes ``OUT_DIR/rank<R>.json``: ``{"checks": {name: "ok" | failure}, ...}``.
A rank that gets a CommError records its message and exits with :data:`COMM_ERROR_EXIT`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import dshal
from dshal import comm
from dshal.errors import CommError, ConfigError, DeviceError, DTypeError, ShapeError

COMM_ERROR_EXIT = 17


def arrive_together(out: Path, limit_s: float = 120.0) -> None:
    """Wait until every rank of the job has started (a file each in ``out``). The scenario's
    distributed.timeout_s, a few seconds where a dead or hung peer is the subject, also bounds
    the rendezvous, and ranks importing torch on a loaded machine can start seconds apart: only
    the init scenario, whose subject is the rendezvous, goes without it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    (out / f"started{rank}").touch()
    deadline = time.monotonic() + limit_s
    while not all((out / f"started{r}").exists() for r in range(world)) and time.monotonic() < deadline:
        time.sleep(0.01)


def write(out: Path, rank: int, payload: dict) -> None:
    tmp = out / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.replace(out / f"rank{rank}.json")


def run_checks(checks: dict[str, str], name: str, fn) -> None:
    start = time.perf_counter()
    try:
        fn()
        checks[name] = "ok"
        if os.environ.get("DSHAL_TEST_TIMING"):
            print(f"rank {os.environ.get('RANK')}: {name}: {time.perf_counter() - start:.2f} s", flush=True)
    except Exception as err:  # noqa: BLE001 - every failure is recorded and asserted by the test
        checks[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"


def expect_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(f"got {got.dtype} {tuple(got.shape)} {got.tolist()}, want {want.dtype} {tuple(want.shape)} {want.tolist()}")


def expect_raises(kind: type[BaseException], words: list[str], fn) -> None:
    try:
        fn()
    except kind as err:
        missing = [w for w in words if w not in str(err)]
        if missing:
            raise AssertionError(f"{kind.__name__} message {str(err)!r} lacks {missing}") from None
        return
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


def collectives(rank: int, n: int) -> dict[str, str]:
    """Integer-valued inputs, so every result is exact; expectations are computed from the
    formula for every rank's input, not by calling the collective."""
    checks: dict[str, str] = {}

    def value(r: int, shape=(2, 3), dtype=torch.float32) -> torch.Tensor:  # rank r's input
        return (torch.arange(6, dtype=torch.int64).reshape(shape) * (r + 1) + r).to(dtype)

    ranks = range(n)
    for dtype in (torch.float32, torch.int64, torch.bfloat16):
        stack = torch.stack([value(r, dtype=dtype) for r in ranks])
        wants = {"sum": stack.sum(0), "max": stack.amax(0), "min": stack.amin(0)}
        if dtype != torch.bfloat16:  # bf16 products pass 256, where bf16 stops being exact
            wants["product"] = stack.prod(0)
        for op, want in wants.items():
            run_checks(checks, f"all_reduce[{op},{dtype}]", lambda op=op, want=want, dtype=dtype: expect_equal(
                comm.all_reduce(value(rank, dtype=dtype), op=op), want.to(dtype)))
    evens = torch.stack([value(r) * n for r in ranks])  # sums divisible by n: avg is exact
    run_checks(checks, "all_reduce[avg]", lambda: expect_equal(comm.all_reduce(value(rank) * n, op="avg"), evens.sum(0) / n))

    run_checks(checks, "all_gather[dim0]", lambda: expect_equal(comm.all_gather(value(rank)), torch.cat([value(r) for r in ranks], 0)))
    run_checks(checks, "all_gather[dim1]", lambda: expect_equal(comm.all_gather(value(rank), dim=1), torch.cat([value(r) for r in ranks], 1)))
    run_checks(checks, "all_gather[dim-1,int64]", lambda: expect_equal(
        comm.all_gather(value(rank, dtype=torch.int64), dim=-1), torch.cat([value(r, dtype=torch.int64) for r in ranks], -1)))

    def rs_input(r: int) -> torch.Tensor:
        return torch.arange(4 * n * 3, dtype=torch.float32).reshape(4 * n, 3) * (r + 1)

    total = sum(rs_input(r) for r in ranks)
    run_checks(checks, "reduce_scatter[dim0,sum]", lambda: expect_equal(comm.reduce_scatter(rs_input(rank)), total.chunk(n, 0)[rank]))
    run_checks(checks, "reduce_scatter[dim1,max]", lambda: expect_equal(
        comm.reduce_scatter(rs_input(rank).T.contiguous(), dim=1, op="max"), rs_input(n - 1).T.chunk(n, 1)[rank]))
    run_checks(checks, "reduce_scatter[avg]", lambda: expect_equal(
        comm.reduce_scatter(rs_input(rank) * n, op="avg"), (sum(rs_input(r) * n for r in ranks) / n).chunk(n, 0)[rank]))

    # all_to_all: rank s sends rows tagged (s, d, i) to rank d.
    def a2a_rows(src: int, dst: int, count: int) -> torch.Tensor:
        return torch.tensor([[src, dst, i] for i in range(count)], dtype=torch.int64).reshape(count, 3)

    def a2a_case(splits) -> None:  # splits(src, dst) -> rows sent from src to dst
        send = torch.cat([a2a_rows(rank, d, splits(rank, d)) for d in ranks])
        want = torch.cat([a2a_rows(s, rank, splits(s, rank)) for s in ranks])
        ins = [splits(rank, d) for d in ranks]
        outs = [splits(s, rank) for s in ranks]
        expect_equal(comm.all_to_all(send, outs, ins), want)  # sizes known
        expect_equal(comm.all_to_all(send, input_splits=ins), want)  # sizes exchanged first
        expect_equal(comm.all_to_all(send.float(), input_splits=ins), want.float())

    run_checks(checks, "all_to_all[even]", lambda: expect_equal(
        comm.all_to_all(torch.cat([a2a_rows(rank, d, 2) for d in ranks])), torch.cat([a2a_rows(s, rank, 2) for s in ranks])))
    run_checks(checks, "all_to_all[uneven]", lambda: a2a_case(lambda s, d: (s + 2 * d) % 3 + s))
    # rank 0 receives nothing at all, and the last rank sends nothing at all
    run_checks(checks, "all_to_all[rank0 receives none]", lambda: a2a_case(lambda s, d: 0 if d == 0 or s == n - 1 else s + d))
    run_checks(checks, "all_to_all[all empty]", lambda: a2a_case(lambda s, d: 0))

    def bcast() -> None:
        t = value(rank) if rank == n - 1 else torch.zeros(2, 3)
        expect_equal(comm.broadcast(t, src=n - 1), value(n - 1))

    run_checks(checks, "broadcast", bcast)
    run_checks(checks, "barrier", comm.barrier)

    # Strided views reduce and receive their own elements (the backends work on the storage in
    # order: a view of every other element summed the wrong ones), and leave the rest alone.
    def strided(op_name: str) -> None:
        base = torch.arange(8.0) + 10 * rank
        view = base[::2]
        if op_name == "all_reduce":
            comm.all_reduce(view)
            want = sum(torch.arange(8.0)[::2] + 10 * r for r in ranks)
        else:
            comm.broadcast(view, src=n - 1)
            want = torch.arange(8.0)[::2] + 10 * (n - 1)
        expect_equal(view, want)
        expect_equal(base[1::2], torch.arange(8.0)[1::2] + 10 * rank)

    run_checks(checks, "all_reduce[strided view]", lambda: strided("all_reduce"))
    run_checks(checks, "broadcast[strided view]", lambda: strided("broadcast"))

    # Dtypes gloo does not carry (every float8, int16, wide unsigned ints): moved as bytes,
    # bit for bit; a reduction of them is refused before any data moves.
    def fp8(r: int) -> torch.Tensor:
        return (torch.arange(12.0).reshape(3, 4) * (r + 1) - 5).to(torch.float8_e4m3fn)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)

    run_checks(checks, "all_gather[float8 on gloo]", lambda: expect_equal(
        bits(comm.all_gather(fp8(rank), dim=1)), bits(torch.cat([fp8(r) for r in ranks], 1))))
    run_checks(checks, "all_gather[int16 on gloo]", lambda: expect_equal(
        comm.all_gather(torch.tensor([rank, -rank], dtype=torch.int16)), torch.tensor([v for r in ranks for v in (r, -r)], dtype=torch.int16)))
    run_checks(checks, "broadcast[float8 on gloo]", lambda: expect_equal(
        bits(comm.broadcast(fp8(rank), src=n - 1)), bits(fp8(n - 1))))
    run_checks(checks, "all_to_all[float8 on gloo]", lambda: expect_equal(
        bits(comm.all_to_all(torch.cat([fp8(rank)[:1]] * n))), bits(torch.cat([fp8(r)[:1] for r in ranks]))))
    run_checks(checks, "error[float8 all_reduce on gloo]", lambda: expect_raises(
        DTypeError, ["all_reduce", "float8_e4m3fn", "gloo process group cannot reduce"], lambda: comm.all_reduce(fp8(rank))))
    run_checks(checks, "error[int16 reduce_scatter on gloo]", lambda: expect_raises(
        DTypeError, ["reduce_scatter", "int16"], lambda: comm.reduce_scatter(torch.zeros(n, dtype=torch.int16))))

    # local argument errors: raised before any traffic, and the group stays usable
    t = value(rank)
    run_checks(checks, "error[op]", lambda: expect_raises(CommError, ["all_reduce", "'op'", "'median'", "sum"], lambda: comm.all_reduce(t, op="median")))
    run_checks(checks, "error[avg int]", lambda: expect_raises(DTypeError, ["avg", "torch.int64"], lambda: comm.all_reduce(t.long(), op="avg")))
    run_checks(checks, "init again", lambda: expect_equal(torch.tensor(comm.init().world_size), torch.tensor(n)))
    run_checks(checks, "error[init with another timeout]", lambda: expect_raises(  # kept the old one silently
        ConfigError, ["'timeout_s' is 12345", "shutdown() first"], lambda: comm.init(timeout_s=12345)))
    run_checks(checks, "error[expanded all_reduce]", lambda: expect_raises(  # failed in torch after the data moved
        ShapeError, ["all_reduce", "expanded view", "t.clone()"], lambda: comm.all_reduce(torch.ones(1).expand(4))))
    run_checks(checks, "error[max complex]", lambda: expect_raises(  # torch refused it at issue: the group was torn down
        DTypeError, ["op='max'", "complex64", "'sum' or 'avg'"], lambda: comm.all_reduce(t.to(torch.complex64), op="max")))
    run_checks(checks, "error[splits sum]", lambda: expect_raises(
        ShapeError, ["input_splits", f"summing to {t.shape[0]}"], lambda: comm.all_to_all(t, input_splits=[t.shape[0] + 1] + [0] * (n - 1))))
    run_checks(checks, "error[splits count]", lambda: expect_raises(ShapeError, ["input_splits", f"{n} non-negative"], lambda: comm.all_to_all(t, input_splits=[2])))
    run_checks(checks, "error[rs indivisible]", lambda: expect_raises(
        ShapeError, ["reduce_scatter", "multiple of the group size"], lambda: comm.reduce_scatter(torch.zeros(n + 1, 2))))
    run_checks(checks, "error[not a tensor]", lambda: expect_raises(DTypeError, ["'t'", "list", "torch.Tensor"], lambda: comm.all_reduce([1, 2])))
    run_checks(checks, "error[broadcast src]", lambda: expect_raises(CommError, ["'src'", str(n)], lambda: comm.broadcast(t, src=n)))
    run_checks(checks, "error[dim]", lambda: expect_raises(ShapeError, ["'dim'", "5"], lambda: comm.all_gather(t, dim=5)))
    run_checks(checks, "error[0-d]", lambda: expect_raises(ShapeError, ["reduce_scatter", "0-d tensor"], lambda: comm.reduce_scatter(torch.tensor(1.0))))
    run_checks(checks, "error[meta device]", lambda: expect_raises(
        DeviceError, ["all_reduce", "device meta", "cpu", "gloo"], lambda: comm.all_reduce(torch.ones(2, device="meta"))))
    for name in ("all_gather", "broadcast", "all_to_all"):
        run_checks(checks, f"error[meta device {name}]", lambda name=name: expect_raises(
            DeviceError, [name, "device meta"], lambda: getattr(comm, name)(torch.ones(n, device="meta"))))
    run_checks(checks, "usable after argument errors", lambda: expect_equal(
        comm.all_reduce(torch.ones(2)), torch.full((2,), float(n))))

    # sub-groups: TP x EP = 2 x n/2, contiguous (the cpu backend reports no topology)
    from dshal.parallel.groups import setup_groups

    groups = setup_groups(tp=2, ep=n // 2)
    tp_ranks = groups.plan.tp_group_of(rank)
    ep_ranks = groups.plan.ep_group_of(rank)

    def sub_checks() -> None:
        if tp_ranks != tuple(range(rank - rank % 2, rank - rank % 2 + 2)):
            raise AssertionError(f"tp group {tp_ranks}")
        expect_equal(comm.all_reduce(torch.tensor([float(rank)]), group=groups.tp), torch.tensor([float(sum(tp_ranks))]))
        expect_equal(comm.all_gather(torch.tensor([rank]), group=groups.tp), torch.tensor(list(tp_ranks)))
        # broadcast from group rank 1 = global rank tp_ranks[1]
        expect_equal(comm.broadcast(torch.tensor([rank]), src=1, group=groups.tp), torch.tensor([tp_ranks[1]]))
        if groups.ep is not None:
            expect_equal(comm.all_gather(torch.tensor([rank]), group=groups.ep), torch.tensor(list(ep_ranks)))
            ins = [1 if i == 0 else 0 for i in range(len(ep_ranks))]  # everything to EP rank 0
            got = comm.all_to_all(torch.tensor([[rank]]), input_splits=ins, group=groups.ep)
            want = torch.tensor([[r] for r in ep_ranks]) if rank == ep_ranks[0] else torch.zeros(0, 1, dtype=torch.int64)
            expect_equal(got, want)
        if comm.communicator(groups.tp).world_size != 2 or comm.communicator(groups.tp).rank != tp_ranks.index(rank):
            raise AssertionError("tp communicator rank/world_size")
        name = comm.group_name(groups.tp)
        if "tp" not in name or str(list(tp_ranks)) not in name:
            raise AssertionError(f"group name {name!r}")

    run_checks(checks, "subgroups", sub_checks)
    return checks


def failure(rank: int, n: int, mode: str, out: Path) -> int:
    """The last rank dies (SIGKILL to itself) or hangs; the others must get CommError."""
    comm.all_reduce(torch.ones(4))  # everyone is connected
    victim = n - 1
    if rank == victim:
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)  # hang: the test kills this rank when it is done
    start = time.monotonic()
    try:
        for _ in range(1000):
            comm.all_reduce(torch.ones(4))
        write(out, rank, {"error": None})
        return 0
    except CommError as err:
        elapsed = time.monotonic() - start
        try:  # after a failure every collective refuses at once
            comm.barrier()
            after = "no error"
        except CommError as again:
            after = str(again)
        write(out, rank, {"error": str(err), "elapsed": elapsed, "after": after})
        return COMM_ERROR_EXIT


def disagree(rank: int, n: int) -> dict[str, str]:
    """Ranks that make different calls: checked mode raises CommError on every rank, naming
    the ranks, before any data moves, and the group stays usable. Inside ops.trusted() the
    agreement exchange is skipped (counted through dshal.comm's own exchange function)."""
    from dshal import ops

    checks: dict[str, str] = {}
    last = n - 1
    others = "rank 0" if n == 2 else "ranks " + ", ".join(map(str, range(last)))  # how the message groups them
    run_checks(checks, "all_reduce[4 vs 5 elements]", lambda: expect_raises(
        CommError, ["all_reduce", "shape of 't'", f"{others}: all_reduce of float32 [4]", f"rank {last}: all_reduce of float32 [5]"],
        lambda: comm.all_reduce(torch.ones(5 if rank == last else 4))))
    run_checks(checks, "all_reduce[float32 vs int64]", lambda: expect_raises(
        CommError, ["dtype", "float32", "int64", f"rank {last}"],
        lambda: comm.all_reduce(torch.ones(4, dtype=torch.int64 if rank == last else torch.float32))))
    run_checks(checks, "all_reduce[sum vs max]", lambda: expect_raises(
        CommError, ["op", "sum", "max"], lambda: comm.all_reduce(torch.ones(4), op="max" if rank == last else "sum")))
    run_checks(checks, "broadcast[src]", lambda: expect_raises(
        CommError, ["src"], lambda: comm.broadcast(torch.ones(2), src=1 if rank == last else 0)))
    run_checks(checks, "all_reduce vs all_gather", lambda: expect_raises(
        CommError, ["the collective", "all_reduce", "all_gather"],
        lambda: comm.all_gather(torch.ones(2)) if rank == last else comm.all_reduce(torch.ones(2))))

    # all_to_all: rank 0 says it expects 2 rows from the last rank, which sends it 3.
    def bad_splits() -> None:
        ins = [3 if (rank == last and d == 0) else 1 for d in range(n)]
        outs = [2 if (rank == 0 and s == last) else 1 for s in range(n)]
        comm.all_to_all(torch.ones(sum(ins), 2), output_splits=outs, input_splits=ins)

    run_checks(checks, "all_to_all[splits]", lambda: expect_raises(
        CommError, ["split sizes", f"rank {last} sends 3 rows to rank 0", "expects 2 rows"], bad_splits))
    run_checks(checks, "all_to_all[trailing shape]", lambda: expect_raises(
        CommError, ["shape of 't' past dim 0"], lambda: comm.all_to_all(torch.ones(n, 3 if rank == last else 2))))
    run_checks(checks, "usable after disagreements", lambda: expect_equal(comm.all_reduce(torch.ones(2)), torch.full((2,), float(n))))

    # The sizes an input_splits-only all_to_all needs come from the agreement records.
    def uneven() -> None:
        ins = [rank + d for d in range(n)]
        got = comm.all_to_all(torch.full((sum(ins), 1), float(rank)), input_splits=ins)
        expect_equal(got, torch.cat([torch.full((s + rank, 1), float(s)) for s in range(n)]))

    run_checks(checks, "all_to_all[sizes from the agreement]", uneven)

    calls = []
    real = comm.agreement_record

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    def trusted_skips() -> None:
        comm.agreement_record = counting
        try:
            comm.all_reduce(torch.ones(2))
            checked = len(calls)
            with ops.trusted():
                expect_equal(comm.all_reduce(torch.ones(2)), torch.full((2,), float(n)))
                comm.all_to_all(torch.ones(n, 1), input_splits=[1] * n)
        finally:
            comm.agreement_record = real
        if checked != 1 or len(calls) != 1:
            raise AssertionError(f"agreement records: {checked} checked, {len(calls)} in all (want 1 and 1)")

    run_checks(checks, "trusted skips the agreement", trusted_skips)
    return checks


def devices(rank: int) -> dict:
    """The device index each GPU backend computes for this rank (from LOCAL_RANK; no GPU is
    needed to compute it, and nothing here touches torch.cuda's state)."""
    from dshal_amd import AmdBackend
    from dshal_nvidia import NvidiaBackend

    found = {}
    for backend in (NvidiaBackend(), AmdBackend()):
        device = backend.device()
        found[backend.name] = [device.type, device.index]
    found["cpu runtime"] = str(dshal.current().device)
    found["local_rank"] = os.environ["LOCAL_RANK"]
    found["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gathered = comm.all_gather(torch.tensor([found["nvidia"][1]]))
    found["all ranks"] = gathered.tolist()
    return found


def shared_lines(rank: int, timeout_s: float) -> dict:
    """Every rank reads rank 0's lines through ``shared_input``; rank 0's user takes longer
    than the comm timeout over the first one (the poll keeps each collective shorter)."""
    import time

    from dshal.parallel.run import shared_input

    typed = iter(["héllo ✓", "", "a second line"])

    def slow_user(prompt: str) -> str:
        time.sleep(1.5 * timeout_s)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    read = shared_input(slow_user if rank == 0 else None, poll_s=timeout_s / 5)
    got, start = [], time.monotonic()
    while True:
        try:
            got.append(read(">>> "))
        except EOFError:
            return {"lines": got, "seconds": time.monotonic() - start}


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    backend = os.environ.get("DSHAL_TEST_BACKEND", "cpu")  # a rank may be told another (init errors)
    dshal.use(backend=backend, emulate=backend != "cpu", distributed={"timeout_s": timeout_s})
    rank = int(os.environ["RANK"])
    if scenario != "init":
        arrive_together(out)
    try:
        world = comm.init()
    except CommError as err:
        write(out, rank, {"init_error": str(err)})
        return COMM_ERROR_EXIT
    n = world.world_size
    if scenario == "collectives":
        write(out, rank, {"checks": collectives(rank, n), "backend": world.__class__.__name__})
        comm.shutdown()
        return 0
    if scenario == "disagree":
        write(out, rank, {"checks": disagree(rank, n)})
        comm.shutdown()
        return 0
    if scenario == "devices":
        write(out, rank, devices(rank))
        comm.shutdown()
        return 0
    if scenario == "shared_input":
        write(out, rank, shared_lines(rank, timeout_s))
        comm.shutdown()
        return 0
    if scenario in ("die", "hang"):
        return failure(rank, n, scenario, out)
    if scenario == "init":
        comm.barrier()
        write(out, rank, {"ok": True})
        comm.shutdown()
        return 0
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    sys.exit(main())
