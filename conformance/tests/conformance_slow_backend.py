"""A test plugin (``slow``) whose rms_norm hangs inside a case: it marks a file named by
``DSHAL_TEST_MARKER`` and sleeps, so a test can press Ctrl-C while op cases run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from dshal.backends.cpu import CpuBackend


def rms_norm(x, weight, eps=1e-6, residual=None):  # noqa: ANN001, ANN201
    if os.environ.get("DSHAL_TEST_MARKER"):
        open(os.environ["DSHAL_TEST_MARKER"], "w").close()
    time.sleep(120)
    raise AssertionError("a test should have interrupted this case")


class SlowBackend(CpuBackend):
    @property
    def name(self) -> str:
        return "slow"

    def ops(self) -> Mapping[str, Callable[..., Any]]:
        return {**super().ops(), "rms_norm": rms_norm}
