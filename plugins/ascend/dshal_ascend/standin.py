"""A signature-checking stand-in for torch_npu -- NOT an NPU. For tests and the dry view of
``dshal info --backend ascend --standin RELEASE`` (:func:`standin_trace`) only.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dshal.plugin import SPECS
from dshal_ascend.layouts import (
    DSA_NO_TOKEN_LIMIT,
    FIA_MAX_BATCH,
    FIA_MAX_KEYS,
    GROUPED_MATMUL_MAX_GROUPS,
    INDEXER_DTYPES,
    INDEXER_HEAD_DIM,
    INDEXER_MAX_HEADS,
    SFA_HEADS,
    SFA_LATENT_DIM,
    SFA_ROPE_DIM,
    indexer_sparse_count_fits,
)
from dshal_ascend.npu_ops import AscendOps
from dshal_ascend.releases import kernel_features
from dshal_ascend.schema import ReleaseSignatures, SignatureError, recorded_signatures


@dataclass(frozen=True)
class RecordedCall:
    kernel: str
    schema: str
    arguments: dict[str, Any]
    #: The names of the arguments the caller passed, positional ones first (the rest of
    #: ``arguments`` are the schema's defaults).
    given: tuple[str, ...] = ()
    #: How many of ``given`` were passed positionally.
    positional: int = 0


class SignatureCheckingStandIn:
    """Stand-in for the ``torch_npu`` module of one release: checks signatures, computes on CPU.
    Not an NPU (``is_npu`` is False; :meth:`describe` says so)."""

    is_npu = False

    def __init__(self, signatures: ReleaseSignatures) -> None:
        self.release = signatures.release
        self.calls: list[RecordedCall] = []
        #: storage address -> storage of each tensor npu_format_cast made (kept alive, so an
        #: address is never another tensor's: views of a cast weight are recognised too)
        self._format_cast: dict[int, torch.UntypedStorage] = {}
        for kernel, schemas in signatures.ops.items():
            setattr(self, kernel, _Kernel(self, kernel, schemas, _COMPUTE[kernel]))

    def describe(self) -> str:
        return (f"signature-checking stand-in for torch_npu (op-plugin {self.release}): not an NPU; "
                "computes with plain torch on the CPU")

    def called(self, kernel: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.kernel == kernel]

    def was_format_cast(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on the storage of a tensor ``npu_format_cast`` made (a view too)."""
        return t.untyped_storage().data_ptr() in self._format_cast


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
            given = tuple(list(bound)[: len(args) + len(kwargs)])  # bind() puts the caller's first
            self.owner.calls.append(RecordedCall(self.name, schema.text, bound, given, len(args)))
            result = self.compute(self.owner, bound)
            if not schema.returns_fit(result):
                raise SignatureError(f"stand-in bug: {self.name} result does not match {schema.text}")
            return result
        where = f"torch_npu (op-plugin {self.owner.release}).{self.name}"
        raise SignatureError(f"{where}: no overload accepts the call:\n  " + "\n  ".join(errors))


#: ScalarType numbers of the dtypes dshal passes (op-plugin 26.0.0 ``_meta_registrations.py``
#: ``TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP``): what an ``int? output_dtype`` (26.x) receives.
_SCALAR_TYPE_NUMBERS = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 15: torch.bfloat16}


def _dtype_arg(value: Any) -> torch.dtype | None:
    """An ``output_dtype`` argument as a dtype: a torch.dtype (``ScalarType?``, or ``int?`` through
    torch.ops' conversion) or its ScalarType number (``int?``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in _SCALAR_TYPE_NUMBERS:
            raise SignatureError(f"stand-in does not model ScalarType number {value}")
        return _SCALAR_TYPE_NUMBERS[value]
    return value


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
    if b.get("query_rope") is not None or b.get("key_rope") is not None or b["block_table"] is not None:
        return _mla_paged_attention(owner, b)
    _constraint(b["num_heads"] == q.shape[1], "num_heads must equal query's N")
    kv_heads = b["num_key_value_heads"] or q.shape[1]
    _constraint(kv_heads == k.shape[1] and q.shape[1] % kv_heads == 0, "num_key_value_heads must equal key's N")
    _constraint(k.shape[-1] == v.shape[-1] == q.shape[-1], "query, key and value need one head dim D")
    tq, tk = q.shape[2], k.shape[2]
    _constraint(q.shape[0] <= FIA_MAX_BATCH and tk <= FIA_MAX_KEYS,
                f"batch {q.shape[0]}, {tk} keys; the kernel takes B <= {FIA_MAX_BATCH}, S <= {FIA_MAX_KEYS}")
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
    p = torch.softmax(s, dim=-1)
    p = torch.where(hidden.all(dim=-1, keepdim=True), torch.zeros((), dtype=p.dtype), p)  # no key: zeros, not NaN
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return (p @ vf).to(q.dtype), lse


def _mla_paged_attention(owner, b):
    """The MLA form with page attention, BNSD (op-plugin 7.1.0 / 7.2.0 docs, query D 512; 7.3.0,
    26.0.0 and 26.1.0 take more, dshal calls only what all take): its documented A2/A3 limits, then
    ``softmax(scale * (q k^T + q_rope k_rope^T)) v`` over each batch's pages, end-aligned
    causal for sparse_mode 3. The softmax LSE is not asked for: ``[1]`` zeros, as documented."""
    q, key, value, q_rope, k_rope = b["query"], b["key"], b["value"], b["query_rope"], b["key_rope"]
    table, lengths, block = b["block_table"], b["actual_seq_lengths_kv"], b["block_size"]
    batch, heads, tq, d = q.shape
    _constraint(q_rope is not None and k_rope is not None, "query_rope and key_rope go together")
    _constraint(d == 512 and heads in (32, 64, 128) and 1 <= tq <= 16,
                f"MLA form: query [B, 32/64/128, 1-16, 512], got {list(q.shape)}")
    _constraint(tuple(q_rope.shape) == (batch, heads, tq, 64), f"query_rope must be {[batch, heads, tq, 64]}, got {list(q_rope.shape)}")
    _constraint(b["num_heads"] == heads and b["num_key_value_heads"] == 1, "MLA form: num_heads = query's N, one kv head")
    _constraint(table is not None and block in (16, 128), f"MLA form needs page attention with block_size 16 or 128, got {block}")
    pages = key.shape[0]
    _constraint(tuple(key.shape) == (pages, 1, block, 512) and tuple(value.shape) == tuple(key.shape),
                f"paged key / value must be [blocknum, 1, {block}, 512], got {list(key.shape)} / {list(value.shape)}")
    _constraint(tuple(k_rope.shape) == (pages, 1, block, 64), f"key_rope must be [{pages}, 1, {block}, 64], got {list(k_rope.shape)}")
    dtypes = {t.dtype for t in (q, key, value, q_rope, k_rope)}
    _constraint(len(dtypes) == 1 and q.dtype in (torch.float16, torch.bfloat16), f"MLA form: one fp16/bf16 dtype, got {dtypes}")
    _constraint(all(t.is_contiguous() for t in (q, key, value, q_rope, k_rope)),
                "query, key, value, query_rope and key_rope must be contiguous")
    _constraint(table.dtype == torch.int32 and table.dim() == 2 and table.shape[0] == batch, "block_table: int32 [B, pages]")
    _constraint(lengths is not None and (len(lengths) == 1 or len(lengths) >= batch),
                "page attention needs actual_seq_lengths_kv: one length, or one per batch")
    lengths = [lengths[0]] * batch if len(lengths) == 1 else list(lengths[:batch])
    _constraint(batch <= 65536 and max(int(n) for n in lengths) <= 262144 and key.numel() <= 2**31 - 1,
                "B <= 65536, S <= 262144, key / value of at most 2**31 - 1 elements")
    need = [-(-int(n) // block) for n in lengths]
    _constraint(table.shape[1] >= max(need) and pages >= sum(need), "block_table / blocknum too small for the lengths")
    _constraint(not b["softmax_lse_flag"], "the MLA form does not return the softmax LSE")
    mode, mask = b["sparse_mode"], b["atten_mask"]
    if tq == 1:
        _constraint(mode == 0 and mask is None, "MLA form, one query: sparse_mode 0 and no mask")
    else:
        _constraint(mode == 3 and mask is not None and tuple(mask.shape[-2:]) == (2048, 2048),
                    "MLA form, several queries: sparse_mode 3 with the compressed mask")
    out = torch.zeros(batch, heads, tq, 512)
    for i in range(batch):
        rows = table[i, : need[i]].long()
        n = int(lengths[i])
        kf, rf, vf = (t[rows].reshape(-1, t.shape[-1])[:n].float() for t in (key, k_rope, value))
        s = (q[i].float() @ kf.T + q_rope[i].float() @ rf.T) * b["scale"]  # [H, Tq, n]
        if tq > 1:
            s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(tq)[:, None] + n - tq, float("-inf"))
        out[i] = torch.softmax(s, dim=-1) @ vf
    return out.to(q.dtype), torch.zeros(1)


def _release_key(owner) -> tuple[int, ...]:
    return tuple(int(p) for p in owner.release.split("."))


def _dsa_common(owner, b, kernel: str, query_layout: str, key_layout: str) -> None:
    """What both DSA kernels' pages say of the arguments dshal passes (the stand-in models BSND only)."""
    _constraint(b[query_layout] == "BSND" and b[key_layout] == "BSND",
                f"{kernel}: the stand-in models {query_layout}=BSND / {key_layout}=BSND (the docs want them equal "
                f"without page attention), got {b[query_layout]!r} / {b[key_layout]!r}")
    _constraint(b["pre_tokens"] == DSA_NO_TOKEN_LIMIT and b["next_tokens"] == DSA_NO_TOKEN_LIMIT,
                f"{kernel}: pre_tokens / next_tokens take only their default 2**63 - 1")
    _constraint(b["sparse_mode"] in (0, 3), f"{kernel}: sparse_mode 0 or 3, got {b['sparse_mode']}")
    _constraint(b["block_table"] is None, f"{kernel}: the stand-in models no page attention")


def _lightning_indexer(owner, b):
    """npu_lightning_indexer, BSND (op-plugin 7.3.0 docs/context and 26.x docs/en/custom_APIs pages,
    A2/A3): its limits per release, then ``sum_h w[h] * relu(q[h] . k)`` in float32, causal from the
    bottom-right corner for sparse_mode 3, keys by descending score (stable). What fills the entries
    past a query's visible keys is not documented: this stand-in writes the masked keys there, as
    op-plugin's own test expects (test/test_custom_ops/test_npu_lightning_indexer.py), and -1 past S2."""
    q, k, w, count = b["query"], b["key"], b["weights"], b["sparse_count"]
    _dsa_common(owner, b, "npu_lightning_indexer", "layout_query", "layout_key")
    newer = _release_key(owner) >= (26, 0, 0)
    _constraint(q.dim() == 4 and k.dim() == 4 and k.shape[0] == q.shape[0] and k.shape[2] == 1,
                f"npu_lightning_indexer: query [B, S1, N1, D], key [B, S2, 1, D], got {list(q.shape)} / {list(k.shape)}")
    batch, s1, heads, d = q.shape
    _constraint(d == INDEXER_HEAD_DIM and k.shape[3] == d, f"npu_lightning_indexer: D = {INDEXER_HEAD_DIM}, got {d} / {k.shape[3]}")
    _constraint(heads <= INDEXER_MAX_HEADS if newer else heads == INDEXER_MAX_HEADS,
                f"npu_lightning_indexer (op-plugin {owner.release} docs): N1 {'<=' if newer else '=='} 64, got {heads}")
    _constraint(q.dtype in INDEXER_DTYPES and k.dtype == q.dtype, f"npu_lightning_indexer: one bf16/fp16 dtype, got {q.dtype} / {k.dtype}")
    _constraint(w.dtype == q.dtype or (newer and w.dtype == torch.float32),
                f"npu_lightning_indexer (op-plugin {owner.release} docs): weights {w.dtype} with query {q.dtype}")
    _constraint(tuple(w.shape) == (batch, s1, heads), f"npu_lightning_indexer: weights [B, S1, N1], got {list(w.shape)}")
    _constraint(all(t.is_contiguous() for t in (q, k, w)), "npu_lightning_indexer: query, key, weights must be contiguous")
    _constraint(indexer_sparse_count_fits(count, newer), f"npu_lightning_indexer (op-plugin {owner.release} docs): sparse_count {count}")
    _constraint(b["actual_seq_lengths_query"] is None and b["actual_seq_lengths_key"] is None,
                "the stand-in models full lengths only")
    _constraint(not b["return_value"], "npu_lightning_indexer: return_value only in training")
    s2 = k.shape[1]
    per_head = torch.relu(torch.einsum("bqhd,bkd->bhqk", q.float(), k[:, :, 0].float()))
    scores = torch.einsum("bqh,bhqk->bqk", w.float(), per_head)
    if b["sparse_mode"] == 3:
        hidden = torch.arange(s2)[None, :] > torch.arange(s1)[:, None] + (s2 - s1)
        scores = scores.masked_fill(hidden, float("-inf"))
    order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :count]
    out = torch.full((batch, s1, 1, count), -1, dtype=torch.int32)
    out[:, :, 0, : order.shape[-1]] = order.to(torch.int32)
    return out, torch.empty(0, dtype=q.dtype)


def _sparse_flash_attention(owner, b):
    """npu_sparse_flash_attention's MLA-absorb form, BSND, token-wise (op-plugin 7.3.0 docs/context and
    26.x docs/en/custom_APIs pages, A2/A3): its limits, then ``softmax(scale * (q k^T + q_rope k_rope^T)) v``
    over each query's indices, the valid ones before the -1 (sparse_mode 3: also causal). A query with no
    valid index is not documented: NaN here, so a caller that does not handle it fails."""
    q, key, value, idx = b["query"], b["key"], b["value"], b["sparse_indices"]
    q_rope, k_rope = b["query_rope"], b["key_rope"]
    _dsa_common(owner, b, "npu_sparse_flash_attention", "layout_query", "layout_kv")
    _constraint(b["attention_mode"] == 2 and q_rope is not None and k_rope is not None,
                "npu_sparse_flash_attention: only attention_mode 2 (MLA-absorb), with query_rope and key_rope")
    _constraint(b["sparse_block_size"] == 1, "the stand-in models token-wise selection (sparse_block_size 1)")
    _constraint(q.dim() == 4 and key.dim() == 4, f"query [B, S1, N1, D], key [B, S2, 1, D], got {list(q.shape)} / {list(key.shape)}")
    batch, s1, heads, d = q.shape
    s2 = key.shape[1]
    _constraint(d == SFA_LATENT_DIM and tuple(key.shape) == (batch, s2, 1, SFA_LATENT_DIM),
                f"npu_sparse_flash_attention: query / key D = {SFA_LATENT_DIM}, one kv head, got {list(q.shape)} / {list(key.shape)}")
    _constraint(value is key or (value.shape == key.shape and torch.equal(value, key)),
                "npu_sparse_flash_attention (attention_mode 2): key and value are one tensor")
    _constraint(tuple(q_rope.shape) == (batch, s1, heads, SFA_ROPE_DIM) and tuple(k_rope.shape) == (batch, s2, 1, SFA_ROPE_DIM),
                f"query_rope [B, S1, N1, 64], key_rope [B, S2, 1, 64], got {list(q_rope.shape)} / {list(k_rope.shape)}")
    _constraint(heads in SFA_HEADS, f"npu_sparse_flash_attention: N1 in {SFA_HEADS}, got {heads}")
    dtypes = {t.dtype for t in (q, key, value, q_rope, k_rope)}
    _constraint(len(dtypes) == 1 and q.dtype in INDEXER_DTYPES, f"npu_sparse_flash_attention: one bf16/fp16 dtype, got {dtypes}")
    _constraint(idx.dtype == torch.int32 and idx.dim() == 4 and tuple(idx.shape[:3]) == (batch, s1, 1) and idx.shape[3] > 0,
                f"sparse_indices: int32 [B, S1, 1, K > 0], got {idx.dtype} {list(idx.shape)}")
    _constraint(all(t.is_contiguous() for t in (q, key, value, q_rope, k_rope, idx)), "all tensor inputs must be contiguous")
    valid = idx >= 0
    _constraint(bool(((idx >= -1) & (idx < s2)).all()), f"sparse_indices: -1 or a key position below {s2}")
    _constraint(not bool((valid[..., 1:] & ~valid[..., :-1]).any()), "sparse_indices: the valid entries first, -1 after them")
    _constraint(b["actual_seq_lengths_query"] is None and b["actual_seq_lengths_kv"] is None, "the stand-in models full lengths only")
    _constraint(not b["return_softmax_lse"], "npu_sparse_flash_attention: return_softmax_lse only in training")
    out = torch.full((batch, s1, heads, SFA_LATENT_DIM), float("nan"))
    for i in range(batch):
        for t in range(s1):
            keys = idx[i, t, 0][valid[i, t, 0]].long()
            if b["sparse_mode"] == 3:
                keys = keys[keys <= t + s2 - s1]
            if keys.numel() == 0:
                continue
            kf, rf = key[i, keys, 0].float(), k_rope[i, keys, 0].float()
            s = (q[i, t].float() @ kf.T + q_rope[i, t].float() @ rf.T) * b["scale_value"]  # [N1, n]
            out[i, t] = torch.softmax(s, dim=-1) @ value[i, keys, 0].float()
    return out.to(q.dtype), torch.empty(0), torch.empty(0)


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
    _constraint(ends.numel() <= GROUPED_MATMUL_MAX_GROUPS,
                f"group_list has {ends.numel()} groups; the kernel takes at most {GROUPED_MATMUL_MAX_GROUPS}")
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    quantized = x.dtype == torch.int8
    out_dtype = _dtype_arg(b["output_dtype"]) or x.dtype
    if quantized:
        _constraint(w.dtype == torch.int8 and b["scale"] is not None and b.get("per_token_scale") is not None
                    and out_dtype in (torch.bfloat16, torch.float16),
                    "int8 npu_grouped_matmul: int8 weight, scale, per_token_scale and a bf16/fp16 output_dtype")
        want_scale = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32  # 7.1.0 doc, per-token table
        _constraint(b["scale"][0].dtype == want_scale and b["per_token_scale"][0].dtype == torch.float32,
                    f"per-token npu_grouped_matmul, {out_dtype} out: scale {want_scale}, per_token_scale float32")
    # rows past the last group stay unwritten on the NPU (vllm-ascend saw random values, NaN): NaN here
    out = torch.full((x.shape[0], w.shape[-1]), float("nan"))
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
    out_dtype = _dtype_arg(b["output_dtype"])
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
    owner._format_cast[out.untyped_storage().data_ptr()] = out.untyped_storage()
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
    "npu_lightning_indexer": _lightning_indexer,
    "npu_sparse_flash_attention": _sparse_flash_attention,
}


# ---------------------------------------------------------------- the dry view (dshal info --standin)
def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return "[" + ", ".join(_describe_value(v) for v in value) + "]"
    return str(value).replace("torch.", "")


def describe_calls(calls: list[RecordedCall]) -> str:
    """``kernel(name=value, ...) -> ...``: the kernels called, in order, with the arguments the
    caller passed (a tensor by its dtype), leaving out the data tensors passed positionally."""
    def shown(c: RecordedCall) -> str:
        return ", ".join(
            f"{k}={_describe_value(c.arguments[k])}" for i, k in enumerate(c.given)
            if i >= c.positional or not isinstance(c.arguments[k], (torch.Tensor, list, tuple))
        )

    return " -> ".join(f"{c.kernel}({shown(c)})" for c in calls)


def _trace_cases(release: str) -> dict[str, Callable[[Any], Any]]:
    """One small call per op (and per weight format of linear / moe_experts), DeepSeek-V3-shaped
    where a kernel's fitting rules care (the router: 256 experts, 8 groups, top-4 groups, top-8)."""
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    int8 = SPECS["quantize_int8"].reference_impl
    fp8 = SPECS["quantize_fp8"].reference_impl
    t, h, inter, e = 4, 128, 128, 4
    x, x_res = rand(t, h, dtype=bf16), rand(t, h, dtype=bf16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    weights = torch.full((t, 2), 0.5)
    w13f, w2f = rand(e, 2 * inter, h) * 0.05, rand(e, h, inter) * 0.05
    w13_i8, w2_i8 = int8(w13f), int8(w2f)
    w13_f8, w2_f8 = fp8(w13f, (128, 128), "e4m3fn"), fp8(w2f, (128, 128), "e4m3fn")
    w, bias = rand(64, h) * 0.05, rand(64)
    w_i8, w_f8 = int8(w), fp8(w, (128, 128), "e4m3fn")
    a_i8 = int8(x.float())
    q = rand(1, 2, 8, 64, dtype=bf16)
    cos, sin = rand(8, 32, dtype=bf16), rand(8, 32, dtype=bf16)
    q_mla, latent = rand(1, 32, 1, 576, dtype=bf16), rand(1, 1, 8, 576, dtype=bf16)  # 32 heads, r 512 + rope 64
    logits, gate_bias = rand(t, 256), rand(256) * 0.1

    # DeepSeek-V3.2's indexer (64 heads of 128, float32 weights) and its sparse attention over the latent
    q_index, k_index = rand(1, 2, 64, 128, dtype=bf16), rand(1, 40, 128, dtype=bf16)
    w_index = rand(1, 2, 64) * (64 * 128) ** -0.5
    chosen = torch.tensor([[[5, 0, 39, -1, 12], [7, -1, -1, 30, 2]]])
    q_sparse, latent_kv = rand(1, 32, 2, 576, dtype=bf16), rand(1, 40, 576, dtype=bf16)
    dsa_cases = {
        "indexer_topk[64 heads of 128]": lambda ops: ops.indexer_topk(q_index, w_index, k_index, 8),
        "sparse_mla_attention[absorbed, 32 heads]": lambda ops: ops.sparse_mla_attention(q_sparse, latent_kv, chosen, 0.07, 512),
    }

    loaded: dict[str, torch.Tensor] = {}

    def load_int8_linear(ops: Any) -> None:  # what the model core does once per weight at load
        loaded["weight"] = ops.prepare_weight("linear.weight", w_i8[0], "linear.weight")

    return {
        "rms_norm": lambda ops: ops.rms_norm(x, torch.ones(h), 1e-6),
        "rms_norm[residual]": lambda ops: ops.rms_norm(x, torch.ones(h, dtype=bf16), 1e-6, x_res),
        "silu_and_mul": lambda ops: ops.silu_and_mul(x),
        "rotary_embedding[interleaved]": lambda ops: ops.rotary_embedding(q, cos, sin, True),
        "attention[causal]": lambda ops: ops.attention(q, q, q, True),
        "attention[window]": lambda ops: ops.attention(q, q, q, True, None, 4),
        "attention[absorbed MLA decode]": lambda ops: ops.attention(q_mla, latent, latent[..., :512], True),
        "moe_gate[256 experts, 8 groups]": lambda ops: ops.moe_gate(logits, gate_bias, 8, 8, 4, 2.5),
        "moe_gate[64 experts, 4 groups]": lambda ops: ops.moe_gate(logits[:, :64], gate_bias[:64], 4, 4, 2, 2.5),
        "moe_experts[bf16]": lambda ops: ops.moe_experts(x, weights, ids, w13f.to(bf16), w2f.to(bf16)),
        "moe_experts[int8]": lambda ops: ops.moe_experts(x, weights, ids, w13_i8[0], w2_i8[0], w13_i8[1], w2_i8[1]),
        "moe_experts[fp8]": lambda ops: ops.moe_experts(x, weights, ids, w13_f8[0], w2_f8[0], w13_f8[1], w2_f8[1]),
        "quantize_int8": lambda ops: ops.quantize_int8(x),
        "int8_gemm[bf16 out]": lambda ops: ops.int8_gemm(a_i8[0], a_i8[1], w_i8[0], w_i8[1], bf16),
        "int8_gemm[float32 out]": lambda ops: ops.int8_gemm(a_i8[0], a_i8[1], w_i8[0], w_i8[1], torch.float32),
        "linear[bf16]": lambda ops: ops.linear(x, w.to(bf16), bias.to(bf16)),
        "linear[int8] at load (Backend.prepare_weight)": load_int8_linear,
        "linear[int8]": lambda ops: ops.linear(x, loaded["weight"], bias, w_i8[1]),
        "linear[fp8]": lambda ops: ops.linear(x, w_f8[0], None, w_f8[1]),
        "fp8_gemm": lambda ops: ops.fp8_gemm(*fp8(x.float(), (1, 128), "e4m3fn"), *w_f8),
        "dequantize_fp8": lambda ops: ops.dequantize_fp8(*w_f8, (128, 128)),
        # a dshal without DeepSeek Sparse Attention's ops: nothing to trace (the plugin does not provide them)
        **{case: run for case, run in dsa_cases.items() if case.split("[")[0] in SPECS},
    }


def standin_trace(release: str) -> dict[str, str]:
    """Which torch_npu kernels the plugin's own op code calls on ``release``, per op and weight
    format: each case runs :class:`~dshal_ascend.npu_ops.AscendOps` on CPU tensors through a
    :class:`SignatureCheckingStandIn` of that release. What ran is bound against the release's
    schemas; no result here is an NPU's (the stand-in computes with plain torch)."""
    stand_in = SignatureCheckingStandIn(recorded_signatures(release))
    ops = AscendOps(kernel_features(release), stand_in)
    trace: dict[str, str] = {}
    for case, run in _trace_cases(release).items():
        before, fell_back = len(stand_in.calls), sum(ops.reference_calls.values())
        run(ops)
        calls = stand_in.calls[before:]
        used_reference = sum(ops.reference_calls.values()) > fell_back
        if calls:
            trace[case] = describe_calls(calls) + ("; then the dshal reference" if used_reference else "")
        else:
            emulated = " (emulated: no FP8 units)" if "fp8" in case else ""
            trace[case] = "no torch_npu kernel: " + (
                "the dshal reference" if used_reference else f"plain torch ops on the device{emulated}"
            )
    return trace
