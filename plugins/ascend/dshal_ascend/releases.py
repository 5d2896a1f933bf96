"""Which torch_npu release is installed, and what each release's kernels accept.

A torch_npu build belongs to one "Ascend Extension for PyTorch" release (the op-plugin
branch, e.g. ``7.0.0``), which pins a CANN version. The release decides which kernels
exist and how they are called, so the plugin reads the installed torch_npu version (and,
on an NPU host, the kernels' schemas, in the child-process probe) and plans every op from
that: :func:`kernel_features` -> :func:`plan_ops`.

Facts (source beside each):

* torch_npu version -> release, CANN: the version table of ``Ascend/pytorch`` README.md
  (branch ``v2.9.0-7.3.0``, "CANN Version / Supported Extension Version"), torch >= 2.4 rows.
  From 26.0.0 the README no longer lists the release (its table stops at 7.3.0); the mapping is in
  ``docs/en/release_notes/release_notes.md`` ("Related Product Version Mapping") of the release's
  ``v2.7.1-<release>`` branch. The numbering jumped from 7.3.0 to 26.0.0 (op-plugin branches
  ``26.0.0``, ``26.1.0``), and 26.1.0 renames the product "TorchNPU":

  - 26.0.0 (branch ``v2.7.1-26.0.0``, April 2026): CANN 9.0.0; torch_npu 2.7.1.post4,
    2.8.0.post4, 2.9.0.post2, 2.10.0.
  - 26.1.0 (branch ``v2.7.1-26.1.0``, July 2026): CANN 9.1.0; torch_npu 2.7.1.post8,
    2.9.0.post6, 2.10.0.post4, 2.11.0, 2.12.0 (no torch 2.8 build).
  - Pre-release builds of new torch lines: the README of the 26.x branches lists torch_npu
    2.10.0rc2, 2.11.0rc1, 2.12.0rc1 with CANN 8.5.0 (branches ``v2.10.0`` ... , no op-plugin
    release); before 26.0.0 / 26.1.0 listed those lines they were planned as 7.3.0 ("newer"), and
    they still are (:func:`release_of`).
* Signatures: ``op_signatures/<release>.json`` (op-plugin ``op_plugin_functions.yaml`` of the
  release branch). 6.0.0: ``npu_rotary_mul(self, r1, r2)`` (no ``rotary_mode``), no
  ``npu_interleave_rope`` / ``npu_moe_gating_top_k``, ``npu_grouped_matmul`` takes
  ``int[]? group_list`` without ``group_type`` / ``group_list_type`` / ``per_token_scale``.
  7.0.0 has all of them.
* ``npu_moe_gating_top_k`` on Atlas A2/A3: op-plugin 7.1.0
  ``docs/context/torch_npu-npu_moe_gating_top_k.md`` accepts only 256 experts, k in [1, 32],
  a bias, k_group 4, group_count 8; the 7.2.0 page lifts this (E <= 2048, general groups).
  7.0.0 ships no page; it is held to the 7.1.0 limits.
* ``npu_rms_norm``: the 7.1.0 doc page wants gamma in x's dtype; the 7.2.0 page accepts a float32
  gamma with bf16/fp16 x on A2/A3.
* ``npu_quant_matmul``: op-plugin 6.0.0 ``QuantMatmulKernelNpuOpApi.cpp`` converts a float32
  ``scale`` with ``npu_trans_quant_param`` whenever there is no ``pertoken_scale`` and the output
  is not bf16 -- int32 output included; 7.0.0 adds ``output_dtype != at::kInt`` to that guard.
  26.0.0 / 26.1.0 keep it (``output_acltype != ACL_INT32``, same file).
* 26.0.0 / 26.1.0 signatures (``op_plugin_functions.yaml``; the same for both): ``output_dtype`` of
  ``npu_quant_matmul`` and of the Tensor-``group_list`` ``npu_grouped_matmul``, and ``dst_type`` of
  ``npu_dynamic_quant``, are ``int?`` (were ``ScalarType?``). ``torch_npu.npu_*`` is
  ``torch.ops.npu.npu_*`` (``torch_npu/__init__.py``), whose argument conversion passes a
  ``torch.dtype`` to an ``int`` as its ScalarType number (bfloat16 -> 15), the number the kernels
  read (``op_plugin/python/meta/_meta_registrations.py`` ``TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP``);
  the docs and op-plugin's tests still pass ``output_dtype=torch.bfloat16``, as dshal does.
  ``npu_format_cast``'s ``customize_dtype`` became keyword-only (dshal passes only ``acl_format``);
  ``npu_rotary_mul`` gained an optional ``rotate``. The documented limits dshal relies on (rms_norm
  gamma dtypes, add_rms_norm gamma = x's dtype, rotary B, N < 1000, the attention head / dim limits
  and the MLA form, gating, grouped-matmul per-token scale dtypes) read as in 7.3.0
  (``docs/zh/custom_APIs/torch_npu/torch_npu-<kernel>.md``).
* DeepSeek Sparse Attention (DeepSeek-V3.2): ``npu_lightning_indexer`` and
  ``npu_sparse_flash_attention`` are in ``op_plugin_functions.yaml`` from 7.3.0 (CANN 8.5.0; not in
  7.2.0), ``exposed: all_version``, the same schemas in 26.0.0 / 26.1.0. Their doc pages (7.3.0
  ``docs/context/torch_npu-<kernel>.md``, 26.x ``docs/en/custom_APIs/torch_npu/``; limits in
  :mod:`dshal_ascend.layouts`): the 7.3.0 indexer takes exactly 64 query heads, ``sparse_count``
  1-2048 and weights in the query's dtype; 26.0.0 adds N1 <= 64, ``sparse_count`` 3072 ... 8192 in
  steps of 1024 and float32 weights (A2/A3; not on Ascend 950). vllm-ascend's DeepSeek-V3.2 path
  calls same-named ops it builds itself (``torch.ops._C_ascend.npu_lightning_indexer``; at first
  ``torch.ops.custom.*`` from a separate CANN custom-ops package) with TND queries, PA_BSND caches,
  ``sparse_count=2048``, ``sparse_mode=3``, and ``attention_mode=2`` for the attention; the plugin
  calls torch_npu's.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace

from dshal_ascend.schema import ReleaseSignatures, recorded_releases, recorded_signatures
from dshal_ascend.tool import run_tool

#: The kernels the plugin calls (the probe reads their schemas on an NPU host).
KERNELS = (
    "npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_rotary_mul", "npu_interleave_rope",
    "npu_fused_infer_attention_score", "npu_moe_gating_top_k", "npu_grouped_matmul",
    "npu_dynamic_quant", "npu_quant_matmul", "npu_format_cast", "npu_lightning_indexer", "npu_sparse_flash_attention",
)

#: op -> the kernels it cannot run without (moe_gate falls back per call on its own).
OP_KERNELS = {
    "rms_norm": ("npu_rms_norm", "npu_add_rms_norm"),
    "silu_and_mul": ("npu_swiglu",),
    "rotary_embedding": ("npu_rotary_mul",),
    "attention": ("npu_fused_infer_attention_score",),
    "moe_experts": ("npu_grouped_matmul", "npu_swiglu", "npu_dynamic_quant"),
    "quantize_int8": ("npu_dynamic_quant",),
    "int8_gemm": ("npu_quant_matmul", "npu_format_cast"),
    "linear": ("npu_dynamic_quant", "npu_quant_matmul", "npu_format_cast"),
    "indexer_topk": ("npu_lightning_indexer",),
    "sparse_mla_attention": ("npu_sparse_flash_attention",),
}


@dataclass(frozen=True)
class Release:
    """One Ascend Extension for PyTorch release (= op-plugin branch)."""

    name: str
    cann: str
    #: torch_npu versions of this release built for torch >= 2.4 (README table).
    torch_npu: tuple[str, ...]
    #: Pre-release builds of a newer torch line the README lists with this release's CANN, built from
    #: that line's own branch (``v2.10.0`` ...), not the release branch: planned as this release.
    prereleases: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[int, ...]:
        return _release_key(self.name)


def _release_key(name: str) -> tuple[int, ...]:
    # "6.0.rc3" sorts before "6.0.0": rcN -> -100 + N
    return tuple(-100 + int(p[2:]) if p.startswith("rc") else int(p) for p in name.split("."))


#: Oldest first. 6.0.rc3 is kept only to recognise it as too old.
RELEASES = (
    Release("6.0.rc3", "8.0.RC3", ("2.4.0",)),
    Release("6.0.0", "8.0.0", ("2.4.0.post2",)),
    Release("7.0.0", "8.1.RC1", ("2.4.0.post4", "2.5.1")),
    Release("7.1.0", "8.2.RC1", ("2.5.1.post1", "2.6.0")),
    Release("7.2.0", "8.3.RC1", ("2.6.0.post3", "2.7.1", "2.8.0")),
    Release("7.3.0", "8.5.0", ("2.6.0.post5", "2.7.1.post2", "2.8.0.post2", "2.9.0"),
            prereleases=("2.10.0rc2", "2.11.0rc1", "2.12.0rc1")),
    Release("26.0.0", "9.0.0", ("2.7.1.post4", "2.8.0.post4", "2.9.0.post2", "2.10.0")),
    Release("26.1.0", "9.1.0", ("2.7.1.post8", "2.9.0.post6", "2.10.0.post4", "2.11.0", "2.12.0")),
)
RELEASE_BY_NAME = {r.name: r for r in RELEASES}
#: A build older than every listed build of its torch line (pre-releases included), on a line no
#: release up to this one lists, is planned as the newest release whose lines are all older (e.g.
#: 2.10.0rc1: 7.3.0, as before 26.0.0 was recorded). Lines introduced by earlier releases keep the
#: "predates" verdict they always had.
PRERELEASE_LINES_FROM = "7.3.0"
#: The oldest release the plugin supports (also the pin of the ``npu`` extra: torch_npu >= 2.4.0.post2).
MINIMUM_RELEASE = "6.0.0"
MINIMUM_TORCH_NPU = "2.4.0.post2"
WHY_MINIMUM = (
    "the first final release for torch >= 2.4 whose op-plugin has npu_fused_infer_attention_score, "
    "npu_dynamic_quant, npu_quant_matmul with pertoken_scale and npu_grouped_matmul"
)


def parse_torch_npu_version(text: str) -> tuple[tuple[int, int, int], int] | None:
    """``"2.5.1.post1"`` -> ``((2, 5, 1), 1)``; a plain ``"2.5.1"`` has post 0, ``rcN`` -100 + N."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)(?:\.?(post|rc)(\d+))?", text.strip())
    if match is None:
        return None
    base = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    kind, num = match.group(4), match.group(5)
    post = 0 if kind is None else (int(num) if kind == "post" else -100 + int(num))
    return base, post


@dataclass(frozen=True)
class ReleaseMatch:
    """What a torch_npu version means: its release (or None) and whether it is supported."""

    torch_npu: str
    release: Release | None
    supported: bool
    reason: str


def release_of(torch_npu_version: str) -> ReleaseMatch:
    """The release a torch_npu version belongs to: the newest release whose listed version for
    the same torch line is not newer than it; else a pre-release build the README lists
    (``Release.prereleases``); else the newest release listing an earlier build of its torch
    minor line (2.11.1 after 2.11.0). A version on a torch line newer than every line the releases up to
    some release P list is planned as P ("newer"): past the table, the newest release; an older
    build of a line a release after 7.3.0 introduced, the newest release before it
    (``PRERELEASE_LINES_FROM``). Other versions predate the minimum."""
    parsed = parse_torch_npu_version(torch_npu_version)
    minimum = RELEASE_BY_NAME[MINIMUM_RELEASE]
    if parsed is None:
        return ReleaseMatch(torch_npu_version, None, False, f"torch_npu version {torch_npu_version!r} not understood")
    base, post = parsed
    listed = [(parse_torch_npu_version(v), r) for r in RELEASES for v in r.torch_npu]
    same_line = [(p, r) for (b, p), r in listed if b == base and p <= post]
    pre = [(p, r, v) for r in RELEASES for v in r.prereleases
           for b, p in [parse_torch_npu_version(v)] if b == base and p <= post]
    # A later build of a listed torch line (2.11.1 after 26.1.0's 2.11.0): the newest release
    # listing a build of that line before it, not an older release by the line rule below.
    later_build = [r for (b, p), r in listed if b[:2] == base[:2] and (b, p) <= parsed]
    newer_than = [r for r in RELEASES if all(b < base for (b, _), o in listed if o.key <= r.key)]
    if same_line:
        release = max(same_line, key=lambda pr: pr[1].key)[1]
    elif pre:
        _, release, build = max(pre, key=lambda prv: (prv[0], prv[1].key))
        why = (f"torch_npu {torch_npu_version}: pre-release {build}, which the Ascend/pytorch README lists with CANN "
               f"{release.cann} (no release branch); planned as op-plugin {release.name}")
        return ReleaseMatch(torch_npu_version, release, True, why)
    elif later_build and max(later_build, key=lambda r: r.key).key >= minimum.key:
        release = max(later_build, key=lambda r: r.key)
        line = ".".join(map(str, base[:2]))
        why = (f"torch_npu {torch_npu_version} is a later build of torch {line} than op-plugin {release.name} lists; "
               f"planned as {release.name} (CANN {release.cann})")
        return ReleaseMatch(torch_npu_version, release, True, why)
    elif newer_than and newer_than[-1].key >= _release_key(PRERELEASE_LINES_FROM):
        release = newer_than[-1]
        if release is RELEASES[-1]:
            why = f"torch_npu {torch_npu_version} is newer than the recorded releases; planned as {release.name}"
        else:
            line = ".".join(map(str, base))
            first = min((r for (b, _), r in listed if b == base), key=lambda r: r.key, default=None)
            later = (f"precedes the first {line} build listed (op-plugin {first.name})" if first
                     else f"no release lists torch {line}")
            why = (f"torch_npu {torch_npu_version} is newer than the torch lines of op-plugin {release.name} and "
                   f"{later}; planned as {release.name}")
        return ReleaseMatch(torch_npu_version, release, True, why)
    else:
        return ReleaseMatch(
            torch_npu_version, None, False,
            f"torch_npu {torch_npu_version} predates op-plugin {MINIMUM_RELEASE} (CANN {minimum.cann}); "
            f"dshal-ascend needs torch_npu >= {MINIMUM_TORCH_NPU}: {WHY_MINIMUM}",
        )
    if release.key < minimum.key:
        return ReleaseMatch(
            torch_npu_version, release, False,
            f"torch_npu {torch_npu_version} is op-plugin release {release.name} (CANN {release.cann}), older than "
            f"the minimum {MINIMUM_RELEASE} (torch_npu {MINIMUM_TORCH_NPU}, CANN {minimum.cann}): {WHY_MINIMUM}",
        )
    return ReleaseMatch(torch_npu_version, release, True, f"op-plugin release {release.name} (CANN {release.cann})")


_CANN_VERSION = re.compile(r"(\d+)\.(\d+)\.(?:(\d+)|RC(\d+))(?:\.(alpha|beta)(\d+))?(?:\.\d+)*", re.IGNORECASE)


def parse_cann_version(text: str) -> tuple[int, int, int, int, int] | None:
    """A CANN version as a sortable key: ``"8.0.RC3"`` < ``"8.0.0"`` < ``"8.1.RC1"``; an
    ``alpha`` / ``beta`` build precedes its version (``"8.2.RC1.alpha003"`` < ``"8.2.RC1"``).
    ``RCn`` sorts as -100 + n in the patch place, as in :func:`parse_torch_npu_version`.
    None when not understood."""
    match = _CANN_VERSION.fullmatch(text.strip())  # "9.0.0-beta.1": not understood, not read as 9.0.0
    if match is None:
        return None
    major, minor, patch, rc, stage, build = match.groups()
    patch_key = int(patch) if patch is not None else -100 + int(rc)
    stage_key = {"alpha": -2, "beta": -1}.get((stage or "").lower(), 0)
    return int(major), int(minor), patch_key, stage_key, int(build or 0)


def release_for(torch_npu_version: str, cann_version: str | None) -> ReleaseMatch:
    """:func:`release_of` held to the installed CANN: when the torch_npu version's release wants
    a newer CANN than ``cann_version``, the newest recorded release before it whose CANN is not
    newer (its kernels are what that CANN has); none from the minimum on: not supported. An
    unknown or unparsed ``cann_version`` leaves the torch_npu version's release."""
    match = release_of(torch_npu_version)
    installed = parse_cann_version(cann_version) if cann_version else None
    if cann_version and installed is None and match.supported:
        return replace(match, reason=f"{match.reason}; CANN version {cann_version!r} not understood: not compared")
    if not match.supported or match.release is None or installed is None:
        return match
    chosen = match.release
    if parse_cann_version(chosen.cann) <= installed:
        return match
    fitting = [r for r in RELEASES if r.key <= chosen.key and parse_cann_version(r.cann) <= installed]
    newest = max(fitting, key=lambda r: r.key, default=None)
    why = f"torch_npu {torch_npu_version} is op-plugin {chosen.name}, which wants CANN {chosen.cann}; CANN {cann_version} is installed"
    if newest is None or newest.key < RELEASE_BY_NAME[MINIMUM_RELEASE].key:
        minimum = RELEASE_BY_NAME[MINIMUM_RELEASE]
        return ReleaseMatch(torch_npu_version, newest, False,
                            f"{why}, older than CANN {minimum.cann} of the minimum op-plugin {MINIMUM_RELEASE}; "
                            f"install CANN {chosen.cann} for this torch_npu")
    return ReleaseMatch(torch_npu_version, newest, True,
                        f"{why}: planned as op-plugin {newest.name} (CANN {newest.cann}), the newest release whose "
                        f"CANN is not newer than the installed one")


@dataclass(frozen=True)
class KernelFeatures:
    """How this release's kernels are called; read from its schemas plus the release facts above."""

    release: str
    signatures: ReleaseSignatures
    #: ``npu_rotary_mul`` takes ``rotary_mode`` (else its only mode is "half").
    rotary_mode: bool
    interleave_rope: bool
    gating_top_k: bool
    #: 7.0.0/7.1.0: npu_moe_gating_top_k only for E=256, 8 groups, k_group 4, a bias, k <= 32.
    gating_fixed_shape: bool
    #: ``group_list`` is a Tensor with ``group_type`` / ``group_list_type`` / ``per_token_scale`` (7.0.0+).
    grouped_matmul_v2: bool
    #: ``npu_quant_matmul`` leaves a float32 ``scale`` alone for an int32 output (7.0.0+).
    quant_matmul_int32_guard: bool
    #: ``npu_rms_norm`` takes a float32 gamma with bf16/fp16 x on A2/A3 (7.2.0 docs; 7.1.0: same dtype).
    rms_norm_fp32_gamma: bool
    #: npu_fused_infer_attention_score's MLA form (``query_rope`` / ``key_rope`` with page attention):
    #: in the schema from 7.0.0, its A2/A3 limits documented from 7.1.0 (the form dshal relies on).
    mla_rope: bool
    #: torch_npu has npu_lightning_indexer / npu_sparse_flash_attention (op-plugin 7.3.0+).
    lightning_indexer: bool = False
    sparse_flash_attention: bool = False
    #: npu_lightning_indexer takes float32 ``weights`` with bf16/fp16 q / k (26.0.0+ docs; 7.3.0: q's dtype only).
    indexer_float32_weights: bool = False
    #: npu_lightning_indexer's ``sparse_count`` may also be 3072 ... 8192 in steps of 1024 (26.0.0+ docs).
    indexer_large_counts: bool = False

    @property
    def w8a8_experts(self) -> bool:
        """int8 experts through npu_grouped_matmul with per-token activation scales."""
        return self.grouped_matmul_v2 and self.signatures.accepts("npu_grouped_matmul", "per_token_scale")


def kernel_features(release: str, signatures: ReleaseSignatures | None = None) -> KernelFeatures:
    """Features of ``release``, from ``signatures`` (the probed schemas on an NPU host) or the
    recorded ones."""
    sig = signatures or recorded_signatures(release)
    key = _release_key(release)
    return KernelFeatures(
        release=release,
        signatures=sig,
        rotary_mode=sig.accepts("npu_rotary_mul", "rotary_mode"),
        interleave_rope=sig.has("npu_interleave_rope"),
        gating_top_k=sig.has("npu_moe_gating_top_k"),
        gating_fixed_shape=key < (7, 2, 0),
        grouped_matmul_v2=sig.accepts("npu_grouped_matmul", "group_list", "Tensor")
        and sig.accepts("npu_grouped_matmul", "group_list_type"),
        quant_matmul_int32_guard=key >= (7, 0, 0),
        rms_norm_fp32_gamma=key >= (7, 2, 0),
        mla_rope=key >= (7, 1, 0) and sig.accepts("npu_fused_infer_attention_score", "query_rope"),
        lightning_indexer=sig.has("npu_lightning_indexer"),
        sparse_flash_attention=sig.has("npu_sparse_flash_attention") and sig.accepts("npu_sparse_flash_attention", "attention_mode"),
        indexer_float32_weights=key >= (26, 0, 0) and sig.has("npu_lightning_indexer"),
        indexer_large_counts=key >= (26, 0, 0) and sig.has("npu_lightning_indexer"),
    )


@dataclass(frozen=True)
class OpRoute:
    """How one op is served on this release: kind (native / emulated / reference), by what, and why."""

    kind: str
    path: str
    why: str

    def describe(self) -> str:
        return f"{self.kind}: {self.path} ({self.why})"


def plan_ops(f: KernelFeatures) -> dict[str, OpRoute]:
    """Which path serves each op on release ``f.release``; ``dshal info`` prints this."""
    rel = f"op-plugin {f.release}"
    rotary = "npu_rotary_mul(x, cos, sin" + (", rotary_mode='half')" if f.rotary_mode else ") [half mode only]")
    interleaved = (
        "npu_interleave_rope when D == 64 and bf16/fp16, else " if f.interleave_rope else "no npu_interleave_rope: "
    )
    if not f.gating_top_k:
        gate = OpRoute("reference", "dshal reference", f"{rel} has no npu_moe_gating_top_k")
    elif f.gating_fixed_shape:
        gate = OpRoute("native", "npu_moe_gating_top_k (ids) + exact weights",
                       f"{rel} on A2/A3 accepts only 256 experts, 8 groups, topk_group 4, a bias, top_k <= 32; "
                       "other shapes: reference")
    else:
        gate = OpRoute("native", "npu_moe_gating_top_k (ids) + exact weights",
                       f"{rel}: E <= 2048, E/n_group > 2, align32(E/n_group)*n_group <= 2048; else reference")
    if not f.grouped_matmul_v2:
        experts = OpRoute("reference", "dshal reference",
                          f"{rel}: npu_grouped_matmul takes one [E, K, N] weight only with a Tensor group_list (7.0.0+); "
                          "its int[] form wants a list of 2-D weights")
    elif f.w8a8_experts:
        experts = OpRoute("native", "npu_grouped_matmul x2 + npu_swiglu; int8: W8A8 with per_token_scale from "
                          "npu_dynamic_quant; FP8: emulated (active experts decoded to bf16)",
                          f"{rel}: group_list Tensor, group_type 0, group_list_type 0 (cumsum); "
                          "more than 1024 experts (FP8: active experts): reference")
    else:
        experts = OpRoute("native", "npu_grouped_matmul x2 + npu_swiglu (bf16); int8 experts: reference; "
                          "FP8: emulated (active experts decoded to bf16)",
                          f"{rel}: group_list is int[] (host copy of the counts), no per_token_scale; "
                          "more than 1024 experts (FP8: active experts): reference")
    mla = ("absorbed MLA decode (576 = 512 + rope 64, 1 kv head, <= 128 heads padded to 32/64/128, <= 16 causal "
           "queries): the MLA form, query_rope / key_rope, keys copied into 128-token pages" if f.mla_rope
           else f"absorbed MLA (head dim 576): reference ({rel} has no documented MLA form)")
    int8_f32 = ("npu_quant_matmul int32 output, scaled in float32" if f.quant_matmul_int32_guard
                else "reference (int32 output would reinterpret a float32 scale before 7.0.0)")
    if not f.indexer_float32_weights:
        indexer = OpRoute("reference", "dshal reference",
                          f"{rel}: npu_lightning_indexer takes weights only in q's dtype (7.3.0 docs), dshal's are "
                          "float32 (rounding them would change which keys are chosen); 26.0.0+ takes float32")
    else:
        counts = "1-2048 or 3072-8192 in steps of 1024"
        indexer = OpRoute("native", "npu_lightning_indexer (BSND, key [B, S, 1, 128], float32 weights, "
                          "sparse_mode 3: causal, queries the last T)",
                          f"entries past a query's visible keys set to -1; index head dim < 128 zero-padded; "
                          f"an explicit visible mask, float32 q / k, head dim > 128, > 64 heads, topk not {counts}: "
                          "reference; NaN / Inf ranked as the kernel ranks them (not documented)")
    sparse_attention = OpRoute(
        "native", "npu_sparse_flash_attention (MLA-absorb attention_mode 2, BSND, latent 512 + rope 64, value = key, "
        "sparse_mode 0, token-wise sparse_block_size 1)",
        "indices sorted so -1 come last; queries without a key: zeros; NaN / Inf: the op's rule met around the kernel; "
        "D < 576, v_dim < 512 zero-padded, heads padded to 1/2/4/.../128; q and the latent copied per call (split "
        "512 + 64); float32, D > 576, v_dim > 512, > 128 heads: reference")
    routes = {
        "rms_norm": OpRoute("native", "npu_rms_norm / npu_add_rms_norm",
                            "npu_rms_norm keeps a float32 gamma" + (" (7.2.0+ docs: fp32 gamma with bf16/fp16 x)"
                            if f.rms_norm_fp32_gamma else " only for float32 x (before 7.2.0 gamma must match x)")
                            + "; npu_add_rms_norm: gamma in x's dtype"),
        "silu_and_mul": OpRoute("native", "npu_swiglu(x, dim=-1)", "swish(first half) * second half"),
        "rotary_embedding": OpRoute("native", rotary, f"cos/sin broadcast as [1, 1, S, D]; interleaved: "
                                    f"{interleaved}a de-interleave permutation around npu_rotary_mul"),
        "attention": OpRoute("native", "npu_fused_infer_attention_score (BNSD, num_key_value_heads)",
                             "causal: sparse_mode 3 + 2048x2048 mask; window: band sparse_mode 4 (pre/next tokens); "
                             "window + global tokens: dense mask, sparse_mode 0; one query: keys sliced; " + mla
                             + "; float32, head dim > 512 or not a multiple of 16, > 256 heads or > 64 per kv head, "
                             "batch > 65536 or keys > 262144: reference"),
        "moe_gate": gate,
        "moe_experts": experts,
        "quantize_int8": OpRoute("native", "npu_dynamic_quant (bf16/fp16)", "float32 input: reference"),
        "int8_gemm": OpRoute("native", "npu_quant_matmul(x1, x2 [K, N], scale, pertoken_scale)",
                             f"bf16/fp16 out; float32 out: {int8_f32}; K or N > 65535 split"),
        "linear": OpRoute("native", "bf16: CANN matmul; int8: npu_dynamic_quant + npu_quant_matmul on a weight "
                          "transposed and cast to NZ once (npu_format_cast 29); FP8: emulated",
                          "K or N > 65535 split into <= 65535 pieces"),
        "fp8_gemm": OpRoute("emulated", "FP8 bytes decoded with integer ops, bf16 matmul", "910B has no FP8 units"),
        "dequantize_fp8": OpRoute("emulated", "integer decode of the FP8 bytes", "no FP8 casts on the device"),
        "quantize_fp8": OpRoute("reference", "dshal reference", "an FP8 result cannot be held natively on 910B"),
        "indexer_topk": indexer,
        "sparse_mla_attention": sparse_attention,
    }
    for op, kernels in OP_KERNELS.items():
        missing = [k for k in kernels if not f.signatures.has(k)]
        if missing:
            routes[op] = OpRoute("reference", "dshal reference", f"{', '.join(missing)} missing from torch_npu ({rel})")
    return routes


def main(argv: list[str] | None = None) -> int:
    """``dshal-ascend-plan [--release R]``: which path serves each op on a release, from the
    recorded signatures (no NPU needed; on an NPU host ``dshal info`` shows the probed plan)."""
    parser = argparse.ArgumentParser(prog="dshal-ascend-plan", description=(main.__doc__ or "").split("\n")[0])
    parser.add_argument("--release", choices=recorded_releases(), default=recorded_releases()[-1],
                        help="op-plugin release (default: the newest recorded)")
    args = parser.parse_args(argv)
    release = RELEASE_BY_NAME[args.release]

    def show() -> int:
        print(f"op-plugin {release.name} (CANN {release.cann}; torch_npu {', '.join(release.torch_npu)}), "
              "from recorded signatures -- a plan, not an NPU run")
        for op, route in plan_ops(kernel_features(args.release)).items():
            print(f"  {op:17s} {route.describe()}")
        return 0

    return run_tool("dshal-ascend-plan", show)


if __name__ == "__main__":
    raise SystemExit(main())
