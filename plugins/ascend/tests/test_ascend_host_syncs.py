"""The MoE and DeepSeek Sparse Attention op paths of dshal-ascend read nothing on the host inside ``dshal.ops.trusted()``.

A host read (``.item()``, ``bool(t)``, ``nonzero``, ``unique``, op-plugin's NPU ``bincount``,
which reads min and max) stalls every decode step and breaks graph capture. The plugin's op code
runs here on CPU tensors through :class:`~dshal_ascend.standin.SignatureCheckingStandIn`; the
aten ops it dispatches are recorded, those of the stand-in's own kernels left out (they stand
for NPU kernels). The stand-in is not an NPU: nothing here is an NPU result.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dshal
import dshal.ops.reference as ref
from dshal.perf.syncs import SYNC_ATEN_OPS, HostSyncCounter
from dshal.plugin import NO_EXPERT, moe_experts_on_kept_slots
from dshal_ascend import standin
from dshal_ascend.npu_ops import AscendOps
from dshal_ascend.releases import kernel_features
from dshal_ascend.schema import recorded_releases, recorded_signatures
from dshal_ascend.standin import SignatureCheckingStandIn

#: Releases whose moe_experts runs npu_grouped_matmul (6.0.0 serves the reference).
GROUPED_RELEASES = [r for r in recorded_releases() if kernel_features(r).w8a8_experts]
#: Host reads: the core's list plus ``bincount`` (op-plugin's NPU kernel reads min and max) and ``item``.
FORBIDDEN = SYNC_ATEN_OPS | {"aten::bincount", "aten::item"}


def _in_stand_in_kernel() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == standin.__file__:
            return True
        frame = frame.f_back
    return False


class AtenCalls(TorchDispatchMode):
    """The aten ops the plugin's own code dispatches (not the stand-in's kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not _in_stand_in_kernel():
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _moe_inputs(tokens: int, weight: str, skip: bool):
    g = torch.Generator().manual_seed(tokens)
    experts, hidden, inter, top_k = 8, 128, 64, 4
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    weights = torch.rand(tokens, top_k, generator=g)
    ids = torch.rand(tokens, experts, generator=g).argsort(dim=-1)[:, :top_k].contiguous()
    if skip:  # every third slot served by another rank (its weight NaN: ignored by the op)
        skipped = torch.arange(tokens * top_k).reshape(tokens, top_k) % 3 == 1
        ids, weights = ids.masked_fill(skipped, NO_EXPERT), weights.masked_fill(skipped, float("nan"))
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    if weight == "int8":
        (w13, w13_scale), (w2, w2_scale) = ref.quantize_int8(w13), ref.quantize_int8(w2)
        return (x, weights, ids, w13, w2, w13_scale, w2_scale)
    return (x, weights, ids, w13.bfloat16(), w2.bfloat16())


@pytest.mark.parametrize("release", GROUPED_RELEASES)
@pytest.mark.parametrize("weight", ["bf16", "int8"])
@pytest.mark.parametrize("tokens", [1, 24], ids=["decode", "prefill"])
@pytest.mark.parametrize("skip", [False, True], ids=["all-served", "no-expert-slots"])
def test_ascend_moe_path_has_no_host_reads(release, weight, tokens, skip):
    stand_in = SignatureCheckingStandIn(recorded_signatures(release))
    ops = AscendOps(kernel_features(release), stand_in)
    args = _moe_inputs(tokens, weight, skip)
    with dshal.ops.trusted(), HostSyncCounter(exempt=(standin.__file__,)) as syncs, AtenCalls() as calls:
        weights, ids = ops.moe_gate(torch.randn(tokens, 8), None, 4, 4, 2, 2.5)  # the gate of the same step
        got = ops.moe_experts(*args)
    assert syncs.count == 0, syncs.where
    assert not FORBIDDEN & set(calls.names), sorted(FORBIDDEN & set(calls.names))
    assert "aten::scatter_add_" in calls.names  # the recorder saw the routing counts
    assert len(stand_in.called("npu_grouped_matmul")) == 2  # the kernel path, not the reference
    # The same result as before: the reference within the plugin's tolerance, and for NO_EXPERT
    # slots the former route (the served slots alone, one row each, summed as the op does).
    want = ref.moe_experts(*args).float()
    if weight == "int8":  # W8A8 rounds activations per token where the reference runs int8_gemm: norms
        assert (got.float() - want).norm() / want.norm() < 2e-2  # W8A8 adds ~1% (test_ascend_moe_experts_w8a8)
    else:
        torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=2e-2)
    if skip:
        before = moe_experts_on_kept_slots(ops.moe_experts, *args)
        if tokens > 1:  # both sum each token's rows in expert order
            assert torch.equal(got, before)
        else:  # one token: the former route summed in slot order, this one in expert order
            torch.testing.assert_close(got, before, rtol=1e-2, atol=1e-5)
    assert weights.shape == ids.shape == (tokens, 4)


@pytest.mark.parametrize("release", [r for r in recorded_releases() if kernel_features(r).indexer_float32_weights])
@pytest.mark.parametrize("tokens", [1, 6], ids=["decode", "prefill"])
def test_ascend_dsa_path_has_no_host_reads(release, tokens):
    """DeepSeek-V3.2's sparse attention step: the indexer's choice, then attention over it (indices
    checked by a device-side assertion, the NaN rule met without reading anything back)."""
    stand_in = SignatureCheckingStandIn(recorded_signatures(release))
    ops = AscendOps(kernel_features(release), stand_in)
    g = torch.Generator().manual_seed(tokens)
    q_index, k_index = torch.randn(2, tokens, 8, 128, generator=g).bfloat16(), torch.randn(2, 30, 128, generator=g).bfloat16()
    weights = torch.randn(2, tokens, 8, generator=g) * 0.03
    q, kv = torch.randn(2, 16, tokens, 576, generator=g).bfloat16(), torch.randn(2, 30, 576, generator=g).bfloat16()
    with dshal.ops.trusted(), HostSyncCounter(exempt=(standin.__file__,)) as syncs, AtenCalls() as calls:
        chosen = ops.indexer_topk(q_index, weights, k_index, 8)
        out = ops.sparse_mla_attention(q, kv, chosen, 0.05, 512)
    assert syncs.count == 0, syncs.where
    assert not FORBIDDEN & set(calls.names), sorted(FORBIDDEN & set(calls.names))
    assert "aten::sort" in calls.names  # the recorder saw the indices' reordering
    assert stand_in.called("npu_lightning_indexer") and stand_in.called("npu_sparse_flash_attention")
    assert out.shape == (2, 16, tokens, 512) and not ops.reference_calls
