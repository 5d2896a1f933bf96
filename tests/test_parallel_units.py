"""In-process pieces of dshal.parallel: group placement on topology data, shards, and the
checkpoint view a rank loads from (no process group; one test starts a one-rank job)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dshal.backend import Topology
from dshal.errors import CommError
from dshal.model.checkpoint import fp8_block_dequantize, fp8_block_quantize
from dshal.model.loader import DictReader
from dshal.parallel.groups import fastest_link, plan_groups
from dshal.parallel.layers import ColumnParallelLinear, RowParallelLinear, Shard, ShardedExperts, split_range
from dshal.parallel.loading import ShardView


def topology(link_of, n: int, weights=None, source: str = "test") -> Topology:
    links = tuple(tuple("self" if i == j else link_of(i, j) for j in range(n)) for i in range(n))
    return Topology(links=links, weights=weights, source=source)


# ---------------------------------------------------------------- placement
def test_parallel_plan_contiguous_without_topology() -> None:
    plan = plan_groups(8, tp=4, ep=2)
    assert plan.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert plan.ep_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert "no topology" in plan.reason
    assert plan.tp_group_of(5) == (4, 5, 6, 7) and plan.ep_group_of(5) == (1, 5)


def test_parallel_plan_two_islands_interleaved() -> None:
    """8 GPUs whose NVLink islands are the even and the odd devices: TP=4 groups follow the
    islands on every node; EP groups take one rank of each TP group."""
    node = topology(lambda i, j: "nvlink" if i % 2 == j % 2 else "pcie", 8)
    plan = plan_groups(16, tp=4, ep=4, local_world_size=8, topology=node)
    assert plan.tp_groups == ((0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15))
    assert plan.ep_groups == ((0, 1, 8, 9), (2, 3, 10, 11), (4, 5, 12, 13), (6, 7, 14, 15))
    assert "'nvlink'" in plan.reason and "test" in plan.reason
    # every rank is in exactly one TP group and one EP group
    for groups in (plan.tp_groups, plan.ep_groups):
        assert sorted(r for g in groups for r in g) == list(range(16))


def test_parallel_plan_weights_pick_the_fast_link() -> None:
    """Names unknown to dshal, but weights say which link is closest (xGMI-style data)."""
    weights = tuple(tuple(0.0 if i == j else (15.0 if i // 2 == j // 2 else 40.0) for j in range(4)) for i in range(4))
    node = topology(lambda i, j: "fabric" if i // 2 == j // 2 else "bus", 4, weights)
    assert fastest_link(node) == "fabric"
    assert plan_groups(4, tp=2, ep=2, topology=node).tp_groups == ((0, 1), (2, 3))
    crossed = topology(lambda i, j: "fabric" if (i + j) % 2 else "bus", 4,
                       tuple(tuple(0.0 if i == j else (15.0 if (i + j) % 2 else 40.0) for j in range(4)) for i in range(4)))
    assert plan_groups(4, tp=2, ep=2, topology=crossed).tp_groups == ((0, 1), (2, 3))
    pairs = topology(lambda i, j: "fabric" if {i, j} in ({0, 3}, {1, 2}) else "bus", 4,
                     tuple(tuple(0.0 if i == j else (15.0 if {i, j} in ({0, 3}, {1, 2}) else 40.0) for j in range(4)) for i in range(4)))
    assert plan_groups(4, tp=2, ep=2, topology=pairs).tp_groups == ((0, 3), (1, 2))


def test_parallel_plan_falls_back_with_a_reason() -> None:
    node = topology(lambda i, j: "nvlink" if i % 2 == j % 2 else "pcie", 8)
    plan = plan_groups(8, tp=8, ep=1, topology=node)  # no 8 devices are pairwise NVLinked
    assert plan.tp_groups == (tuple(range(8)),)
    assert "contiguous ranks" in plan.reason and "cannot split" in plan.reason
    small = plan_groups(8, tp=2, ep=4, local_world_size=8, topology=topology(lambda i, j: "nvlink", 4))
    assert "fewer than the 8 local ranks" in small.reason
    spanning = plan_groups(8, tp=4, ep=2, local_world_size=2)
    assert spanning.tp_groups == ((0, 1, 2, 3), (4, 5, 6, 7)) and "span nodes" in spanning.reason


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"world_size": 4, "tp": 3, "ep": 1}, ["tp (3) x ep (1) = 3", "world size 4"]),
        ({"world_size": 4, "tp": 0, "ep": 4}, ["'tp' is 0", "positive integer"]),
        ({"world_size": 4, "tp": 2, "ep": 2, "local_world_size": 3}, ["local_world_size is 3", "divisor"]),
    ],
)
def test_parallel_plan_rejects_bad_sizes(kwargs, words) -> None:
    with pytest.raises(CommError) as err:
        plan_groups(**kwargs)
    for word in words:
        assert word in str(err.value)


# ---------------------------------------------------------------- shards
def test_parallel_shard_take_and_split_range() -> None:
    full = torch.arange(8 * 3).reshape(8, 3)
    assert torch.equal(Shard(0, 1, 3, parts=2).take(full), full[[1, 2, 5, 6]])  # gate rows 1:3, up rows 1:3
    assert torch.equal(Shard(1, 1, 2).take(full), full[:, 1:2])
    assert [split_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [split_range(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]  # some ranks get nothing


def _holder(path: str, module: nn.Module) -> nn.Module:
    """A module tree with ``module`` at ``path`` (what ShardView walks)."""
    root = nn.Module()
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)
    return root


def test_parallel_shard_view_fp8_slices() -> None:
    """Block-aligned row shards keep FP8 bits and their scale rows; a shard that cuts a
    128-block is served dequantized (float32) with no scale."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=gen)
    q, scale = fp8_block_quantize(weight)
    name = "model.layers.0.self_attn.kv_b_proj"
    reader = DictReader({f"{name}.weight": q, f"{name}.weight_scale_inv": scale, "model.norm.weight": torch.ones(4)})
    with torch.device("meta"):
        aligned = ColumnParallelLinear(256, 128, Shard(0, 128, 256), bias=False, dtype=torch.float32)
    view = ShardView(reader, _holder("layers.0.self_attn.kv_b_proj", aligned))
    assert view.shape(f"{name}.weight") == (128, 256) and view.dtype(f"{name}.weight") == torch.float8_e4m3fn
    assert torch.equal(view.get(f"{name}.weight").view(torch.uint8), q[128:].view(torch.uint8))
    assert torch.equal(view.get(f"{name}.weight_scale_inv"), scale[1:2])
    assert view.read_whole == []
    with torch.device("meta"):
        cut = ColumnParallelLinear(256, 128, Shard(0, 64, 192), bias=False, dtype=torch.float32)
    view = ShardView(reader, _holder("layers.0.self_attn.kv_b_proj", cut))
    assert view.dtype(f"{name}.weight") == torch.float32 and f"{name}.weight_scale_inv" not in view
    assert torch.equal(view.get(f"{name}.weight"), fp8_block_dequantize(q, scale)[64:192])
    assert "model.norm.weight" in view.names() and torch.equal(view.get("model.norm.weight"), torch.ones(4))
    with torch.device("meta"):
        row = RowParallelLinear(128, 256, Shard(1, 128, 256), bias=False, dtype=torch.float32, group=None)
    view = ShardView(reader, _holder("layers.0.self_attn.kv_b_proj", row))
    assert torch.equal(view.get(f"{name}.weight_scale_inv"), scale[:, 1:2])


def test_parallel_shard_view_experts_renumbered() -> None:
    """A rank holding experts 2 and 3 sees them as experts 0 and 1, from the per-expert
    layout and from the fused one, and none of the other experts' tensors."""
    n, inter, dim = 4, 3, 5
    fused_up = torch.arange(n * 2 * inter * dim, dtype=torch.float32).reshape(n, 2 * inter, dim)
    fused_down = -torch.arange(n * dim * inter, dtype=torch.float32).reshape(n, dim, inter)
    prefix = "model.layers.1.mlp.experts"
    per_expert = {}
    for e in range(n):
        per_expert[f"{prefix}.{e}.gate_proj.weight"] = fused_up[e, :inter]
        per_expert[f"{prefix}.{e}.up_proj.weight"] = fused_up[e, inter:]
        per_expert[f"{prefix}.{e}.down_proj.weight"] = fused_down[e]
    fused = {f"{prefix}.gate_up_proj": fused_up, f"{prefix}.down_proj": fused_down}
    experts = ShardedExperts(n, [2, 3], dim, inter, torch.float32)
    for tensors in (per_expert, fused):
        view = ShardView(DictReader(tensors), _holder("layers.1.mlp.experts", experts))
        assert sorted(view.names()) == sorted(f"{prefix}.{i}.{p}.weight" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj"))
        assert torch.equal(view.get(f"{prefix}.0.gate_proj.weight"), fused_up[2, :inter])
        assert torch.equal(view.get(f"{prefix}.1.up_proj.weight"), fused_up[3, inter:])
        assert torch.equal(view.get(f"{prefix}.1.down_proj.weight"), fused_down[3])
        assert view.shape(f"{prefix}.1.down_proj.weight") == (dim, inter)


def test_parallel_shard_view_says_the_checkpoints_own_names_and_shows_what_the_model_does_not_read() -> None:
    """A rank holding experts 2 and 3 reads them as experts 0 and 1: ``origin`` gives the
    checkpoint's names back (also of a tensor the checkpoint lacks, and in the fused layout
    the fused tensor and the expert's rows), ``part`` which rows of a sliced tensor the rank
    holds. Only what the model reads is hidden: a bias or an unknown tensor under an expert
    stayed hidden, so a parallel load dropped what one process calls unexpected."""
    n, inter, dim = 4, 3, 5
    prefix = "model.layers.1.mlp.experts"
    experts = ShardedExperts(n, [2, 3], dim, inter, torch.float32)
    tensors = {f"{prefix}.{e}.{p}.weight": torch.ones(inter, dim) for e in range(n) for p in ("gate_proj", "up_proj", "down_proj")}
    tensors.update({f"{prefix}.2.gate_proj.bias": torch.ones(inter), f"{prefix}.0.foo.weight": torch.ones(1),
                    f"{prefix}.1.gate_proj.weight_scale_inv": torch.ones(1)})
    view = ShardView(DictReader(tensors), _holder("layers.1.mlp.experts", experts))
    assert view.origin(f"{prefix}.0.gate_proj.weight") == f"{prefix}.2.gate_proj.weight"
    assert view.origin(f"{prefix}.1.down_proj.weight_scale_inv") == f"{prefix}.3.down_proj.weight_scale_inv"  # absent
    assert view.origin("model.norm.weight") == "model.norm.weight" and view.part(f"{prefix}.0.up_proj.weight") == ""
    shown = set(view.names())
    assert {f"{prefix}.2.gate_proj.bias", f"{prefix}.0.foo.weight"} <= shown  # the loader calls them unexpected
    assert f"{prefix}.1.gate_proj.weight_scale_inv" not in shown  # another rank's expert: what the model reads
    assert f"{prefix}.3.gate_proj.weight" not in shown and f"{prefix}.1.gate_proj.weight" in shown  # renumbered
    fused = {f"{prefix}.gate_up_proj": torch.ones(n, 2 * inter, dim)}  # down_proj missing
    view = ShardView(DictReader(fused), _holder("layers.1.mlp.experts", experts))
    assert view.names() == [] and f"{prefix}.1.down_proj.weight" not in view
    assert view.origin(f"{prefix}.1.up_proj.weight") == f"{prefix}.gate_up_proj[3, 3:6]"
    assert view.origin(f"{prefix}.0.down_proj.weight") == f"{prefix}.down_proj[2]"
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    with torch.device("meta"):
        column = ColumnParallelLinear(64, 128, Shard(0, 128, 256, total=256), bias=False, dtype=torch.float32)
    view = ShardView(DictReader({name: torch.ones(256, 64)}), _holder("layers.0.self_attn.kv_b_proj", column))
    assert view.origin(name) == name and view.part(name) == "this rank's rows [128, 256) of it"


def _parallel_rank_load(args, tensors, tp: int, ep: int, rank: int = 1):
    """Rank ``rank``'s part of ``tensors`` loaded in one process (simulated groups)."""
    import dshal
    from dshal.comm import SimulatedGroup
    from dshal.parallel.groups import ParallelGroups
    from dshal.parallel.loading import build_parallel

    dshal.use(backend="cpu", precision={"gemm": "bf16"})
    groups = ParallelGroups(
        tp=SimulatedGroup(tp, rank % tp, "tp") if tp > 1 else None, ep=SimulatedGroup(ep, rank // tp, "ep") if ep > 1 else None,
        tp_size=tp, ep_size=ep, plan=plan_groups(tp * ep, tp, ep),
    )
    return build_parallel(args, DictReader(tensors, path="<ckpt>"), groups)


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_parallel_load_errors_name_the_checkpoints_expert_as_one_process_does(clean_dshal_env, tp, ep) -> None:
    """Rank 1 of two holds experts 8..15 of 16, which it reads as 0..7: its messages named
    checkpoint expert 13 ``experts.5`` (missing, mis-shaped, wrong dtype, NaN), and a bias
    or an unknown tensor under an expert was dropped without a word. They read as one
    process's now; a NaN in a tensor-parallel slice says its index is within the rank's rows."""
    from dshal.errors import CheckpointError
    from dshal.model.args import tiny_args
    from dshal.model.checkpoint import random_checkpoint

    args = tiny_args()
    good = random_checkpoint(args, seed=1)
    expert = "model.layers.1.mlp.experts.13"
    nan = good[f"{expert}.gate_proj.weight"].clone()
    nan[2, 3] = float("nan")
    cases = [
        ({f"{expert}.down_proj.weight": None}, rf"missing tensor '{expert}.down_proj.weight' \(expected shape .* for layers.1.mlp.experts\[13\]\)"),
        ({f"{expert}.up_proj.weight": torch.zeros(3, 4)}, rf"tensor '{expert}.up_proj.weight' has shape \[3, 4\]"),
        ({f"{expert}.up_proj.weight": good[f"{expert}.up_proj.weight"].to(torch.int64)}, rf"tensor '{expert}.up_proj.weight' has dtype torch.int64"),
        ({f"{expert}.gate_proj.weight": nan}, rf"tensor '{expert}.gate_proj.weight' \(torch.float32, shape \[64, 128\]\) has 1 non-finite value\(s\), the first at index \[2, 3\]"),
        ({f"{expert}.gate_proj.bias": torch.ones(4)}, rf"unexpected tensor\(s\) '{expert}.gate_proj.bias'"),
        ({"model.layers.1.mlp.experts.2.foo.weight": torch.ones(4)}, r"unexpected tensor\(s\) 'model.layers.1.mlp.experts.2.foo.weight'"),
    ]
    if tp > 1:  # rank 1 holds q_b_proj's second half of rows
        q_b = "model.layers.0.self_attn.q_b_proj.weight"
        half = good[q_b].shape[0] // 2
        spoiled = good[q_b].clone()
        spoiled[half + 4, 1] = float("inf")
        cases.append(({q_b: spoiled}, rf"tensor '{q_b}' \(this rank's rows \[{half}, {2 * half}\) of it\) .* index \[4, 1\]"))
    for edits, said in cases:
        tensors = {**good, **edits}
        tensors = {k: v for k, v in tensors.items() if v is not None}
        with pytest.raises(CheckpointError, match=said):
            _parallel_rank_load(args, tensors, tp, ep)


def test_parallel_shard_view_refuses_a_tensor_its_slice_does_not_come_from() -> None:
    """A slice fits many wrong tensors: TP=2 loaded a 4-head q_b_proj into a 2-head model
    (config.json edited), a tensor with extra rows, a larger vocabulary, and an extra expert,
    all of which one process refuses; a row short crashed inside torch at the first forward."""
    from dshal.errors import CheckpointError
    from dshal.model.model import Linear
    from dshal.parallel.transforms import _parallel_linear

    name = "model.layers.0.self_attn.kv_b_proj"
    with torch.device("meta"):
        full = Linear(64, 256, bias=False, dtype=torch.float32)
    column = _parallel_linear(full, Shard(0, 0, 128), row=False)
    assert column.shard.total == 256
    good = DictReader({f"{name}.weight": torch.randn(256, 64)})
    assert ShardView(good, _holder("layers.0.self_attn.kv_b_proj", column)).shape(f"{name}.weight") == (128, 64)
    for rows in (512, 255, 300):
        reader = DictReader({f"{name}.weight": torch.randn(rows, 64)})
        with pytest.raises(CheckpointError, match=rf"has shape \[{rows}, 64\], expected \[256, 64\] \(the full tensor, whose rows \[0, 128\)"):
            ShardView(reader, _holder("layers.0.self_attn.kv_b_proj", column))
    q, scale = fp8_block_quantize(torch.randn(256, 64))
    wrong_scale = DictReader({f"{name}.weight": q, f"{name}.weight_scale_inv": torch.ones(3, 1)})
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' has shape \[3, 1\], expected \[2, 1\]"):
        ShardView(wrong_scale, _holder("layers.0.self_attn.kv_b_proj", column))
    assert ShardView(DictReader({f"{name}.weight": q, f"{name}.weight_scale_inv": scale}),
                     _holder("layers.0.self_attn.kv_b_proj", column)).shape(f"{name}.weight_scale_inv") == (1, 1)

    prefix, n, inter, dim = "model.layers.1.mlp.experts", 4, 3, 5
    experts = ShardedExperts(n, [2, 3], dim, inter, torch.float32)
    tensors = {f"{prefix}.{e}.{p}.weight": torch.ones(1) for e in range(n + 1) for p in ("gate_proj", "up_proj", "down_proj")}
    view = ShardView(DictReader(tensors), _holder("layers.1.mlp.experts", experts))
    assert f"{prefix}.4.up_proj.weight" in view.names()  # visible: the loader calls it unexpected
    assert f"{prefix}.1.up_proj.weight" in view.names() and f"{prefix}.0.gate_proj.weight" in view.names()
    fused = {f"{prefix}.gate_up_proj": torch.ones(n + 1, 2 * inter, dim), f"{prefix}.down_proj": torch.ones(n + 1, dim, inter)}
    with pytest.raises(CheckpointError, match=r"gate_up_proj' has shape \[5, 6, 5\], expected 4 experts in dim 0"):
        ShardView(DictReader(fused), _holder("layers.1.mlp.experts", experts))


def test_transforms_record_the_split_in_the_models_declared_parallel_state(clean_dshal_env):
    """tensor_parallel / expert_parallel write the model's ParallelState (a declared field),
    not attributes the model never declared; a second tensor_parallel is refused."""
    import dshal
    from dshal.comm import SimulatedGroup
    from dshal.errors import ShapeError
    from dshal.model import ParallelState, random_model, tiny_args
    from dshal.parallel.transforms import expert_parallel, tensor_parallel

    dshal.use(backend="cpu")
    model = random_model(tiny_args())
    assert model.parallel == ParallelState()
    tp, ep = SimulatedGroup(2, 1, "tp"), SimulatedGroup(2, 0, "ep")
    tensor_parallel(model, tp)
    expert_parallel(model, ep)
    assert model.parallel == ParallelState(tp_group=tp, tp_size=2, tp_rank=1, ep_group=ep, ep_size=2, ep_rank=0)
    assert not {"tp_group", "tp_size", "tp_rank", "ep_group", "ep_size", "ep_rank"} & set(vars(model))
    with pytest.raises(ShapeError, match="already tensor-parallel over 2 ranks"):
        tensor_parallel(model, tp)


def test_a_vocabulary_split_that_leaves_a_rank_empty_is_refused(clean_dshal_env):
    """vocab 9 over TP=4 is cut in chunks of 3: rank 3 got no rows and crashed in index_select
    at the first forward (a raw RuntimeError); the transform now says so up front, on every rank."""
    import dshal
    from dshal.comm import SimulatedGroup
    from dshal.errors import ShapeError
    from dshal.model import random_model, tiny_args
    from dshal.parallel.transforms import tensor_parallel

    dshal.use(backend="cpu")
    for rank in (0, 3):
        with pytest.raises(ShapeError, match="vocab_size 9 in chunks of 3 leaves the last of 4 ranks no vocabulary rows"):
            tensor_parallel(random_model(tiny_args(vocab_size=9, num_attention_heads=4)), SimulatedGroup(4, rank, "tp"))
    tensor_parallel(random_model(tiny_args(vocab_size=10, num_attention_heads=4)), SimulatedGroup(4, 3, "tp"))  # 3+3+3+1



def test_column_shards_of_fp8_block_weights_that_end_mid_block_compute_their_rows(clean_dshal_env):
    """TP=3 column shards (64 rows each) of fp8-block weights of 192 rows -- one part, and two
    stacked as gate_up_proj -- give their rows of the unsharded product. Rank 2's rows [128, 192)
    keep their FP8 blocks only when the weight ends there: it then needs the partial last block's
    scale row; in the stacked weight that block also holds the next part's first rows, so the
    shard must be held dequantized instead."""
    import dshal
    from dshal import ops
    from dshal.model.model import Linear
    from dshal.parallel.transforms import _parallel_linear

    dshal.use(backend="cpu")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    for parts in (1, 2):
        full = Linear(256, 192 * parts, dtype=torch.float32)
        dense = torch.randn(192 * parts, 256, generator=torch.Generator().manual_seed(parts)) * 0.05
        weight, scale = ops.quantize_fp8(dense, (128, 128), "e4m3")
        full.weight, full.weight_scale = nn.Parameter(weight, requires_grad=False), nn.Parameter(scale, requires_grad=False)
        want = full(x).reshape(5, parts, 192)  # each part's rows
        for rank in range(3):
            shard = _parallel_linear(full, Shard(0, 64 * rank, 64 * (rank + 1), parts=parts), row=False)
            got = shard(x).reshape(5, parts, 64)
            torch.testing.assert_close(got, want[..., 64 * rank : 64 * (rank + 1)], rtol=1e-5, atol=1e-6)
            kept_fp8 = shard.weight_scale is not None
            assert kept_fp8 == (rank == 2 and parts == 1), (parts, rank, kept_fp8)


CHAT_READER = """
import dshal
from dshal import comm
from dshal.parallel.run import shared_input

dshal.use(backend="cpu")
comm.init()
from dshal.model.chat import INVALID_TEXT
def undecodable(prompt):
    raise UnicodeDecodeError("utf-8", b"\\\\xff", 0, 1, "invalid start byte")
def broken_terminal(prompt):
    raise OSError(5, "Input/output error")
print("refused line" if shared_input(undecodable, poll_s=0.05)("> ") == INVALID_TEXT else "other")
try:
    shared_input(broken_terminal, poll_s=0.05)("> ")
except EOFError:
    print("ended")
comm.shutdown()
"""


def test_the_shared_chat_reader_ends_on_a_terminal_error(tmp_path):
    """`--interactive --tp N`: an undecodable byte (or EIO) killed rank 0's reader thread, and
    rank 0 posted "waiting" forever. A line that is not UTF-8 now reaches every rank as one
    chat() refuses (the chat goes on); any other read error ends the input for every rank."""
    import subprocess
    import sys

    from dshal.parallel.launch import free_port, rank_env

    env = {**os.environ, **rank_env(0, 1, free_port()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHAT_READER], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["refused", "line", "ended"], done.stderr[-2000:]
    assert "reading the terminal failed (OSError" in done.stderr


# ---------------------------------------------------------------- launcher
def test_local_job_names_the_rank_that_failed_first_and_the_ones_it_killed(tmp_path: Path) -> None:
    """A dead rank's peers fail after it with a lost connection, so their errors name no culprit
    (torchrun prints the "first observed failure" for that reason). Rank 1 kills itself, rank 0
    fails a moment later, rank 2 never ends: the summary names each in its role."""
    import signal
    import sys

    from dshal.parallel.launch import LocalJob

    # rank 0 fails 1 s after rank 1 is about to die (not 1.5 s after its own start: a loaded
    # machine may start rank 1 later than that)
    dying = tmp_path / "rank1-dies"
    script = ("import os, pathlib, signal, sys, time\n"
              "rank, dying = int(os.environ['RANK']), pathlib.Path(sys.argv[1])\n"
              "if rank == 1: dying.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
              "while rank == 0 and not dying.exists(): time.sleep(0.05)\n"
              "time.sleep(1.0 if rank == 0 else 60)\n"
              "raise SystemExit(3)\n")
    with LocalJob([sys.executable, "-c", script, str(dying)], 3, capture=True) as job:
        codes = [code for code, _, _ in job.communicate(timeout_s=60, grace_s=4)]
    assert codes == [3, -signal.SIGKILL, -signal.SIGKILL]
    assert job.first_failed == [1] and job.killed == [2]
    assert job.failure_summary(codes) == (
        "first failure: rank 1 (killed by SIGKILL (the out-of-memory killer sends it: see `dmesg`)); "
        "then rank 0 (its error names a lost peer); rank 2 still running, killed"
    )
    with LocalJob([sys.executable, "-c", "pass"], 2) as ok:
        assert ok.failure_summary(ok.wait(30)) is None
    # A later rank that a signal ended (an abort) printed no error naming a lost peer: its signal is said.
    aborting = script.replace("raise SystemExit(3)", "os.abort() if rank == 0 else None")
    dying.unlink()
    with LocalJob([sys.executable, "-c", aborting, str(dying)], 3, capture=True) as job:
        codes = [code for code, _, _ in job.communicate(timeout_s=60, grace_s=4)]
    assert codes == [-signal.SIGABRT, -signal.SIGKILL, -signal.SIGKILL]
    assert job.failure_summary(codes).startswith(
        "first failure: rank 1 (killed by SIGKILL (the out-of-memory killer sends it: see `dmesg`)); "
        "then rank 0 (killed by SIGABRT (an abort in native code)); rank 2 still running, killed"
    )


def test_the_rank_that_says_a_shared_error_is_named_first_though_a_silent_one_left_before_it(tmp_path: Path) -> None:
    """An error every rank meets is said once, by the lowest rank; the others leave without a
    word. When one of those left first, the summary named it the first failure and the rank
    that said the error "a lost peer"; `dshal run --tp 2` also exited with the silent rank's 1."""
    import sys

    from dshal.parallel.launch import SAID_BY_ANOTHER_RANK, LocalJob

    script = ("import os, sys, time\n"
              f"if os.environ['RANK'] == '1': sys.exit({SAID_BY_ANOTHER_RANK})\n"
              "time.sleep(1.0)\n"
              "print('dshal run: error: the shared refusal', file=sys.stderr)\n"
              "sys.exit(1)\n")
    with LocalJob([sys.executable, "-c", script], 2, capture=True) as job:
        codes = [code for code, _, _ in job.communicate(timeout_s=60, grace_s=30)]
    assert codes == [1, SAID_BY_ANOTHER_RANK]
    assert job.first_failed == [0]
    assert job.failure_summary(codes) == "first failure: rank 0 (exit code 1); rank 1 met the same error (said once)"


def test_tensor_parallel_experts_take_their_share_in_fixed_shapes_up_to_a_bound(clean_dshal_env):
    """A tensor-parallel rank's experts (no EP group) run every token's slots, the other
    ranks' experts as NO_EXPERT, up to ``FIXED_SHAPE_SLOTS`` (decode: no host read, capturable);
    past it (a long prefill chunk) only this rank's slots, so a GPU kernel's temporaries
    follow this rank's share. Both give this rank's partial sum, the reference's on its
    experts alone."""
    import dshal
    from dshal.ops import reference as ref
    from dshal.ops.moe import NO_EXPERT

    dshal.use(backend="cpu")
    gen = torch.Generator().manual_seed(0)
    n, held, dim, inter = 8, [2, 3, 5], 64, 32
    experts = ShardedExperts(n, held, dim, inter, torch.float32)
    experts.w13 = torch.nn.Parameter(torch.randn(len(held), 2 * inter, dim, generator=gen) / 8, requires_grad=False)
    experts.w2 = torch.nn.Parameter(torch.randn(len(held), dim, inter, generator=gen) / 8, requires_grad=False)
    x, weights = torch.randn(12, dim, generator=gen), torch.rand(12, 3, generator=gen)
    ids = torch.rand(12, n, generator=gen).argsort(dim=-1)[:, :3]
    local = torch.full((n,), NO_EXPERT)
    local[held] = torch.arange(len(held))
    want = ref.moe_experts(x, weights, local[ids], experts.w13, experts.w2)
    fixed = experts(x, weights, ids)
    experts.FIXED_SHAPE_SLOTS = ids.numel() - 1
    kept = experts(x, weights, ids)
    torch.testing.assert_close(fixed, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept, want, rtol=1e-6, atol=1e-6)
    assert experts.graph_capture_unsupported is None


def test_a_backend_that_does_not_declare_no_expert_ids_never_gets_them(install_plugin):
    """``NO_EXPERT`` ids came with this release: a plugin written before it (its
    ``moe_experts`` refuses -1, ``Capabilities.moe_no_expert_ids`` undeclared) still serves
    tensor-parallel experts, which keep their own slots for it (a host read, as before), and
    their decode steps say why they are not captured; the conformance rows with such ids are
    unsupported there, not failed. The backends dshal ships declare it."""
    import dshal
    from dshal.ops.moe import NO_EXPERT

    install_plugin("old_moe_contract", {"oldmoetest": "OldMoeContractBackend"})
    runtime = dshal.use(backend="oldmoetest")
    assert not runtime.moe_skips_no_expert
    gen = torch.Generator().manual_seed(1)
    n, held, dim, inter = 8, [1, 6], 64, 32
    experts = ShardedExperts(n, held, dim, inter, torch.float32)
    experts.w13 = torch.nn.Parameter(torch.randn(len(held), 2 * inter, dim, generator=gen) / 8, requires_grad=False)
    experts.w2 = torch.nn.Parameter(torch.randn(len(held), dim, inter, generator=gen) / 8, requires_grad=False)
    x, weights = torch.randn(5, dim, generator=gen), torch.rand(5, 2, generator=gen)
    ids = torch.tensor([[1, 2], [6, 1], [0, 3], [6, 7], [2, 5]])
    with pytest.raises(dshal.errors.ShapeError, match="expert id -1"):  # what -1 would have met
        dshal.ops.moe_experts(x, weights, torch.full_like(ids, NO_EXPERT), experts.w13, experts.w2)
    got = experts(x, weights, ids)
    local = torch.full((n,), NO_EXPERT)
    local[held] = torch.arange(len(held))
    want = dshal.ops.reference.moe_experts(x, weights, local[ids], experts.w13, experts.w2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert "does not declare Capabilities.moe_no_expert_ids" in experts.graph_capture_unsupported
    from dshal_conformance import runner  # lazy: the suite is its own package

    report = runner.run(runner.resolve("oldmoetest"), runner.Options(ops=["moe_experts"], collectives=False, progress=False))
    skipped = [c for c in report["cases"] if "skipped-slots" in c["id"] or "all-skipped" in c["id"]]
    declared = [row for row in dshal.ops.SPECS["moe_experts"].rows if row.params.get("capability") == "moe_no_expert_ids"]
    assert len(skipped) == len(declared) >= 8 and all(c["status"] == "unsupported" for c in skipped), skipped
    assert all("moe_no_expert_ids" in c["reason"] for c in skipped)
    assert dshal.use(backend="cpu").moe_skips_no_expert


@pytest.mark.needs_interpreter
def test_the_gpu_base_serves_no_expert_ids(clean_dshal_env):
    import dshal

    if not any(info.name == "nvidia" for info in dshal.backends()):
        pytest.skip("the dshal-nvidia plugin is not installed")
    assert dshal.use(backend="nvidia", emulate=True).moe_skips_no_expert


def test_expert_parallel_over_a_model_without_moe_is_refused(clean_dshal_env):
    """--ep 2 on a checkpoint whose layers are all dense ran two identical copies of the
    model and said nothing; now it is refused (the launcher checks every rank's split
    before starting them, so `dshal run` and `dshal plan` fail in a second)."""
    import dshal
    from dshal.comm import SimulatedGroup
    from dshal.errors import ShapeError
    from dshal.model import random_model, tiny_args
    from dshal.parallel.groups import plan_groups
    from dshal.parallel.transforms import expert_parallel, sharded_skeletons

    dshal.use(backend="cpu")
    args = tiny_args()
    dense = args.with_(first_k_dense_replace=args.num_hidden_layers)
    said = r"expert_parallel: the model has no MoE layer \(first_k_dense_replace=\d+, num_hidden_layers=\d+\)"
    with pytest.raises(ShapeError, match=said):
        expert_parallel(random_model(dense), SimulatedGroup(2, 0, "ep"))
    with pytest.raises(ShapeError, match=said):
        list(sharded_skeletons(dense, plan_groups(2, 1, 2)))
    assert expert_parallel(random_model(dense), None).parallel.ep_size == 1  # one rank: nothing to spread
    expert_parallel(random_model(args), SimulatedGroup(2, 0, "ep"))  # with MoE layers: taken


def test_free_port_is_outside_the_range_outgoing_connections_take():
    """The launcher's rank 0 binds MASTER_PORT seconds after it was picked: a port of the OS's
    ephemeral range could meanwhile go to any outgoing connection (the other test worker's
    gloo pairs make many), which made the job fail with "address already in use"."""
    import socket

    from dshal.lifetime import PORT_CEILING, PORT_FLOOR, _ephemeral_low
    from dshal.parallel.launch import free_port  # where the launcher takes it from

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    if low is not None and min(low, PORT_CEILING) > PORT_FLOOR + 1000:
        assert all(PORT_FLOOR <= port < min(low, PORT_CEILING) for port in ports), (low, sorted(ports))
        assert len(ports) > 1  # drawn at random: two jobs started together do not pick the same one
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free


def test_cleanup_on_termination_turns_sigterm_into_an_exit_that_runs_cleanup() -> None:
    """SIGTERM / SIGHUP inside the block raise Terminated (a SystemExit of 128 + the signal), so
    `finally` and `with` blocks run (Python's default ends the process without them); the
    handlers in place before come back after the block."""
    import signal
    import threading
    import time

    from dshal.lifetime import Terminated, cleanup_on_termination

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set on the main thread (older pytest-xdist runs tests elsewhere)")
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(Terminated) as info:
        with cleanup_on_termination():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the main thread's next instruction
            finally:
                cleaned.append(True)
    assert isinstance(info.value, SystemExit) and info.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def _sigterm_once_waiting(code: str, marker, preexec_fn, **env: str) -> tuple[int, str, float]:
    """Run ``code`` in a child python, send it SIGTERM half a second after it creates ``marker``
    (then waiting, in C or in Python), and return its exit status, its stderr and the seconds
    from the signal to its end."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists()
        time.sleep(0.5)  # into the wait
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=50)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        proc.kill()


def test_sigterm_while_the_main_thread_is_blocked_in_c_ends_the_process_after_the_grace(tmp_path, sigint_deliverable) -> None:
    """A Python handler runs only when the main thread is back in the interpreter: a rank blocked
    in a collective on a dead peer (here a store waiting for a second rank) held SIGTERM until its
    timeout, so torchrun / Slurm killed it 30 s later anyway. The watchdog ends it after the grace."""
    import signal
    import textwrap

    marker = tmp_path / "blocked"
    code = textwrap.dedent(f"""
        import datetime, signal, sys
        import torch.distributed as dist
        from dshal.lifetime import arm_termination_watchdog, cleanup_on_termination, free_port
        port = free_port()
        with cleanup_on_termination(grace_s=1.0):
            assert arm_termination_watchdog()  # as dshal.comm.init does before the rendezvous
            open({str(marker)!r}, "w").close()
            dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=60))  # no second rank
        print("the store returned", file=sys.stderr)
    """)
    error_file = tmp_path / "error.json"  # as torchrun names one for each rank
    returncode, err, took = _sigterm_once_waiting(code, marker, sigint_deliverable, TORCHELASTIC_ERROR_FILE=str(error_file))
    assert returncode == 128 + signal.SIGTERM, (returncode, err)
    assert took < 30, took  # the store waits 60 s
    assert "still running 1 s after SIGTERM" in err and "the store returned" not in err
    # torchrun's summary says why the rank ended (it showed only the exit code)
    assert "still running 1 s after SIGTERM" in json.loads(error_file.read_text())["message"]["message"]


def test_sigterm_while_a_rank_waits_for_its_peers_to_join_unwinds_it(tmp_path, sigint_deliverable) -> None:
    """torchrun's agent stops the other ranks with SIGTERM when one fails while joining (then
    restarts them all, with --max-restarts). A rank waiting for its peers in dshal's world-size
    check was blocked in the store's wait, in C: only the watchdog ended it, its grace later
    (10 s) and without cleanup. The check waits in Python now, and the signal unwinds it."""
    import signal
    import textwrap

    marker = tmp_path / "waiting"
    code = textwrap.dedent(f"""
        import datetime, sys
        import torch.distributed as dist
        from dshal import comm
        from dshal.lifetime import Terminated, arm_termination_watchdog, cleanup_on_termination, free_port
        port = free_port()
        store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=60))
        env = comm.LaunchEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, master_addr="127.0.0.1",
                             master_port=port)
        try:
            with cleanup_on_termination(grace_s=30.0):
                assert arm_termination_watchdog()  # as dshal.comm.init does
                open({str(marker)!r}, "w").close()
                comm._check_world_size(store, env, "setup", 60.0)  # rank 1 never comes
        except Terminated:
            print("unwound", file=sys.stderr)
            sys.exit(143)
    """)
    returncode, err, _ = _sigterm_once_waiting(code, marker, sigint_deliverable)
    assert returncode == 128 + signal.SIGTERM, (returncode, err)
    assert "unwound" in err and "still running" not in err, err


@pytest.mark.parametrize("case", ["forked child signalled", "cleanup in python", "nested blocks"])
def test_the_termination_watchdog_fires_only_for_a_signal_its_handler_could_not_take(case, sigint_deliverable) -> None:
    """The watchdog ended the process 10 s after SIGTERM whatever happened: a forked worker's
    SIGTERM (multiprocessing's terminate()) wrote into the parent's inherited pipe and killed the
    parent; a cleanup running in Python after the handler was cut short. Each scenario here
    ends with 0 and says it finished."""
    import subprocess
    import sys
    import textwrap

    scenarios = {
        "forked child signalled": """
            import multiprocessing as mp
            with cleanup_on_termination(grace_s=0.5):
                arm_termination_watchdog()
                p = mp.get_context("fork").Process(target=time.sleep, args=(60,))
                p.start()
                time.sleep(0.3)
                p.terminate()  # SIGTERM to the child only
                p.join()
                assert p.exitcode == 143, p.exitcode
                time.sleep(1.5)  # the parent works on, past the grace
        """,
        "cleanup in python": """
            try:
                with cleanup_on_termination(grace_s=0.5):
                    arm_termination_watchdog()
                    try:
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(5)
                    finally:
                        deadline = time.monotonic() + 1.5
                        while time.monotonic() < deadline:  # e.g. reaping ranks: in Python, past the grace
                            time.sleep(0.05)
            except Terminated:
                pass
        """,
        "nested blocks": """
            with cleanup_on_termination(grace_s=0.5):
                try:
                    with cleanup_on_termination(grace_s=0.5):
                        arm_termination_watchdog()
                        os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(5)
                except Terminated:
                    pass
                time.sleep(1.0)
        """,
    }
    code = ("import os, signal, time\n"
            "from dshal.lifetime import Terminated, arm_termination_watchdog, cleanup_on_termination\n"
            + textwrap.dedent(scenarios[case]) + "print('finished')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=sigint_deliverable)
    assert (done.returncode, done.stdout) == (0, "finished\n"), (done.returncode, done.stdout, done.stderr)


def test_joining_a_job_under_the_dshal_command_arms_the_termination_watchdog() -> None:
    """`torchrun ... -m dshal run`: each rank's collectives wait in C, so dshal.comm.init arms
    the watchdog of the command's block (and only there: a library caller has no block)."""
    import subprocess
    import sys
    import textwrap

    from dshal.lifetime import free_port

    code = textwrap.dedent("""
        import threading
        import dshal, dshal.comm as comm
        from dshal.lifetime import cleanup_on_termination
        watched = lambda: any(t.name == "dshal-termination-watchdog" for t in threading.enumerate())
        dshal.use(backend="cpu")
        with cleanup_on_termination():
            before = watched()
            comm.init(timeout_s=30)
            print(before, watched())
            comm.shutdown()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False", "True"], (done.stdout, done.stderr[-2000:])


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="needs Linux's /proc to cap the address space")
def test_a_watchdog_that_cannot_start_leaves_the_block_unguarded_not_broken() -> None:
    """Under `ulimit -v` no thread may start: arming raised RuntimeError out of dshal.comm.init
    (a traceback) and left the wakeup fd on a pipe nobody read, and its two fds open."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, resource, signal
        from dshal.lifetime import arm_termination_watchdog, cleanup_on_termination
        size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        before = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(before)
        fds = sorted(os.listdir("/proc/self/fd"))
        with cleanup_on_termination():
            resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**20, resource.RLIM_INFINITY))
            armed = arm_termination_watchdog()
            print(armed, signal.set_wakeup_fd(before) == before, sorted(os.listdir("/proc/self/fd")) == fds)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["False", "True", "True"], (done.stdout, done.stderr[-2000:])


def test_cleanup_on_termination_restores_the_wakeup_fd_and_ends_its_watchdog() -> None:
    import signal
    import threading

    from dshal.lifetime import arm_termination_watchdog, cleanup_on_termination

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set on the main thread (older pytest-xdist runs tests elsewhere)")
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    assert not arm_termination_watchdog()  # no block to guard
    with cleanup_on_termination():
        assert not any(t.name == "dshal-termination-watchdog" for t in threading.enumerate())  # only where armed
        assert arm_termination_watchdog()
        assert any(t.name == "dshal-termination-watchdog" for t in threading.enumerate())
    assert signal.set_wakeup_fd(before) == before  # what was there before the block is back
    deadline = time.monotonic() + 5
    while any(t.name == "dshal-termination-watchdog" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "dshal-termination-watchdog" for t in threading.enumerate())


def test_cleanup_on_termination_leaves_an_ignored_signal_ignored() -> None:
    """`nohup dshal kernels ...` ignores SIGHUP so that the run outlives the terminal; the guard
    replaced the ignore with its handler, and logging out ended the run with 129."""
    import signal
    import subprocess
    import sys

    script = ("import os, signal, time\n"
              "from dshal.lifetime import cleanup_on_termination\n"
              "with cleanup_on_termination():\n"
              "    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN\n"
              "    os.kill(os.getpid(), signal.SIGHUP)\n"
              "    time.sleep(0.5)\n"
              "print('survived')\n")

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=nohup)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


def test_the_aggregate_line_counts_every_sequence_of_the_run() -> None:
    """``--tp 2 --prompt-file F --batch 2`` with 3 prompts runs 2 batches: the line said "the
    same 2 sequence(s)" (one batch's rows), where the ranks produce 3."""
    from dshal.parallel.run import aggregate_line

    parallel = {"tp": 2, "ep": 1, "world_size": 2, "placement": "contiguous ranks",
                "aggregate_prefill_tokens_per_s": 100.0, "aggregate_decode_tokens_per_s": 50.0}
    prompts = {"batch": 2, "batches": 2, "sequences": [{}, {}, {}], "parallel": parallel}
    assert "all ranks produce the same 3 sequence(s)" in aggregate_line(prompts)
    random_ids = {"batch": 4, "batches": 1, "parallel": parallel}  # no text: one batch of --batch rows
    line = aggregate_line(random_ids)
    assert line == ("aggregate over 2 ranks (TP=2 x EP=1; all ranks produce the same 4 sequence(s), so the slowest rank "
                    "sets the pace): prefill 100.0 tokens/s, decode 50.0 tokens/s; placement: contiguous ranks")
    no_decode_rate = {**random_ids, "parallel": {**parallel, "aggregate_decode_tokens_per_s": None}}
    assert "decode n/a tokens/s" in aggregate_line(no_decode_rate)
