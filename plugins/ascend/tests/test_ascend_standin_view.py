"""`dshal info --backend ascend --standin RELEASE`: which path each op takes on a release, shown by
running the plugin's own op code through the signature-checking stand-in -- and never reported
as an NPU: the backend stays unavailable, and the conformance matrix's ascend leg says "not run".

The stand-in binds every kernel call against that release's recorded schemas and computes with
plain torch on the CPU; these tests assert the paths and labels, not NPU numerics.
"""

from __future__ import annotations

import json

import pytest

from dshal import cli
from dshal.errors import ArgumentError
from dshal_ascend import AscendBackend
from dshal_ascend.probe import torch_npu_installed
from dshal_ascend.schema import recorded_releases

RELEASES = recorded_releases()
no_torch_npu = pytest.mark.skipif(torch_npu_installed(), reason="torch_npu is installed here: covers hosts without it")


def _info_json(capsys, *argv: str) -> dict:
    assert cli.main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("release", RELEASES)
def test_ascend_info_standin_shows_each_op_path_per_release(capsys, release):
    view = _info_json(capsys, "--backend", "ascend", "--standin", release)["standin"]
    assert view["device_run"] is False and "NOT a device run" in view["label"]
    caps = view["capabilities"]
    assert "not an NPU" in caps["device_name"] and caps["arch"] == "none (stand-in)"
    notes = caps["notes"]
    gmm_int8 = notes["calls moe_experts[int8]"]
    linear_int8 = notes["calls linear[int8]"]
    if release == "6.0.0":  # no per_token_scale / group_list Tensor / gating kernel before 7.0.0
        assert gmm_int8 == "no torch_npu kernel: the dshal reference"
        assert notes["op moe_gate"].startswith("reference") and "has no npu_moe_gating_top_k" in notes["op moe_gate"]
        assert notes["calls moe_gate[256 experts, 8 groups]"] == "no torch_npu kernel: the dshal reference"
        assert notes["calls int8_gemm[float32 out]"] == "no torch_npu kernel: the dshal reference"
        assert caps["fp8_checkpoint_gemm"] == "bf16"
    else:  # the grouped int8 path, as vllm-ascend's w8a8_dynamic: per-token int8 activations
        assert gmm_int8.count("npu_dynamic_quant()") == 2 and gmm_int8.count("npu_grouped_matmul(") == 2
        assert "per_token_scale=[float32]" in gmm_int8 and "scale=[bfloat16]" in gmm_int8
        assert "group_list_type=0" in gmm_int8 and "npu_swiglu(dim=-1)" in gmm_int8
        assert notes["calls moe_gate[256 experts, 8 groups]"].startswith("npu_moe_gating_top_k(k=8, bias=float32")
        assert caps["fp8_checkpoint_gemm"] == "int8"
    fixed_gating = release in ("7.0.0", "7.1.0")  # 7.1.0 docs: only E=256, 8 groups, k_group 4 on A2/A3
    assert (notes["calls moe_gate[64 experts, 4 groups]"] == "no torch_npu kernel: the dshal reference") == (
        release == "6.0.0" or fixed_gating
    )
    # int8 linear: transposed + NZ once at load (the load hook), then W8A8 per call, every release
    assert notes["calls linear[int8] at load (Backend.prepare_weight)"] == "npu_format_cast(acl_format=29)"
    assert linear_int8 == (
        "npu_dynamic_quant() -> npu_quant_matmul(pertoken_scale=float32, bias=float32, output_dtype=bfloat16)"
    )
    assert "emulated" in notes["calls linear[fp8]"] and "emulated" in notes["calls fp8_gemm"]
    assert notes["calls attention[window]"].endswith("pre_tokens=3, next_tokens=0, input_layout=BNSD, "
                                                     "num_key_value_heads=2, sparse_mode=4)")
    assert caps["fp8_gemm_native"] is False and caps["fp8_formats"] == []
    # no float8 tensors on the NPU: FP8 checkpoints are converted on the host (the core loader)
    assert caps["fp8_storage"] is False and notes["fp8 storage"].startswith("no float8 tensors on the NPU")


def test_ascend_info_standin_text_is_labelled_not_an_npu(capsys):
    assert cli.main(["info", "--backend", "ascend", "--standin", "7.2.0"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[:3]
    assert first[0].startswith("ascend on a stand-in for release 7.2.0: NOT a device run")
    assert first[1].startswith("stand-in: signature-checking stand-in for torch_npu (op-plugin 7.2.0): not an NPU")
    assert "calls moe_experts[int8]" in out and "npu_grouped_matmul" in out and "op moe_experts" in out


@no_torch_npu
def test_ascend_info_standin_leaves_the_backend_unavailable(capsys):
    view = _info_json(capsys, "--backend", "ascend", "--standin", "7.3.0")["standin"]
    assert view["available"] is False and "torch_npu not installed" in view["reason"]
    listing = _info_json(capsys)  # plain `dshal info`: ascend still unavailable, nothing says stand-in
    ascend = next(b for b in listing["backends"] if b["name"] == "ascend")
    assert not ascend["available"] and "capabilities" not in ascend
    assert "stand-in" not in json.dumps(listing) and listing["runtime"]["backend"] != "ascend"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--standin", "7.2.0"], "--standin: needs --backend NAME"),
        (["--backend", "ascend", "--standin", "6.0.rc3"], "'6.0.rc3' (older than the minimum 6.0.0"),
        (["--backend", "ascend", "--standin", "9.9.9"], "expected one of 6.0.0, 7.0.0"),
        (["--backend", "cpu", "--standin", "7.2.0"], "backend 'cpu' offers no stand-in view"),
    ],
)
def test_ascend_info_standin_refuses_bad_requests(capsys, argv, message):
    assert cli.main(["info", *argv]) == 1
    assert message in capsys.readouterr().err


def test_ascend_standin_capabilities_reject_unknown_release():
    with pytest.raises(ArgumentError, match="expected one of"):
        AscendBackend().standin_capabilities("5.0.0")


@no_torch_npu
def test_ascend_matrix_leg_says_not_run_here(tmp_path):
    """The stand-in is never a conformance leg: `dshal conformance --backend ascend` writes a
    'not run' report with the backend's own reason, and the matrix shows that cell as not run."""
    assert cli.main(["conformance", "--backend", "ascend", "--report-dir", str(tmp_path),
                     "--allow-unavailable", "--quiet"]) == 0
    report = json.loads((tmp_path / "ascend.json").read_text())
    assert report["cases"] == [] and not any(report["summary"].values())
    assert report["platform"]["device"] == "not run" and "torch_npu not installed" in report["platform"]["not_run"]
    assert "stand-in" not in json.dumps(report) and "npu" not in report["platform"]["device"].lower()
    md = tmp_path / "m.md"
    assert cli.main(["matrix", str(tmp_path / "ascend.json"), "--markdown", str(md),
                     "--html", str(tmp_path / "m.html")]) == 0
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| op | dtype |"))
    assert header.endswith("| ascend (not run) · not run `NOT RUN` |")
    leg = next(line for line in text.splitlines() if line.startswith("| ascend (not-run)"))
    assert "| not run | not run | not run | not run |" in leg and "torch_npu not installed" in leg
    assert "stand-in" not in text
