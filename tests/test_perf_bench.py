"""``dshal bench``: it runs, its FLOP/s and bytes/s match independent counts, its HTML
holds the plots and rows, and its shape files are validated with file:line errors."""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch

import dshal
from dshal.backend import Availability, Capabilities
from dshal.backends.cpu import CpuBackend
from dshal.cli import main as cli
from dshal.errors import ConfigError, DshalError
from dshal.ops.catalogue import SPECS
from dshal.ops.spec import Cost
from dshal.perf.bench import input_set_count, load_shapes_file, shape_cases, torch_rival
from dshal.perf.measure import Repeats, Stats, perf_counter_clock, place, resolve_peaks, time_calls
from dshal.perf.report import read_report

# No --min-runs: the default floor (5) follows a smaller --runs (it was refused, naming --min-runs).
FAST = ["--warmup", "1", "--runs", "3", "--time-per-case", "0", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One CLI run on linear + rms_norm (5 ci cases), shared by the report checks."""
    out = tmp_path_factory.mktemp("bench")
    rc = cli(["bench", "--backend", "cpu", "--ops", "linear,rms_norm", "--output", str(out / "r.html"), *FAST])
    return rc, out / "r.html", json.loads((out / "r.json").read_text())


def test_bench_cli_writes_report_and_json(bench_run):
    rc, html_path, report = bench_run
    assert rc == 0
    assert report["schema"] == "dshal.bench/1" and report["backend"] == "cpu"
    assert [c["op"] for c in report["cases"]] == ["linear"] * 3 + ["rms_norm"] * 2
    for case in report["cases"]:
        backend = case["providers"]["backend"]
        assert backend["runs"] == 3 and backend["p10_s"] <= backend["median_s"] <= backend["p90_s"]
        assert case["input_sets"] >= 2, "inputs must rotate between calls"
        assert "median_s" in case["providers"]["reference"]
        assert case["speedup"]["reference"] == pytest.approx(
            case["providers"]["reference"]["median_s"] / backend["median_s"]
        )
    # The CPU declares no peaks: they were measured, and say so.
    assert report["peaks"]["sources"]["bandwidth"] == "measured" and report["peaks"]["bandwidth"] > 0
    assert report["peaks"]["sources"]["fp32"] == "measured"


def test_bench_flops_and_bytes_match_independent_counts(bench_run):
    _, _, report = bench_run
    checked = 0
    for case in report["cases"]:
        p, b = case["params"], case["providers"]["backend"]
        if case["op"] == "linear":
            flops = 2 * p["m"] * p["n"] * p["k"]  # GEMM: one multiply + one add per (m, n, k)
        else:
            (t, h), residual = p["shape"], p.get("residual", False)
            elems = t * h
            flops = 4 * elems + (elems if residual else 0)  # square, sum, normalize, weight (+ residual add)
            size = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
            # reads x (and residual), writes y (and the sum), reads the weight once
            moved = elems * size * (4 if residual else 2) + h * size
            assert case["cost"]["bytes"] == moved
            assert b["bytes_per_s"] == pytest.approx(moved / b["median_s"], rel=1e-9)
        assert case["cost"]["flops"] == flops
        assert b["flops_per_s"] == pytest.approx(flops / b["median_s"], rel=1e-9)
        torch_entry = case["providers"]["torch"]
        if "median_s" in torch_entry:
            assert torch_entry["flops_per_s"] == pytest.approx(flops / torch_entry["median_s"], rel=1e-9)
        checked += 1
    assert checked == 5


def test_bench_html_holds_plots_and_rows(bench_run):
    _, html_path, report = bench_run
    parser = read_report(html_path.read_text())
    assert parser.svgs + parser.imgs >= 2, "roofline and latency plots"
    assert parser.external == [], "self-contained: nothing fetched from the network"
    ids = [c["id"] for c in report["cases"]]
    rows = {r[0]: r for r in parser.rows if r and r[0] in ids}
    assert set(rows) == set(ids)
    for c in report["cases"]:
        assert rows[c["id"]][5].endswith("%")  # % roofline column filled
    assert any(r[:1] == ["linear"] for r in parser.rows)  # op providers table


def test_bench_summary_keeps_every_figure_in_a_narrow_terminal(bench_run, capsys, monkeypatch):
    """In a 60-column terminal (a tmux pane) rich printed every figure of the summary table as
    "…", and at 80 columns it cut them."""
    import io
    import re
    import sys

    from dshal.perf.bench import print_summary

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def words(text: str) -> set[str]:
        return set(re.sub(r"[\u2500-\u257f]", " ", re.sub(r"\x1b\[[0-9;]*m", "", text)).split())

    report = bench_run[2]
    monkeypatch.delenv("COLUMNS", raising=False)
    print_summary(report)  # to pytest's capture: not a terminal
    wide = capsys.readouterr().out
    for case in report["cases"]:  # one line per case, for grep
        assert "FLOP/s" in next(line for line in wide.splitlines() if case["id"] in line)
    for columns in ("60", "80"):
        monkeypatch.setenv("COLUMNS", columns)
        monkeypatch.setattr(sys, "stdout", Terminal())
        print_summary(report)
        narrow = sys.stdout.getvalue()
        assert "…" not in narrow
        assert words(narrow) == words(wide), f"COLUMNS={columns}: lost {words(wide) - words(narrow)}"


def test_bench_ci_shapes_cover_every_op_and_finish(tmp_path):
    """Every op of the catalogue has a ci case, and the whole ci set runs on the cpu backend
    well inside the 2-minute budget (here with few runs; RESULTS.md has default settings)."""
    cases = shape_cases("ci")
    assert {c.op for c in cases} == set(SPECS)
    rc = cli(["bench", "--backend", "cpu", "--output", str(tmp_path / "ci.html"), "--no-reference", *FAST])
    report = json.loads((tmp_path / "ci.json").read_text())
    assert rc == 0
    assert len(report["cases"]) == len(cases)
    assert all("median_s" in c["providers"]["backend"] for c in report["cases"])
    assert report["duration_s"] < 120


def test_full_shapes_use_deepseek_v3_dims():
    cases = shape_cases("full")
    assert {c.op for c in cases} == set(SPECS)
    assert {c.label for c in shape_cases("ci")} < {c.label for c in cases}  # full includes the ci rows
    experts = [c.params for c in cases if c.op == "moe_experts" and "full" in c.row.tiers and "ci" not in c.row.tiers]
    assert [(p["h"], p["i"], p["e"], p["k"]) for p in experts] == [(7168, 2048, 256, 8)]
    decode = [c.params for c in cases if c.op == "attention" and c.params["tq"] == 1 and c.params["hq"] == 128]
    assert decode and decode[0]["d"] == 512 + 64 and decode[0]["hk"] == 1  # absorbed MLA: latent + rope


def test_torch_direct_columns_compute_the_same_thing(cpu_rowwise_scaled_mm_refusal):
    """The side-by-side torch calls are fair rivals: they agree with the reference. (Where
    this torch's CPU ``_scaled_mm`` refuses rowwise scales, the bench reports that rival's
    error instead; those cases are left out here.)"""
    device = torch.device("cpu")
    found = 0
    for case in shape_cases("ci"):
        direct = torch_rival(case)
        if direct is None:
            continue
        if cpu_rowwise_scaled_mm_refusal and case.op == "fp8_gemm" and case.params.get("granularity") == "row":
            continue
        args, kwargs = case.inputs(device, 0)
        want = getattr(dshal.ops.reference, case.op)(*args, **kwargs)
        got = direct[1](*args, **kwargs)
        want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
        tol = 2e-2 if want.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=case.label)
        found += 1
    assert found >= 8


def test_time_calls_cycles_every_input_set():
    seen: list[int] = []
    sets = [((i,), {}) for i in range(3)]
    stats = time_calls(seen.append, sets, perf_counter_clock, Repeats(warmup=2, min_runs=7, max_runs=7, budget_s=0))
    assert stats.runs == 7
    assert seen == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # warm-up included; never the same set twice in a row
    assert gc.isenabled()  # paused while timing only


def test_input_set_count():
    assert input_set_count(1000) == 8
    assert input_set_count(40 << 20) == 2
    assert input_set_count(2 << 30) == 1
    assert input_set_count(1000, requested=3) == 3
    with pytest.raises(DshalError, match="--rotate"):
        input_set_count(1000, requested=0)


def test_stats_percentiles():
    s = Stats.of([float(i) for i in range(1, 102)])
    assert (s.median, s.p10, s.p90, s.min, s.runs) == (51.0, 11.0, 91.0, 1.0, 101)


def test_roofline_placement():
    peak_flops, bandwidth = 100e12, 1e12  # ridge at 100 FLOP/byte
    mem = place(Cost(flops=1e9, bytes=1e9), 1e-3, peak_flops, bandwidth)  # intensity 1
    assert mem.bound == "memory" and mem.attainable_flops_per_s == pytest.approx(1e12)
    assert mem.percent == pytest.approx(100 * 1e12 / 1e12)
    comp = place(Cost(flops=1e12, bytes=1e9), 0.02, peak_flops, bandwidth)  # intensity 1000
    assert comp.bound == "compute" and comp.percent == pytest.approx(50.0)
    unknown = place(Cost(1.0, 1.0), 1.0, None, None)
    assert unknown.bound == "unknown" and math.isnan(unknown.percent)


class _DeclaredPeaks(CpuBackend):
    @property
    def name(self) -> str:
        return "declared"

    def availability(self) -> Availability:
        return Availability(True, "test")

    def capabilities(self) -> Capabilities:
        return Capabilities(peak_flops={"bf16": 1e15, "fp8": 2e15}, peak_bandwidth=3e12)


def test_declared_peaks_are_used_and_missing_ones_measured():
    backend = _DeclaredPeaks()
    peaks = resolve_peaks(backend, torch.device("cpu"), {"bf16", "fp8"})
    assert peaks.flops == {"bf16": 1e15, "fp8": 2e15} and peaks.bandwidth == 3e12
    assert set(peaks.sources.values()) == {"capabilities"}
    peaks = resolve_peaks(backend, torch.device("cpu"), {"int8"})  # not declared: stands in from bf16
    assert peaks.flops["int8"] == 1e15 and peaks.sources["int8"] == "stand-in: bf16 (capabilities)"


def test_shapes_file_loads(tmp_path):
    f = tmp_path / "shapes.yaml"
    f.write_text("cases:\n  - {op: linear, m: 4, n: 8, k: 16, dtype: float32}\n  - op: attention\n    b: 1\n    hq: 4\n    tq: 8\n    d: 16\n")
    cases = load_shapes_file(f)
    assert [c.label for c in cases] == ["linear/m=4, n=8, k=16, dtype=float32", "attention/b=1, hq=4, tq=8, d=16"]
    assert cases[0].params["dtype"] is torch.float32
    _, kwargs = cases[1].inputs(torch.device("cpu"), 0)
    assert kwargs["k"].shape == (1, 4, 8, 16) and kwargs["v"].shape == (1, 4, 8, 16)  # hk, tk, dv follow hq, tq, d


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("cases:\n  - {op: linear, m: 4, n: 8, k: 16}\n  - {op: nope, m: 1}\n", 3, ["op", "'nope'", "linear"]),
        ("cases:\n  - op: linear\n    m: 4\n    n: -8\n    k: 16\n", 4, ["n", "-8", ">= 0"]),
        ("cases:\n  - op: linear\n    n: 8\n    k: 16\n    weight: fp9\n", 5, ["weight", "'fp9'", "fp8-block", "float"]),
        ("cases:\n  - op: linear\n    n: 8\n    k: 16\n    dtype: bf16\n", 5, ["dtype", "'bf16'", "bfloat16"]),
        (
            "cases:\n  - op: rms_norm\n    shape: [4, 8]\n    colour: red\n",
            4,
            ["colour", "unknown parameter", "residual"],
        ),
        ("cases:\n  - op: rms_norm\n    residual: true\n", 2, ["'shape'"]),
        ("cases:\n  - op: rms_norm\n    shape: [4, -8]\n", 3, ["shape", "[4, -8]", "integers >= 0"]),
        ("cases:\n  - op: quantize_fp8\n    shape: [4, 8]\n    block: [1, -2]\n", 4, ["block", "[1, -2]", "integers >= -1"]),
        ("shapes:\n  - {op: rms_norm}\n", 1, ["shapes", "'cases'"]),
        ("cases: [\n", 2, ["invalid YAML"]),
    ],
)
def test_shapes_file_errors_name_file_and_line(tmp_path, text, line, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_shapes_file(f)
    assert str(info.value).startswith(f"{f}:{line}: "), str(info.value)
    for word in words:
        assert word in str(info.value)


def test_bench_cli_rejects_bad_options(tmp_path, capsys):
    assert cli(["bench", "--backend", "cpu", "--shapes", "huge", "--output", str(tmp_path / "x.html")]) == 1
    assert "--shapes: got 'huge', expected ci, full" in capsys.readouterr().err
    assert cli(["bench", "--backend", "cpu", "--ops", "linear,nope", "--output", str(tmp_path / "x.html")]) == 1
    assert "--ops: got 'nope'" in capsys.readouterr().err
    assert cli(["bench", "--backend", "cpu", "--runs", "0", "--output", str(tmp_path / "x.html")]) == 1
    assert "--runs: got 0, expected a number >= 1" in capsys.readouterr().err
    # said once, before any case: each case used to report "--rotate: got 0" as its own error
    for flags, said in ((["--rotate", "0"], "--rotate: got 0, expected a number >= 1"),
                        (["--min-runs", "10", "--runs", "2"], "--min-runs: got 10, expected at most --runs (2)"),
                        (["--ops", ""], "--ops: got '', expected op names")):  # fmt: skip
        assert cli(["bench", "--backend", "cpu", *flags, "--output", str(tmp_path / "x.html")]) == 1
        assert said in capsys.readouterr().err
    assert not Path(tmp_path / "x.html").exists()


def test_bench_reports_a_failing_case_and_goes_on(tmp_path):
    """A case the backend rejects (the op's own checks) or whose inputs cannot be built is a
    result with its error; the other cases still run and the exit status says it failed."""
    shapes = tmp_path / "s.yaml"
    shapes.write_text(
        "cases:\n"
        "  - {op: dequantize_fp8, shape: [4, 256], block: [0, 128]}\n"  # a zero block: no inputs
        "  - {op: moe_gate, t: 4, e: 6, top_k: 2, n_group: 4, topk_group: 2, routed_scaling_factor: 1.0}\n"  # 6 experts in 4 groups: ShapeError from the op
        "  - {op: rms_norm, shape: [4, 8]}\n"
        "  - {op: quantize_fp8, shape: [4, 256], block: [0, 128]}\n"  # refused by the op before its cost model divides by 0
    )
    rc = cli(["bench", "--backend", "cpu", "--shapes", str(shapes), "--output", str(tmp_path / "f.html"), *FAST])
    report = json.loads((tmp_path / "f.json").read_text())
    assert rc == 1
    errors = [c["providers"]["backend"].get("error", "") for c in report["cases"]]
    assert errors[0].startswith("building inputs failed")
    assert errors[1].startswith("ShapeError: moe_gate: argument 'n_group' is 4")
    assert errors[2] == "" and "median_s" in report["cases"][2]["providers"]["backend"]
    assert errors[3].startswith("ArgumentError: quantize_fp8: argument 'block' is (0, 128)")


def test_bench_whose_every_case_fails_says_so_on_stderr_only(tmp_path):
    """The failure line went to stdout among the results, and with no case measured matplotlib
    warned twice on stderr ("No artists with labels found to put in legend")."""
    import subprocess
    import sys

    shapes = tmp_path / "s.yaml"
    shapes.write_text("cases:\n  - {op: rms_norm, shape: [4, 256], eps: -1.0}\n")  # refused by the op
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}  # DSHAL_LOG would add lines
    done = subprocess.run([sys.executable, "-m", "dshal", "bench", "--backend", "cpu", "--shapes", str(shapes),
                           "--output", str(tmp_path / "f.html"), *FAST], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "failed on the backend" not in done.stdout and "report: " in done.stdout
    assert done.stderr == "dshal bench: 1 case(s) failed on the backend: rms_norm/shape=[4, 256], eps=-1.0\n"


@pytest.mark.needs_interpreter
def test_bench_emulate_flag_runs_a_gpu_plugins_own_code(tmp_path):
    """`--emulate` (as conformance and diff take it) benches the nvidia plugin's kernels on CPU
    tensors; bench's own error for the plugin pointed at DSHAL_EMULATE=1 with no flag to match."""
    pytest.importorskip("dshal_nvidia", reason="the dshal-nvidia plugin is not installed")
    shapes = tmp_path / "s.yaml"
    shapes.write_text("cases:\n  - {op: rms_norm, shape: [4, 128]}\n")
    out = tmp_path / "e.html"
    rc = cli(["bench", "--backend", "nvidia", "--emulate", "--shapes", str(shapes), "--output", str(out), *FAST])
    report = json.loads(out.with_suffix(".json").read_text())
    assert rc == 0 and report["backend"] == "nvidia" and report["emulated"] is True
    assert "median_s" in report["cases"][0]["providers"]["backend"]


def test_bench_names_cases_above_their_roofline():
    """A figure over 100 % of roofline (seen at 177 % with a re-measured host bandwidth) is
    named with its likely causes, not printed as if it were an achievement."""
    from dshal.perf.bench import above_roofline

    def case(name: str, percent: float | None) -> dict:
        return {"id": name, "providers": {"backend": {"roofline_percent": percent}}}

    report = {"cases": [case("a", 58.0), case("b", 177.0), case("c", None), {"id": "d", "providers": {"backend": {"error": "x"}}}]}
    assert above_roofline(report) == ["b"]


def test_bench_names_cases_whose_spread_makes_their_ratios_rough():
    from dshal.perf.bench import NOISY_SPREAD, noisy_cases

    def entry(median: float, p10: float, p90: float) -> dict:
        return {"median_s": median, "p10_s": p10, "p90_s": p90}

    steady, jumpy = entry(1e-3, 0.95e-3, 1.1e-3), entry(1e-3, 0.9e-3, 1e-3 * (1.0 + NOISY_SPREAD))
    report = {"cases": [
        {"id": "steady", "providers": {"backend": steady, "reference": steady}},
        {"id": "backend-noisy", "providers": {"backend": jumpy, "reference": steady}},
        {"id": "peer-noisy", "providers": {"backend": steady, "torch": jumpy, "reference": None}},
        {"id": "failed", "providers": {"backend": {"error": "x"}}},
    ]}
    assert noisy_cases(report) == ["backend-noisy", "peer-noisy"]


def test_threads_and_cores_follow_the_cpus_this_process_may_use():
    """Under `taskset -c 0` (or a container's cpuset) on a bigger machine, `--threads 2` was
    taken and the report said "cores": 2: an oversubscribed run that looked normal. The count is
    the process's CPU affinity now, as `dshal info` shows ("1 of 2 cores")."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs CPU affinity and at least 2 usable CPUs to pin a child to one")
    one = min(os.sched_getaffinity(0))
    script = ("import sys\n"
              "from dshal.backend import host_cpus\n"
              "from dshal.perf.report import platform_info, set_threads\n"
              "assert host_cpus() == 1 and platform_info()['cores'] == 1\n"
              "set_threads(2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "--threads: got 2, expected an integer in [1, 1] (the CPUs this process may use)" in done.stderr
