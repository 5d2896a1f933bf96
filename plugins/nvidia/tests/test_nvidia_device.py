"""Device facts (compute capability -> FP8, peak table, NVML link matrix) as data, and the
hooks that need a real NVIDIA GPU (skipped here with the reason)."""

from __future__ import annotations

import pytest
import torch

from dshal.kernels.triton.crosscompile import COMPILE_TARGETS
from dshal.plugin import SHIPPED_TARGETS, lookup_peaks
from dshal_nvidia import NVIDIA_PEAKS, NvidiaBackend
from dshal_nvidia.backend import TARGET_OF_CAPABILITY, fp8_facts, kernel_target_name
from dshal_nvidia.topology import link_matrix

ON_NVIDIA = torch.cuda.is_available() and torch.version.cuda is not None and torch.version.hip is None
needs_gpu = pytest.mark.skipif(not ON_NVIDIA, reason="needs an NVIDIA GPU with a CUDA build of torch (none here)")


@pytest.mark.parametrize(
    "capability, has_fp8, words",
    [((9, 0), True, "Hopper paths"), ((8, 9), True, "no Hopper-only paths"), ((8, 0), False, "no FP8"), ((7, 0), False, "no FP8"),
     ((10, 0), True, "tcgen05 tilings"), ((10, 3), True, "tcgen05 tilings"), ((12, 0), True, "mma.sync tilings"),
     ((11, 0), True, "no tile table")],
)
def test_nvidia_fp8_by_compute_capability(capability, has_fp8, words):
    formats, note = fp8_facts(capability)
    assert bool(formats) is has_fp8 and words in note
    if has_fp8:
        assert formats == ("e4m3fn", "e5m2")
    if capability != (9, 0):  # wgmma and cuBLASLt blockwise scaling are Hopper's alone
        assert "wgmma" not in note and "cuBLASLt blockwise scaling)" not in note


@pytest.mark.parametrize(
    "capability, table",
    [((8, 0), "generic"), ((8, 6), "generic"), ((8, 9), "nvidia-sm89"), ((9, 0), "nvidia-sm90"),
     ((10, 0), "nvidia-sm100"), ((10, 3), "nvidia-sm100"), ((12, 0), "nvidia-sm120"), ((12, 1), "nvidia-sm120")],
)
def test_nvidia_capability_maps_to_its_tile_table_exactly(capability, table, caplog):
    """B200 (10.0) and B300 (10.3) got Hopper's wgmma table, RTX PRO 6000 (12.0) too: every
    capability >= 9.0 was mapped to it."""
    with caplog.at_level("INFO", logger="dshal"):
        assert kernel_target_name(capability) == table
    assert not caplog.records  # a known part says nothing


@pytest.mark.parametrize("capability", [(9, 1), (10, 1), (11, 0), (12, 7), (13, 0)])
def test_nvidia_an_unknown_part_gets_the_generic_table_and_says_so_at_v(capability, caplog):
    with caplog.at_level("INFO", logger="dshal"):
        assert kernel_target_name(capability) == "generic"
    (record,) = caplog.records
    assert record.levelname == "INFO" and f"no Triton tile table for sm_{capability[0]}{capability[1]}" in record.getMessage()


def test_nvidia_every_mapped_table_is_shipped_and_cross_compiled():
    """Each table a part gets is a shipped one that `dshal kernels` checks on its arch (sm_89's
    table predates the check: no sm_89 compile target)."""
    compiled = {t.target_name for t in COMPILE_TARGETS.values()}
    assert set(TARGET_OF_CAPABILITY.values()) <= set(SHIPPED_TARGETS)
    assert set(TARGET_OF_CAPABILITY.values()) - compiled == {"nvidia-sm89"}


@pytest.mark.parametrize(
    "name, bf16_tflops, bandwidth_tbs",
    [("NVIDIA H200", 989.5, 4.8), ("NVIDIA H100 80GB HBM3", 989.5, 3.35), ("NVIDIA H100 PCIe", 756.5, 2.0), ("NVIDIA H200 NVL", 835.5, 4.8),
     # torch's names of the Blackwell parts
     ("NVIDIA B200", 2250, 8.0), ("NVIDIA B300 SXM6 AC", 2250, 8.0), ("NVIDIA GB200", 2500, 8.0)],
)
def test_nvidia_peak_table_matches_the_most_specific_part(name, bf16_tflops, bandwidth_tbs):
    row = lookup_peaks(name, NVIDIA_PEAKS)
    assert row is not None and row.bf16_flops == bf16_tflops * 1e12 and row.bandwidth == bandwidth_tbs * 1e12
    assert row.fp8_flops == pytest.approx(2 * row.bf16_flops, rel=1e-3)
    assert "NVIDIA" in row.source and ("datasheet" in row.source or "specifications" in row.source)
    assert lookup_peaks("NVIDIA A100-SXM4-80GB", NVIDIA_PEAKS) is None  # unknown parts get no figures


@pytest.mark.parametrize("name", ["NVIDIA GB300", "NVIDIA B300", "NVIDIA B200A", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
                                  "NVIDIA GeForce RTX 5090"])
def test_nvidia_blackwell_parts_without_a_sourced_row_get_no_figures(name):
    """No datasheet row for them (see plugins/nvidia/README.md): bench measures instead of
    borrowing a neighbour's figures (a GB300 is not a GB200, a B200A not a B200)."""
    assert lookup_peaks(name, NVIDIA_PEAKS) is None


def test_nvidia_nvml_link_matrix_from_data():
    # GPUs 0-1 NVLinked; 2 reachable over a PCIe switch (level 10) or across sockets (50).
    nvlink = [[False, True, False], [True, False, False], [False, False, False]]
    level = [[0, 10, 10], [10, 0, 50], [10, 50, 0]]
    links, weights = link_matrix(nvlink, level)
    assert links == [["self", "nvlink", "pcie"], ["nvlink", "self", "pcie"], ["pcie", "pcie", "self"]]
    assert weights[0][1] == 1.0 and weights[0][2] == 3.0 and weights[1][2] == 7.0


def test_nvidia_emulated_hooks_are_cpu_safe():
    backend = NvidiaBackend(emulate=True)
    assert backend.topology() is None
    assert set(backend.memory_stats()) <= {"free"}  # the host's, where known: emulated tensors live there
    assert not backend.pinned_empty((4,)).is_pinned()
    fn = lambda t: t * 2  # noqa: E731
    assert backend.graph(fn) is fn  # no device graphs on the CPU: fn runs eagerly
    timer = backend.timer()
    timer.start()
    assert timer.stop() >= 0.0


@needs_gpu
def test_nvidia_real_device_capabilities():
    backend = NvidiaBackend()
    assert backend.availability().ok
    caps = backend.capabilities()
    props = torch.cuda.get_device_properties(0)
    assert caps.device_name == props.name and caps.compute_units == props.multi_processor_count
    assert caps.dist_backend == "nccl" and not caps.emulated
    assert "fp8_gemm block path" in caps.notes


@needs_gpu
def test_nvidia_graph_timer_and_pinned_memory():
    backend = NvidiaBackend()
    x = torch.randn(64, 64, device="cuda")
    step = backend.graph(lambda t: (t @ t).relu())
    first = step(x).clone()
    torch.testing.assert_close(first, (x @ x).relu())
    y = torch.randn(64, 64, device="cuda")
    torch.testing.assert_close(step(y), (y @ y).relu())  # replay with new inputs
    timer = backend.timer()
    timer.start()
    x @ x
    assert timer.stop() > 0.0
    assert backend.pinned_empty((8,)).is_pinned()
    stats = backend.memory_stats()
    assert stats["allocated"] > 0 and 0 < stats["free"] <= stats["total"]


@pytest.mark.skipif(not ON_NVIDIA or torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")
def test_nvidia_triton_ops_run_on_their_tensors_gpu():
    # Triton launches on the current device: tensors on cuda:1 while cuda:0 is current must
    # still be computed on cuda:1, bit for bit as on cuda:0.
    ops = NvidiaBackend().ops()
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 512, generator=gen).bfloat16(), torch.randn(512, generator=gen).bfloat16()
    b = torch.randn(256, 512, generator=gen)

    def run(dev: torch.device) -> list[torch.Tensor]:
        qa, sa = ops["quantize_fp8"](x.to(dev), (1, 128))
        qb, sb = ops["quantize_fp8"](b.to(dev), (128, 128))
        outs = [ops["rms_norm"](x.to(dev), w.to(dev)), ops["silu_and_mul"](x.to(dev)), qa.float(), sa, ops["fp8_gemm"](qa, sa, qb, sb)]
        assert all(t.device == dev for t in outs)
        return [t.cpu() for t in outs]

    with torch.cuda.device(0):
        want, got = run(torch.device("cuda", 0)), run(torch.device("cuda", 1))
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, rtol=0, atol=0)


@needs_gpu
def test_nvidia_nvml_topology():
    pytest.importorskip("pynvml", reason="pynvml not installed (pip install 'dshal-nvidia[nvml]')")
    topo = NvidiaBackend().topology()
    assert topo is not None and topo.num_devices == torch.cuda.device_count() and topo.source == "nvml"
    assert all(topo.links[i][i] == "self" for i in range(topo.num_devices))


@pytest.mark.parametrize(("text", "parsed"), [
    ("12.9", (12, 9)), ("12.9.1", (12, 9, 1)), ("13.0", (13, 0)), ("12.10", (12, 10)),
    ("12.8.93", (12, 8, 93)), ("12.9rc1", (12, 9)), ("12.9+git", (12, 9)), ("", ()), (None, ()), ("abc.1", ()),
])
def test_cuda_version_strings_compare_as_numbers(text, parsed) -> None:
    """The cuBLASLt gate compares torch.version.cuda with 12.9 as numbers: as strings,
    "12.10" < "12.9" would turn blockwise scaling off on a newer CUDA."""
    from dshal_nvidia.cublaslt import MIN_CUDA, version_tuple

    assert version_tuple(text) == parsed
    assert (version_tuple("12.10") >= MIN_CUDA, version_tuple("12.8") >= MIN_CUDA, version_tuple("13.0") >= MIN_CUDA) == (True, False, True)


@pytest.mark.parametrize("version, said", [("3.6.0", True), ("3.7.0", True), ("3.8.0", False), ("3.9.0", False)])
def test_nvidia_dgx_spark_fp8_note_says_when_its_triton_widens_fp8(version, said):
    """On sm_121 (DGX Spark) Triton 3.6 / 3.7 widen FP8 dot operands to f16 (compiled here for
    sm_121a); `dshal info`'s FP8 line says so, naming the Triton and the minimum."""
    formats, note = fp8_facts((12, 1), version)
    assert formats == ("e4m3fn", "e5m2") and "mma.sync tilings" in note
    assert (f"Triton {version}" in note and "triton>=3.8" in note and "sm_121a" in note) is said
    assert fp8_facts((12, 0), version) == fp8_facts((12, 0), "3.9.0")  # sm_120a gets FP8 mma.sync from 3.6 on
