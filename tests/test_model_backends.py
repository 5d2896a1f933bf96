"""The one model core, unchanged, on the GPU plugins' own op code.

No GPU here: each plugin runs emulated (CPU tensors, its Triton kernels in the interpreter,
``torch._scaled_mm`` on CPU). The same random checkpoint is loaded on the ``cpu`` backend and
on the plugin, with the same precision policy in the plugin's native FP8 format, and the
logits and greedy tokens are compared. Decode steps after the first run inside
``ops.trusted()``, so the plugins' providers are called without the spec's checks too.
"""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal.config import PrecisionConfig
from dshal.model import build_model, random_model, tiny_args


class Unreadable:
    """A checkpoint reader whose every read fails: what a check made before reading never meets."""

    path = "<unreadable>"

    def _read(self, *args):
        raise AssertionError("the checkpoint was read before the refusal")

    names = get = get_slice = shape = dtype = _read


def _installed(name: str) -> bool:
    return any(info.name == name for info in dshal.backends())


@pytest.mark.needs_interpreter
@pytest.mark.parametrize("gemm", ["bf16", "fp8-block"])
@pytest.mark.parametrize("backend", ["nvidia", "amd"])
def test_model_core_on_an_emulated_gpu_plugin_matches_the_cpu_backend(backend, gemm):
    if not _installed(backend):
        pytest.skip(f"the dshal-{backend} plugin is not installed")
    runtime = dshal.use(backend=backend, emulate=True)
    assert runtime.emulated  # results below are emulated, not measured on the hardware
    precision = PrecisionConfig(gemm=gemm, fp8_format=runtime.backend.native_e4m3())
    # A dense layer and a MoE layer (the tiny model's third layer is a second MoE layer: the same
    # kernels again, a third of the interpreted time); the emulated conformance legs' model family
    # runs all three.
    args = tiny_args(num_hidden_layers=2)
    ids = torch.randint(0, args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))

    model = random_model(args, seed=3, precision=precision)
    # bf16: torch's matmul; fp8-block: the plugin's Triton kernel (neither a fallback).
    assert runtime.provider_kind("linear", gemm) == ("native" if gemm == "bf16" else "triton")
    logits, tokens = model(ids), model.generate(ids, 4)

    dshal.use(backend="cpu")
    reference = random_model(args, seed=3, precision=precision)
    want_logits, want_tokens = reference(ids), reference.generate(ids, 4)

    # Same weights, same formats: only the summation order differs (measured ~6e-7).
    assert ((logits - want_logits).abs().max() / want_logits.abs().max()).item() <= 1e-4
    assert torch.equal(tokens, want_tokens)


@pytest.mark.needs_interpreter
@pytest.mark.parametrize("backend, undeclared", [("amd", "e4m3fn"), ("nvidia", "e4m3fnuz")])
def test_an_fp8_format_the_backend_does_not_declare_is_refused_at_load(backend, undeclared):
    """gfx942 computes e4m3fnuz only and Hopper e4m3fn / e5m2: FP8 weights stored in another
    format would be served by a fallback (before this check the model ran, slowly on a device),
    so the load is a ConfigError naming the format, the declared ones and what to set."""
    if not _installed(backend):
        pytest.skip(f"the dshal-{backend} plugin is not installed")
    runtime = dshal.use(backend=backend, emulate=True)
    assert undeclared not in runtime.backend.fp8_formats()
    with pytest.raises(dshal.ConfigError) as err:
        random_model(tiny_args(), seed=3, precision=PrecisionConfig(gemm="fp8-block", fp8_format=undeclared))
    native = runtime.backend.native_e4m3()
    assert f"stored as {undeclared!r}" in str(err.value) and f"precision.fp8_format: auto ({native})" in str(err.value)
    assert f"backend {backend!r}" in str(err.value)
    with pytest.raises(dshal.ConfigError, match=f"stored as {undeclared!r}"):  # an explicit FP8 mode: before any read
        build_model(tiny_args(), Unreadable(), PrecisionConfig(gemm="fp8-block", fp8_format=undeclared))
    everything_high = PrecisionConfig(gemm="fp8-block", fp8_format=undeclared, keep_high_precision=("*",))
    random_model(tiny_args(), seed=3, precision=everything_high)  # stores no FP8: nothing to refuse
    # auto (the native E4M3) loads, and so does high precision, which stores no FP8
    random_model(tiny_args(), seed=3, precision=PrecisionConfig(gemm="fp8-block", fp8_format="auto"))
    random_model(tiny_args(), seed=3, precision=PrecisionConfig(gemm="high", fp8_format=undeclared))
    dshal.use(backend="cpu")
