"""One rank of the model-parallel tests (started by tests/test_parallel_model.py).

Usage: ``python parallel_worker.py SCENARIO OUT_DIR CHECKPOINT_DIR [TIMEOUT_S]`` with
torchrun's environment. Every rank builds the single-process model from the same
checkpoint as the oracle and compares its parallel model against it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from comm_worker import COMM_ERROR_EXIT, arrive_together, expect_equal, expect_raises, run_checks, write

import dshal
from dshal import comm, ops
from dshal.errors import CommError, ShapeError
from dshal.kernels import cpu as cpu_kernels
from dshal.model import DictReader, ModelArgs, build_model, decode, from_pretrained, tiny_args
from dshal.model.checkpoint import random_checkpoint
from dshal.model.loader import CheckpointReader
from dshal.parallel import build_parallel, expert_parallel, setup_groups, tensor_parallel
from dshal.parallel.groups import ParallelGroups
from dshal.parallel.layers import ShardedExperts
from dshal.parallel.transforms import spread_experts

REL_TOL = 1e-5
NEW_TOKENS = 5


class CountingReader(CheckpointReader):
    """The safetensors reader, counting the bytes each read returns."""

    bytes_read = 0

    def get(self, name: str) -> torch.Tensor:
        t = super().get(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        t = super().get_slice(name, slices)
        self.bytes_read += t.numel() * t.element_size()
        return t


def prompt(args: ModelArgs) -> torch.Tensor:
    # batch 2 x 7 tokens: 14 rows, uneven over 4 EP ranks; decode steps have 2 rows (EP ranks 2, 3 get none)
    return torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))


def compare(reference: torch.nn.Module, model: torch.nn.Module, args: ModelArgs) -> None:
    ids = prompt(args)
    want, got = reference(ids), model(ids)
    if got.shape != want.shape:
        raise AssertionError(f"logits shape {tuple(got.shape)}, want {tuple(want.shape)}")
    rel = float((got - want).abs().max() / want.abs().max())
    if not rel <= REL_TOL:
        raise AssertionError(f"logits differ: max rel error {rel:.3g} > {REL_TOL}")
    tokens_want = reference.generate(ids, NEW_TOKENS)
    tokens_got = model.generate(ids, NEW_TOKENS)
    expect_equal(tokens_got, tokens_want)
    # prompts of different lengths: the second row's prompt is its first 4 ids (rows at their own positions)
    ragged = dict(prompt_lens=[ids.shape[1], 4])
    expect_equal(model.generate(ids, NEW_TOKENS, **ragged), reference.generate(ids, NEW_TOKENS, **ragged))


def groups_for(tp: int, ep: int) -> ParallelGroups:
    return setup_groups(tp=tp, ep=ep)


def from_checkpoint(checks: dict, name: str, reference, path: Path, groups: ParallelGroups) -> None:
    def check() -> None:
        args = ModelArgs.from_file(path)
        reader = CountingReader(path)
        model = build_parallel(args, reader, groups)
        compare(reference, model, args)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        whole = total_bytes(path)
        # float32 file: each rank read exactly the bytes of its own parameters (its slices);
        # FP8 file: its parameters are dequantized, and slices that cut a 128-block read the block
        if args.weight_block_size is None and reader.bytes_read != held:
            raise AssertionError(f"read {reader.bytes_read} bytes for {held} bytes of parameters")
        if not reader.bytes_read < whole:
            raise AssertionError(f"rank read {reader.bytes_read} of {whole} bytes: the whole file")
        sharded = [n for n in model.shard_view.read_whole if any(k in n for k in ("q_b_proj", "kv_b_proj", "o_proj", "embed", "lm_head"))]
        if groups.tp_size > 1 and sharded:
            raise AssertionError(f"tensor-parallel weights read whole: {sharded[:3]}")

    run_checks(checks, name, check)


def ranks_agree(checks: dict, reference, path: Path, rank: int) -> None:
    """A rank that would choose another token (as a near tie can make a split model's ranks do)
    still takes rank 0's: each rank here picks argmax + its rank, yet every rank's tokens are
    rank 0's choice, the single process's greedy ones (with a stop id: the same step count)."""

    def check() -> None:
        args = ModelArgs.from_file(path)
        model = build_parallel(args, CheckpointReader(path), groups_for(2, 1))
        ids = prompt(args)
        def own_choice(logits: torch.Tensor) -> torch.Tensor:
            return (logits.argmax(dim=-1) + rank) % args.vocab_size
        for lens in ([ids.shape[1]] * 2, [ids.shape[1], 4]):
            want = reference.generate(ids, NEW_TOKENS, prompt_lens=lens)
            got, _ = decode.generate_rows(model, ids, lens, NEW_TOKENS, own_choice)
            expect_equal(got, want)
            stop = int(want[0, ids.shape[1] + 1])  # row 0's second new token stops it; row 1 runs on
            got, _ = decode.generate_rows(model, ids, lens, NEW_TOKENS, own_choice, eos_token_id=[stop])
            expect_equal(got, reference.generate(ids, NEW_TOKENS, prompt_lens=lens, eos_token_id=stop))

    run_checks(checks, "ranks take rank 0's tokens (TP=2, each rank choosing its own)", check)


def sparse_attention(checks: dict) -> None:
    """DeepSeek-V3.2: its indexer is replicated on every rank (TP splits heads, not the indexer;
    EP only the experts); with 3 keys kept of the 7-token prompts the selection decides, and
    split or not each query keeps the same keys."""
    args = tiny_args(index_n_heads=8, index_head_dim=32, index_topk=3)
    ckpt = random_checkpoint(args, seed=7)
    reference = build_model(args, DictReader(ckpt))
    live(checks, "live tensor_parallel of DeepSeek-V3.2 (sparse attention)", reference, ckpt, args,
         [lambda m: tensor_parallel(m, None)])
    for tp, ep in ((2, 1), (1, 2)):
        def check(tp: int = tp, ep: int = ep) -> None:
            model = build_parallel(args, DictReader(ckpt), groups_for(tp, ep))
            if tp > 1 and model.layers[1].self_attn.indexer.wq_b.weight.shape != reference.layers[1].self_attn.indexer.wq_b.weight.shape:
                raise AssertionError("the indexer was split, expected it whole on every rank")
            compare(reference, model, args)

        run_checks(checks, f"TP={tp} x EP={ep} DeepSeek-V3.2 (sparse attention) from checkpoint", check)


def total_bytes(path: Path) -> int:
    reader = CheckpointReader(path)
    total = 0
    for name in reader.names():
        shape = reader.shape(name)
        total += int(torch.tensor(shape).prod()) * torch.empty((), dtype=reader.dtype(name)).element_size()
    return total


def live(checks: dict, name: str, reference, ckpt: dict, args: ModelArgs, steps) -> None:
    """Transforms applied to a model that already has all its weights."""

    def check() -> None:
        model = build_model(args, DictReader(ckpt))
        for step in steps:
            step(model)
        compare(reference, model, args)

    run_checks(checks, name, check)


def uneven_dispatch(checks: dict, group, size: int, rank: int) -> None:
    """ShardedExperts over an EP group vs the single-device op, with tokens routed only to
    the experts of EP rank 0 (the other ranks receive nothing) and fewer tokens than ranks:
    in fixed shapes (each rank's share, all-reduced) and through the all_to_all dispatch
    (the path of calls past ``FIXED_SHAPE_SLOTS``)."""

    def check() -> None:
        gen = torch.Generator().manual_seed(11)
        n_experts, dim, inter = 8, 16, 8
        w13 = torch.randn(n_experts, 2 * inter, dim, generator=gen) * 0.3
        w2 = torch.randn(n_experts, dim, inter, generator=gen) * 0.3
        per = n_experts // size
        for tokens in (1, size + 1):  # fewer tokens than ranks, then an uneven split
            x = torch.randn(tokens, dim, generator=gen)
            ids = torch.randint(0, per, (tokens, 2), generator=gen)  # only rank 0's experts
            weights = torch.rand(tokens, 2, generator=gen)
            want = ops.moe_experts(x, weights, ids, w13, w2)
            experts = ShardedExperts(n_experts, list(range(n_experts)), dim, inter, torch.float32)
            experts.w13 = torch.nn.Parameter(w13.clone(), requires_grad=False)
            experts.w2 = torch.nn.Parameter(w2.clone(), requires_grad=False)
            spread_experts(experts, group)
            if experts.held != list(range(rank * per, (rank + 1) * per)):
                raise AssertionError(f"rank {rank} holds {experts.held}")
            for fixed_slots in (ids.numel(), ids.numel() - 1):  # fixed shapes, then the dispatch
                experts.FIXED_SHAPE_SLOTS = fixed_slots
                got = experts(x, weights, ids)
                rel = float((got - want).abs().max() / want.abs().max())
                if not rel <= REL_TOL:
                    raise AssertionError(f"{tokens} tokens, fixed shapes up to {fixed_slots} slots: rel error {rel:.3g}")

    run_checks(checks, f"uneven all_to_all dispatch (EP={size}, ranks >0 receive nothing)", check)


def trusted_steps_exchange_nothing(checks: dict, path: Path, groups: ParallelGroups) -> None:
    """A decode step after the first runs inside ``ops.trusted()``, where a collective does not
    first exchange agreement records (an all_gather and a host read each). The TP embedding's
    all-reduce sat outside that block: one exchange every step."""

    def check() -> None:
        args = ModelArgs.from_file(path)
        model = build_parallel(args, CheckpointReader(path), groups)
        ids = prompt(args)[:1]
        cache = model.new_cache(1, ids.shape[1] + 2)
        model(ids, 0, cache)
        model(ids[:, -1:], ids.shape[1], cache)  # the first step of this length: checked
        exchanged, original = [], comm.ProcessGroupCommunicator._agree

        def counting(self, collective, *rest, **named):  # instrumentation: counts, changes nothing
            records = original(self, collective, *rest, **named)
            if records is not None:
                exchanged.append(collective)
            return records

        comm.ProcessGroupCommunicator._agree = counting
        try:
            model(ids[:, -1:], ids.shape[1] + 1, cache)
        finally:
            comm.ProcessGroupCommunicator._agree = original
        if exchanged:
            raise AssertionError(f"a trusted decode step exchanged agreement records for {exchanged}")

    run_checks(checks, "trusted TP decode steps exchange no agreement records", check)


#: The check name of :func:`ep_decode_rows_own_bits` (tests/test_parallel_model.py expects it).
EP_DECODE_BITS = "EP=2 decode step: a row's logits alone and in a batch of 3, bit for bit"


def ep_decode_rows_own_bits(checks: dict, reference, ckpt: dict, args: ModelArgs) -> None:
    """README's batch invariance under --ep: with the C kernels, a float32 decode step of 3 rows
    (each prefilled alone) gives row 0 its logits alone, bit for bit, though each rank's experts
    see the other rank's slots as NO_EXPERT (skipped inside the C call, not regathered)."""
    from test_model_batch_invariance import rows_prefilled_alone  # lazy: a test helper, for this check only

    def check() -> None:
        model = expert_parallel(build_model(args, DictReader(ckpt)), None)
        ids = prompt(args)[:, :6].repeat(2, 1)[:3]
        with torch.inference_mode():
            batch_cache, logits = rows_prefilled_alone(model, ids, 2)
            alone_cache, _ = rows_prefilled_alone(model, ids[:1], 2)
            token = logits.argmax(-1)
            for step in range(2):
                batched = model(token[:, None], 6 + step, batch_cache, last_only=True)[:, -1]
                alone = model(token[:1, None], 6 + step, alone_cache, last_only=True)[:, -1]
                if not torch.equal(batched[0], alone[0]):
                    diff = float((batched[0] - alone[0]).abs().max())
                    raise AssertionError(f"step {step}: row 0's logits differ by up to {diff:.3g} in a batch of 3")
                token = batched.argmax(-1)

    run_checks(checks, EP_DECODE_BITS, check)


def models(rank: int, world: int, path: Path) -> dict[str, str]:
    checks: dict[str, str] = {}
    args = ModelArgs.from_file(path)
    reference = from_pretrained(path)
    ckpt = {n: CheckpointReader(path).get(n) for n in CheckpointReader(path).names()}
    layouts = [(world, 1), (1, world)] + ([(2, 2)] if world == 4 else [])
    for tp, ep in layouts:
        from_checkpoint(checks, f"TP={tp} x EP={ep} from checkpoint", reference, path, groups_for(tp, ep))
    if world == 2:  # FP8 checkpoint: TP slices cut its 128-blocks (read dequantized), EP keeps FP8 experts
        fp8 = path / "fp8"
        fp8_reference = from_pretrained(fp8)
        for tp, ep in layouts:
            from_checkpoint(checks, f"TP={tp} x EP={ep} from FP8 checkpoint", fp8_reference, fp8, groups_for(tp, ep))
        live(checks, "live tensor_parallel", reference, ckpt, args, [lambda m: tensor_parallel(m, None)])
        live(checks, "live expert_parallel", reference, ckpt, args, [lambda m: expert_parallel(m, None)])
        if cpu_kernels.status().available:
            ep_decode_rows_own_bits(checks, reference, ckpt, args)
        # o_proj's bias (row-parallel) is added once, after the all-reduce, not on every rank
        biased = tiny_args(attention_bias=True)
        biased_ckpt = random_checkpoint(biased, seed=6)
        live(checks, "live tensor_parallel with attention biases", build_model(biased, DictReader(biased_ckpt)),
             biased_ckpt, biased, [lambda m: tensor_parallel(m, None)])
        sparse_attention(checks)
        ranks_agree(checks, reference, path, rank)
        trusted_steps_exchange_nothing(checks, path, groups_for(world, 1))
    if world == 4:
        g = groups_for(2, 2)
        live(checks, "live TP then EP", reference, ckpt, args, [lambda m: tensor_parallel(m, g.tp), lambda m: expert_parallel(m, g.ep)])
        live(checks, "live EP then TP", reference, ckpt, args, [lambda m: expert_parallel(m, g.ep), lambda m: tensor_parallel(m, g.tp)])
        bad = build_model(args, DictReader(ckpt))
        tensor_parallel(bad, g.tp)
        run_checks(checks, "EP group across TP ranks refused", lambda: expect_raises(
            ShapeError, ["EP group", "TP rank"], lambda: expert_parallel(bad, g.tp)))
        two_heads = tiny_args(num_attention_heads=2)
        run_checks(checks, "heads not divisible refused", lambda: expect_raises(
            ShapeError, ["num_attention_heads is 2", "group size 4"],
            lambda: tensor_parallel(build_model(two_heads, DictReader(random_checkpoint(two_heads))), None)))
    uneven_dispatch(checks, None, world, rank)
    return checks


#: (checkpoint sub-directory, precision.gemm) pairs: quantized on load from float32, and an
#: FP8 checkpoint run as stored (auto) or re-quantized.
PRECISION_CASES = [("", "fp8-block"), ("", "fp8-row"), ("", "fp8-tensor"), ("", "int8"), ("fp8", "auto"), ("fp8", "int8")]


def precision_modes(world: int, path: Path) -> dict[str, str]:
    """TP=world and EP=world against the single process in every quantized precision mode,
    on the tiny model (hidden size 128: TP slices of q_b_proj, o_proj and the shared experts
    cut 128-blocks)."""
    from dshal.config import PrecisionConfig

    checks: dict[str, str] = {}
    # a W8A8 checkpoint as stored (dshal-ascend-convert's; made when that plugin is installed)
    # (with o_proj, a row-parallel layer, kept in high precision: its shard quantizes nothing)
    w8a8 = [("int8", "auto"), ("int8", "auto+high o_proj")] if (path / "int8").is_dir() else []
    for sub, gemm in PRECISION_CASES + w8a8:
        ckpt = path / sub if sub else path
        keep = ("*o_proj",) if gemm.endswith("+high o_proj") else ()
        precision = PrecisionConfig(gemm=gemm.removesuffix("+high o_proj"), keep_high_precision=keep)
        args = ModelArgs.from_file(ckpt)
        reference = build_model(args, CheckpointReader(ckpt), precision)
        for tp, ep in ((world, 1), (1, world)):

            def check(tp=tp, ep=ep, ckpt=ckpt, precision=precision, args=args, reference=reference, gemm=gemm,
                      sub=sub) -> None:
                model = build_parallel(args, CheckpointReader(ckpt), groups_for(tp, ep), precision)
                if model.describe()["precision"]["mode"] != reference.describe()["precision"]["mode"]:
                    raise AssertionError(f"mode {model.describe()['precision']} vs {reference.describe()['precision']}")
                cut = [n for n, m in model.named_modules() if getattr(m, "act_quant", None) is not None]
                # block modes: the TP slice of q_b_proj cuts 128-row blocks; per-token modes:
                # o_proj's activation scale spans both ranks' columns
                want = "q_b_proj" if gemm in ("fp8-block", "auto") and sub != "int8" else "o_proj"
                high_o_proj = gemm.endswith("+high o_proj")
                if high_o_proj and any(n.endswith("o_proj") for n in cut):  # it quantizes nothing
                    raise AssertionError(f"o_proj is kept in high precision but emulates a quantized shard: {cut}")
                if tp > 1 and not high_o_proj and not any(n.endswith(want) for n in cut):
                    raise AssertionError(f"expected {want} to hold an emulated shard; emulated shards: {cut}")
                o_proj = model.layers[0].self_attn.o_proj.weight
                if tp > 1 and "int8" in (gemm, sub) and not high_o_proj and o_proj.dtype != torch.int8:  # row-parallel stays W8A8
                    raise AssertionError(f"row-parallel o_proj is {o_proj.dtype} under TP, expected int8")
                if sub == "int8" and model.shard_view is None:  # W8A8 as stored: its rows and scales slice
                    raise AssertionError("a TP/EP rank read the whole W8A8 checkpoint")
                if tp == 1 and model.shard_view is None:  # EP alone: experts are whole, slices suffice
                    raise AssertionError("EP-only model read the whole checkpoint")
                compare(reference, model, args)

            run_checks(checks, f"TP={tp} x EP={ep} {gemm} from {sub or 'float32'} checkpoint", check)
    return checks


def killed(rank: int, out: Path, path: Path) -> int:
    """TP=2 x EP=2 forward passes in a loop until a peer dies; report the CommError."""
    args = ModelArgs.from_file(path)
    model = build_parallel(args, CheckpointReader(path), groups_for(2, 2))
    ids = prompt(args)
    model(ids)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    try:
        while True:
            model(ids)
    except CommError as err:
        write(out, rank, {"error": str(err)})
        return COMM_ERROR_EXIT


def main() -> int:
    scenario, out, path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    timeout_s = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    dshal.use(backend="cpu", precision={"gemm": "bf16"}, distributed={"timeout_s": timeout_s})
    rank = int(os.environ["RANK"])
    arrive_together(out)
    world = comm.init().world_size
    if scenario == "models":
        write(out, rank, {"checks": models(rank, world, path)})
        comm.shutdown()
        return 0
    if scenario == "kill":
        return killed(rank, out, path)
    if scenario == "precision":
        write(out, rank, {"checks": precision_modes(world, path)})
        comm.shutdown()
        return 0
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    sys.exit(main())
