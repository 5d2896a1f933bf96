"""A signature-checking stand-in for torch_npu -- NOT an NPU. For tests only.

Built from one release's recorded op schemas (:func:`dshal_ascend.schema.recorded_signatures`),
it has exactly that release's kernels as attributes (a kernel the release lacks is an
AttributeError), binds every call against the schema (a wrong keyword, a missing argument,
a wrong arity or a value of the wrong kind raises :class:`SignatureError`), checks a few
documented constraints the plugin relies on, and computes the result with plain torch on
the CPU so the plugin's code after the call runs (a wrong tuple index or layout shows up
as a wrong result). Its results say nothing about an NPU's numerics or speed, and nothing
it runs is ever reported as an NPU run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dshal_ascend.schema import ReleaseSignatures, SignatureError


@dataclass(frozen=True)
class RecordedCall:
    kernel: str
    schema: str
    arguments: dict[str, Any]


class SignatureCheckingStandIn:
    """Stand-in for the ``torch_npu`` module of one release: checks signatures, computes on CPU.
    Not an NPU (``is_npu`` is False; :meth:`describe` says so)."""

    is_npu = False

    def __init__(self, signatures: ReleaseSignatures) -> None:
        self.release = signatures.release
        self.calls: list[RecordedCall] = []
        self._format_cast: dict[int, weakref.ref] = {}  # id -> tensor made by npu_format_cast
        for kernel, schemas in signatures.ops.items():
            setattr(self, kernel, _Kernel(self, kernel, schemas, _COMPUTE[kernel]))

    def describe(self) -> str:
        return (f"signature-checking stand-in for torch_npu (op-plugin {self.release}): not an NPU; "
                "computes with plain torch on the CPU")

    def called(self, kernel: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.kernel == kernel]

    def was_format_cast(self, t: torch.Tensor) -> bool:
        ref = self._format_cast.get(id(t))
        return ref is not None and ref() is t


class _Kernel:
    def __init__(self, owner: SignatureCheckingStandIn, name: str, schemas, compute: Callable[..., Any]) -> None:
        self.owner, self.name, self.schemas, self.compute = owner, name, schemas, compute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        errors = []
        for schema in self.schemas:
            try:
                bound = schema.bind(args, kwargs)
            except SignatureError as err:
                errors.append(str(err))
                continue
            self.owner.calls.append(RecordedCall(self.name, schema.text, bound))
            result = self.compute(self.owner, bound)
            if not schema.returns_fit(result):
                raise SignatureError(f"stand-in bug: {self.name} result does not match {schema.text}")
            return result
        where = f"torch_npu (op-plugin {self.owner.release}).{self.name}"
        raise SignatureError(f"{where}: no overload accepts the call:\n  " + "\n  ".join(errors))


def _constraint(ok: bool, message: str) -> None:
    if not ok:
        raise SignatureError(message)


def _rms(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def _rms_norm(owner, b):
    x, g = b["self"], b["gamma"]
    newer = tuple(int(p) for p in owner.release.split(".")) >= (7, 2, 0)
    _constraint(g.dtype == x.dtype or (newer and g.dtype == torch.float32),
                f"npu_rms_norm (op-plugin {owner.release} docs): gamma {g.dtype} with x {x.dtype} not accepted")
    return _rms(x, g, b["epsilon"])


def _add_rms_norm(owner, b):
    _constraint(b["gamma"].dtype == b["x1"].dtype, "npu_add_rms_norm: gamma must have x's dtype")
    s = (b["x1"].float() + b["x2"].float()).to(b["x1"].dtype)
    y, rstd = _rms(s, b["gamma"], b["epsilon"])
    return y, rstd, s


def _swiglu(owner, b):
    a, g = b["self"].float().chunk(2, dim=b["dim"])
    return (F.silu(a) * g).to(b["self"].dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, c = x.chunk(2, dim=-1)
    return torch.cat((-c, a), dim=-1)


def _rotary_mul(owner, b):
    x, r1, r2 = b["self"], b["r1"], b["r2"]
    _constraint(b.get("rotary_mode", "half") == "half", "npu_rotary_mul: only half mode is used by dshal")
    _constraint(x.dim() == 4 and r1.dim() == 4 and r1.shape[:2] == (1, 1) and r1.shape[2] in (1, x.shape[2]),
                f"npu_rotary_mul: r1 layout must be 11SD against x {list(x.shape)}, got {list(r1.shape)}")
    return (x.float() * r1.float() + _rotate_half(x.float()) * r2.float()).to(x.dtype)


def _interleave_rope(owner, b):
    x, cos, sin = b["x"], b["cos"], b["sin"]
    _constraint(x.shape[-1] == 64 and cos.shape[1] == 1, "npu_interleave_rope: D must be 64 and cos N must be 1")
    halves = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1).float()
    return (halves * cos.float() + _rotate_half(halves) * sin.float()).to(x.dtype)


def _fused_infer_attention(owner, b):
    q, k, v = b["query"], b["key"], b["value"]
    _constraint(b["input_layout"] == "BNSD", "stand-in models input_layout BNSD only")
    _constraint(b["num_heads"] == q.shape[1], "num_heads must equal query's N")
    kv_heads = b["num_key_value_heads"] or q.shape[1]
    _constraint(kv_heads == k.shape[1] and q.shape[1] % kv_heads == 0, "num_key_value_heads must equal key's N")
    _constraint(k.shape[-1] == v.shape[-1] == q.shape[-1], "query, key and value need one head dim D")
    tq, tk = q.shape[2], k.shape[2]
    mode, mask = b["sparse_mode"], b["atten_mask"]
    rel = torch.arange(tk)[None, :] - (torch.arange(tq)[:, None] + tk - tq)
    if tq == 1:  # docs: sparse_mode, pre/next tokens ignored for one query
        _constraint(mask is None, "stand-in: no mask expected for one query")
        hidden = torch.zeros(1, tk, dtype=torch.bool)
    elif mode == 0:
        hidden = torch.zeros(tq, tk, dtype=torch.bool) if mask is None else mask.bool().reshape(tq, tk)
    elif mode in (3, 4):
        _constraint(mask is not None and tuple(mask.shape[-2:]) == (2048, 2048),
                    f"sparse_mode {mode} needs the 2048 x 2048 compressed mask")
        if mode == 3:
            hidden = rel > 0
        else:
            hidden = (rel < -b["pre_tokens"]) | (rel > b["next_tokens"])
    else:
        raise SignatureError(f"stand-in does not model sparse_mode {mode}")
    rep = q.shape[1] // kv_heads
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * b["scale"]
    s = s.masked_fill(hidden, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return (p @ vf).to(q.dtype), lse


def _gating_top_k(owner, b):
    x, k = b["x"], b["k"]
    _constraint(b["norm_type"] == 1 and b["group_select_mode"] == 1 and b["renorm"] == 0,
                "stand-in models DeepSeek routing only (sigmoid, top-2 group score)")
    scores = torch.sigmoid(x.float())
    choice = scores if b["bias"] is None else scores + b["bias"].float()
    t, e = x.shape
    groups = choice.reshape(t, b["group_count"], e // b["group_count"])
    group_score = groups.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(b["k_group"], dim=-1).indices, 1.0)
    masked = (groups * 0 + keep[..., None]).reshape(t, e).bool()
    ids = choice.masked_fill(~masked, float("-inf")).topk(k, dim=-1).indices
    return scores.gather(1, ids).to(x.dtype), ids.to(torch.int32), scores


def _grouped_matmul(owner, b):
    (x,), (w,) = b["x"], b["weight"]
    _constraint(b["split_item"] == 2, "dshal calls npu_grouped_matmul with split_item=2 (one tensor out)")
    group_list = b["group_list"]
    ends = torch.as_tensor(group_list, dtype=torch.int64).reshape(-1)
    if b.get("group_list_type", 0) == 1:
        ends = ends.cumsum(0)
    _constraint(ends.numel() == w.shape[0], f"group_list has {ends.numel()} groups, weight {w.shape[0]} experts")
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    quantized = x.dtype == torch.int8
    out_dtype = b["output_dtype"] or x.dtype
    if quantized:
        _constraint(w.dtype == torch.int8 and b["scale"] is not None and b.get("per_token_scale") is not None
                    and out_dtype in (torch.bfloat16, torch.float16),
                    "int8 npu_grouped_matmul: int8 weight, scale, per_token_scale and a bf16/fp16 output_dtype")
        want_scale = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32  # 7.1.0 doc, per-token table
        _constraint(b["scale"][0].dtype == want_scale and b["per_token_scale"][0].dtype == torch.float32,
                    f"per-token npu_grouped_matmul, {out_dtype} out: scale {want_scale}, per_token_scale float32")
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float32)
    for e in range(w.shape[0]):
        lo, hi = int(starts[e]), int(ends[e])
        if hi > lo:
            acc = x[lo:hi].double() @ w[e].double()
            if quantized:
                acc = acc * b["per_token_scale"][0][lo:hi].double()[:, None] * b["scale"][0][e].double()[None, :]
            out[lo:hi] = acc.float()
    return [out.to(out_dtype)]


def _dynamic_quant(owner, b):
    x = b["input"].float()
    amax = x.abs().amax(-1)
    scale = amax / 127.0
    q = torch.where(scale[..., None] > 0, torch.round(x / scale.clamp_min(1e-30)[..., None]), torch.zeros_like(x))
    return q.clamp(-128, 127).to(torch.int8), scale


def _quant_matmul(owner, b):
    x1, x2, scale = b["x1"], b["x2"], b["scale"]
    _constraint(x1.dtype == x2.dtype == torch.int8, "npu_quant_matmul: int8 x1 and x2")
    _constraint(x1.shape[-1] == x2.shape[0],
                f"npu_quant_matmul: x2 must be [K, N]: x1 {list(x1.shape)}, x2 {list(x2.shape)}")
    acc = x1.double() @ x2.double()
    out_dtype = b["output_dtype"]
    if out_dtype == torch.int32:
        old = tuple(int(p) for p in owner.release.split(".")) < (7, 0, 0)
        _constraint(not (old and scale.dtype == torch.float32 and b["pertoken_scale"] is None),
                    f"op-plugin {owner.release}: an int32 output converts a float32 scale (npu_trans_quant_param)")
        return acc.to(torch.int32)
    _constraint(out_dtype in (torch.bfloat16, torch.float16) and b["pertoken_scale"] is not None,
                "dshal's W8A8 call: pertoken_scale with a bf16/fp16 output")
    y = acc * scale.double()[None, :] * b["pertoken_scale"].double()[:, None]
    if b["bias"] is not None:
        y = y + b["bias"].double()
    return y.to(out_dtype)


def _format_cast(owner, b):
    out = b["self"].clone()
    owner._format_cast[id(out)] = weakref.ref(out)
    return out


_COMPUTE: dict[str, Callable[[SignatureCheckingStandIn, dict[str, Any]], Any]] = {
    "npu_rms_norm": _rms_norm,
    "npu_add_rms_norm": _add_rms_norm,
    "npu_swiglu": _swiglu,
    "npu_rotary_mul": _rotary_mul,
    "npu_interleave_rope": _interleave_rope,
    "npu_fused_infer_attention_score": _fused_infer_attention,
    "npu_moe_gating_top_k": _gating_top_k,
    "npu_grouped_matmul": _grouped_matmul,
    "npu_dynamic_quant": _dynamic_quant,
    "npu_quant_matmul": _quant_matmul,
    "npu_format_cast": _format_cast,
}
