"""``dshal run`` end to end (a real subprocess), and the model core's portability rule:
no device-type or vendor branches in its source."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import pytest
import torch

import dshal
import dshal.model

MODEL_DIR = Path(dshal.model.__file__).parent
#: Code names that would mean vendor- or device-specific code in the model core.
VENDOR_NAMES = re.compile(
    r"^(cuda|npu|torch_npu|hip|rocm|triton|nvidia|amd|ascend|mps|xpu|is_available|device_type|get_device_capability)$",
    re.I,
)


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    """The file's tokens without comments and strings (docstrings may name vendors)."""
    fstring_parts = ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")  # Python >= 3.12 splits f-strings
    skip = {tokenize.COMMENT, tokenize.STRING, *(getattr(tokenize, n) for n in fstring_parts if hasattr(tokenize, n))}
    return [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline) if t.type not in skip]


@pytest.mark.parametrize(
    "name", ["model.py", "cache.py", "prefill.py", "generate.py", "decode.py", "speculative.py", "loader.py", "precision.py", "args.py"]
)
def test_model_core_has_no_vendor_or_device_branches(name):
    tokens = _code_tokens(MODEL_DIR / name)
    hits = [
        f"line {t.start[0]}: {t.string}" for t in tokens if t.type == tokenize.NAME and VENDOR_NAMES.match(t.string)
    ]
    # `<x>.device.type` / `<x>.type ==` compares are device branches too
    text = " ".join(t.string for t in tokens)
    hits += [m.group(0) for m in re.finditer(r"\. type\b|device \. type", text)]
    assert not hits, f"{name} has device/vendor-specific code: {hits}"


def test_model_scan_catches_a_device_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""mentions cuda in a docstring only"""\nif x.device.type == "cuda":\n    pass\n')
    names = [t.string for t in _code_tokens(bad) if t.type == tokenize.NAME]
    assert "type" in names and not any(VENDOR_NAMES.match(n) for n in names if n != "type")
    assert re.search(r"device \. type", " ".join(t.string for t in _code_tokens(bad)))


def _dshal(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m dshal ARGV`` in a child process: for what only a process shows (its CPU time,
    what a refused allocation does to it); the tests of the command's flags, output and report
    use :func:`dshal_here`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    return subprocess.run(
        [sys.executable, "-m", "dshal", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def dshal_here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, clean_dshal_env: None, cli_main):
    """``dshal_here(*argv, stdin=None)``: ``dshal ARGV`` in this process (conftest's ``cli_main``),
    as a ``CompletedProcess``: its exit status, stdout and stderr; ``stdin`` is the text its
    ``input()`` reads. About 2 s a call less than :func:`_dshal`."""

    def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return cli_main(capsys, list(argv))

    return run


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_model_dshal_run_tiny_default(tmp_path):
    """The default run (32-token prompt, 32 new tokens) within the 30 s budget. Its CPU time
    is what is checked: wall time on a shared CI box also counts waiting for a core."""
    out = tmp_path / "run.json"
    before = _children_cpu_s()
    proc = _dshal("run", "--no-progress", "--json", str(out), timeout=120)
    cpu_s = _children_cpu_s() - before
    assert proc.returncode == 0, proc.stderr
    assert cpu_s < 30, f"dshal run used {cpu_s:.1f} s of CPU, the budget is 30 s on 2 cores"
    for text in (
        "backend cpu",
        "op providers",
        "moe_experts",
        "precision per layer group",
        "routed experts",
        "tokens/s",
        "precision: high (auto: the checkpoint stores",
    ):
        assert text in proc.stdout, f"{text!r} missing from:\n{proc.stdout}"
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
    assert len(report["output_ids"]) == 32
    # how the backend serves, in its words (a failed C-kernel build was said by `dshal info` only)
    assert report["backend_reason"].startswith("torch CPU kernels") and f"  {report['backend_reason']}\n" in proc.stdout
    # warm-up with the timed shapes, its compile/first-call time apart; no device graphs on cpu
    assert report["warmup_s"] >= report["compile_autotune_s"] >= 0 and "compile/autotune" in proc.stdout
    assert report["graphs"] == {"run": False, "why": "backend 'cpu' has no device graphs"}
    assert report["decode_tokens_per_s_graphs"] is None and "decode with graphs: not run" in proc.stdout
    assert report["providers"]["attention"] == {"provider": "cpu", "kind": "native"}
    assert report["determinism"] == {"mode": "default", "batch_invariant_ops": [], "gaps": {}}
    assert "determinism:" not in proc.stdout
    # the default policy, gemm: auto, runs the float32 random checkpoint as stored
    assert report["model_description"]["precision_groups"]["attention"] == "float32"
    assert report["model_description"]["precision"]["mode"] == "high"


def test_model_dshal_run_records_a_strict_determinism_mode(tmp_path, dshal_here):
    """``determinism: strict`` changes the numbers (batch-invariant providers): the run's
    output and JSON said nothing of it, so a strict run's record equalled a default one's."""
    config = tmp_path / "strict.yaml"
    config.write_text("backend: cpu\ndeterminism: strict\n")
    out = tmp_path / "run.json"
    proc = dshal_here("run", "--no-progress", "--config", str(config), "--prompt-len", "4", "--new-tokens", "2",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    determinism = json.loads(out.read_text())["determinism"]
    assert determinism["mode"] == "strict" and "linear" in determinism["batch_invariant_ops"]
    assert "determinism: strict (batch-invariant: " in proc.stdout


def test_model_dshal_run_applies_the_configs_attention_window_to_the_tiny_model(tmp_path, dshal_here):
    """``attention: {window, global_tokens}`` reached checkpoints only: the built-in model ran
    with full attention and a full KV cache, and said nothing."""
    config = tmp_path / "window.yaml"
    config.write_text("backend: cpu\nattention: {window: 8, global_tokens: 2}\n")
    proc = dshal_here("run", "--no-progress", "--config", str(config), "--prompt-len", "4", "--new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert "window 8 + 2 global tokens" in proc.stdout


def test_model_dshal_run_graphs_on_reports_both_rates(tmp_path, dshal_here):
    """``--graphs on`` times the static (graph-capturable) decode step too; without device
    graphs it runs eagerly and says so; its tokens equal the eager run's."""
    out = tmp_path / "run.json"
    proc = dshal_here("run", "--no-progress", "--graphs", "on", "--prompt-len", "8", "--new-tokens", "6", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["decode_tokens_per_s"] > 0 and report["decode_tokens_per_s_graphs"] > 0
    graphs = report["graphs"]
    assert graphs["run"] and not graphs["captured"] and graphs["tokens_match_eager"]
    assert "ran eagerly" in graphs["why"] and "decode with graphs:" in proc.stdout


@pytest.mark.slow
def test_model_dshal_run_speculative_mtp(tmp_path, dshal_here):
    """``--speculative mtp`` loads the MTP layer and times greedy decoding with its drafts
    after the eager run: the same tokens, and how many drafts were accepted. A checkpoint
    without an MTP layer, and sampling, are said."""
    from dshal.model import tiny_args
    from dshal.model.checkpoint import random_checkpoint, save_checkpoint

    out = tmp_path / "run.json"
    proc = dshal_here("run", "--no-progress", "--speculative", "mtp", "--new-tokens", "12", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    spec = report["speculative"]
    assert spec["run"] and spec["tokens_match_eager"] and spec["method"] == "mtp"
    assert spec["drafted"] == spec["steps"] >= 6 and spec["steps"] + spec["accepted"] == 11
    assert report["decode_tokens_per_s_speculative"] > 0 and "decode with MTP drafts:" in proc.stdout
    assert spec["captured"] is None  # no device graphs on cpu: --graphs auto leaves the steps eager
    assert report["model_description"]["precision_groups"]["mtp"] == "float32"
    # The MTP layer's weights come after the others': the eager tokens are those of a run without it.
    plain = dshal_here("run", "--no-progress", "--new-tokens", "12", "--json", str(tmp_path / "plain.json"))
    assert plain.returncode == 0, plain.stderr
    assert json.loads((tmp_path / "plain.json").read_text())["output_ids"] == report["output_ids"]
    assert json.loads((tmp_path / "plain.json").read_text())["speculative"] is None

    graphed = dshal_here("run", "--no-progress", "--speculative", "mtp", "--new-tokens", "4", "--graphs", "on",
                     "--json", str(out))
    assert graphed.returncode == 0, graphed.stderr
    spec = json.loads(out.read_text())["speculative"]  # through the hook, which on cpu captures nothing
    assert spec["captured"] is False and spec["tokens_match_eager"] and "its steps not captured" in graphed.stdout
    sampled = dshal_here("run", "--no-progress", "--speculative", "mtp", "--new-tokens", "4", "--temperature", "0.7",
                     "--json", str(out))
    assert sampled.returncode == 0, sampled.stderr
    spec = json.loads(out.read_text())["speculative"]
    assert spec["run"] and spec["tokens_match_eager"] is None and "sampled: tokens not compared" in sampled.stdout
    several = dshal_here("run", "--no-progress", "--speculative", "mtp", "--new-tokens", "6", "--batch", "3",
                     "--json", str(out))
    assert several.returncode == 0, several.stderr
    spec = json.loads(out.read_text())["speculative"]
    assert spec["run"] and spec["tokens_match_eager"] and spec["steps"] + spec["accepted"] >= 3 * 5

    args = tiny_args(num_hidden_layers=2)
    save_checkpoint(tmp_path / "ckpt", args, random_checkpoint(args))
    missing = dshal_here("run", "--no-progress", "--checkpoint", str(tmp_path / "ckpt"), "--speculative", "mtp")
    assert missing.returncode != 0
    assert "mtp_layers is 1, expected an integer in [0, 0]" in missing.stderr and "config.json" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_model_dshal_run_checkpoint_and_config(tmp_path, dshal_here):
    from dshal.model import tiny_args
    from dshal.model.checkpoint import random_checkpoint, save_checkpoint

    args = tiny_args(num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)
    save_checkpoint(tmp_path / "ckpt", args, random_checkpoint(args, seed=1))
    cfg = tmp_path / "dshal.yaml"
    cfg.write_text("backend: cpu\nprecision: {gemm: bf16}\nattention: {window: 8, global_tokens: 2}\n")
    proc = dshal_here(
        "run",
        "--config",
        str(cfg),
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--prompt-len",
        "12",
        "--new-tokens",
        "4",
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model_description"]["precision_groups"]["attention"] == "float32"
    assert report["model_description"]["precision"]["gemm"] == "bf16"  # the older name of "high"
    assert "'bf16' is the older name of 'high'" in report["model_description"]["precision"]["why"]
    assert report["model_description"]["kv_cache"]["max_cached_tokens"] == 10
    assert "window 8 + 2 global tokens" in proc.stdout


def test_model_dshal_run_bad_arguments(tmp_path, dshal_here):
    proc = dshal_here("run", "--new-tokens", "0")
    assert proc.returncode == 1 and "--new-tokens is 0, expected an integer >= 1" in proc.stderr
    proc = dshal_here("run", "--checkpoint", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "cannot read model config" in proc.stderr


def test_the_run_fit_check_counts_the_caches_each_stage_makes(monkeypatch):
    """--speculative mtp makes the main layers' and the MTP layer's caches together: the check
    counted the main one alone (a run that fit the check failed at the MTP stage, after the
    eager and graph runs), and it counted the graph run's cache under --graphs off too."""
    import argparse

    from dshal.model import run

    model = dshal.model.random_model(dshal.model.tiny_args(num_nextn_predict_layers=1, mtp_layers=1), seed=0)
    eager, static = model.cache_bytes(2, 64), model.cache_bytes(2, 64, "absorb", static=True)
    drafts = model.cache_bytes(2, 64, "absorb", mtp=True, static=True)
    assert eager < static < static + drafts  # the tiny model's absorb cache, plus mask columns, plus MTP

    def fits(free: int, **flags: Any) -> bool:
        monkeypatch.setattr(run, "free_memory", lambda device: free)
        args = argparse.Namespace(batch=2, prompt_len=32, new_tokens=32, **{"graphs": "auto", "speculative": None, **flags})
        try:
            run.check_run_fits(model, args, torch.device("cpu"))
        except dshal.errors.ArgumentError as error:
            assert "needs a KV cache of" in str(error)
            assert ("with --speculative mtp's MTP cache" in str(error)) == (flags.get("speculative") == "mtp")
            return False
        return True

    assert fits(static) and not fits(static - 1)
    assert fits(eager, graphs="off") and not fits(eager - 1, graphs="off")
    assert fits(static + drafts, speculative="mtp") and not fits(static + drafts - 1, speculative="mtp")
    without_mtp = dshal.model.random_model(dshal.model.tiny_args(), seed=0)  # no MTP layer: its stage does not run
    monkeypatch.setattr(run, "free_memory", lambda device: static)
    run.check_run_fits(without_mtp, argparse.Namespace(batch=2, prompt_len=32, new_tokens=32, graphs="auto",
                                                       speculative="mtp"), torch.device("cpu"))


def test_the_run_fit_check_counts_one_sequences_mtp_caches_in_the_models_own_layout(monkeypatch):
    """One sequence drafted without device graphs (the cpu backend) keeps both caches in the
    model's own layout: under mla_mode naive that is larger than the graph layout the check
    counted (the tiny model: 320 KiB made, 240 KiB checked)."""
    import argparse

    from dshal.model import run

    model = dshal.model.random_model(
        dshal.model.tiny_args(num_nextn_predict_layers=1, mtp_layers=1, mla_mode="naive"), seed=0)
    made = model.cache_bytes(1, 64) + model.cache_bytes(1, 64, mtp=True)  # what _generate_one allocates
    monkeypatch.setattr(run, "free_memory", lambda device: made - 1)
    args = argparse.Namespace(batch=1, prompt_len=32, new_tokens=32, graphs="auto", speculative="mtp")
    with pytest.raises(dshal.errors.ArgumentError, match="with --speculative mtp's MTP cache"):
        run.check_run_fits(model, args, torch.device("cpu"))
    monkeypatch.setattr(run, "free_memory", lambda device: made)
    run.check_run_fits(model, args, torch.device("cpu"))


def test_model_dshal_run_refuses_a_batch_whose_kv_cache_cannot_fit(tmp_path):
    from dshal.plugin import host_available_memory

    if host_available_memory() is None:
        pytest.skip("no /proc/meminfo here: the cpu backend reports no free memory to check against")
    # 10**9 sequences x 64 tokens of the tiny model's 960-byte tokens: ~57 TiB of cache. Before,
    # the prompt's ids alone (512 GB) were a traceback from torch's allocator.
    proc = _dshal("run", "--batch", str(10**9), "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--batch 1000000000 x (--prompt-len 32 + --new-tokens 32) tokens needs a KV cache of" in proc.stderr
    # In a container with a memory limit the message also names it (", held to the container's ...").
    assert re.search(r"GiB free on cpu(, held to the container's memory limit \(.*\))?: lower --batch, --prompt-len or "
                     r"--new-tokens", proc.stderr), proc.stderr


def test_model_run_and_profile_say_a_sequence_past_the_models_positions_in_flags(capsys):
    """`--prompt-len 5000` on the tiny model (4096 positions) said generate's internal
    `argument 'input_ids' has 5000 tokens`; profile said `Transformer: positions up to ...`."""
    from dshal.cli import main

    for argv, said in ((["run", "--prompt-len", "5000"], "--prompt-len 5000 + --new-tokens 32 = 5032 tokens"),
                       (["run", "--new-tokens", "4065"], "--prompt-len 32 + --new-tokens 4065 = 4097 tokens"),
                       (["profile", "--prompt-len", "4090"], "--prompt-len 4090 + --new-tokens 8 = 4098 tokens")):  # fmt: skip
        assert main([*argv, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"error: {said}, expected at most the model's max_position_embeddings (4096)" in err, err


def test_model_dshal_run_says_why_there_is_no_decode_rate(dshal_here):
    proc = dshal_here("run", "--new-tokens", "2", "--prompt-len", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode: n/a tokens/s (1 x 2 new tokens) (timed from the second decode step on: needs --new-tokens >= 3)" in proc.stdout


def test_model_dshal_run_backend_flag_overrides_the_config(tmp_path, dshal_here):
    """``--backend`` wins over the config file's ``backend`` (as for bench and profile); an
    unknown name is one error line naming what is installed."""
    cfg = tmp_path / "dshal.yaml"
    cfg.write_text("backend: nvidia\n")  # no GPU and no DSHAL_EMULATE here: unavailable
    proc = dshal_here("run", "--config", str(cfg), "--prompt-len", "4", "--new-tokens", "2", "--no-progress")
    assert proc.returncode == 1 and "nvidia" in proc.stderr and "Traceback" not in proc.stderr
    proc = dshal_here("run", "--config", str(cfg), "--backend", "cpu", "--prompt-len", "4", "--new-tokens", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend cpu" in proc.stdout
    proc = dshal_here("run", "--backend", "no-such-backend", "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "backend 'no-such-backend' is not installed; installed: [" in proc.stderr and "'cpu'" in proc.stderr
    assert "(requested by backend, set by --backend)" in proc.stderr  # the flag, not "<keyword arguments>"


@pytest.mark.slow
def test_model_dshal_run_prefill_chunk(tmp_path, dshal_here):
    """``--prefill-chunk`` prefills the prompt in forwards of that many tokens, says so, and
    generates the tokens of the one-forward prefill."""
    common = ("run", "--prompt-len", "8", "--new-tokens", "3", "--graphs", "off", "--no-progress", "--json")
    chunked = dshal_here(*common, str(tmp_path / "chunked.json"), "--prefill-chunk", "3")
    whole = dshal_here(*common, str(tmp_path / "whole.json"))
    assert chunked.returncode == 0 and whole.returncode == 0, chunked.stderr[-2000:] + whole.stderr[-2000:]
    assert "(1 x 8 tokens in 3 chunks of <= 3)" in chunked.stdout and "(1 x 8 tokens)" in whole.stdout
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("chunked.json", "whole.json"))
    assert (a["prefill_chunk"], b["prefill_chunk"]) == (3, 2048) and a["output_ids"] == b["output_ids"]
    bad = dshal_here("run", "--prefill-chunk", "0")
    assert bad.returncode == 1 and "--prefill-chunk is 0, expected an integer >= 1" in bad.stderr


#: ``dshal run`` in a process whose address space is capped (RLIMIT_AS) at what its imports
#: use plus argv[1] MiB: a real allocation failure, as a device out of memory gives one.
_CAPPED_RUN = """
import resource, sys
import torch, dshal.cli, dshal.model.run  # the command's imports, before the cap
used = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]) * 2**20, resource.RLIM_INFINITY))
sys.exit(dshal.cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc to cap the address space")
def test_model_dshal_run_out_of_memory_in_the_prefill_is_said_in_the_flags_terms():
    """The KV cache fits, the prefill's activations do not: the allocation the host refuses is
    one error line naming the flags that shrink them (not torch's traceback), and a smaller
    --prefill-chunk, as it says, runs under the same cap. (400 MiB above the imports: measured
    on torch 2.13, chunk 2048 fails from 500 MiB down; chunk 64 peaks near 300 MiB, with some
    spread from run to run: at 300 it failed one run in four.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env.update(OMP_NUM_THREADS="1", DSHAL_BACKEND="cpu")
    run = ("run", "--batch", "16", "--prompt-len", "2048", "--new-tokens", "2", "--graphs", "off", "--no-progress")

    def capped(chunk: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _CAPPED_RUN, "400", *run, "--prefill-chunk", str(chunk)],
                              capture_output=True, text=True, timeout=120, env=env)

    refused = capped(2048)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert ("dshal run: error: --batch 16 x --prompt-len 2048 (prefilled in forwards of <= 2048 tokens) + --new-tokens 2 "
            "ran out of memory on cpu (") in refused.stderr
    assert "can't allocate memory" in refused.stderr and "lower --batch, --prefill-chunk or --prompt-len" in refused.stderr
    smaller = capped(64)
    assert smaller.returncode == 0, smaller.stderr[-2000:]


def test_out_of_memory_as_error_turns_only_refused_allocations_into_device_errors():
    from dshal.runtime import out_of_memory_as_error

    with pytest.raises(dshal.DeviceError, match=r"^a big request ran out of memory on cpu \(.*can't allocate memory.*\): "
                                                  r"lower --size$"):
        with out_of_memory_as_error("cpu", "a big request", "--size"):
            torch.empty(2**62, dtype=torch.uint8)  # the host refuses it at once
    with pytest.raises(dshal.DeviceError, match=r"on cuda:0 \(CUDA out of memory\. Tried to allocate 2\.00 GiB\)"):
        with out_of_memory_as_error("cuda:0", "a big request", "--size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # what torch raises there
    with pytest.raises(RuntimeError, match="^something else$"):
        with out_of_memory_as_error("cpu", "a big request", "--size"):
            raise RuntimeError("something else")


def _checkpoint_with_tokenizer(folder: Path, eos: str = "<eos>") -> Any:
    """The tiny random model saved with a byte-level BPE tokenizer trained here (at most 300 tokens,
    BOS added, a chat template), as a real release ships tokenizer.json beside config.json."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dshal.model import tiny_args
    from dshal.model.checkpoint import random_checkpoint, save_checkpoint

    args = tiny_args(num_hidden_layers=2, num_nextn_predict_layers=1)  # an MTP layer, read with --speculative mtp
    save_checkpoint(folder, args, random_checkpoint(args, seed=2))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["one model on any accelerator", "hello world", "the lazy dog"] * 10, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token=eos)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.slow
def test_model_dshal_run_text_prompt_through_the_checkpoints_tokenizer(tmp_path, dshal_here):
    """``--prompt`` encodes the text with the checkpoint's tokenizer (BOS added; ``--chat``
    wraps it in the chat template), prints and reports the decoded output, and stops at the
    tokenizer's EOS unless ``--ignore-eos``."""
    ckpt = tmp_path / "ckpt"
    tokenizer = _checkpoint_with_tokenizer(ckpt)
    run = ("run", "--checkpoint", str(ckpt), "--new-tokens", "6", "--no-progress", "--graphs", "on", "--json")
    proc = dshal_here(*run, str(tmp_path / "a.json"), "--prompt", "hello world", "--ignore-eos")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["prompt_len"] == len(tokenizer("hello world")["input_ids"]) and report["prompt_text"] == "hello world"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.bos_token_id
    assert len(report["output_ids"]) == report["generated_tokens"] == 6
    assert report["output_text"] == tokenizer.decode(report["output_ids"], skip_special_tokens=True)
    assert f"output: {report['output_text']!r}" in proc.stdout and "prompt: 'hello world'" in proc.stdout
    assert report["graphs"]["tokens_match_eager"]

    # The same run, with the model's second new token made the tokenizer's EOS: it stops there.
    first, second = report["output_ids"][:2]
    if second in (first, tokenizer.bos_token_id):
        pytest.skip("the random model's second token is its first or BOS: no distinct EOS to stop at")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(second)
    tokenizer.save_pretrained(ckpt)
    proc = dshal_here(*run, str(tmp_path / "b.json"), "--prompt", "hello world")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stopped = json.loads((tmp_path / "b.json").read_text())
    assert stopped["output_ids"] == report["output_ids"][:2] and stopped["stopped_at_eos"]
    assert "(stopped at an end-of-sequence id)" in proc.stdout and "(1 x 2 new tokens)" in proc.stdout
    assert stopped["graphs"]["tokens_match_eager"]  # the graph run's first tokens are the eager ones

    # The tokenizer's EOS back to '<eos>'; the end-of-turn id only in generation_config.json (as Kimi-K2's).
    tokenizer.eos_token = "<eos>"
    tokenizer.save_pretrained(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, second]}))
    proc = dshal_here(*run, str(tmp_path / "g.json"), "--prompt", "hello world")
    assert proc.returncode == 0, proc.stderr[-2000:]
    turn = json.loads((tmp_path / "g.json").read_text())
    assert turn["output_ids"] == report["output_ids"][:2] and turn["stopped_at_eos"]
    assert turn["stop_ids"] == [tokenizer.eos_token_id, second]
    (ckpt / "generation_config.json").unlink()

    chat = dshal_here(*run, str(tmp_path / "c.json"), "--prompt", "hello world", "--chat", "--ignore-eos")
    assert chat.returncode == 0, chat.stderr[-2000:]
    want = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert json.loads((tmp_path / "c.json").read_text())["prompt_len"] == len(want) > report["prompt_len"]


@pytest.mark.slow
def test_model_dshal_run_a_batch_of_prompts_of_different_lengths(tmp_path, dshal_here):
    """Repeated ``--prompt``: one batch of prompts of different lengths; each sequence gets the
    tokens it gets alone, the graph run agrees, and ``--batch`` with several prompts is refused."""
    ckpt = tmp_path / "ckpt"
    tokenizer = _checkpoint_with_tokenizer(ckpt)
    texts = ["hello", "one model on any accelerator"]
    lens = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert lens[0] < lens[1]
    run = ("run", "--checkpoint", str(ckpt), "--new-tokens", "5", "--no-progress", "--graphs", "on", "--ignore-eos",
           "--json")
    proc = dshal_here(*run, str(tmp_path / "both.json"), "--prompt", texts[0], "--prompt", texts[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = json.loads((tmp_path / "both.json").read_text())
    assert (both["batch"], both["prompt_len"], both["shortest_prompt"]) == (2, lens[1], lens[0])
    assert both["ragged_batch"] == "each at its own positions" and both["generated_tokens"] == 5
    assert [seq["prompt_len"] for seq in both["sequences"]] == lens
    assert both["graphs"]["tokens_match_eager"]
    assert f"2 prompts of {lens[0]} to {lens[1]} tokens: the shortest length for all, each longer one's rest alone" in proc.stdout
    for i, text in enumerate(texts):
        alone = dshal_here(*run, str(tmp_path / f"{i}.json"), "--prompt", text, "--graphs", "off")
        assert alone.returncode == 0, alone.stderr[-2000:]
        want = json.loads((tmp_path / f"{i}.json").read_text())
        seq = both["sequences"][i]
        assert seq["output_ids"] == want["output_ids"] and len(seq["output_ids"]) == 5
        assert f"prompt {i + 1}: {text!r}" in proc.stdout and f"output {i + 1}: {seq['output_text']!r}" in proc.stdout
    # From a file, at most --batch 1 sequence per generation: two batches, the same sequences.
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    from_file = dshal_here(*run, str(tmp_path / "file.json"), "--prompt-file", str(tmp_path / "prompts.jsonl"), "--batch", "1")
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    one_by_one = json.loads((tmp_path / "file.json").read_text())
    assert (one_by_one["batch"], one_by_one["batches"]) == (1, 2) and one_by_one["sequences"] == both["sequences"]
    assert f"2 prompts of {lens[0]} to {lens[1]} tokens in 2 batches of <= 1" in from_file.stdout
    assert one_by_one["graphs"] == {"run": False, "why": "2 batches: graphs are timed on one batch"}
    # Two prompt lengths: the second batch's shapes are warmed up too, not met inside the timings.
    assert (both["warmup_shapes"], one_by_one["warmup_shapes"]) == (1, 2) and "2 batch shapes" in from_file.stdout


def test_model_dshal_run_reads_a_prompt_file(tmp_path):
    from dshal.model.run import read_prompt_file

    (tmp_path / "p.txt").write_text("hello\n\n  \none model\n")
    assert read_prompt_file(str(tmp_path / "p.txt")) == ["hello", "one model"]
    (tmp_path / "p.jsonl").write_text('"hello"\n\n{"prompt": "two\\nlines", "id": 3}\n')
    assert read_prompt_file(str(tmp_path / "p.jsonl")) == ["hello", "two\nlines"]
    for body, line, why in (('"a"\n{"id": 1}\n', 2, "no prompt on this line"), ('"a"\n"b"\n[x\n', 3, "not JSON"),
                            ('""\n', 1, "no prompt on this line")):
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(dshal.ConfigError, match=rf"bad.jsonl:{line}: --prompt-file: {why}"):
            read_prompt_file(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(dshal.ConfigError, match="empty.txt: --prompt-file: no prompts in it"):
        read_prompt_file(str(tmp_path / "empty.txt"))
    with pytest.raises(dshal.ConfigError, match="cannot read --prompt-file: no such file"):
        read_prompt_file(str(tmp_path / "missing.txt"))


def test_model_dshal_run_runs_a_checkpoints_tokenizer_code_only_when_asked(tmp_path):
    """A tokenizer that is code shipped with the checkpoint (``auto_map``, as Kimi-K2's
    tiktoken one): refused with what to do, never asked about on the terminal; run with
    ``--trust-remote-code``."""
    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    (ckpt / "shipped_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass ShippedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="ShippedTokenizer", auto_map={"AutoTokenizer": [None, "shipped_tokenizer.ShippedTokenizer"]})
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    run = ("run", "--checkpoint", str(ckpt), "--prompt", "hello", "--new-tokens", "2", "--no-progress")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # where transformers copies the code
    env = {k: v for k, v in env.items() if not k.startswith("DSHAL_")}
    refused = subprocess.run([sys.executable, "-m", "dshal", *run], capture_output=True, text=True, timeout=60, env=env,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "its tokenizer is code the checkpoint ships" in refused.stderr and "--trust-remote-code" in refused.stderr
    trusted = subprocess.run([sys.executable, "-m", "dshal", *run, "--trust-remote-code"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "output: " in trusted.stdout


def test_model_dshal_run_text_prompt_errors(tmp_path, capsys):
    """Each one error line, no traceback (in-process: the flags are refused before anything
    heavy runs). The tokenizer is read before the weights (a full checkpoint loads for minutes):
    here the weights are gone too, and the tokenizer's error is the one said, for --prompt
    and --interactive alike."""
    from dshal.cli import main

    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    cases = [
        (("--prompt", "hi"), "--prompt needs --checkpoint DIR"),
        (("--checkpoint", str(ckpt), "--prompt", "hi", "--prompt-len", "4"), "--prompt and --prompt-len are both given"),
        (("--chat",), "--chat is given without --prompt"),
        (("--trust-remote-code",), "--trust-remote-code is given without --prompt"),
        (("--checkpoint", str(ckpt), "--prompt", ""), "--prompt is empty, expected text"),
    ]
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ckpt / tokenizer_file).rename(tmp_path / tokenizer_file)
    for weights in ckpt.glob("*.safetensors"):
        weights.unlink()
    cases.append((("--checkpoint", str(ckpt), "--prompt", "hi"), "no tokenizer, expected one of tokenizer.json"))
    cases.append((("--checkpoint", str(ckpt), "--interactive"), "no tokenizer, expected one of tokenizer.json"))
    for flags, said in cases:
        code = main(["run", *flags, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and said in err and err.count("\n") == 1, (flags, err[-2000:])


def test_model_dshal_run_names_prompt_file_in_its_refusals(tmp_path, capsys):
    """Prompts given as ``--prompt-file F`` were refused as "--prompt ...", a flag the command
    line did not have (the file's prompts join --prompt's before the checks)."""
    from dshal.cli import main

    (tmp_path / "prompts.txt").write_text("hello\n")
    file = ("--prompt-file", str(tmp_path / "prompts.txt"))
    for flags, said in (((*file,), "--prompt-file needs --checkpoint DIR"),
                        ((*file, "--prompt-len", "4"), "--prompt-file and --prompt-len are both given"),
                        ((*file, "--checkpoint", str(tmp_path), "--interactive"), "--interactive is given with --prompt-file"),
                        ((*file, "--prompt", "hi", "--prompt-len", "4"), "--prompt and --prompt-len are both given")):
        code = main(["run", *flags, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and f"error: {said}," in err and err.count("\n") == 1, (flags, err[-2000:])


@pytest.mark.slow
def test_model_dshal_run_temperature_samples_reproducibly(tmp_path, capsys, dshal_here):
    """``--temperature`` samples (seeded by ``--seed``: the same tokens twice, others than
    greedy's); the graph run samples too (its tokens not compared: other draws)."""
    common = ("run", "--prompt-len", "4", "--new-tokens", "8", "--graphs", "on", "--no-progress", "--json")
    ids = []
    for name, extra in (("g", ()), ("t1", ("--temperature", "1.5")), ("t2", ("--temperature", "1.5"))):
        proc = dshal_here(*common, str(tmp_path / f"{name}.json"), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ids.append(json.loads((tmp_path / f"{name}.json").read_text()))
    greedy, sampled, again = ids
    assert sampled["output_ids"] == again["output_ids"] != greedy["output_ids"]
    assert sampled["temperature"] == 1.5 and greedy["temperature"] == 0.0
    assert sampled["graphs"]["run"] and sampled["graphs"]["tokens_match_eager"] is None
    assert sampled["decode_tokens_per_s_graphs"] > 0
    from dshal.cli import main

    assert main(["run", "--temperature", "-1"]) == 1
    assert main(["run", "--top-p", "0"]) == 1
    err = capsys.readouterr().err
    assert "--temperature is -1.0, expected a finite number >= 0" in err and "--top-p is 0.0, expected a number in (0, 1]" in err
    assert main(["run", "--top-k", "-1"]) == 1
    assert main(["run", "--min-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "--top-k is -1, expected an int >= 0" in err and "--min-p is 1.5, expected a number in [0, 1]" in err
    assert main(["run", "--top-p", "0.5"]) == 1  # greedy would ignore it in silence
    assert "--top-p 0.5 with greedy decoding (temperature 0), expected --temperature > 0" in capsys.readouterr().err
    assert main(["run", "--top-k", "5", "--min-p", "0.1"]) == 1
    assert "--top-k 5, --min-p 0.1 with greedy decoding (temperature 0)" in capsys.readouterr().err
    nucleus = dshal_here(*common, str(tmp_path / "p.json"), "--temperature", "1.5", "--top-p", "1e-9")
    assert nucleus.returncode == 0, nucleus.stderr[-2000:]
    assert json.loads((tmp_path / "p.json").read_text())["output_ids"] == greedy["output_ids"]  # a one-token nucleus


def test_text_refuses_another_models_tokenizer_and_a_chat_without_template(tmp_path):
    from dshal.model.text import check_vocabulary, encode_prompt, load_tokenizer, stop_ids

    _checkpoint_with_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    check_vocabulary(tokenizer, 512)  # the tiny model's vocabulary holds its tokens (at most 300)
    with pytest.raises(dshal.CheckpointError, match=rf"tokenizer has {len(tokenizer)} tokens, expected at most the model's vocab_size \(256\)"):
        check_vocabulary(tokenizer, 256)
    tokenizer.chat_template = None
    with pytest.raises(dshal.ArgumentError, match="--chat: the checkpoint's tokenizer has no chat_template"):
        encode_prompt(tokenizer, "hello", chat=True)
    assert encode_prompt(tokenizer, "hello", chat=False)[0] == tokenizer.bos_token_id
    assert stop_ids(tokenizer, tmp_path) == [tokenizer.eos_token_id]  # no generation_config.json
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert stop_ids(tokenizer, tmp_path) == [tokenizer.eos_token_id, 7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": ["x"]}')
    with pytest.raises(dshal.CheckpointError, match=r"generation_config.json: eos_token_id holds 'x', expected token ids"):
        stop_ids(tokenizer, tmp_path)
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(dshal.CheckpointError, match="not a JSON object of generation settings"):
        stop_ids(tokenizer, tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 1,}')
    with pytest.raises(dshal.CheckpointError, match=r"generation_config.json:1: generation config: invalid JSON: "):
        stop_ids(tokenizer, tmp_path)
    # DeepSeek-V3.2 ships a Python encoder instead of a chat template: the refusal says what to do
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v32"}))
    with pytest.raises(dshal.ArgumentError, match="no chat_template .*DeepSeek-V3.2 releases ship no Jinja chat template "
                       "but a Python encoder .* pass that as --prompt without --chat"):
        encode_prompt(tokenizer, "hello", chat=True)


def test_text_prompt_errors_before_any_weight_is_read(tmp_path, monkeypatch):
    """An unreadable tokenizer file, a prompt its tokenizer turns into no tokens, transformers
    missing: each names the checkpoint or flag and what was expected."""
    from dshal.model.text import encode_prompt, load_tokenizer  # lazy: transformers is optional

    pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(dshal.CheckpointError, match=rf"{re.escape(str(tmp_path))}: cannot read its tokenizer: \w+Error: "):
        load_tokenizer(tmp_path)
    no_bos = lambda text: {"input_ids": []}  # noqa: E731 - what a tokenizer without a BOS gives for ""
    with pytest.raises(dshal.ArgumentError, match="--prompt: '' is no tokens, expected at least one"):
        encode_prompt(no_bos, "", chat=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # an environment without it: its import fails
    with pytest.raises(dshal.ArgumentError, match=rf"needs the transformers package to read {re.escape(str(tmp_path))}'s "
                                                  r"tokenizer \(.*\): pip install transformers"):
        load_tokenizer(tmp_path)


def test_model_dshal_run_parallel_prompt_error_is_said_once(tmp_path):
    """Two ranks (``--tp 2``) reading a checkpoint without a tokenizer: one error line, not two."""
    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer_config.json").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "dshal", "run", "--checkpoint", str(ckpt), "--prompt", "hi", "--tp", "2",
                           "--no-progress"], capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("no tokenizer, expected one of tokenizer.json") == 1, proc.stderr[-2000:]


def test_text_stream_holds_back_a_character_split_across_tokens(tmp_path):
    """Byte-level tokens can split one character: the stream never shows the half (U+FFFD),
    and its pieces join to the whole decoded text."""
    from dshal.model.text import TextStream, load_tokenizer

    _checkpoint_with_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer("héllo wörld ✓", add_special_tokens=False)["input_ids"]
    halves = [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert halves, "the test text must split a character across tokens"
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in [tokenizer.bos_token_id, *ids]] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "héllo wörld ✓"
    assert pieces[halves[0]] == ""  # after ids[:halves[0]]: held back, shown with the next token


def test_model_chat_holds_a_conversation_through_the_chat_template(tmp_path):
    """Each turn sends the whole conversation (the earlier answers included) through the chat
    template and prints the greedy answer as it comes; /clear forgets it; a turn past the
    model's positions is refused and dropped; the end of the input ends the chat."""
    import io

    from dshal.model import from_pretrained
    from dshal.model.chat import ChatSettings, chat
    from dshal.model.text import encode_chat, load_tokenizer

    _checkpoint_with_tokenizer(tmp_path)
    dshal.use(backend="cpu")
    model, tokenizer = from_pretrained(tmp_path), load_tokenizer(tmp_path)

    def answer(messages: list[dict[str, str]]) -> str:
        ids = encode_chat(tokenizer, messages)
        out = model.generate(torch.tensor([ids]), 6)
        return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    first = answer([{"role": "user", "content": "hello world"}])
    second = answer([{"role": "user", "content": "hello world"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "the lazy dog"}])
    after_clear = answer([{"role": "user", "content": "one model"}])
    read = _typed("hello world", "", "the lazy dog", "x " * 5000, "/clear", "one model")

    out = io.StringIO()
    conversation = chat(model, tokenizer, ChatSettings(max_new_tokens=6), read, out)
    text = out.getvalue()
    assert conversation.turns == 3
    assert conversation.messages == [{"role": "user", "content": "one model"}, {"role": "assistant", "content": after_clear}]
    assert f"\n{first}\n" in text and f"\n{second}\n" in text and f"\n{after_clear}\n" in text
    assert "(not sent: the conversation would be" in text and "positions end at 4096 (max_position_embeddings)" in text
    assert text.index(second) < text.index("(conversation cleared)") < text.rindex(after_clear)
    # The second turn prefilled only what it added to the first turn's tokens (kept in the cache);
    # its answer above is still the one a fresh generate gives.
    first_turn = len(encode_chat(tokenizer, [{"role": "user", "content": "hello world"}]))
    second_turn = encode_chat(tokenizer, [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": first},
                                          {"role": "user", "content": "the lazy dog"}])
    assert conversation.prefilled[0] == first_turn and conversation.prefilled[1] <= len(second_turn) - first_turn
    # With the MTP layer's drafts: the same greedy answers, both caches kept across turns (the
    # MTP layer's one position shorter at least: its entries were made with the token after).
    drafting = from_pretrained(tmp_path, mtp_layers=1)
    read = _typed("hello world", "the lazy dog", "/clear", "one model")
    out = io.StringIO()
    speculative = chat(drafting, tokenizer, ChatSettings(max_new_tokens=6, speculative=True), read, out)
    assert [m["content"] for m in speculative.messages] == ["one model", after_clear]
    assert f"\n{first}\n" in out.getvalue() and f"\n{second}\n" in out.getvalue()
    assert speculative.prefilled[0] == first_turn and speculative.prefilled[1] <= len(second_turn) - first_turn + 1
    assert len(speculative.drafts) == 3 and all(0 <= kept <= steps for kept, steps in speculative.drafts)
    # Through the static decode step and a graph hook (a stand-in that records what it is
    # asked to capture; the CPU has no device graphs): the same answers, the step captured
    # once for the whole conversation, the cache reused as before.
    captures = []

    def stand_in(step):
        captures.append(step)
        return step

    read = _typed("hello world", "the lazy dog", "/clear", "one model")
    out = io.StringIO()
    graphed = chat(model, tokenizer, ChatSettings(max_new_tokens=6, graph=stand_in), read, out)
    assert [m["content"] for m in graphed.messages] == ["one model", after_clear]
    assert f"\n{first}\n" in out.getvalue() and f"\n{second}\n" in out.getvalue()
    assert len(captures) == 1 and graphed.decoder is not None and graphed.decoder.cache is graphed.cache
    assert graphed.prefilled[:2] == conversation.prefilled[:2]
    # With the MTP layer's drafts through the hook: the step's two forwards captured once for the
    # conversation (kept with its caches), the same answers.
    captures.clear()
    read = _typed("hello world", "the lazy dog", "/clear", "one model")
    out = io.StringIO()
    both = chat(drafting, tokenizer, ChatSettings(max_new_tokens=6, speculative=True, graph=stand_in), read, out)
    assert [m["content"] for m in both.messages] == ["one model", after_clear]
    assert f"\n{first}\n" in out.getvalue() and f"\n{second}\n" in out.getvalue()
    assert len(captures) == 2 and both.prefilled[1] <= len(second_turn) - first_turn + 1
    windowed = dshal.model.random_model(dshal.model.tiny_args(attention_window=8))  # refused before any turn is read
    with pytest.raises(dshal.DshalError, match="ChatSettings.graph is given, but the static decode step it captures "
                                               "cannot run: an attention window is set"):
        chat(windowed, tokenizer, ChatSettings(max_new_tokens=6, graph=stand_in), read, out)
    # No answer without a token: 0 claimed cached tokens it never prefilled, and dropped the next turn.
    with pytest.raises(dshal.errors.ArgumentError, match="ChatSettings.max_new_tokens is 0, expected an int >= 1"):
        chat(model, tokenizer, ChatSettings(max_new_tokens=0), read, out)


@pytest.mark.slow
def test_model_dshal_run_interactive(tmp_path, dshal_here):
    """``dshal run --interactive`` reads the turns from the terminal (here a pipe), answers each
    and ends at the end of the input; the flags of a timed run are refused with it."""
    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    proc = subprocess.run([sys.executable, "-m", "dshal", "run", "--checkpoint", str(ckpt), "--interactive",
                           "--new-tokens", "4"], input="hello world\n/clear\nthe lazy dog\n", capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chat: /clear to forget the conversation" in proc.stdout and "(conversation cleared)" in proc.stdout
    assert "dshal run --interactive: 2 answer(s) on backend cpu (cpu)" in proc.stdout
    # Two tensor-parallel ranks: rank 0 reads and prints, both generate; the same answers.
    tp = subprocess.run([sys.executable, "-m", "dshal", "run", "--checkpoint", str(ckpt), "--interactive",
                         "--new-tokens", "4", "--tp", "2"], input="hello world\n/clear\nthe lazy dog\n",
                        capture_output=True, text=True, timeout=120, env=env)
    assert tp.returncode == 0, tp.stderr[-2000:]
    answers = lambda out: [line for line in out.splitlines() if line.startswith(">>> ")]  # noqa: E731
    assert answers(tp.stdout) == answers(proc.stdout) and len(answers(proc.stdout)) == 4
    assert "dshal run --interactive: 2 answer(s) on backend cpu (cpu, TP=2 x EP=1)" in tp.stdout
    # With the MTP layer's drafts (greedy): the same answers.
    # (In this process from here: the turns come from its stdin just the same.)
    drafting = dshal_here("run", "--checkpoint", str(ckpt), "--interactive", "--new-tokens", "4", "--speculative", "mtp",
                          stdin="hello world\n/clear\nthe lazy dog\n")
    assert drafting.returncode == 0, drafting.stderr[-2000:]
    assert answers(drafting.stdout) == answers(proc.stdout) and "MTP drafts accepted" in drafting.stdout
    assert "decode steps: eager (backend 'cpu' has no device graphs)" in proc.stdout
    # Through the static (graph) step, which the cpu backend runs eagerly: the same answers.
    static = dshal_here("run", "--checkpoint", str(ckpt), "--interactive", "--new-tokens", "4", "--graphs", "on",
                        stdin="hello world\n/clear\nthe lazy dog\n")
    assert static.returncode == 0, static.stderr[-2000:]
    assert answers(static.stdout) == answers(proc.stdout)
    assert "decode steps: the static (graph) step, eager: backend 'cpu' has no device graphs" in static.stdout
    for extra, flag in ((("--prompt", "hi"), "--prompt"), (("--batch", "2"), "--batch"), (("--json", "x.json"), "--json")):
        bad = dshal_here("run", "--checkpoint", str(ckpt), "--interactive", *extra)
        assert bad.returncode == 1 and f"--interactive is given with {flag}, expected one of them" in bad.stderr
    bad = dshal_here("run", "--interactive")
    assert bad.returncode == 1 and "--interactive needs --checkpoint DIR" in bad.stderr


def test_model_dshal_run_interactive_with_stdin_closed_or_empty_ends_the_chat(tmp_path):
    """No input at all ends the chat with 0 answers, exit 0: ``</dev/null`` did, but a closed stdin
    (``<&-``, a service started without one) was a traceback, "RuntimeError: input(): lost sys.stdin"."""
    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    argv = [sys.executable, "-m", "dshal", "run", "--checkpoint", str(ckpt), "--interactive", "--new-tokens", "2"]
    for closed in (False, True):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=env,
                              preexec_fn=(lambda: os.close(0)) if closed else None)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (closed, proc.stderr[-2000:])
        assert "dshal run --interactive: 0 answer(s) on backend cpu (cpu)" in proc.stdout, closed


def _typed(*lines: str):  # noqa: ANN202
    """A terminal that types ``lines``, then ends (EOFError), as ``chat`` reads one."""
    typed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    return read


class _CodePointChat:
    """A stand-in chat tokenizer (not a real one): one id per character (>= 10), 0..9 special."""

    chat_template = "code points"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):  # noqa: ANN001, ANN201
        ids = [1]
        for m in messages:
            ids += [2 if m["role"] == "user" else 3] + [ord(c) % 100 + 10 for c in m["content"]] + [4]
        return ids + [3]

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001, ANN201
        return "".join(chr(i + 90) for i in ids if i >= 10)


def test_model_chat_with_an_attention_window_goes_on_after_clear_and_a_wrapped_ring():
    """With an attention window, /clear (and a failed turn) left the cache at its old length
    and the next turn asked to restart at 0, which ``generate`` refused for any windowed
    cache: every later turn was "not answered". A restart at 0 is always possible; a ring
    that has wrapped cannot rewind to a shared prefix, so the turn prefills from 0. Every
    answer equals a fresh ``generate`` of its conversation."""
    import io

    from dshal.model.chat import ChatSettings, chat
    from dshal.model.text import encode_chat

    dshal.use(backend="cpu")
    model = dshal.model.random_model(dshal.model.tiny_args(attention_window=8, attention_global_tokens=2), seed=2)
    tokenizer = _CodePointChat()
    read = _typed("hello", "more words", "/clear", "again")

    out = io.StringIO()
    conversation = chat(model, tokenizer, ChatSettings(max_new_tokens=4), read, out)
    assert "not answered" not in out.getvalue() and conversation.turns == 3
    # the second turn could not reuse the wrapped ring's prefix: it prefilled all its tokens
    first = encode_chat(tokenizer, [{"role": "user", "content": "hello"}])
    answer = tokenizer.decode(model.generate(torch.tensor([first]), 4)[0, len(first):].tolist())
    second = encode_chat(tokenizer, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer},
                                     {"role": "user", "content": "more words"}])
    assert len(first) + 4 > 10 and conversation.prefilled[1] == len(second)
    messages = [{"role": "user", "content": "again"}]
    ids = encode_chat(tokenizer, messages)
    fresh = model.generate(torch.tensor([ids]), 4)[0, len(ids):].tolist()
    assert conversation.messages == [*messages, {"role": "assistant", "content": tokenizer.decode(fresh)}]
    cache = model.new_cache(1, 64)
    model.generate(torch.tensor([ids * 2]), 4, cache=cache)  # 36 positions: past the ring's 10 slots
    assert cache.length > cache.capacity and not cache.can_rewind_to(5) and cache.can_rewind_to(0)
    again = model.generate(torch.tensor([ids]), 4, cache=cache, cached=0)
    assert again[0, len(ids):].tolist() == fresh


def test_model_chat_goes_on_after_its_mtp_cache_is_refused(monkeypatch):
    """With MTP drafts the chat makes the main cache, then the MTP one, whose memory check sees
    what the main one took: refused, the turn was dropped but the main cache kept without it,
    and the next turn ended the chat with an AttributeError. The next turn makes both again."""
    import io

    from dshal.model.chat import ChatSettings, chat
    from dshal.model.text import encode_chat

    dshal.use(backend="cpu")
    model = dshal.model.random_model(dshal.model.tiny_args(num_nextn_predict_layers=1, mtp_layers=1), seed=2)
    tokenizer = _CodePointChat()
    make_cache, refused = model.new_cache, []

    def refuse_the_first_mtp_cache(*args, mtp=False, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if mtp and not refused:
            refused.append(True)
            raise dshal.errors.ArgumentError("new_cache: batch 1 x max_len 1024 needs a KV cache of 1.00 GiB, "
                                             "expected at most the 0.50 GiB free")
        return make_cache(*args, mtp=mtp, **kwargs)

    monkeypatch.setattr(model, "new_cache", refuse_the_first_mtp_cache)
    out = io.StringIO()
    conversation = chat(model, tokenizer, ChatSettings(max_new_tokens=4, speculative=True), _typed("hello", "hello"), out)
    assert "(not answered: new_cache: batch 1 x max_len 1024 needs" in out.getvalue() and conversation.turns == 1
    ids = encode_chat(tokenizer, [{"role": "user", "content": "hello"}])
    fresh = tokenizer.decode(model.generate(torch.tensor([ids]), 4)[0, len(ids):].tolist())
    assert conversation.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": fresh}]
    assert conversation.mtp_cache is not None and conversation.mtp_cache.max_len == conversation.cache.max_len


def test_model_chat_survives_bad_bytes_unknown_commands_ctrl_c_and_the_end_of_its_positions(tmp_path, monkeypatch):
    """Bytes that are not UTF-8 crashed the chat with a tokenizer traceback (and, under TP, broke
    the broadcast); ``/foo`` went to the model as a message; Ctrl-C during an answer ended the
    session (the model reloaded for minutes); an answer that did not fit the positions left
    refused the turn, where DeepSeek-V3's generate.py gives it what is left; a cut answer said nothing."""
    import io
    import json

    from dshal.model import from_pretrained
    from dshal.model.chat import ChatSettings, chat
    from dshal.model.text import load_tokenizer

    _checkpoint_with_tokenizer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    dshal.use(backend="cpu")
    model, tokenizer = from_pretrained(tmp_path), load_tokenizer(tmp_path)
    with pytest.raises(dshal.errors.ArgumentError, match="max_new_tokens is 40, expected fewer than the model's"):
        chat(model, tokenizer, ChatSettings(max_new_tokens=40), _typed(), io.StringIO())
    generate = type(model).generate
    interrupted = []

    def interrupt_once(self, *args, **kwargs):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", interrupt_once)
    out = io.StringIO()
    read = _typed("hello \udcff world", "/foo", "\ufeff/help", "hello world", "hello world")
    conversation = chat(model, tokenizer, ChatSettings(max_new_tokens=30), read, out)
    text = out.getvalue()
    assert text.count("(not sent: the line is not valid UTF-8)") == 1
    assert "(unknown command /foo: /clear, /exit" in text and "(unknown command /help" in text
    assert "(answer stopped: this turn is dropped" in text  # the first "hello world": the chat goes on
    assert conversation.turns == 1 and [m["role"] for m in conversation.messages] == ["user", "assistant"]
    assert "(this answer: at most" in text and "new tokens, where the model's positions end)" in text


def test_model_chat_says_a_turn_it_cannot_answer_and_goes_on(tmp_path):
    import io

    from dshal.model import from_pretrained
    from dshal.model.chat import ChatSettings, chat
    from dshal.model.text import load_tokenizer

    _checkpoint_with_tokenizer(tmp_path)
    dshal.use(backend="cpu")
    model, tokenizer = from_pretrained(tmp_path), load_tokenizer(tmp_path)
    lines = iter(["hello", "world", "/exit", "never read"])
    out = io.StringIO()
    conversation = chat(model, tokenizer, ChatSettings(max_new_tokens=2, temperature=-1.0), lambda _: next(lines), out)
    assert conversation.turns == 0 and conversation.messages == [] and next(lines) == "never read"
    assert out.getvalue().count("(not answered: generate: argument 'temperature' is -1.0, expected a finite number >= 0)") == 2


def test_sampling_defaults_read_the_checkpoints_generation_config(tmp_path):
    from dshal.model.text import sampling_defaults

    assert sampling_defaults(tmp_path) == {}  # no generation_config.json
    config = tmp_path / "generation_config.json"
    config.write_text('{"bos_token_id": 0, "eos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.95}')
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}  # DeepSeek-V3's
    config.write_text('{"do_sample": false, "temperature": 0.6}')
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}  # transformers: greedy
    config.write_text('{"eos_token_id": 1}')
    assert sampling_defaults(tmp_path) == {}
    # transformers and vLLM: top_k 1 is greedy, and do_sample without a temperature samples at 1.0.
    config.write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 1}')
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}
    config.write_text('{"do_sample": true, "top_p": 0.9}')
    assert sampling_defaults(tmp_path) == {"temperature": 1.0, "top_p": 0.9}
    config.write_text('{"temperature": 0.7, "top_k": 20, "min_p": 0.05}')
    defaults = sampling_defaults(tmp_path)
    assert defaults == {"temperature": 0.7, "top_k": 20, "min_p": 0.05} and isinstance(defaults["top_k"], int)
    config.write_text('{"temperature": 0.7, "top_k": 0, "min_p": 0}')  # no cut, as when absent (not transformers' 50)
    assert sampling_defaults(tmp_path) == {"temperature": 0.7}
    config.write_text('{"do_sample": false, "top_k": 20, "min_p": 0.05}')
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}
    for body, said in (('{"temperature": -1}', "temperature is -1, expected a number >= 0"),
                       ('{"top_p": 0}', r"top_p is 0, expected a number in \(0, 1\]"),
                       ('{"temperature": "hot"}', "temperature is 'hot'"), ('{"top_p": true}', "top_p is True"),
                       ('{"top_k": 2.5}', "top_k is 2.5, expected an int >= 0"), ('{"min_p": 1e400}', "min_p is inf"),
                       ('{"top_k": -1}', "top_k is -1, expected an int >= 0"),
                       ('{"min_p": 1.5}', r"min_p is 1.5, expected a number in \[0, 1\]"),
                       ('{"top_k": ' + "9" * 400 + '}', "top_k is 999")):
        config.write_text(body)
        with pytest.raises(dshal.CheckpointError, match=f"generation_config.json: {said}"):
            sampling_defaults(tmp_path)


@pytest.mark.slow
def test_model_dshal_run_text_prompts_sample_as_the_generation_config_says(tmp_path, dshal_here):
    """With --prompt, the checkpoint's temperature / top_p / top_k / min_p apply unless the
    flags are given (as vLLM applies them); the run says where they came from. Random ids stay
    greedy."""
    ckpt = tmp_path / "ckpt"
    _checkpoint_with_tokenizer(ckpt)
    (ckpt / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05}'
    )
    run = ("run", "--checkpoint", str(ckpt), "--new-tokens", "3", "--no-progress", "--graphs", "off", "--json")
    runs = {}
    for name, extra in (("config", ("--prompt", "hello")), ("greedy", ("--prompt", "hello", "--temperature", "0")),
                        ("ids", ("--prompt-len", "4")), ("flags", ("--prompt", "hello", "--top-k", "5", "--min-p", "0"))):
        proc = dshal_here(*run, str(tmp_path / f"{name}.json"), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "note:" not in proc.stderr, proc.stderr[-500:]  # the file's sampling is applied, none left out
        runs[name] = (json.loads((tmp_path / f"{name}.json").read_text()), proc.stdout)
    report, stdout = runs["config"]
    assert (report["temperature"], report["top_p"], report["top_k"], report["min_p"], report["sampling_from"]) == (
        0.6, 0.95, 20, 0.05, "generation_config.json")
    assert ("sampling: temperature 0.6, top-p 0.95, top-k 20, min-p 0.05 (from the checkpoint's generation_config.json; "
            "--temperature 0 for greedy)") in stdout
    report, stdout = runs["flags"]  # the flags override the file, the rest still comes from it
    assert (report["temperature"], report["top_p"], report["top_k"], report["min_p"], report["sampling_from"]) == (
        0.6, 0.95, 5, 0.0, "generation_config.json")
    assert "sampling: temperature 0.6, top-p 0.95, top-k 5 (from the checkpoint's" in stdout
    for name in ("greedy", "ids"):
        report, stdout = runs[name]
        assert (report["temperature"], report["sampling_from"]) == (0.0, None) and "sampling: greedy\n" in stdout


def test_model_a_kimi_k2_checkpoint_reads_its_tokenizer_without_running_its_config_code(tmp_path):
    """Kimi-K2 ships config.json with model_type kimi_k2 (unknown to transformers), an auto_map
    to its configuration code and YaRN rope_scaling. transformers read that config only to pick
    a tokenizer class and died in it (AttributeError: no 'max_position_embeddings'), a traceback
    from `dshal run --prompt`, or offered to run the code on the terminal. A plain tokenizer is
    now read without the config (same ids as the tokenizer itself gives); a shipped tokenizer is
    the documented refusal; a config.json path means its folder."""
    from dshal.model.text import load_tokenizer

    ckpt = tmp_path / "kimi"
    tokenizer = _checkpoint_with_tokenizer(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
                  rope_scaling={"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096})
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "configuration_deepseek.py").write_text("raise RuntimeError('the config code ran')\n")
    read = load_tokenizer(ckpt)
    assert read("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    from dshal.model import from_pretrained

    ids = torch.tensor([read("hello world")["input_ids"]])
    assert torch.equal(from_pretrained(ckpt / "config.json")(ids), from_pretrained(ckpt)(ids))  # was "not safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    done = subprocess.run([sys.executable, "-m", "dshal", "run", "--checkpoint", str(ckpt / "config.json"), "--prompt",
                           "hello", "--new-tokens", "2", "--no-progress"], capture_output=True, text=True, timeout=90,
                          env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and "output: " in done.stdout, done.stderr[-2000:]
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_config))
    # a class transformers has is loaded as that class, the shipped code left alone (as transformers does)
    assert load_tokenizer(ckpt)("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    tok_config["tokenizer_class"] = "TikTokenTokenizer"  # Kimi-K2's: only its shipped code has it
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(dshal.CheckpointError, match="its tokenizer is code the checkpoint ships"):
        load_tokenizer(ckpt)


def test_decode_rate_counts_the_tokens_each_sequence_keeps():
    """A row that stopped at its EOS is padded to the batch's end, and a ragged batch with an
    attention window feeds a row its prompt a position a step: counting every row every step
    reported 2 x 18 tokens where 2 + 18 were kept, and ~6x the output rate with the window."""
    from dshal.model.run import _decode_rate, _decode_span

    stamps = [0.0, 1.0] + [1.0 + 0.5 * i for i in range(1, 19)]  # 20 steps, the last 18 in 9 s
    stopped, full = [7] * 4, [7] * 20
    assert _decode_span(stamps, [stopped, full]) == (2 + 18, 9.0)
    assert _decode_rate(stamps, [full, full]) == 36 / 9.0
    assert _decode_span(stamps[:2], [full]) == (0, 0.0)  # fewer than 3 steps: no rate
    assert _decode_rate(stamps, [[7], [7]]) is None  # no token after step 1: no rate, not 0.0
    # a row fed its prompt for 16 steps first: all 4 of its tokens come after step 1
    assert _decode_span(stamps, [[7] * 4, [7] * 4], [0, 16]) == (2 + 4, 9.0)


def test_model_dshal_run_builds_the_tiny_model_in_the_dtype_asked(tmp_path, capsys):
    """--dtype bfloat16: the kernels a real (bf16) checkpoint runs, where float32 goes to the
    reference on some backends (Ascend's fused attention); a checkpoint keeps its own dtype."""
    from dshal.cli import main

    out = tmp_path / "run.json"
    assert main(["run", "--dtype", "bfloat16", "--prompt-len", "4", "--new-tokens", "2", "--no-progress",
                 "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert (written["schema"], written["dshal_version"]) == ("dshal.run/1", dshal.__version__)
    described = written["model_description"]
    assert described["dtype"] == "bfloat16"
    modes = {part: mode for layer in described["layers"] for part, mode in layer["precision"].items()}
    assert modes["mlp.experts"] == modes["self_attn.o_proj"] == "bfloat16" and modes["mlp.gate"] == "float32"  # the router stays float32
    capsys.readouterr()
    assert main(["run", "--dtype", "float16", "--checkpoint", str(tmp_path), "--no-progress"]) == 1
    assert "--dtype float16 is given with --checkpoint, expected one of them" in capsys.readouterr().err


def test_model_dshal_run_says_why_graphs_and_drafts_captured_nothing(tmp_path, capsys, monkeypatch):
    """On a backend that captures (its graph hook returns another callable, as CUDA's does),
    ``--new-tokens 1`` runs no decode step: the graph line read "n/a tokens/s; ; tokens match"
    and the JSON said ``captured: false`` with an empty why, and the MTP drafts' "its steps not
    captured" with no reason, as if capture had failed. On a backend without device graphs the
    drafts' line gave no reason either, where the graph run's says it."""
    from dshal.backends.cpu import CpuBackend
    from dshal.cli import main

    out = tmp_path / "run.json"
    argv = ["run", "--prompt-len", "4", "--speculative", "mtp", "--graphs", "on", "--no-progress", "--json", str(out)]
    assert main([*argv, "--new-tokens", "2"]) == 0
    drafts = json.loads(out.read_text())["speculative"]
    assert drafts["captured"] is False and drafts["capture_error"] == "backend 'cpu' has no device graphs: its steps ran eagerly"
    assert "its steps not captured: backend 'cpu' has no device graphs" in capsys.readouterr().out

    monkeypatch.setattr(CpuBackend, "graph", lambda self, fn: lambda *inputs: fn(*inputs))  # a capture stand-in
    assert main([*argv, "--new-tokens", "1"]) == 0
    report, said = json.loads(out.read_text()), capsys.readouterr().out
    nothing_ran = "no decode step ran: every sequence ended at the prefill's token"
    assert report["graphs"]["why"] == nothing_ran and report["speculative"]["capture_error"] == nothing_ran
    assert f"decode with graphs: n/a tokens/s; {nothing_ran}; tokens match" in said and "; ;" not in said
    assert f"its steps not captured: {nothing_ran}" in said
