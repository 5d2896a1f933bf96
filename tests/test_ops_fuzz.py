"""Every argument of every op, spoiled one at a time: the call raises a ``DshalError`` or
gives the reference's answer -- never another exception from deep in torch or a kernel.

Each op's ci example rows (the inputs conformance judges) are the starting point. One
argument at a time is replaced by a wrong value: another dtype, a dim added, dropped or
shortened, an empty or 0-d tensor, a transposed or strided view, NaN / Inf / out-of-range
ids, the meta device, a list, None, a string, a negative, zero or huge number. An accepted
call is compared with the op's reference on the same arguments.

The backends: ``cpu`` (native); the GPU plugins' own code under the Triton interpreter
(``emulated``, the same kernels a GPU compiles); the Ascend plugin's own code with its
torch_npu calls bound against a release's recorded signatures (a stand-in, not an NPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import dshal
import dshal.ops
from dshal.errors import DshalError
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import Draw

#: Example rows spoiled per op: natively, and under the interpreter (slower by ~100x).
ROWS_PER_OP = {"native": 4, "emulated": 2}
# NaN / Inf inputs are among the spoilers: numpy says so when the interpreter computes with them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)
OTHER_DTYPES = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
    torch.bool, *FP8,
)


def spoiled_tensors(t: torch.Tensor) -> Iterator[tuple[str, Any]]:
    """Wrong values for a tensor argument, named."""
    for dtype in OTHER_DTYPES:
        if dtype != t.dtype:
            yield f"dtype {str(dtype).replace('torch.', '')}", t.to(dtype)
    yield "a leading dim added", t.unsqueeze(0)
    yield "meta device", t.to("meta")
    yield "a list", t.tolist() if t.numel() <= 64 else [1, 2]
    yield "None", None
    if t.dim() == 0:
        return
    yield "flattened", t.reshape(-1)
    yield "empty first dim", t[:0]
    if t.numel():
        yield "0-d", t.reshape(-1)[0]
    if t.shape[0]:
        yield "first dim dropped", t[0]
    if t.shape[0] > 1:
        yield "first dim one short", t[:-1]
    if t.shape[-1] > 1:
        yield "last dim one short", t[..., :-1]
        yield "strided last dim", t[..., ::2]
    if t.dim() >= 2:
        yield "transposed", t.transpose(-1, -2)
    if t.numel() and t.is_floating_point():
        for what, value in (("NaN", math.nan), ("Inf", math.inf)):
            u = t.clone()
            u.reshape(-1)[0] = value  # an FP8 format without Inf stores NaN
            yield f"one {what}", u
    if t.numel() and not t.is_floating_point() and t.dtype != torch.bool:
        for what, value in (("-1", -1), ("a huge value", torch.iinfo(t.dtype).max)):
            u = t.clone()
            u.reshape(-1)[0] = value
            yield f"one {what}", u


def spoiled_options(v: Any) -> Iterator[tuple[str, Any]]:
    """Wrong values for a non-tensor argument, named."""
    yield from (("None", None), ("a string", "bogus"), ("a list", [1, 2]))
    if v is None:  # an optional option: numbers it might take
        yield from (("-1", -1), ("0", 0), ("1e30", 10**30), ("1.5", 1.5), ("NaN", math.nan))
    elif isinstance(v, bool):
        yield "2", 2
    elif isinstance(v, int):
        yield from (("-1", -1), ("0", 0), ("1e9", 10**9), ("1e30", 10**30), ("1.5", 1.5), ("True", True))
    elif isinstance(v, float):
        yield from (("NaN", math.nan), ("inf", math.inf), ("-1.0", -1.0), ("0.0", 0.0), ("1 (int)", 1), ("1e30", 1e30))
    elif isinstance(v, tuple):
        yield from (("()", ()), ("(1, 2, 3)", (1, 2, 3)), ("negative", tuple(-1 for _ in v)), ("zeros", tuple(0 for _ in v)),
                    ("1e30", tuple(10**30 for _ in v)))
    elif isinstance(v, str):
        yield "another string", "e5m3"


def _sorted_by_id(out: Any) -> Any:
    """``moe_gate``'s (weights, ids) with each token's experts in id order (the op does not
    fix the order within a token's top-k)."""
    weights, ids = out
    ids, order = ids.sort(-1)
    return weights.gather(-1, order), ids


def differs(got: Any, want: Any) -> str | None:
    """Why ``got`` is not ``want``'s answer, or None. Non-finite entries must be non-finite in
    both (which of NaN or Inf depends on the order of the arithmetic)."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"got {type(got).__name__}, expected {len(want)} outputs"
        return next((why for g, w in zip(got, want) if (why := differs(g, w))), None)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        return f"got {getattr(got, 'dtype', type(got))} {list(getattr(got, 'shape', []))}, expected {want.dtype} {list(want.shape)}"
    if got.device.type == "meta":
        return None
    if not want.dtype.is_floating_point:
        return None if torch.equal(got, want) else "integer outputs differ"
    g, w = got.double(), want.double()
    if not torch.equal(g.isfinite(), w.isfinite()):
        return f"finite where the reference is not, or the other way, at {int((g.isfinite() != w.isfinite()).sum())} entries"
    finite = w.isfinite()
    g, w = g[finite], w[finite]
    # elementwise, or as a whole where a matmul's cancellations make single elements noisy
    # (a bf16 product: ~3e-3 relative L2); a misread stride or layout fails both
    if not torch.allclose(g, w, rtol=5e-2, atol=5e-2) and float((g - w).norm()) > 1e-2 * float(w.norm()):
        return f"values differ by up to {float((g - w).abs().max()):.3g} ({float((g - w).norm() / w.norm()):.2g} relative L2)"
    return None


def spoiled_calls(op: str, rows_per_op: int) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """``(what, arguments, the spoiled value)`` for each row and each spoiler; first the row itself."""
    spec = SPECS[op]
    rows = [r for r in spec.rows if "ci" in r.tiers and r.kind in ("accuracy", "edge")][:rows_per_op]
    assert rows, f"{op} has no ci example rows"
    for row in rows:
        base = spec.example_inputs(Draw(torch.Generator().manual_seed(0)), row).kwargs
        yield f"{row.name}: valid", base, None
        for arg, value in base.items():
            spoilers = spoiled_tensors(value) if isinstance(value, torch.Tensor) else spoiled_options(value)
            for what, bad in spoilers:
                yield f"{row.name}: {arg} {what}", {**base, arg: bad}, bad


def _fp8_with_nan(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in FP8 and value.device.type != "meta" and bool(
        value.float().isnan().any())


@dataclass
class Served:
    """What the spoiled calls go through: one backend's op table behind the ops' input checks."""

    label: str
    ops: dict[str, Callable[..., Any]]
    native_e4m3: str
    rows_per_op: int
    #: (op, spoiled value) -> why a difference from the reference is not the plugin's, or None.
    exempt: Callable[[str, Any], str | None] = lambda op, bad: None


def _through_runtime(config: dict[str, Any]) -> Served:
    runtime = dshal.use({**config, "fallback": "warn"})
    emulated = runtime.emulated

    def exempt(op: str, bad: Any) -> str | None:  # noqa: ARG001
        # the interpreter decodes FP8 NaN codes as numbers, hardware does not: see the test below
        return "Triton interpreter: FP8 NaN" if emulated and _fp8_with_nan(bad) else None

    return Served(f"{runtime.backend.name}{' (emulated)' if emulated else ''}", {op: getattr(dshal.ops, op) for op in SPECS},
                  runtime.backend.native_e4m3(), ROWS_PER_OP["emulated" if emulated else "native"], exempt)


def _through_ascend_standin(release: str) -> Served:
    """The Ascend plugin's own op code on CPU tensors, its torch_npu calls bound against the
    release's recorded signatures by ``SignatureCheckingStandIn``: a stand-in, not an NPU."""
    pytest.importorskip("dshal_ascend", reason="the dshal-ascend plugin is not installed")
    from dshal_ascend.npu_ops import AscendOps
    from dshal_ascend.releases import kernel_features
    from dshal_ascend.schema import recorded_signatures
    from dshal_ascend.standin import SignatureCheckingStandIn

    dshal.use({"backend": "cpu"})
    table = AscendOps(kernel_features(release), SignatureCheckingStandIn(recorded_signatures(release))).ops()

    def exempt(op: str, bad: Any) -> str | None:
        # npu_dynamic_quant's NaN / Inf handling is not documented (the stand-in takes them into
        # the amax); the op's rule leaves them out: measured on a 910B, not here
        nonfinite = isinstance(bad, torch.Tensor) and bad.is_floating_point() and not bad.is_meta and not bool(bad.isfinite().all())
        return "npu_dynamic_quant: non-finite input" if op == "quantize_int8" and nonfinite else None

    return Served(f"ascend stand-in {release} (not an NPU)", {op: SPECS[op].checked(fn, "cpu") for op, fn in table.items()},
                  "e4m3fn", ROWS_PER_OP["native"], exempt)


BACKENDS = [
    pytest.param(lambda: _through_runtime({"backend": "cpu"}), id="cpu"),
    pytest.param(lambda: _through_runtime({"backend": "nvidia", "emulate": True}), id="nvidia-emulated",
                 marks=pytest.mark.needs_interpreter),
    pytest.param(lambda: _through_runtime({"backend": "amd", "emulate": True}), id="amd-emulated",
                 marks=pytest.mark.needs_interpreter),
    # the oldest and the newest recorded op-plugin release: the plugin's paths differ most
    pytest.param(lambda: _through_ascend_standin("6.0.0"), id="ascend-standin-6.0.0"),
    pytest.param(lambda: _through_ascend_standin("7.3.0"), id="ascend-standin-7.3.0"),
]


@pytest.mark.parametrize("serve", BACKENDS)
@pytest.mark.parametrize("op", sorted(SPECS))
def test_a_spoiled_argument_raises_a_dshal_error_or_gives_the_references_answer(serve, op) -> None:
    served = serve()
    if op not in served.ops:
        pytest.skip(f"{served.label} does not serve {op}")
    call, reference = served.ops[op], SPECS[op].reference_impl
    crashes, wrong, refused = [], [], 0
    for name, kwargs, bad in spoiled_calls(op, served.rows_per_op):
        try:
            got = call(**kwargs)
        except DshalError:
            refused += 1
            assert not name.endswith(": valid"), f"{name} was refused"
            continue
        except Exception as e:  # noqa: BLE001 - the finding this test exists for
            crashes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            continue
        # ``fmt="e4m3"`` means the backend's native E4M3 (AMD: e4m3fnuz); the reference's is e4m3fn.
        want = reference(**(kwargs | {"fmt": served.native_e4m3} if kwargs.get("fmt") == "e4m3" else kwargs))
        if op == "moe_gate":
            got, want = _sorted_by_id(got), _sorted_by_id(want)
        why = differs(got, want)
        if why and not served.exempt(op, bad):
            wrong.append(f"{name}: {why}")
    assert not crashes, f"{op} on {served.label}: not a DshalError:\n" + "\n".join(crashes)
    assert not wrong, f"{op} on {served.label}: accepted, but not the reference's answer:\n" + "\n".join(wrong)
    assert refused, f"{op}: no spoiled call was refused"


@pytest.mark.needs_interpreter
def test_the_triton_interpreter_still_decodes_fp8_nan_as_a_number() -> None:
    """Why the emulated backends may drop a NaN in an FP8 operand: the Triton interpreter
    decodes E4M3's NaN codes (0x7f, 0xff) as +-480, so a GEMM over them stays finite, where
    the GPU's conversion keeps NaN. When this test fails, the interpreter keeps NaN: remove
    the exemption above and add a NaN row to ``fp8_gemm``'s examples."""
    import triton  # lazy: only where the interpreter runs
    import triton.language as tl

    @triton.jit
    def upcast(x_ptr, y_ptr):
        offsets = tl.arange(0, 4)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.float32))

    codes = torch.tensor([0x7F, 0xFF, 0x38, 0x00], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = torch.empty(4)
    upcast[(1,)](codes, out)
    assert codes.float()[:2].isnan().all()  # torch: NaN
    assert out.tolist() == [480.0, -480.0, 1.0, 0.0]
