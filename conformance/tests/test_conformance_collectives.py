"""Collective cases on a machine with fewer devices than ranks: skipped with the reason."""

from __future__ import annotations

import pytest

from dshal_conformance import collectives
from dshal_conformance.judge import Verdict


def test_device_shortfall_rules():
    assert collectives.device_shortfall("cpu", 0, 4) is None  # host tensors: any number of ranks
    assert collectives.device_shortfall("cuda", 4, 4) is None
    reason = collectives.device_shortfall("cuda", 1, 2)
    assert reason is not None and "needs 2 cuda devices" in reason and "shows 1" in reason


def test_collectives_skip_when_the_machine_has_fewer_gpus_than_ranks():
    """The real nvidia backend (not emulated) on this GPU-less machine: torch sees 0 CUDA
    devices, so every 2-rank case is skipped with that reason and no rank process starts."""
    pytest.importorskip("dshal_nvidia")
    device_type, visible = collectives.visible_devices("nvidia", emulate=False)
    assert device_type == "cuda"
    if visible >= 2:
        pytest.skip(f"this machine shows {visible} CUDA devices: nothing to skip")
    selected = [c for c in collectives.cases() if c.world_size == 2]
    seen: list[tuple[str, Verdict]] = []
    collectives.run_group("nvidia", False, 2, selected, 5.0, lambda case, v: seen.append((case.id, v)))
    assert [cid for cid, _ in seen] == [c.id for c in selected]
    for _, verdict in seen:
        assert verdict.status == "skip" and f"shows {visible}" in verdict.reason
