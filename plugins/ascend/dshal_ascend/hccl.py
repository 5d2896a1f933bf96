"""HCCL, the Ascend collective library, held to dshal's ``distributed.timeout_s``.

Two gaps between torch's process-group machinery and HCCL, both facts of torch_npu's source:

- torch's ``_abort_process_group`` calls each backend's ``abort()``, which is empty in
  ``c10d::Backend``; torch_npu's ``ProcessGroupHCCL`` has ``abort(optional<string>)``, an
  overload, not an override. Its Python binding ``abort_hccl_comm`` (every release branch from
  ``v2.1.0-6.0.0`` to ``v2.10.0-26.0.0``, torch_npu/csrc/distributed/Init.cpp) does abort the
  communicators. Without it, a collective stuck on a dead peer stays queued and torch_npu's
  exit handler waits for it (HCCL's execution timeout: about 30 minutes by default).
- HCCL's own timeouts are environment variables read when a communicator is built. (torch_npu
  also reads HCCL_EXEC_TIMEOUT once at ``import torch_npu`` for its task-dispatch timeout, before
  dshal sets it: that one follows dshal's value only when the user exports it.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: HCCL_EXEC_TIMEOUT: seconds a device waits in a collective for its peers; an integer in
#: [68, 17340] (CANN's environment-variable reference, as quoted in the Ascend deployment guides).
EXEC_TIMEOUT_RANGE_S = (68, 17340)
#: HCCL_CONNECT_TIMEOUT: seconds to build the links between devices; an integer in [120, 7200].
CONNECT_TIMEOUT_RANGE_S = (120, 7200)

#: What the communicators are aborted with (torch_npu logs it).
ABORT_REASON = "dshal: a collective failed or timed out (distributed.timeout_s); aborting this rank's communicators"


def _seconds_in(timeout_s: float, bounds: tuple[int, int]) -> str:
    low, high = bounds
    return str(min(max(math.ceil(timeout_s), low), high))


def hccl_environment(timeout_s: float) -> dict[str, str]:
    """HCCL's execution and connect timeouts from dshal's ``timeout_s``, each in the range HCCL
    accepts: a stuck collective is ended by HCCL about when dshal reports it (the default, ~30
    minutes, held the dead job's exit that long)."""
    return {
        "HCCL_EXEC_TIMEOUT": _seconds_in(timeout_s, EXEC_TIMEOUT_RANGE_S),
        "HCCL_CONNECT_TIMEOUT": _seconds_in(timeout_s, CONNECT_TIMEOUT_RANGE_S),
    }


def abort_hccl_communicators(groups: Sequence[Any], device: torch.device) -> list[str]:
    """Abort the HCCL communicators of each of ``groups`` (torch process groups) on ``device``'s
    type, each in its own try (one failing leaves the next to abort). A group with no backend
    for that device type (gloo's) has nothing to abort and is passed over. Returns why any
    HCCL group was not aborted."""
    missed = []
    for group in groups:
        try:
            hccl = group._get_backend(torch.device(device.type))
        except (AttributeError, RuntimeError, ValueError) as err:
            if "No backend type associated" not in str(err):  # torch's words for a group of another backend (gloo)
                missed.append(f"{getattr(group, 'group_name', group)}: its backend could not be looked up: {err}")
            continue
        abort = getattr(hccl, "abort_hccl_comm", None)
        if abort is None:
            missed.append(f"{getattr(group, 'group_name', group)}: {type(hccl).__name__} has no abort_hccl_comm")
            continue
        try:
            abort(ABORT_REASON)
        except Exception as err:  # noqa: BLE001 - HCCL's own failure: the next group still gets its abort
            missed.append(f"{getattr(group, 'group_name', group)}: abort_hccl_comm raised {type(err).__name__}: {err}")
    return missed


__all__ = ["ABORT_REASON", "CONNECT_TIMEOUT_RANGE_S", "EXEC_TIMEOUT_RANGE_S", "abort_hccl_communicators", "hccl_environment"]
