"""The ``determinism`` family: same call, same bits; a row's result independent of its batch.

For linear, fp8_gemm, rms_norm, attention and moe_experts, case ``determinism/<op>/<dtype>``
makes two judgements:

- ``/repeat``: the same call twice, the second time on fresh copies of the inputs
  (other addresses), gives bitwise equal outputs;
- ``/batch-invariant``: the op on sub-batches (every row alone, and windows of ``WINDOWS``
  rows: see :func:`_sub_batches`) gives bitwise the rows of the full batch of ``ROWS`` = 96
  (a "row" is dim 0: a token of ``[M, K]`` inputs, a sequence of attention's ``[B, H, T, D]``).
  Kernels switch paths with the row count (the cpu backend's float32 linear runs up to 8 rows
  through its C GEMV, more through torch's GEMM), and a rounding that lands apart may show at
  only a few rows: sub-batches that stay on one side of a threshold, or miss those rows,
  would hide the difference.

Many kernels are legitimately batch-variant (split-K and tile choices follow M), so a
difference is a *finding*, not a failure: status ``unsupported`` with ``finding`` set
(``nondeterministic`` / ``batch-variant``) and the evidence (first differing row, max
difference). Only where the backend promises it -- ``determinism: strict`` and the op
served by one of the backend's ``batch_invariant_ops()`` -- is a difference a ``fail``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dshal.errors import DshalError, ProviderError, UnsupportedOpError
from dshal.ops.catalogue import SPECS
from dshal.runtime import current
from dshal_conformance.cases.base import Case, Context, Outcome, dtype_name, fail_all, to_cpu, unsupported_outcomes
from dshal_conformance.judge import Verdict, finding

BF16, F32 = torch.bfloat16, torch.float32
SUFFIXES = ("/repeat", "/batch-invariant")
#: Rows of the full batch (dim 0). Sub-batches (:func:`_sub_batches`) against 96 rows cross
#: the row counts where kernels change path (GEMV vs GEMM, decode vs prefill kernels, M tiles)
#: while the cases stay small.
ROWS = 96
#: Sizes of the sub-batches besides single rows (odd counts around kernels' thresholds, a tile).
WINDOWS = (2, 3, 5, 9, 16)


#: op -> (dtypes, the example row's parameters (inputs: the op's own example builder, with
#: ``ROWS`` rows along dim 0), the arguments that are batched along dim 0).
OPS: dict[str, tuple[Sequence[torch.dtype], Mapping[str, Any], tuple[str, ...]]] = {
    "linear": ((F32, BF16), dict(m=ROWS, n=128, k=256), ("x",)),
    "fp8_gemm": ((BF16,), dict(m=ROWS, n=128, k=256, granularity="block"), ("a", "a_scale")),
    # float32 too: a model in float32 (the tiny one) hides 1-ulp noise that bf16's rounding masks
    "rms_norm": ((F32, BF16), dict(shape=(ROWS, 256), residual=True), ("x", "residual")),
    "attention": ((F32, BF16), dict(b=ROWS, hq=4, hk=2, tq=16, d=32), ("q", "k", "v")),
    "moe_experts": ((F32, BF16), dict(t=ROWS, h=64, i=32, e=4, k=2), ("x", "weights", "ids")),
}


def _outputs(value: Any) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, int | None]:
    """Max absolute difference of two output tuples and the first differing row (None: equal bits)."""
    worst, row = 0.0, None
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf"), 0
        same = torch.eq(x.view(torch.uint8) if x.dtype.itemsize == 1 else x, y.view(torch.uint8) if y.dtype.itemsize == 1 else y)
        same = same | (torch.isnan(x) & torch.isnan(y)) if x.is_floating_point() else same
        if not bool(same.all()):
            bad = (~same).reshape(same.shape[0], -1).any(dim=1).nonzero()
            row = int(bad[0]) if row is None else min(row, int(bad[0]))
            worst = max(worst, float((x.double() - y.double()).abs().nan_to_num(float("inf")).max()))
    return worst, row


def _sub_batches(n: int) -> list[slice]:
    """Row slices compared with the full batch of ``n`` rows: every row alone (a row's output
    may depend on its neighbours' values only at some rows: a rounding that lands apart), then
    ``WINDOWS`` rows from row 1 (not at the start) and at the end."""
    windows = [slice(start, start + size) for size in WINDOWS if size < n for start in (1, n - size)]
    return [slice(i, i + 1) for i in range(n)] + windows


def _sub_batch_text(n: int) -> str:
    return f"each of the {n} rows alone, and {', '.join(map(str, WINDOWS))} rows from row 1 and at the end"


def promised(op: str) -> bool:
    """True when the active runtime runs ``determinism: strict`` and serves ``op`` with a
    provider its backend declares batch-invariant."""
    rt = current()
    return getattr(rt.config, "determinism", "default") == "strict" and op in getattr(rt, "batch_invariant", frozenset())


def run_op(ctx: Context, op: str, dtype: torch.dtype) -> list[Outcome]:
    _, params, batched = OPS[op]
    kwargs = SPECS[op].example_inputs(ctx.draw, {**params, "dtype": dtype}).kwargs
    try:
        first = _outputs(ctx.call(op, kwargs))
        second = _outputs(ctx.call(op, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
    except UnsupportedOpError as err:
        return unsupported_outcomes(SUFFIXES, f"backend does not provide {op!r}: {err}")
    except ProviderError as err:  # not a refusal: its result (or its inputs afterwards) broke the contract
        return fail_all(SUFFIXES, "fail", f"the provider breaks the op's contract: {err}")
    except DshalError as err:
        return fail_all(SUFFIXES, "fail", f"valid input rejected with {type(err).__name__}: {err}")
    strict = promised(op)
    diff, row = _difference(first, second)
    if row is None:
        repeat = Verdict("pass", "bitwise_repeat", 0.0, 0.0, f"{op}: two calls (the second on fresh input copies) gave equal bits")
    else:
        text = f"{op}: the same call twice differs (first at row {row}, max |diff| {diff:.3g})"
        repeat = Verdict("fail", "bitwise_repeat", diff, 0.0, text + " although determinism: strict") if strict else \
            finding("nondeterministic", text, "bitwise_repeat", diff, {"row": row})
    rows = first[0].shape[0]
    worst, where = 0.0, None
    for part in _sub_batches(rows):
        sub = {k: (v[part] if k in batched else v) for k, v in kwargs.items()}
        got = _outputs(to_cpu(ctx.table[op](**{k: ctx.place(v) for k, v in sub.items()})))
        d, r = _difference(got, tuple(t[part] for t in first))
        if r is not None and (where is None or d > worst):
            worst, where = d, (part.start + r, f"rows {part.start}..{part.stop - 1} of {rows}")
    if where is None:
        invariant = Verdict("pass", "bitwise_batch_invariance", 0.0, 0.0,
                            f"{op}: rows computed in sub-batches ({_sub_batch_text(rows)}) equal the full batch's bits")
    else:
        text = f"{op}: row {where[0]} computed in a sub-batch ({where[1]}) differs from the full batch (max |diff| {worst:.3g})"
        invariant = Verdict("fail", "bitwise_batch_invariance", worst, 0.0, text + " although determinism: strict") if strict else \
            finding("batch-variant", text, "bitwise_batch_invariance", worst, {"row": where[0]})
    return [Outcome("/repeat", repeat), Outcome("/batch-invariant", invariant)]


def cases() -> list[Case]:
    out = []
    for op, (dtypes, _, batched) in OPS.items():
        for dtype in dtypes:

            def body(ctx: Context, op: str = op, dtype: torch.dtype = dtype) -> list[Outcome]:
                return run_op(ctx, op, dtype)

            name = {F32: "f32", BF16: "bf16"}[dtype]
            params: Mapping[str, Any] = {"rows": ROWS, "batched": list(batched), "sub_batches": _sub_batch_text(ROWS)}
            out.append(Case(f"determinism/{op}/{name}", op, "determinism", dtype_name(dtype), dict(params), frozenset({"ci", "full"}), body, SUFFIXES))
    return out
