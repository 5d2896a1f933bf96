"""Metrics and verdicts: how one output is compared with the float64 oracle.

Every comparison yields :class:`Check` objects (metric, value, threshold, a readable
detail, the tolerance that would have been needed). A case passes when all its checks do;
its report row shows the failing check with the worst margin, or else the check closest
to its threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dshal_conformance.tolerances import CLOSENESS_METRIC, THRESHOLDS, Tolerance


@dataclass
class Check:
    """One metric measured against one threshold."""

    metric: str
    value: float
    threshold: float
    at_least: bool = False
    detail: str = ""
    #: The tolerance that would have made this check pass (metric-specific keys).
    needed: dict[str, float] = field(default_factory=dict)
    origin: str = ""

    @property
    def ok(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    @property
    def badness(self) -> float:
        """How close to (or past) the threshold: 1 is at the threshold, larger is worse."""
        v, t = self.value, self.threshold
        if math.isnan(v):
            return math.inf
        if self.at_least:
            return t / v if v > 0 else (math.inf if t > 0 else 0.0)
        if t == 0:
            return 0.0 if v == 0 else math.inf
        return v / t

    def describe(self) -> str:
        op = ">=" if self.at_least else "<="
        word = "ok" if self.ok else "FAILED"
        text = f"{self.metric} = {_num(self.value)} ({word}: needs {op} {_num(self.threshold)})"
        return f"{text}; {self.detail}" if self.detail else text


def failed(metric: str, detail: str) -> Check:
    """A check that failed outright (wrong shape, wrong dtype, missing output...)."""
    return Check(metric, math.inf, 0.0, detail=detail)


def threshold_check(metric: str, value: float, detail: str = "") -> Check:
    """``value`` against the THRESHOLDS row named ``metric``."""
    row = THRESHOLDS[metric]
    needed = {metric: value} if not math.isnan(value) else {}
    return Check(metric, value, row.limit, row.at_least, detail, needed, row.origin)


def _num(v: float) -> str:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.3e}"


def _where(index: torch.Tensor, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(index, shape)) if len(shape) else ()


# ------------------------------------------------------------------ structure
def check_structure(name: str, out: Any, ref: torch.Tensor) -> Check | None:
    """A failed check when ``out`` is not a tensor of ``ref``'s shape, else None."""
    if not isinstance(out, torch.Tensor):
        return failed(f"{name}.type", f"{name}: expected a tensor of shape {list(ref.shape)}, got {type(out).__name__}")
    if tuple(out.shape) != tuple(ref.shape):
        return failed(f"{name}.shape", f"{name}: shape {list(out.shape)}, expected {list(ref.shape)}")
    return None


def check_dtype(name: str, out: torch.Tensor, expected: torch.dtype | None) -> Check | None:
    if expected is not None and out.dtype != expected:
        return failed(f"{name}.dtype", f"{name}: dtype {out.dtype}, expected {expected}")
    return None


# ------------------------------------------------------------------ closeness
def nonfinite_policy(name: str, out: torch.Tensor, ref: torch.Tensor) -> Check | None:
    """NaN never passes unless the reference is NaN there; +-Inf must match exactly."""
    o, r = out.to(torch.float64), ref.to(torch.float64)
    bad = torch.isnan(o) != torch.isnan(r)
    inf_bad = (torch.isinf(r) | torch.isinf(o)) & ~(o == r) & ~torch.isnan(r)
    bad = bad | inf_bad
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        at = _where(torch.tensor(first), out.shape)
        count = int(bad.sum())
        return failed(
            f"{name}.nonfinite",
            f"{name}: {count} element(s) break the NaN/Inf policy (propagate as the reference does); "
            f"first at {at}: got {float(o.flatten()[first])}, reference {float(r.flatten()[first])}",
        )
    return None


def close(name: str, out: Any, ref: torch.Tensor, tol: Tolerance, expected_dtype: torch.dtype | None = None) -> list[Check]:
    """Elementwise ``|out - ref| <= atol + rtol |ref|`` after the structure and NaN/Inf checks."""
    for problem in (check_structure(name, out, ref),):
        if problem:
            return [problem]
    problem = check_dtype(name, out, expected_dtype) or nonfinite_policy(name, out, ref)
    if problem:
        return [problem]
    o, r = out.detach().to("cpu", torch.float64), ref.detach().to(torch.float64)
    finite = torch.isfinite(r)
    err = torch.where(finite, (o - r).abs(), torch.zeros((), dtype=torch.float64))
    bound = tol.atol + tol.rtol * r.abs()
    ratio = torch.where(finite, err / bound, torch.zeros((), dtype=torch.float64))
    metric = f"{name}.{CLOSENESS_METRIC}" if name else CLOSENESS_METRIC
    if ratio.numel() == 0:
        return [Check(metric, 0.0, 1.0, detail=f"{name}: empty output", origin=tol.origin)]
    worst = int(ratio.flatten().argmax())
    value = float(ratio.flatten()[worst])
    at = _where(torch.tensor(worst), ratio.shape)
    detail = (
        f"{name}: max |err| {_num(float(err.flatten()[worst]))} at {at}: got {_num(float(o.flatten()[worst]))}, "
        f"reference {_num(float(r.flatten()[worst]))} (rtol {tol.rtol:g}, atol {tol.atol:g}: {tol.origin})"
    )
    needed = {"rtol": value * tol.rtol, "atol": value * tol.atol}
    return [Check(metric, value, 1.0, detail=detail, needed=needed, origin=tol.origin)]


# ------------------------------------------------------------------ FP8 GEMM metrics
def similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    """DeepGEMM's ``calc_diff``: ``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64 (0 = identical)."""
    x, y = out.detach().to("cpu", torch.float64), ref.detach().to(torch.float64)
    denom = float((x * x + y * y).sum())
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denom


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (inf when equal)."""
    x, y = out.detach().to("cpu", torch.float64), ref.detach().to(torch.float64)
    noise = float(((x - y) ** 2).sum())
    signal = float((y * y).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def fp8_result(name: str, out: Any, ref: torch.Tensor, against: str, expected_dtype: torch.dtype | None = None) -> list[Check]:
    """Similarity and SQNR of an FP8 result against ``ref`` (``against``: dequant | prequant)."""
    problem = check_structure(name, out, ref) or check_dtype(name, out, expected_dtype)
    if problem:
        return [problem]
    if not bool(torch.isfinite(out.detach().cpu()).all()):
        return [nonfinite_policy(name, out, ref) or failed(f"{name}.nonfinite", f"{name}: non-finite output")]
    if out.numel() == 0:
        return [threshold_check(f"similarity_vs_{against}", 0.0, f"{name}: empty output")]
    sim = similarity(out, ref)
    snr = sqnr_db(out, ref)
    what = {
        "dequant": "the float64 GEMM of the dequantized inputs",
        "prequant": "the float64 GEMM of the inputs before quantization",
        "prequant_e5m2": "the float64 GEMM of the inputs before quantization to E5M2",
        "requant": "the float64 oracle (which re-quantizes intermediates in float64)",
    }[against]
    return [
        threshold_check(f"similarity_vs_{against}", sim, f"{name} against {what}"),
        threshold_check(f"sqnr_vs_{against}_db", snr, f"{name} against {what}"),
    ]


# ------------------------------------------------------------------ quantizers
def _fp8_order(q: torch.Tensor) -> torch.Tensor:
    """FP8 codes as integers ordered like the values they encode (sign-magnitude -> signed)."""
    bits = q.contiguous().view(torch.uint8).to(torch.int32)
    magnitude = bits & 0x7F
    return torch.where(bits & 0x80 != 0, -magnitude, magnitude)


def fp8_codes(name: str, q: Any, ref_q: torch.Tensor, boundary: torch.Tensor | None = None) -> list[Check]:
    """Distance in FP8 code steps between ``q`` and the oracle's codes (NaN must match NaN).
    ``boundary``: where the exact quotient sits at a rounding boundary (see
    :func:`near_rounding_boundary`); a code that differs there is left out of the fraction."""
    problem = check_structure(name, q, ref_q) or check_dtype(name, q, ref_q.dtype)
    if problem:
        return [problem]
    q = q.detach().cpu()
    problem = nonfinite_policy(name, q.float(), ref_q.float())
    if problem:
        return [problem]
    if q.numel() == 0:
        return [threshold_check("fp8_code_distance", 0.0, f"{name}: empty")]
    nan = torch.isnan(ref_q.float())
    dist = torch.where(nan, 0, (_fp8_order(q) - _fp8_order(ref_q)).abs())
    worst = int(dist.flatten().argmax())
    at = _where(torch.tensor(worst), dist.shape)
    value = float(dist.flatten()[worst])
    differ = int((dist > 0).sum())
    detail = (
        f"{name}: {differ} of {dist.numel()} codes differ; worst at {at}: "
        f"got {float(q.float().flatten()[worst])}, reference {float(ref_q.float().flatten()[worst])}"
    )
    return [threshold_check("fp8_code_distance", value, detail),
            _mismatch_check("fp8_code_mismatch_frac", name, dist > 0, boundary, "codes")]


def near_rounding_boundary(quotient: torch.Tensor, to_code: Any) -> torch.Tensor:
    """Where ``quotient`` (the exact ``x / scale``, float64) lies within a few float32 ulps of a
    point where rounding to the code grid changes (``to_code``: float64 -> codes). A correct
    quantizer that divides in another order (``x * (1 / scale)``, DeepGEMM's ``x * (448 /
    amax)``) rounds those one code the other way: bf16 inputs land on such ties exactly."""
    near = 4 * torch.finfo(torch.float32).eps  # relative: a few roundings of float32 arithmetic
    below, above = to_code(quotient * (1 - near)), to_code(quotient * (1 + near))
    return (below != above) & ~torch.isnan(quotient)


def _mismatch_check(metric: str, name: str, differs: torch.Tensor, boundary: torch.Tensor | None, what: str) -> Check:
    """The fraction of the quantized values that differ from the oracle's away from a rounding
    boundary (``boundary``, where another correct order of float32 arithmetic may land one step
    off): there a correct quantizer differs on none, a systematic rounding error (toward zero,
    say) on about half of them."""
    total, at_boundary = differs.numel(), 0
    if boundary is not None:
        at_boundary = int((differs & boundary).sum())
        differs = differs & ~boundary
    differ = int(differs.sum())
    tie = f" (and {at_boundary} at a rounding boundary, allowed)" if at_boundary else ""
    return threshold_check(metric, differ / total, f"{name}: {differ} of {total} {what} differ from the oracle's{tie}")


def int_codes(name: str, q: Any, ref_q: torch.Tensor, metric: str = "int8_code_distance",
              boundary: torch.Tensor | None = None) -> list[Check]:
    problem = check_structure(name, q, ref_q) or check_dtype(name, q, ref_q.dtype)
    if problem:
        return [problem]
    if ref_q.numel() == 0:
        return [threshold_check(metric, 0.0, f"{name}: empty")]
    dist = (q.detach().cpu().to(torch.int64) - ref_q.to(torch.int64)).abs()
    worst = int(dist.flatten().argmax())
    at = _where(torch.tensor(worst), dist.shape)
    differ = int((dist > 0).sum())
    detail = (
        f"{name}: {differ} of {dist.numel()} values differ; worst at {at}: "
        f"got {int(q.flatten()[worst])}, reference {int(ref_q.flatten()[worst])}"
    )
    return [threshold_check(metric, float(dist.flatten()[worst]), detail),
            _mismatch_check(metric.replace("_distance", "_mismatch_frac"), name, dist > 0, boundary, "values")]


def scales(name: str, scale: Any, ref_scale: torch.Tensor) -> list[Check]:
    """Relative error of quantization scales (float32, never NaN/0)."""
    problem = check_structure(name, scale, ref_scale) or check_dtype(name, scale, torch.float32)
    if problem:
        return [problem]
    s, r = scale.detach().to("cpu", torch.float64), ref_scale.to(torch.float64)
    if s.numel() == 0:
        return [threshold_check("scale_rel_err", 0.0, f"{name}: empty")]
    if not bool(torch.isfinite(s).all()):
        return [failed(f"{name}.nonfinite", f"{name}: non-finite scale (zero blocks must get scale 1)")]
    rel = (s - r).abs() / r.abs().clamp(min=torch.finfo(torch.float32).tiny)
    worst = int(rel.flatten().argmax())
    at = _where(torch.tensor(worst), rel.shape)
    ratio = float(s.flatten()[worst] / r.flatten()[worst]) if float(r.flatten()[worst]) else math.inf
    detail = (
        f"{name}: worst at {at}: got {_num(float(s.flatten()[worst]))}, reference {_num(float(r.flatten()[worst]))} "
        f"(ratio {ratio:.6g})"
    )
    return [threshold_check("scale_rel_err", float(rel.flatten()[worst]), detail)]


# ------------------------------------------------------------------ verdicts
@dataclass
class Verdict:
    status: str
    metric: str | None
    value: float | None
    threshold: float | None
    reason: str
    needed: dict[str, float] | None = None
    #: Structured evidence beyond one metric (per-layer drift, per-op findings), JSON-friendly.
    details: dict[str, Any] | None = None
    #: A property the backend lacks that is no contract violation (``batch-variant``,
    #: ``nondeterministic``, ``host-sync``, ``capture-failed``): recorded with status
    #: ``unsupported`` so it never fails a run, and shown by the matrix.
    finding: str | None = None
    #: The waiver threshold keys (``metric -> limit`` names) that loosened a check of this
    #: verdict: how waiver accounting knows a waiver was used.
    waived: tuple[str, ...] = ()


def finding(name: str, reason: str, metric: str | None = None, value: float | None = None,
            details: dict[str, Any] | None = None) -> Verdict:
    """A finding (see :attr:`Verdict.finding`): status ``unsupported`` with the evidence."""
    return Verdict("unsupported", metric, value, None, reason, None, details, name)


def verdict(checks: list[Check], overrides: dict[str, float] | None = None) -> Verdict:
    """pass when every check passes; the row shows the worst check (failing ones first).
    ``overrides`` (from a waiver) loosens the threshold of the metrics it names; a metric
    named ``out.max_err_ratio`` matches the override ``max_err_ratio``."""
    waived = []
    for c in checks:
        key = next((k for k in (c.metric, c.metric.rsplit(".", 1)[-1]) if k in (overrides or {})), None)
        if key is not None:
            limit = overrides[key]
            c.detail = f"{c.detail}; threshold {_num(c.threshold)} loosened to {_num(limit)} by a waiver".lstrip("; ")
            c.threshold = limit
            waived.append(key)
    if not checks:
        return Verdict("error", None, None, None, "the case produced no checks")
    failing = [c for c in checks if not c.ok]
    pool = failing or checks
    shown = max(pool, key=lambda c: c.badness)
    if failing:
        reason = "; ".join(c.describe() for c in failing)
    else:
        reason = "; ".join(c.describe() for c in checks)
    return Verdict(
        "fail" if failing else "pass",
        shown.metric,
        _json_float(shown.value),
        _json_float(shown.threshold),
        reason,
        {k: _json_float(v) for k, v in shown.needed.items()} or None,
        waived=tuple(dict.fromkeys(waived)),
    )


def _json_float(v: float) -> float | None:
    """JSON has no NaN/Inf: those become None (the reason text keeps the word)."""
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v
