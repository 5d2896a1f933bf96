"""torch_npu version -> op-plugin release, the minimum release, and what dshal info reports.

The availability decision is tested on the version data (``release_gate``), never by faking an NPU.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dshal.plugin import SPECS
from dshal_ascend import AscendBackend, probe
from dshal_ascend.probe import release_gate
from dshal_ascend.releases import (
    KERNELS,
    MINIMUM_RELEASE,
    MINIMUM_TORCH_NPU,
    OP_KERNELS,
    RELEASE_BY_NAME,
    RELEASES,
    kernel_features,
    main,
    parse_cann_version,
    plan_ops,
    release_for,
    release_of,
)
from dshal_ascend.schema import recorded_releases, recorded_signatures


def test_ascend_torch_npu_versions_map_to_releases():
    assert release_of("2.4.0.post2").release.name == "6.0.0"
    assert release_of("2.5.1").release.name == "7.0.0"
    assert release_of("2.5.1.post1").release.name == "7.1.0"
    assert release_of("2.6.0.post4").release.name == "7.2.0"  # between listed builds: the older release
    assert release_of("2.9.0+gitabc").release.name == "7.3.0"
    newer = release_of("2.13.0")
    assert newer.supported and newer.release.name == "26.1.0" and "newer" in newer.reason


def test_ascend_26_x_torch_npu_versions_map_to_releases():
    """release_notes.md of Ascend/pytorch v2.7.1-26.0.0 / v2.7.1-26.1.0: 26.0.0 = CANN 9.0.0,
    26.1.0 = CANN 9.1.0; later posts of a line take the later release, earlier ones stay 7.3.0."""
    expected = {
        "2.7.1.post2": "7.3.0", "2.7.1.post3": "7.3.0", "2.7.1.post4": "26.0.0", "2.7.1.post8": "26.1.0",
        "2.8.0.post4": "26.0.0", "2.8.0.post9": "26.0.0",  # 26.1.0 has no torch 2.8 build
        "2.9.0": "7.3.0", "2.9.0.post1": "7.3.0", "2.9.0.post2": "26.0.0", "2.9.0.post6": "26.1.0",
        "2.10.0": "26.0.0", "2.10.0.post3": "26.0.0", "2.10.0.post4": "26.1.0", "2.11.0": "26.1.0", "2.12.0": "26.1.0",
    }
    for version, release in expected.items():
        match = release_of(version)
        assert match.supported and match.release.name == release, (version, match)
    assert {r.name: r.cann for r in RELEASES}.items() >= {"26.0.0": "9.0.0", "26.1.0": "9.1.0"}.items()
    assert "op-plugin release 26.1.0 (CANN 9.1.0)" == release_of("2.12.0").reason


def test_ascend_pre_release_builds_of_new_torch_lines_stay_planned_as_7_3_0():
    """The README lists torch_npu 2.10.0rc2 / 2.11.0rc1 / 2.12.0rc1 with CANN 8.5.0 (no release
    branch): planned as 7.3.0, as before 26.x was recorded (they would "predate 6.0.0" otherwise),
    as is an unlisted older build of such a line; lines of releases up to 7.3.0 keep "predates"."""
    for version in ("2.10.0rc2", "2.11.0rc1", "2.12.0rc1", "2.10.0rc1"):
        match = release_of(version)
        assert match.supported and match.release.name == "7.3.0", (version, match)
    assert "CANN 8.5.0" in release_of("2.11.0rc1").reason and "newer" in release_of("2.10.0rc1").reason
    # A later build of a listed torch line: the newest release listing an earlier build of it
    # (2.11.1 and 2.10.1 went to 26.0.0 while 2.11.0 and 2.10.0.post4 are 26.1.0's).
    for version, release in (("2.10.5", "26.1.0"), ("2.11.1", "26.1.0"), ("2.10.1", "26.1.0"), ("2.9.5", "26.1.0"),
                             ("2.8.1", "26.0.0"), ("2.5.2", "7.1.0")):
        match = release_of(version)
        assert match.supported and match.release.name == release, (version, match)
        line = ".".join(version.split(".")[:2])
        assert f"is a later build of torch {line} than op-plugin {release} lists" in match.reason, match.reason
    for version in ("2.6.0rc1", "2.9.0rc1", "2.5.0", "2.4.0rc1"):
        match = release_of(version)
        assert not match.supported and "predates" in match.reason, (version, match)


def test_ascend_cann_versions_parse_in_release_order():
    ordered = ["8.0.RC2", "8.0.RC3", "8.0.0", "8.1.RC1", "8.2.RC1.alpha003", "8.2.RC1.beta1", "8.2.RC1",
               "8.3.RC1", "8.5.0", "9.0.0", "9.1.0"]
    keys = [parse_cann_version(v) for v in ordered]
    assert None not in keys and keys == sorted(keys) and len(set(keys)) == len(keys)
    assert parse_cann_version(" 8.0.rc3 ") == parse_cann_version("8.0.RC3")
    assert parse_cann_version("7.0.0.5.242") == parse_cann_version("7.0.0")  # version.cfg's build digits
    assert [parse_cann_version(v) for v in ("", "CANN", "8", "8.x.0", "RC1", "9.0.0-beta.1", "8.3.RC1.alpha001abc")] == [None] * 7
    # the table's CANN versions grow with its releases (so "not newer" picks a prefix of it)
    assert [r.name for r in sorted(RELEASES, key=lambda r: parse_cann_version(r.cann))] == [r.name for r in RELEASES]


def test_ascend_release_steps_down_to_what_the_installed_cann_has():
    """Every (torch_npu, CANN) pair of the release table: the torch_npu version's release when
    the installed CANN is at least its CANN, else the newest release of the installed CANN;
    below the minimum's CANN, unsupported with the reason. Unknown CANN: torch_npu alone."""
    minimum = RELEASE_BY_NAME[MINIMUM_RELEASE]
    for own_release in RELEASES:
        for version in own_release.torch_npu:
            alone = release_of(version)
            assert release_for(version, None) == alone
            if not alone.supported:
                assert all(not release_for(version, r.cann).supported for r in RELEASES)
                continue
            own = alone.release
            for installed in RELEASES:
                got = release_for(version, installed.cann)
                want = own if installed.key >= own.key else installed
                if want.key < minimum.key:
                    assert not got.supported
                    assert f"CANN {installed.cann} is installed" in got.reason and f"minimum op-plugin {MINIMUM_RELEASE}" in got.reason
                    continue
                assert got.supported and got.release is want, (version, installed.cann, got)
                stepped = f"planned as op-plugin {want.name} (CANN {want.cann}), the newest release whose CANN"
                assert (stepped in got.reason) == (want is not own), got.reason
    odd = release_for("2.5.1", "CANN-next")
    assert odd.release.name == "7.0.0" and "'CANN-next' not understood: not compared" in odd.reason


@pytest.mark.parametrize("torch_npu, cann, release", [
    ("2.5.1", "8.0.0", "6.0.0"),  # 7.0.0 wants 8.1.RC1
    ("2.9.0", "8.2.RC1", "7.1.0"),
    ("2.6.0.post3", "8.2.RC1.alpha003", "7.0.0"),  # an alpha of 8.2.RC1 precedes 7.1.0's 8.2.RC1
    ("2.6.0.post3", "8.3.RC1.beta2", "7.1.0"),
    ("2.10.0", "8.5.0", "7.3.0"),
    ("2.10.0", "9.0.1", "26.0.0"),
    ("2.4.0.post2", "8.0.RC3", None),  # older than the minimum's CANN 8.0.0
])
def test_ascend_release_for_cann_builds_between_the_table_rows(torch_npu, cann, release):
    got = release_for(torch_npu, cann)
    assert got.supported == (release is not None)
    assert (got.release.name if got.supported else None) == release


def test_ascend_release_older_than_minimum_is_unavailable_with_reason():
    probe, match = release_gate("2.4.0")  # op-plugin 6.0.rc3, CANN 8.0.RC3
    assert probe is not None and not probe.ok and match.release.name == "6.0.rc3"
    assert "older than the minimum 6.0.0" in probe.reason and MINIMUM_TORCH_NPU in probe.reason
    probe, _ = release_gate("2.3.1.post4")  # torch 2.3 line
    assert probe is not None and not probe.ok and "predates" in probe.reason
    probe, match = release_gate("2.5.1")
    assert probe is None and match.supported


def test_ascend_npu_extra_pins_the_minimum_release():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["npu"] == [f"torch_npu>={MINIMUM_TORCH_NPU}"]
    assert MINIMUM_RELEASE == recorded_releases()[0]
    assert all(r.name in recorded_releases() for r in RELEASES if r.key >= RELEASES[1].key)


def test_ascend_plan_follows_release_facts():
    old, new, relaxed = (plan_ops(kernel_features(r)) for r in ("6.0.0", "7.1.0", "7.2.0"))
    assert "[half mode only]" in old["rotary_embedding"].path and "rotary_mode='half'" in new["rotary_embedding"].path
    assert "256 experts" in new["moe_gate"].why and "2048" in relaxed["moe_gate"].why
    assert "reference" in old["int8_gemm"].why and "int32 output" in new["int8_gemm"].why
    assert kernel_features("7.2.0").rms_norm_fp32_gamma and not kernel_features("7.1.0").rms_norm_fp32_gamma
    for release in ("26.0.0", "26.1.0"):  # compared as numbers, not strings ("26" < "7")
        f = kernel_features(release)
        assert f.rms_norm_fp32_gamma and f.mla_rope and f.quant_matmul_int32_guard and not f.gating_fixed_shape


def test_ascend_plan_command_prints_grouped_int8_path(capsys):
    assert main(["--release", "7.0.0"]) == 0
    out = capsys.readouterr().out
    assert "not an NPU run" in out and "W8A8 with per_token_scale" in out and "npu_fused_infer_attention_score" in out


def test_ascend_capabilities_declare_fp8_emulated_and_auto_choice():
    caps = AscendBackend().capabilities()  # no NPU here: planned for the minimum release
    assert caps.fp8_gemm_native is False and caps.fp8_formats == () and caps.fp8_storage is False
    assert caps.op_kinds["fp8_gemm"] == caps.op_kinds["dequantize_fp8"] == "emulated"
    assert set(caps.op_kinds) <= set(SPECS)  # one kind per op; FP8-weight paths are in op_paths
    assert caps.fp8_checkpoint_gemm == "bf16" and "op-plugin 6.0.0" in caps.notes["gemm auto for an FP8 checkpoint"]
    assert "moe_gate" not in caps.op_kinds  # 6.0.0: the reference serves it
    assert caps.notes["op moe_gate"].startswith("reference")
    # Per weight format (Capabilities.op_paths): FP8 decoded, bf16 and int8 linears on CANN kernels;
    # 6.0.0's grouped matmul takes no single [E, K, N] weight, so the reference serves the experts.
    linear = caps.op_paths["linear"]
    assert {f: p.kind for f, p in linear.items()} == {
        "bf16": "native", "int8": "native", "fp8-block": "emulated", "fp8-row": "emulated", "fp8-tensor": "emulated"}
    assert "moe_experts" not in caps.op_kinds and "moe_experts" not in caps.op_paths
    later = AscendBackend().standin_capabilities("7.1.0")
    assert {f: p.kind for f, p in later.op_paths["moe_experts"].items()} == {"bf16": "native", "int8": "native", "fp8-block": "emulated"}


def test_ascend_probe_child_source_compiles_and_asks_for_every_kernel():
    program = probe.probe_program()
    compile(program, "<dshal-ascend probe>", "exec")  # it only ever runs on an NPU host
    assert "torch.ops.npu" in program and "overloads()" in program
    assert {k for ks in OP_KERNELS.values() for k in ks} <= set(KERNELS)
    assert set(KERNELS) == set(recorded_signatures(recorded_releases()[-1]).ops)  # the newest has them all


def test_the_plugins_tools_start_with_docstrings_stripped():
    """``python -OO`` (PYTHONOPTIMIZE=2) strips docstrings: dshal-ascend-convert and
    dshal-ascend-plan built their --help from them and died with AttributeError on None."""
    import subprocess
    import sys

    for module in ("dshal_ascend.convert", "dshal_ascend.releases"):
        done = subprocess.run([sys.executable, "-OO", "-c", f"import sys; from {module} import main; sys.exit(main(['--help']))"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and "usage:" in done.stdout, (module, done.stderr[-2000:])


def test_the_plugins_tools_end_quietly_when_their_reader_leaves():
    """``dshal-ascend-plan | head -1``: the reader left and the next print raised a
    BrokenPipeError traceback; the tool now ends with 141 (128 + SIGPIPE) and no word, as `dshal`."""
    import os
    import subprocess
    import sys

    script = ("import os, sys\n"
              "from dshal_ascend.releases import main\n"
              "r, w = os.pipe()\n"
              "os.close(r)\n"
              "os.dup2(w, sys.stdout.fileno())\n"
              "sys.exit(main([]))\n")
    # Buffered, as in a pipeline: PYTHONUNBUFFERED (set on some machines) hid the failure at exit.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    assert done.returncode == 141 and done.stderr == "", done.stderr[-2000:]
