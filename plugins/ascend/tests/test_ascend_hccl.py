"""HCCL held to distributed.timeout_s: its timeouts from dshal's, its communicators aborted.

No NPU here: the abort is checked against stand-in process groups (named as such) that
record the one binding torch_npu exposes, ``abort_hccl_comm(reason)``; a real run is the
host check's job (tools/npu_host_check.sh). torch_npu registers the NPU as torch's
``privateuseone`` device type (renamed "npu"): without it, that is the type the device has.
"""

from __future__ import annotations

import pytest
import torch

from dshal_ascend.backend import AscendBackend
from dshal_ascend.hccl import (
    ABORT_REASON,
    CONNECT_TIMEOUT_RANGE_S,
    EXEC_TIMEOUT_RANGE_S,
    abort_hccl_communicators,
    hccl_environment,
)

#: The device type torch_npu's NPUs have before its rename to "npu".
NPU = "privateuseone"


@pytest.mark.parametrize(("timeout_s", "exec_s", "connect_s"), [
    (300.0, "300", "300"),  # dshal's default: both follow it
    (2.5, "68", "120"),  # below HCCL's floors: the floors
    (99999.0, "17340", "7200"),  # above its ceilings: the ceilings
    (150.2, "151", "151"),  # whole seconds, never below dshal's
])
def test_hccl_timeouts_follow_dshals_within_the_range_hccl_takes(timeout_s, exec_s, connect_s) -> None:
    env = hccl_environment(timeout_s)
    assert env == {"HCCL_EXEC_TIMEOUT": exec_s, "HCCL_CONNECT_TIMEOUT": connect_s}
    assert EXEC_TIMEOUT_RANGE_S[0] <= int(env["HCCL_EXEC_TIMEOUT"]) <= EXEC_TIMEOUT_RANGE_S[1]
    assert CONNECT_TIMEOUT_RANGE_S[0] <= int(env["HCCL_CONNECT_TIMEOUT"]) <= CONNECT_TIMEOUT_RANGE_S[1]


def test_the_backend_gives_the_hccl_environment_to_dshal_comm() -> None:
    assert AscendBackend().process_group_environment(300.0) == hccl_environment(300.0)


class StandInHcclBackend:
    """Stand-in for torch_npu's ProcessGroupHCCL binding: records abort_hccl_comm(reason)."""

    def __init__(self) -> None:
        self.reasons: list[str | None] = []

    def abort_hccl_comm(self, reason: str | None) -> None:  # the binding takes one optional<string>
        self.reasons.append(reason)


class StandInGroup:
    """Stand-in for a torch ProcessGroup: ``_get_backend(device)`` as torch's, for one device type."""

    def __init__(self, name: str, device_type: str | None, backend: object = None) -> None:
        self.group_name, self.device_type, self.backend = name, device_type, backend
        self.asked: list[torch.device] = []

    def _get_backend(self, device: torch.device) -> object:
        self.asked.append(device)
        if device.type != self.device_type:
            raise RuntimeError(f"No backend type associated with device type {device.type}")
        return self.backend


def test_every_hccl_group_is_aborted_and_a_gloo_group_passed_over() -> None:
    world, tp = StandInHcclBackend(), StandInHcclBackend()
    groups = [StandInGroup("world", NPU, world), StandInGroup("gloo0", "cpu"), StandInGroup("tp0", NPU, tp)]
    missed = abort_hccl_communicators(groups, torch.device(NPU, 3))
    assert world.reasons == [ABORT_REASON] and tp.reasons == [ABORT_REASON]
    assert all(g.asked == [torch.device(NPU)] for g in groups)  # by device type, as torch keys its backends
    assert missed == []  # gloo has no communicator to abort: nothing to say


class FailingHcclBackend(StandInHcclBackend):
    def abort_hccl_comm(self, reason: str | None) -> None:
        raise RuntimeError("HCCL error 7")


def test_one_failing_abort_leaves_the_next_group_aborted_and_is_named() -> None:
    after = StandInHcclBackend()
    groups = [StandInGroup("world", NPU, FailingHcclBackend()), StandInGroup("tp0", NPU, after)]
    missed = abort_hccl_communicators(groups, torch.device(NPU))
    assert after.reasons == [ABORT_REASON]
    assert missed == ["world: abort_hccl_comm raised RuntimeError: HCCL error 7"]


class UnreadableGroup(StandInGroup):
    def _get_backend(self, device: torch.device) -> object:
        raise RuntimeError("the group was destroyed")


def test_a_group_whose_backend_cannot_be_looked_up_is_named() -> None:
    missed = abort_hccl_communicators([UnreadableGroup("tp0", NPU)], torch.device(NPU))
    assert missed == ["tp0: its backend could not be looked up: the group was destroyed"]


def test_a_backend_without_the_binding_is_named_not_raised() -> None:
    missed = abort_hccl_communicators([StandInGroup("world", NPU, object())], torch.device(NPU))
    assert missed == ["world: object has no abort_hccl_comm"]
