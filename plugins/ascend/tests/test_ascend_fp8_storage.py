"""Ascend declares that its device holds no float8 tensors (``Capabilities.fp8_storage`` False),
on every release and in the stand-in view, and the core's precision policy draws its
consequences from that declaration alone: ``gemm: auto`` runs an FP8 checkpoint as int8 (bf16
on op-plugin 6.0.0) converted on the host, and an explicit ``fp8-*`` mode is a ConfigError
naming the backend and what to use. No NPU here: these are the declared capabilities and the
policy's answers to them, not a device run."""

from __future__ import annotations

import pytest

from dshal.config import PrecisionConfig
from dshal.errors import ConfigError
from dshal.model.precision import fp8_redirect, refuse_fp8_without_storage
from dshal_ascend import AscendBackend
from dshal_ascend.schema import recorded_releases


@pytest.mark.parametrize("release", recorded_releases())
def test_standin_view_declares_no_fp8_storage_and_the_policy_follows(release):
    caps = AscendBackend().standin_capabilities(release)
    assert caps.fp8_storage is False and caps.fp8_gemm_native is False
    assert caps.moe_no_expert_ids  # its moe_experts serves NO_EXPERT ids (test_ascend_host_syncs.py)
    mode, why = fp8_redirect(caps)
    assert mode == ("high" if release == "6.0.0" else "int8")
    assert "no FP8 GEMM units" in why and "cannot hold float8 tensors on its device" in why
    refuse_fp8_without_storage(PrecisionConfig(gemm="auto"), caps, "ascend")  # auto, int8, high: accepted
    refuse_fp8_without_storage(PrecisionConfig(gemm="int8"), caps, "ascend")
    with pytest.raises(ConfigError) as info:
        refuse_fp8_without_storage(PrecisionConfig(gemm="fp8-block"), caps, "ascend")
    message = str(info.value)
    assert "precision.gemm: 'fp8-block'" in message and "backend 'ascend'" in message
    assert f"auto (an FP8 checkpoint then runs as {mode}" in message and "int8 (W8A8) or high" in message
