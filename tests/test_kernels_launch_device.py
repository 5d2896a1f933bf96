"""Which GPU a compiled Triton launch runs on: its tensors', not torch's current device.

Triton launches on the current device's current stream (``torch.cuda.current_device()``),
whatever device the tensors are on. Fake tensors stand for ``cuda:1`` tensors here (nothing
is allocated); a stand-in for a compiled kernel records the device current at its launch.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dshal.plugin
from dshal.kernels.triton._checks import launch

LAUNCHED_WITHOUT_CUDA = "launched (no CUDA here)"


class RecordingKernel:
    """Stands in for a compiled ``@triton.jit`` function: ``kernel[grid](*args)`` records the
    device current at the launch."""

    def __init__(self) -> None:
        self.devices: list[object] = []

    def __getitem__(self, grid: object):
        def run(*args: object, **kwargs: object) -> None:
            self.devices.append(torch.cuda.current_device() if torch.cuda.is_available() else LAUNCHED_WITHOUT_CUDA)

        return run


def fake_gpu_tensor(index: int) -> torch.Tensor:
    with FakeTensorMode():
        return torch.empty(4, device=torch.device("cuda", index))


def test_a_launch_makes_its_tensors_gpu_current():
    x = fake_gpu_tensor(1)
    kernel = RecordingKernel()
    if torch.cuda.device_count() >= 2:
        with torch.cuda.device(0):
            launch(kernel, (1,), 7, x)
            assert torch.cuda.current_device() == 0  # put back after the launch
        assert kernel.devices == [1]
    else:
        # No second GPU: making cuda:1 current is refused (a CPU build of torch, or no such
        # device), so nothing launches -- rather than launching on whatever device is current.
        with pytest.raises((RuntimeError, AssertionError)):  # torch's "not compiled with CUDA" is either
            launch(kernel, (1,), 7, x)
        assert kernel.devices == []


def test_a_launch_on_host_tensors_or_scalars_touches_no_gpu():
    kernel = RecordingKernel()
    launch(kernel, (1,), 7, torch.zeros(2))
    launch(kernel, (1,), 7, 8.0)
    want = torch.cuda.current_device() if torch.cuda.is_available() else LAUNCHED_WITHOUT_CUDA
    assert kernel.devices == [want, want]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: on a CPU, capturing on the wrong device and "
                    "refusing cuda:1 fail alike, so only hardware tells them apart")
def test_a_device_graph_is_captured_and_replayed_on_its_tensors_gpu():
    """``DeviceGraph`` made its side stream and captured on the current device, and replayed
    on its stream: ``cuda:1`` tensors with ``cuda:0`` current were captured on GPU 0 (the
    launches inside, which follow their tensors, then left the capture)."""
    seen: list[int] = []

    def step(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.cuda.current_device())
        return t * 2

    graph = dshal.plugin.DeviceGraph(step, warmup=1)
    x = torch.ones(4, device="cuda:1")
    with torch.cuda.device(0):
        out = graph(x)
        out = graph(x + 1)  # a replay
        assert torch.cuda.current_device() == 0
    assert set(seen) == {1} and out.tolist() == [4.0] * 4
