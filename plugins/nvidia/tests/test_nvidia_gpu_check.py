"""benchmarks/gpu_check.py --dry-run: the H200 check script's own code on CPU (emulated
nvidia backend, Triton interpreter, tiny shapes). Figures from it are meaningless; the
test proves every stage runs (device, conformance, GEMM, add+RMSNorm, MoE layer, dshal run)
and the JSON/table are written. Also the carried-wheels plan and the supported versions."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
@pytest.mark.needs_interpreter
def test_nvidia_gpu_check_dry_run(tmp_path, cpu_rowwise_scaled_mm_refusal):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=300, check=False,
        cwd=SCRIPT.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"]["dry_run"] is True and data["device"]["capabilities"]["emulated"] is True
    assert data["device"]["gemm_block_path"] == "triton"
    paths = {r["path"] for r in data["gemm"]}
    assert paths == {"triton", "bf16_matmul", "rowwise_scaled_mm"}  # no cuBLASLt blockwise on CPU
    # torch 2.11's CPU _scaled_mm refuses rowwise scales: that rival's rows then carry the error
    refused = {"rowwise_scaled_mm"} if cpu_rowwise_scaled_mm_refusal else set()
    assert all("us" in r and "error" not in r for r in data["gemm"] if r["path"] not in refused), data["gemm"]
    assert all(r["error"].split(": ", 1)[1][:80] in cpu_rowwise_scaled_mm_refusal
               for r in data["gemm"] if r["path"] in refused), data["gemm"]
    assert all(r["similarity_gap"] < 1e-5 for r in data["gemm"] if r["path"] == "triton")
    norm = data["add_rmsnorm"]
    assert norm["max_abs_err"] < 0.05 and norm["norm_us"] > 0 and norm["copy_us"] > 0
    conf = data["conformance"]
    assert conf["command"].startswith("-m dshal conformance --backend nvidia") and "--tier ci" in conf["command"]
    assert "--budget-s" in conf["command"]  # a cut run still writes its report
    assert conf["returncode"] == 0 and conf["summary"]["failed"] == 0 and conf["summary"]["passed"] > 0
    assert {r["n"] for r in data["gemm"]} == {256, 128} and {r["k"] for r in data["gemm"]} == {256, 200}  # K % 128 != 0 too
    moe = data["moe"]
    assert moe["provider"] == "nvidia" and [r["tokens"] for r in moe["rows"]] == [1, 4]
    assert all("experts_us" in r and "error" not in r for r in moe["rows"]), moe
    assert moe["rows"][0]["similarity_gap"] < 1e-3
    attention = data["attention"]["rows"]  # decode attention as served (guard + SDPA) and SDPA alone
    assert [(r["step"], r["d"]) for r in attention] == [("eager", 48), ("static", 56)]
    assert all("error" not in r and r["served_us"] > 0 and r["sdpa_us"] > 0 and r["similarity_gap"] < 1e-2
               for r in attention), attention
    run = data["run"]
    assert run["returncode"] == 0 and run["emulated"] is True and run["decode_tokens_per_s"] > 0
    assert run["graphs"]["run"] and run["graphs"]["tokens_match_eager"]
    assert run["speculative"]["run"] and run["speculative"]["tokens_match_eager"]  # two-token steps on its kernels
    assert run["reference_inside"] == {}  # every call of the tiny model on the plugin's kernels
    ragged = data["ragged"]  # prompts of different lengths: eager and the per-row static step agree
    assert ragged["tokens_match"] is True and ragged["captured"] is False and ragged["eager_s"] > 0  # no graphs on CPU
    assert ragged["graphs_incl_capture_s"] > 0 and "graphs_off" not in ragged
    sampled = ragged["speculative_sampled"]  # sampled speculative decoding through the graph hook (emulated: none)
    assert sampled["steps"] > 0 and sampled["ids_in_range"] is True and sampled["captured"] is False
    assert ragged["conversation"] == {"tokens_match": True, "captured": False, "capture_error": ""}
    assert data["device"]["supported_versions"]["torch"]["in_range"] is True
    tuned = data["tune"]
    assert tuned["returncode"] == 0 and tuned["entries"] == 2 and tuned["complete"] is True, tuned
    assert json.loads(Path(tuned["table"]).read_text())["dry_run"] is True
    assert set(data["targets"]) == {"fp8_block_vs_bf16_at_4096x7168x16384", "triton_vs_cublaslt_blockwise",
                                    "add_rmsnorm_vs_copy_bandwidth", "decode_graphs_vs_eager"}
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("target decode_graphs_vs_eager")  # the table comes last
    assert any("DRY RUN" in line for line in last)


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    """One stage's bug on the real device must not cost the rest of the GPU window."""
    gpu_check = _load_script()
    check = gpu_check.Check(tmp_path, budget_s=60)
    ran: list[str] = []
    said: list[str] = []

    def broken_stage() -> None:
        raise RuntimeError("device property L2_cache_size missing")

    stages = [("a", lambda: ran.append("a"), lambda: "a ok"), ("b", broken_stage, lambda: "b ok"),
              ("c", lambda: ran.append("c"), lambda: "c ok")]
    assert gpu_check.run_stages(check, stages, said.append) == ["b"]
    assert ran == ["a", "c"] and said[0] == "a ok" and said[2] == "c ok"
    assert said[1].startswith("b: FAILED RuntimeError: device property L2_cache_size missing")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "broken_stage" in saved["stage_errors"]["b"] and "L2_cache_size" in saved["stage_errors"]["b"]
    assert set(saved["stage_errors"]) == {"b"}


def test_gpu_check_targets_count_only_rows_that_match_the_reference():
    """A path timed on a shape it computes wrongly (cuBLASLt blockwise at K = 7200 on a torch
    that accepts its scales with another stride) moved the headline ratio."""
    gpu_check = _load_script()
    rows = [{"m": 4096, "n": 7168, "k": 16384, "path": "triton", "us": 60.0, "similarity_gap": 1e-6},
            {"m": 4096, "n": 7168, "k": 16384, "path": "torch_blockwise", "us": 10.0, "similarity_gap": 0.4}]
    assert gpu_check._best(rows, 4096, 7168, 16384, "triton") == 60.0
    assert gpu_check._best(rows, 4096, 7168, 16384, "torch_blockwise") is None


def test_gpu_check_rotates_enough_weight_copies_to_miss_l2():
    """Decode-size GEMMs read mostly weights; four copies at most (the old cap) left three of
    DeepSeek-V3's shapes under twice an H100's L2 and five under an H200's, so their figures
    included L2 hits."""
    gpu_check = _load_script()
    for l2 in (50 * 2**20, 60 * 2**20):  # H100, H200 (as torch reports them)
        for n, k in gpu_check.GEMM_SHAPES:
            copies = gpu_check.copies_for(1 * k + n * k, l2)
            assert gpu_check.weight_copies(copies, n, k) * n * k >= 2 * l2, (n, k, l2)


def test_gpu_check_late_stages_respect_the_budget(tmp_path):
    """With the budget spent, dshal run, the ragged batch and tuning are skipped (recorded),
    not started with a floor of 30-60 s each: the device tool stops the command at 600 s and
    the summary, written last, would be lost."""
    gpu_check = _load_script()
    check = gpu_check.Check(tmp_path, budget_s=0)
    t0 = time.monotonic()
    gpu_check.stage_run(check, dry_run=False)
    gpu_check.stage_ragged(check, None, dry_run=False)  # skipped before touching the backend
    gpu_check.stage_tune(check, dry_run=False)
    assert time.monotonic() - t0 < 5
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(saved[stage]["skipped"] == "time budget" for stage in ("run", "ragged", "tune")), saved


def test_gpu_check_install_plan():
    """--wheels installs dshal's three distributions and only the carried dependencies the
    machine's python lacks; a missing wheel is reported, not discovered by pip."""
    gpu_check = _load_script()
    wheels = ["dshal-0.1.0-py3-none-any.whl", "dshal_nvidia-0.1.0-py3-none-any.whl",
              "dshal_conformance-0.1.0-py3-none-any.whl", "stevedore-5.10.0-py3-none-any.whl",
              "rich-15.0.0-py3-none-any.whl", "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.whl"]
    present = {"rich", "markdown_it", "mdurl", "pygments", "numpy"}
    install, missing = gpu_check.install_plan(present, wheels)
    assert install == ["dshal", "dshal-nvidia", "dshal-conformance", "stevedore", "pyyaml"] and missing == []
    install, missing = gpu_check.install_plan({"numpy"}, wheels)
    assert set(missing) == {"markdown-it-py", "mdurl", "pygments"}
    # jsonschema (and its binary rpds-py) is not carried: conformance runs without it
    assert "jsonschema" not in gpu_check.CARRIED.values()


def test_gpu_check_wheels_install_is_seen_from_a_venv_python(tmp_path):
    """The GPU machine's python3 is itself a venv holding torch. ``--wheels`` must install
    beside it so that the rerun sees both that torch and the carried dshal; a venv made from
    a venv (the old way) saw neither torch nor Triton. Here the test's own python (CI's venv)
    plays that python: dshal's three wheels are built locally (no network), installed by the
    script, and ``--stack`` reports where each package came from."""
    setuptools = importlib.metadata.version("setuptools") if importlib.util.find_spec("setuptools") else None
    if setuptools is None or tuple(int(p) for p in setuptools.split(".")[:2]) < (70, 1):
        pytest.skip(f"building dshal's wheels offline needs setuptools >= 70.1 (its own bdist_wheel) here; found {setuptools}")
    wheels, out, src = tmp_path / "wheels", tmp_path / "out", tmp_path / "src"
    repo = SCRIPT.parents[1]
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests")  # a copy: no build/ left in the tree
    src.mkdir()
    shutil.copy2(repo / "pyproject.toml", src / "pyproject.toml")
    shutil.copy2(repo / "README.md", src / "README.md")
    for part in ("dshal", "conformance", "plugins/nvidia"):
        shutil.copytree(repo / part, src / part, ignore=skip)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
         str(src), str(src / "plugins" / "nvidia"), str(src / "conformance")],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_") and k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["OUT"] = str(out)
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--wheels", str(wheels), "--site", str(site), "--stack"], env=env,
                          capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    facts = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert not out.exists()  # nothing written where the device tool sends files back
    assert facts["python"] == sys.executable
    for own in ("dshal", "dshal_nvidia", "dshal_conformance"):
        assert Path(facts["from"][own]).parent == site, facts["from"]
    import torch

    assert Path(facts["from"]["torch"]) == Path(torch.__file__).parent  # the python's own torch, still seen
    assert facts["versions"]["torch"]["installed"] == importlib.metadata.version("torch")
    assert [b for b in facts["backends"] if b.startswith("nvidia ")] == ["nvidia (dshal_nvidia:NvidiaBackend)"]


@pytest.mark.parametrize("package, version, ok", [
    ("torch", "2.11.0+cu130", True), ("torch", "2.13.0+cpu", True), ("torch", "2.10.1", False), ("torch", "2.14.0", False),
    ("triton", "3.6.0", True), ("triton", "3.9.0", True), ("triton", "3.5.1", False),
])
def test_supported_versions_cover_the_gpu_machine_and_ci(package, version, ok):
    from dshal.versions import in_range

    assert in_range(package, version) is ok


def test_installed_stack_is_supported():
    """CI's torch and Triton are inside the declared ranges (the GPU machine's 2.11/3.6 are
    the ranges' lower ends: checked by gpu_check's device stage there)."""
    from dshal.versions import stack_report

    report = stack_report()
    assert report["torch"]["in_range"] is True, report
    if report["triton"]["installed"] is not None:
        assert report["triton"]["in_range"] is True, report


@pytest.mark.parametrize("version, refused", [("3.6.0", True), ("3.7.0", True), ("3.8.0", False), ("3.9.0", False), (None, False)])
def test_interpreter_minimum_follows_what_each_interpreter_ran(version, refused):
    """3.6 and 3.7's interpreters failed dshal's kernel tests here (no fp8e4b8; 3.6 + numpy 2.4
    also on loop bounds); 3.8 and 3.9 passed them all (see dshal/versions.py)."""
    from dshal.versions import interpreter_refusal

    why = interpreter_refusal(version)
    assert (why is not None) is refused
    if refused:
        assert f"Triton {version}" in why and "triton>=3.8" in why and "e4m3fnuz" in why


@pytest.mark.needs_interpreter
def test_emulated_backend_names_the_interpreter_it_runs_on():
    """The installed Triton (CI's) is new enough: emulated nvidia is available, and its
    availability comes from the same check."""
    from dshal.versions import installed, interpreter_refusal
    from dshal_nvidia import NvidiaBackend

    if installed("triton") is None:
        pytest.skip("triton is not installed: emulated mode is unavailable for that reason instead")
    assert interpreter_refusal(installed("triton")) is None
    availability = NvidiaBackend(emulate=True).availability()
    assert availability.ok and availability.emulated, availability.reason
