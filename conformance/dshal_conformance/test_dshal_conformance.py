"""The conformance suite as pytest tests (collected by ``pytest --pyargs dshal_conformance``).

Cases are parametrized by the plugin in :mod:`dshal_conformance.pytest_plugin`; this
module only turns each case's record into a pytest outcome.
"""

from __future__ import annotations

from typing import Any

import pytest


def test_conformance(dshal_result: dict[str, Any]) -> None:
    status, reason = dshal_result["status"], dshal_result["reason"]
    if status in ("skip", "unsupported"):
        pytest.skip(f"{status}: {reason}")
    if status != "pass":  # the reason alone: an assert's diff and source lines made --junitxml's message 5 lines of noise
        pytest.fail(f"{dshal_result['id']}: {status}: {reason}", pytrace=False)
