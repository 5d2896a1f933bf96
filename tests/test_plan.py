"""dshal plan: DeepSeek-V3 at its real dimensions on the meta device.

What these tests hold to:
- the kept config.json and checkpoint listing are DeepSeek-V3's published facts;
- one prefill chunk and one decode step of the full 61-layer model run through
  ``dshal.ops`` (references behind their checks, meta tensors) for TP in {1, 8} x EP in
  {1, 8, 32}, each rank built by the real loader and transforms;
- a broken shape rule (a transform one head short) is caught by an op's check;
- the loader's shard plan reads, for TP=8 / EP=32, every tensor a rank needs and only the
  slices it needs, and the slices of all 256 ranks tile every tensor;
- ``dshal plan`` refuses layouts that cannot work, with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dshal.config import PrecisionConfig
from dshal.errors import ConfigError, DshalError, ShapeError
from dshal.model.args import ModelArgs
from dshal.plan.names import checkpoint_listing, load_listing
from dshal.plan.plan import PlanError, PlanRequest, coverage, default_config, format_plan, make_plan, to_json
from dshal.plan.simulate import build_rank, run_steps

LISTING = Path(__file__).parent / "fixtures" / "plan" / "deepseek_v3_index.json"
_built: dict[tuple[int, int, int], object] = {}


@pytest.fixture(scope="module")
def v3() -> ModelArgs:
    return ModelArgs.from_file(default_config())


@pytest.fixture(scope="module")
def published() -> tuple[dict, dict]:
    return load_listing(LISTING)


def _rank(args: ModelArgs, tensors: dict, tp: int, ep: int, rank: int = 0):
    """Ranks are built once per test module (a full-size build takes seconds)."""
    key = (tp, ep, rank)
    if key not in _built:
        _built[key] = build_rank(args, tensors, tp, ep, rank, PrecisionConfig(gemm="fp8-block"))
    return _built[key]


# ---------------------------------------------------------------- the facts kept as data
def test_config_is_deepseek_v3(v3: ModelArgs) -> None:
    a = v3
    assert (a.num_hidden_layers, a.first_k_dense_replace, a.hidden_size, a.intermediate_size) == (61, 3, 7168, 18432)
    assert (a.moe_intermediate_size, a.vocab_size, a.n_routed_experts, a.num_experts_per_tok) == (2048, 129280, 256, 8)
    assert (a.n_group, a.topk_group, a.n_shared_experts, a.num_attention_heads) == (8, 4, 1, 128)
    assert (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (
        1536,
        512,
        128,
        64,
        128,
    )
    assert a.weight_block_size == (128, 128) and a.fp8_format == "e4m3fn" and a.num_nextn_predict_layers == 1
    assert a.rope_scaling.factor == 40 and a.rope_scaling.original_max_position_embeddings == 4096


def test_published_listing_matches_the_config(v3: ModelArgs, published: tuple[dict, dict]) -> None:
    header, tensors = published
    assert len(tensors) == header["published_tensor_count"] == 91991
    assert sum(math.prod(e.shape) for e in tensors.values()) == header["published_element_count"]
    assert "DERIVED" in header["shard_files"]  # the file assignment is not the published one, and says so
    mine = checkpoint_listing(v3)
    assert set(mine) == set(tensors)
    assert all((mine[n].shape, mine[n].dtype) == (e.shape, e.dtype) for n, e in tensors.items())
    assert len({e.file for e in tensors.values()}) == 163


def test_parameter_counts_match_the_published_ones(v3: ModelArgs) -> None:
    cover = coverage(v3, 8, 1)
    assert abs(cover.total_params / 671e9 - 1) < 0.01
    assert cover.total_params == 671_026_419_200  # 61 layers + embedding + head, no MTP layer, no scales


def test_kimi_k2_plans_to_its_published_size(tmp_path: Path) -> None:
    """A model of the family under its own model_type: Kimi-K2's config.json (moonshotai/
    Kimi-K2-Instruct: model_type kimi_k2, architectures DeepseekV3ForCausalLM, 384 experts in
    one group, 64 heads, one dense layer, vocab 163840, no MTP layer; the rest as DeepSeek-V3)
    plans to Moonshot's published 1T parameters, 32B activated per token."""
    config = json.loads(default_config().read_text())
    config.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], n_routed_experts=384, n_group=1,
                  topk_group=1, num_attention_heads=64, num_key_value_heads=64, first_k_dense_replace=1,
                  vocab_size=163840, rope_theta=50000.0, routed_scaling_factor=2.827, num_nextn_predict_layers=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    totals = make_plan(PlanRequest(config=path, tp=8, ep=4, context=64, prefill_chunk=63))["totals"]
    assert 1.0e12 < totals["params_once"] < 1.05e12 and 31e9 < totals["activated_per_token"] < 33e9
    assert "published" not in totals  # DeepSeek-V3's published figures are not Kimi-K2's


# ---------------------------------------------------------------- the meta-device forward
@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 8), (1, 32), (8, 1), (8, 8), (8, 32)])
def test_meta_forward_at_full_size(v3: ModelArgs, published: tuple[dict, dict], tp: int, ep: int) -> None:
    sim = _rank(v3, published[1], tp, ep)
    held = {n: p for n, p in sim.model.named_parameters()}
    # the rank's shards: heads / TP, experts / (TP x EP), FP8 blocks kept
    assert held["layers.5.self_attn.q_b_proj.weight"].shape == (128 // tp * 192, 1536)
    assert held["layers.5.self_attn.q_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert held["layers.5.self_attn.q_b_proj.weight_scale"].shape == (128 // tp * 192 // 128, 12)
    assert held["layers.5.mlp.experts.w13"].shape == (256 // (tp * ep), 4096, 7168)
    prefill, decode = run_steps(sim, batch=2, context=64, chunk=16)
    assert prefill.logits_shape == decode.logits_shape == (2, 1, 129280)
    collectives = {(t.group, t.collective) for t in decode.traffic}
    assert (("tp", "all_reduce") in collectives) == (tp > 1)
    # EP decode steps sum the ranks' shares in fixed shapes; no slot goes to an owner and back
    assert (("ep", "all_reduce") in collectives) == (ep > 1) and ("ep", "all_to_all") not in collectives
    assert prefill.peak_bytes > 0 and prefill.eager_peak_bytes >= prefill.peak_bytes


@pytest.mark.parametrize("tp,ep", [(1, 1), (8, 4)])
def test_replayed_op_calls_give_the_forward_that_runs_every_call(v3: ModelArgs, tp: int, ep: int) -> None:
    """The meta forward answers a repeated op call (same argument layouts) from the first
    one; every figure of both steps must equal those of the forward that runs every call."""
    args = v3.with_(num_hidden_layers=6)  # 3 dense layers, then 3 MoE layers
    # A fresh rank for each: the first forward also makes the model's cached weight copies.
    replayed, full = (
        run_steps(
            build_rank(args, checkpoint_listing(args), tp, ep, tp * ep - 1, PrecisionConfig(gemm="fp8-block")),
            batch=2,
            context=48,
            chunk=16,
            replay=replay,
        )
        for replay in (True, False)
    )
    assert replayed == full  # tokens, logits shape, traffic, both peaks, the largest activation
    assert all(step.replayed_calls > 0 for step in replayed) and all(step.replayed_calls == 0 for step in full)
    assert replayed[0].eager_peak_bytes > replayed[0].peak_bytes > 0


def test_a_broken_shard_rule_is_caught(v3: ModelArgs, monkeypatch: pytest.MonkeyPatch) -> None:
    """o_proj's row-parallel shard one head short: the loader reads what it was told, and
    dshal.ops.linear's check names the mismatch at the first forward."""
    from dshal.parallel import transforms
    from dshal.parallel.layers import Shard

    args = v3.with_(num_hidden_layers=4)
    real = transforms._parallel_linear

    def one_head_short(old, shard, row, group=None, reduce=True):
        if (
            row
            and old.out_features == args.hidden_size
            and old.in_features == args.num_attention_heads * args.v_head_dim
        ):
            shard = Shard(shard.dim, shard.start, shard.stop - args.v_head_dim, shard.parts)
        return real(old, shard, row, group, reduce)

    monkeypatch.setattr(transforms, "_parallel_linear", one_head_short)
    sim = build_rank(args, checkpoint_listing(args), 8, 1, 0, PrecisionConfig())
    with pytest.raises(ShapeError, match=r"linear: argument .* 2048"):
        run_steps(sim, batch=1, context=9, chunk=8)


def test_overlapping_shards_are_caught(v3: ModelArgs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary split whose slices overlap by one row: the coverage of all ranks refuses it."""
    from dshal.parallel import transforms

    real = transforms.split_range
    monkeypatch.setattr(
        transforms,
        "split_range",
        lambda total, parts, index: (real(total, parts, index)[0], min(total, real(total, parts, index)[1] + 1)),
    )
    with pytest.raises(ShapeError, match=r"coverage: embed.weight slices .* overlap"):
        coverage(v3, 8, 1)


def test_a_wrong_config_is_caught(v3: ModelArgs) -> None:
    """A config whose kv_b_proj rows do not match its heads: the loader refuses the checkpoint's tensor."""
    args = v3.with_(num_hidden_layers=4)
    tensors = checkpoint_listing(args)
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"]
    with pytest.raises(DshalError, match="kv_b_proj"):
        build_rank(args, tensors, 8, 1, 0, PrecisionConfig())


# ---------------------------------------------------------------- the loader's shard plan
def test_shard_plan_tp8_ep32_reads_only_what_each_rank_needs(v3: ModelArgs, published: tuple[dict, dict]) -> None:
    tensors = published[1]
    for rank in (0, 255):
        sim = _rank(v3, tensors, 8, 32, rank)  # load_weights raised if a tensor the rank needs were missing
        experts = next(m for n, m in sim.model.named_modules() if n == "layers.3.mlp.experts")
        assert len(experts.held) == 1
        read_elements = sum(math.prod(r.shape) for r in sim.reads)
        held_elements = sum(p.numel() for p in sim.model.parameters())
        assert read_elements == held_elements  # nothing read that the rank does not keep
        for r in sim.reads:
            assert not r.name.startswith("model.layers.61."), r.name  # the MTP layer is not loaded
            if ".mlp.experts." in r.name:
                assert int(r.name.split(".")[5]) in experts.held, r.name
            elif any(
                k in r.name
                for k in (
                    "q_b_proj",
                    "kv_b_proj",
                    "o_proj",
                    "embed_tokens",
                    "lm_head",
                    "shared_experts",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            ):
                full = tensors[r.name].shape
                assert r.index is not None and math.prod(r.shape) * 8 == math.prod(full), r.name  # 1/8: its TP slice
        files = {r.file for r in sim.reads}
        assert 1 < len(files) < 163  # the rank opens only the files holding its slices
    cover = coverage(v3, 8, 32)  # every rank's slices: each tensor tiled exactly, each expert held once
    assert cover.experts_per_rank == 1 and cover.total_params == 671_026_419_200


# ---------------------------------------------------------------- refusals and the report
def _config(tmp_path: Path, **changes: object) -> Path:
    cfg = json.loads(default_config().read_text())
    cfg.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "request_changes,match",
    [
        ({"tp": 3}, "num_attention_heads is 128, expected a multiple of the group size 3"),
        ({"ep": 3}, r"routed experts .* expected a multiple of the group size 3"),
        ({"tp": 8, "ep": 8, "nodes": 1, "gpus_per_node": 8}, "64 ranks, but --nodes 1 x --gpus-per-node 8 = 8 devices"),
        ({"precision": "fp9"}, "--precision is 'fp9'"),
        ({"context": 1}, r"--context is 1, expected at least 2"),
        ({"context": 64, "prefill_chunk": 64}, r"--prefill-chunk is 64, expected less than --context \(64\)"),
        ({"context": 163841}, r"--context is 163841, expected at most the model's max_position_embeddings \(163840\)"),
        ({"device_memory_gib": -5.0}, r"--device-memory-gib is -5.0, expected a number > 0"),
        # was torch's "numel: integer multiplication overflow" traceback
        ({"batch": 100_000, "context": 100_000, "prefill_chunk": 2048}, r"--batch 100000 x --context 100000 .* past "
         r"torch's size limit .* expected a smaller --batch"),
    ],
)
def test_plan_refuses_a_split_that_cannot_work(request_changes: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        make_plan(PlanRequest(config=default_config(), **request_changes))


def test_plan_report_and_memory_refusal(tmp_path: Path) -> None:
    config = _config(tmp_path, num_hidden_layers=5)
    stages: list[str] = []
    plan = make_plan(
        PlanRequest(config=config, tp=2, ep=2, batch=2, context=64, prefill_chunk=32, device_memory_gib=1.0),
        on_stage=stages.append,
    )
    assert stages == [  # what the progress line shows while the meta model loads and runs
        "rank class 1/1 (ranks 0-3): loading on meta",
        "rank class 1/1 (ranks 0-3): a prefill chunk of 2 x 32 tokens and a decode step",
    ]
    rank = plan["ranks"][0]
    assert rank["ranks"] == [0, 1, 2, 3]
    assert rank["kv_cache"]["bytes_per_token"] == 5 * 576 * 2  # absorbed latent + rope key, bf16, per layer
    assert rank["weights"]["routed experts"]["params"] == 2 * 64 * 3 * 2048 * 7168  # 2 MoE layers, 256 / 4 experts
    assert "refusal" in plan and "more than --device-memory-gib 1" in plan["refusal"]
    text = format_plan(plan)
    assert "FP8 block cuts: none" in text and "refused:" in text and "published" not in text
    assert json.loads(to_json(plan))["ranks"][0]["kv_cache"] == rank["kv_cache"]


def test_plan_with_the_mtp_layer_for_speculative_decoding(tmp_path: Path) -> None:
    """``--speculative mtp`` holds the MTP layer (split like a MoE layer; its head as the
    output head) and its one layer of KV cache; DeepSeek-V3 then plans to the published 685B
    less the MTP layer's copy of the embedding, which dshal does not load."""
    config = _config(tmp_path, num_hidden_layers=5)
    request = dict(config=config, tp=2, ep=2, batch=2, context=64, prefill_chunk=32)
    without, with_mtp = make_plan(PlanRequest(**request)), make_plan(PlanRequest(**request, speculative="mtp"))
    rank, plain = with_mtp["ranks"][0], without["ranks"][0]
    assert plain["weights"]["MTP layer"]["params"] == 0 and with_mtp["model"]["mtp_layers"] == 1
    moe_layer = plain["weights"]["routed experts"]["params"] // 2  # 2 MoE layers of 5
    assert rank["weights"]["MTP layer"]["params"] > moe_layer  # a MoE layer, eh_proj and a head shard
    assert rank["kv_cache"]["bytes_per_token"] == plain["kv_cache"]["bytes_per_token"] * 6 // 5
    assert rank["activated_params_per_token"] == plain["activated_params_per_token"]
    assert "1 MTP layer loaded (--speculative mtp)" in format_plan(with_mtp)
    full = make_plan(PlanRequest(config=default_config(), tp=8, ep=4, context=64, prefill_chunk=63, speculative="mtp"))
    published = full["totals"]["published"]
    embedding_copy = 129280 * 7168
    assert published["total"] == 685e9 and abs(full["totals"]["params_once"] + embedding_copy - 685e9) / 685e9 < 0.002
    with pytest.raises(ConfigError, match=r"mtp_layers is 1, expected an integer in \[0, 0\]"):
        make_plan(PlanRequest(**{**request, "config": _config(tmp_path, num_nextn_predict_layers=0)}, speculative="mtp"))


def test_cli_plan_refuses_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from dshal.cli import main

    assert main(["plan", "--tp", "3"]) == 1
    assert "num_attention_heads is 128, expected a multiple of the group size 3" in capsys.readouterr().err


# ---------------------------------------------------------------- the simulated group
def test_simulated_group_runs_the_real_checks_and_logs_the_traffic() -> None:
    from dshal import comm
    from dshal.comm import SimulatedGroup

    group = SimulatedGroup(4, 1, "ep")
    assert (comm.get_world_size(group), comm.get_rank(group)) == (4, 1)
    x = torch.empty((6, 8), dtype=torch.bfloat16, device="meta")
    assert comm.all_gather(x, dim=0, group=group).shape == (24, 8)
    assert comm.all_reduce(x, group=group) is x
    link = comm.communicator(group)
    assert link.exchange_splits([1, 2, 3, 0], "meta") == [1, 2, 3, 0]  # symmetric traffic assumed
    assert link.all_to_all(x, [1, 2, 3, 0], [1, 2, 3, 0]).shape == (6, 8)
    with pytest.raises(ShapeError, match="input_splits"):  # the real communicator's split check
        link.all_to_all(x, None, [1, 2, 3, 1])
    wire = [(t.collective, t.payload, t.wire) for t in group.traffic]
    assert ("all_gather", 24 * 16, 18 * 16) in wire and ("all_reduce", 96, 2 * 3 * 96 // 4) in wire
    assert ("all_to_all", 96, 4 * 16) in wire  # rows for the other ranks only (2 of the 6 stay here)


def test_plan_names_the_fp8_blocks_a_shard_cuts(tmp_path: Path) -> None:
    """TP=32: the dense MLP's 18432 rows give 576 per rank (4.5 blocks of 128), the shared
    expert's 2048 give 64; attention (4 heads x 192 / 256 / 128) stays on block edges."""
    plan = make_plan(PlanRequest(config=_config(tmp_path, num_hidden_layers=4), tp=32, context=16, prefill_chunk=15))
    cuts = {c["weight"]: c for c in plan["ranks"][0]["block_cuts"]}
    assert set(cuts) == {
        f"model.layers.*.mlp.{part}{proj}"
        for part in ("", "shared_experts.")
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    gate = cuts["model.layers.*.mlp.gate_proj"]
    assert (gate["slice_size"], gate["tp_ranks_cut"], gate["tensors"]) == (576, 32, 3)
    assert gate["extra_read_bytes"] == 3 * 64 * 7168  # each slice has one edge mid-block: 64 rows of it read extra
    # quantize before sharding: a slice that cuts blocks is held dequantized (TP equals one process)
    assert gate["held_as"] == "float32"
    assert "a rank reads up to" in format_plan(plan)


def test_readme_quotes_what_dshal_plan_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's plan output (the TP=8 node, verbatim) and its EP=32 figures are what the
    commands print today: they had drifted (29.10 GiB quoted, 31.01 printed)."""
    from dshal.cli import main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if ln.startswith("dshal plan --") and "--json" not in ln]
    tp8, ep32 = (ln.split("#")[0].split()[1:] for ln in lines[:2])
    assert "--tp" in tp8 and "--ep" in ep32
    assert main([*tp8, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    after = readme[readme.index("line above prints"):]
    quoted = after[after.index("```\n") + 4:]
    quoted = quoted[: quoted.index("```")]
    first, *rest = quoted.splitlines()
    assert printed.splitlines()[0].endswith(first.removeprefix("dshal plan: "))
    assert printed.splitlines()[1:] == rest
    assert main([*ep32, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    paragraph = " ".join(readme[readme.index("The EP=32 line"):].split("\n\n")[0].split())
    for figure in ("attention 10.63", "routed experts 19.03", "37.01 GiB of weights", "KV cache 8.58 GiB",
                   "activation peak 20.28 GiB", "1.91 GiB (0.24 at TP=8)", "1.64 GiB", "69.41 GiB in all"):
        assert figure in paragraph
    for figure in ("10.63 GiB", "19.03 GiB", "weights total         37.01 GiB", "8192: 8.58 GiB",
                   "32768 tokens: 20.28 GiB", "kv_b_proj dequantized: 1.91 GiB", "(GPU providers): 1.64 GiB more",
                   "needs 69.41 GiB"):
        assert figure in printed, figure


def test_the_plan_counts_the_attention_nan_guard_of_gpu_providers(tmp_path: Path) -> None:
    """A GPU provider builds attention's NaN guard on every prefill chunk (no host read), and its
    temporaries are inside the op, which the one-kernel-per-op peak leaves out: ~31 GiB past an
    H200's memory for a 2048-token chunk at 128k context before the guard went by kv-head groups.
    The plan now adds the guard's measured peak to what a rank needs."""
    from dshal.ops.attention import guarded_attention
    from dshal.plan.simulate import _LiveBytes

    config = _config(tmp_path, num_hidden_layers=4, max_position_embeddings=512)
    plan = make_plan(PlanRequest(config=config, batch=2, context=512, prefill_chunk=128))
    rank = plan["ranks"][0]
    guard = rank["activation_peak"]["attention_guard_bytes"]
    assert guard > 0 and rank["needs_bytes"] == (rank["weight_bytes"] + rank["absorbed_kv_b_bytes"] + rank["kv_cache"]["bytes"]
                                                  + rank["activation_peak"]["bytes"] + guard)
    args = json.loads(Path(config).read_text())
    heads, nope, rope, vdim = (args[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q = torch.empty(2, heads, 128, nope + rope, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, heads, 511, nope + rope, device="meta", dtype=torch.bfloat16)  # the chunk ends at position 510
    v = torch.empty(2, heads, 511, vdim, device="meta", dtype=torch.bfloat16)
    tracker = _LiveBytes(replay=False)
    with tracker:
        out = guarded_attention(lambda q, k, v, *a: q.new_empty(*q.shape[:3], v.shape[3]), q, k, v, True, None, None, 0,
                                may_read_host=False)
    # the naive prefill's expanded heads, as the plan runs the chunk; the output is an activation
    assert guard == tracker.peak["eager"] - out.numel() * out.element_size()


def test_the_plans_byte_count_follows_storages_not_python_objects() -> None:
    """Below autograd a view's _is_view() is False: every slice, transpose and split was counted
    as new bytes (0.55 GiB for a decode step of a few MiB), while a view that outlived its base's
    Python object (kv_b_proj's output, viewed into k and v) let its base's bytes go. Bytes now
    live while any tensor of their storage does, and views of what the forward did not make
    (weights, the KV cache) add nothing."""
    from dshal.plan.simulate import _LiveBytes

    outside = torch.empty(1000, device="meta")
    tracker = _LiveBytes(replay=False)
    with tracker:
        kept = torch.empty(1000, device="meta").view(10, 100).transpose(0, 1)  # the base object is gone
        assert tracker.live["eager"] == 4000
        halves = kept.split(50, dim=0)
        first = outside[:500].view(5, 100)  # a view of a tensor made before: no new bytes
        assert tracker.live["eager"] == 4000
        del kept
        assert tracker.live["eager"] == 4000  # the split halves still hold the storage
        del halves
        assert tracker.live["eager"] == 0 and tracker.peak["eager"] == 4000
    assert first.shape == (5, 100)


@pytest.mark.parametrize("replay", [True, False])
def test_an_op_that_returns_a_view_is_not_replayed_as_new_bytes(replay: bool) -> None:
    """Under inference_mode _is_view() is False even above autograd: an op returning a view of
    its input was taken as replayable, and each replay made a fresh storage (3x the bytes)."""
    from dshal.plan.simulate import _LiveBytes

    tracker = _LiveBytes(replay=replay)
    flatten = tracker.op_hook("flatten", lambda x: x.view(-1))
    with torch.inference_mode(), tracker:
        x = torch.empty(10, 100, device="meta")
        outs = [flatten(x) for _ in range(3)]
        assert tracker.live["eager"] == 4000 and tracker.live["fused"] == 4000, tracker.live
    assert len(outs) == 3 and tracker.replayed == 0


def test_a_context_of_max_position_embeddings_plans(tmp_path: Path) -> None:
    """A sequence may fill every position the model has (as `dshal run` fills them): the steps
    end at position context - 1 in a cache of `context` tokens, the KV cache the plan counts.
    The plan used to ask for a cache of context + 1 and refuse with new_cache's internal names."""
    config = _config(tmp_path, num_hidden_layers=4, max_position_embeddings=256)
    plan = make_plan(PlanRequest(config=config, tp=2, batch=2, context=256, prefill_chunk=255))
    kv = plan["ranks"][0]["kv_cache"]
    assert kv["context"] == 256 and kv["bytes"] == kv["bytes_per_token"] * 2 * 256


def test_plan_defaults_follow_the_checkpoint(tmp_path: Path) -> None:
    """A bf16 model with a short context: the defaults plan it as `dshal run` would run it.
    They were fp8-block (weights planned as FP8 while run keeps them high) and a context of
    4096 the model refuses (`--context is 4096`, with no --context given)."""
    config = _config(tmp_path, max_position_embeddings=512, num_hidden_layers=4)
    data = json.loads(config.read_text())
    data.pop("quantization_config", None)
    config.write_text(json.dumps(data))
    plan = make_plan(PlanRequest(config=config))
    assert plan["precision"] == "auto" and plan["precision_mode"] == "high"
    assert plan["ranks"][0]["kv_cache"]["context"] == 512
    assert "precision: high (auto: the checkpoint's own)" in format_plan(plan)
    v3 = make_plan(PlanRequest(config=_config(tmp_path, num_hidden_layers=4), context=64))
    assert v3["precision_mode"] == "fp8-block"
    assert make_plan(PlanRequest(config=config, precision="fp8-block", context=64))["precision_mode"] == "fp8-block"


def test_plan_counts_the_whole_model_a_quantize_then_shard_rank_loads(tmp_path: Path) -> None:
    """fp8-row with TP quantizes each weight whole before sharding (build_parallel): every rank
    holds the whole model during the load. The plan counted only the shards and let a 131 GiB
    device pass for a ~627 GiB load."""
    config = _config(tmp_path, num_hidden_layers=4)
    sharded = make_plan(PlanRequest(config=config, tp=8, precision="fp8-block", context=16, prefill_chunk=15))
    whole = make_plan(PlanRequest(config=config, tp=8, precision="fp8-row", context=16, prefill_chunk=15))
    (s,), (w,) = sharded["ranks"], whole["ranks"]
    assert not s["loads_whole_model"] and w["loads_whole_model"]
    assert w["needs_bytes"] >= w["reads"]["bytes"] > 4 * w["weight_bytes"]
    assert "loads the whole model, then quantizes and shards it" in format_plan(whole)
    budget = (w["needs_bytes"] / 2) / 2**30
    refused = make_plan(PlanRequest(config=config, tp=8, precision="fp8-row", context=16, prefill_chunk=15,
                                    device_memory_gib=budget))
    assert "load the whole model before sharding it" in refused["refusal"] and "more ranks do not help" in refused["refusal"]


def test_plan_names_the_mode_a_non_128_block_checkpoint_runs_in(tmp_path: Path) -> None:
    """The loader dequantizes FP8 blocks other than 128 x 128 (they run high); the plan said fp8-block."""
    from dshal.plan.plan import resolved_precision

    args = ModelArgs.from_file(default_config())
    request = PlanRequest(config=default_config())
    assert resolved_precision(request, args) == "fp8-block"
    assert resolved_precision(request, ModelArgs(**{**vars(args), "weight_block_size": (64, 64)})) == "high"


def test_plan_does_not_claim_no_block_cuts_for_a_checkpoint_quantized_on_load(tmp_path: Path) -> None:
    """A bf16 checkpoint run fp8-block over TP=32: the shards cut blocks, each rank quantizes the
    whole model first, and the cut weights are held dequantized; the plan printed "FP8 block
    cuts: none (every shard boundary is on a 128x128 block edge)"."""
    cfg = json.loads(default_config().read_text())
    cfg.pop("quantization_config")
    cfg.update(num_hidden_layers=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    text = format_plan(make_plan(PlanRequest(config=path, tp=32, precision="fp8-block", context=16, prefill_chunk=15)))
    assert "FP8 block cuts: none read (the checkpoint is not FP8); every rank quantizes the whole model" in text
    assert "every shard boundary is on a 128x128 block edge" not in text


def test_plan_counts_deepseek_v32s_indexer_on_every_rank_and_its_cached_keys(tmp_path: Path) -> None:
    """DeepSeek-V3.2 (``model_type: deepseek_v32``): each layer's lightning indexer (wq_b, wk,
    k_norm, weights_proj) is whole on every TP rank, and its one key per token joins the KV
    cache; prompts past ``index_topk`` run the sparse path on the meta device too, and its MTP
    layer (``--speculative mtp``) has an indexer of its own."""
    heads, dim = 64, 128
    sparse = dict(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_n_heads=heads,
                  index_head_dim=dim, index_topk=16)
    request = dict(tp=2, context=64, prefill_chunk=32)
    v3 = make_plan(PlanRequest(config=_config(tmp_path, num_hidden_layers=5), **request))["ranks"][0]
    (tmp_path / "v32").mkdir()
    config = _config(tmp_path / "v32", num_hidden_layers=5, **sparse)
    v32 = make_plan(PlanRequest(config=config, **request))["ranks"][0]
    d, q_lora = 7168, 1536
    indexer = heads * dim * q_lora + dim * d + 2 * dim + heads * d
    assert v32["weights"]["attention"]["params"] - v3["weights"]["attention"]["params"] == 5 * indexer
    assert v32["kv_cache"]["bytes_per_token"] - v3["kv_cache"]["bytes_per_token"] == 5 * dim * 2  # bf16 keys
    with_mtp = make_plan(PlanRequest(config=config, **request, speculative="mtp"))["ranks"][0]
    v3_mtp = make_plan(PlanRequest(config=_config(tmp_path, num_hidden_layers=5), **request, speculative="mtp"))
    assert with_mtp["weights"]["MTP layer"]["params"] - v3_mtp["ranks"][0]["weights"]["MTP layer"]["params"] == indexer
