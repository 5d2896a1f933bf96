"""``dshal kernels``: cross-compile every shipped Triton kernel config for a real GPU target.

Triton compiles for a GPU without one: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the real code generators (LLVM NVPTX + ``ptxas`` for ``sm_90a`` / ``sm_100a`` / ``sm_120a``;
the AMDGPU backend for ``gfx942`` / ``gfx950``). For every kernel launch the wrappers make with the target's
:class:`~dshal.kernels.triton.target.KernelTarget` -- every GEMM autotune tile, the MoE and
elementwise kernels -- this records whether it lowers, its shared memory / LDS against the
device's limit, registers and spills, the pipelining stages built (``cp.async`` / TMA on
NVIDIA, LDS buffers on AMD), and for the GEMM and MoE kernels the tensor-core instruction.

Compiled the way a launch is: the wrappers run on representative CPU tensors under
:func:`~dshal.kernels.triton._checks.capture_launches`, and each captured launch is
specialized by Triton's own JIT binder (unit strides and the value 1 become constexprs;
16-divisible pointers, sizes and strides get ``tt.divisibility``), exactly as
``kernel[grid](...)`` would on the device.

Compiles run in worker subprocesses (``--jobs``, default 2) that import triton with
``TRITON_INTERPRET`` unset (the kernels must be decorated for compilation, not for the
interpreter); results are cached per (triton version, kernel source, specialization, options,
target) under ``$DSHAL_CACHE_DIR/kernels`` (default ``~/.cache/dshal/kernels``). A cache folder
that cannot be written turns the cache off for the run, with one warning; a cache write that fails
(a full disk) fails no compile. Triton's own compile cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``) is only written, never read (every compile is forced): when that default
cannot be written, the workers get one inside the run's temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dshal import errors
from dshal.backend import host_usable_cpus
from dshal.cache import make_private_dir
from dshal.config import cache_dir
from dshal.errors import ArgumentError, BackendUnavailableError, ConfigError, DshalError
from dshal.kernels.kernels_command import (
    add_arguments as add_arguments,  # its options, importable without torch (--help)
)
from dshal.kernels.triton import require_triton
from dshal.kernels.triton._checks import capture_launches
from dshal.kernels.triton.target import E4M3_DTYPES, KernelTarget, TileConfig, shipped_target
from dshal.lifetime import child_env, child_python, cleanup_on_termination, dies_with_parent, exit_with_parent
from dshal.outputs import atomic_write, check_writable
from dshal.versions import installed, triton_arch_refusal, triton_arch_shortfall

#: Bumped whenever what a compile is read for changes (the ptxas / AMDGCN patterns, the facts
#: kept): a cached result of the earlier reading is then compiled and read again.
RESULTS_REVISION = 2  # 2: tcgen05.mma is read as a tensor-core instruction


@dataclass(frozen=True)
class CompileTarget:
    """A real GPU target: how Triton names it, its shared-memory limit, its tensor-core
    instructions, and the :class:`KernelTarget` (tile tables) dshal ships for it."""

    name: str
    backend: str  #: "cuda" or "hip"
    arch: int | str  #: 90, or "gfx942"
    warp_size: int
    shared_limit: int  #: bytes of shared memory / LDS one block may use
    shared_source: str
    target_name: str  #: the shipped tile table compiled for it (:data:`~.target.SHIPPED_TARGETS`)
    #: the tensor-core instruction of an FP8 dot of 64 rows or more: "wgmma" (Hopper),
    #: "tcgen05" (datacenter Blackwell), "mma.sync" (consumer Blackwell, Ada) or "mfma" (AMD)
    mma: str = "wgmma"

    def kernel_target(self) -> KernelTarget:
        return shipped_target(self.target_name)

    def gpu_target(self) -> Any:
        from triton.backends.compiler import GPUTarget  # lazy: the vendor runtime

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def tensor_core_pattern(self, block_m: int, fp8_operands: bool = True) -> tuple[str, str]:
        """(regex over the assembly, what it means) of the tensor-core instruction a dot with
        ``block_m`` rows must use here (``fp8_operands`` False: FP8 widened to f16 first)."""
        if self.mma == "mfma":
            if not fp8_operands:
                return r"v_mfma_\w+", "v_mfma (matrix core; FP8 operands widened to f16)"
            # gfx942: v_mfma_*_fp8_fp8 (or bf8); gfx950 also v_mfma_*_f8f6f4 (operand format FP8 here)
            return r"v_mfma_\w*(?:fp8|bf8|f8f6f4)\w*", "v_mfma FP8 (matrix core)"
        if self.mma == "mma.sync":  # the part has nothing else: its FP8 tensor cores take FP8 operands
            return r"mma\.sync\.aligned\S*\.(?:e4m3|e5m2)\.\S*", "mma.sync FP8 (no wgmma or tcgen05 on this part)"
        if block_m >= 64:
            if self.mma == "tcgen05":
                return r"tcgen05\.mma\S*", "tcgen05.mma (Blackwell 5th-gen tensor core)"
            return r"wgmma\.mma_async\S*", "wgmma (Hopper warpgroup MMA)"
        # wgmma's warpgroup and tcgen05 cover 64 rows or more: smaller decode tiles use the synchronous MMA
        return r"mma\.sync\.aligned\S*", f"mma.sync (tile under {self.mma}'s 64 rows)"


COMPILE_TARGETS: dict[str, CompileTarget] = {
    t.name: t
    for t in (
        CompileTarget(
            "sm_90a", "cuda", 90, 32, 232448, "CUDA C Programming Guide, compute capability 9.0: 227 KB shared per block",
            "nvidia-sm90",
        ),
        # 10.0 and 10.3 (B300) share the limits: 228 KB per SM less 1 KB the driver keeps per block
        # (also CCCL's cuda/__device/arch_traits.h, sm_100 / sm_103)
        CompileTarget(
            "sm_100a", "cuda", 100, 32, 232448, "CUDA C Programming Guide, compute capability 10.0: 227 KB shared per block",
            "nvidia-sm100", mma="tcgen05",
        ),
        # 12.0 and 12.1: 100 KB per SM less the 1 KB (CCCL arch_traits.h, sm_120 / sm_121)
        CompileTarget(
            "sm_120a", "cuda", 120, 32, 101376, "CUDA C Programming Guide, compute capability 12.0: 99 KB shared per block",
            "nvidia-sm120", mma="mma.sync",
        ),
        CompileTarget(
            "gfx942", "hip", "gfx942", 64, 65536, "AMD CDNA3 ISA (MI300X): 64 KB LDS per workgroup",
            "amd-gfx942", mma="mfma",
        ),
        CompileTarget(
            "gfx950", "hip", "gfx950", 64, 163840, "AMD CDNA4 ISA (MI350/MI355X): 160 KB LDS per CU",
            "amd-gfx950", mma="mfma",
        ),
    )
}


# ---------------------------------------------------------------- what a target ships
@dataclass(frozen=True)
class CompileJob:
    """One kernel config to compile: the captured launch, expanded per autotune config."""

    kernel: str  #: the wrapper and case, e.g. "fp8_block_gemm (prefill)"
    fn: Any  #: the @triton.jit function
    args: tuple
    kwargs: dict[str, Any]  #: constexprs and compile options, as the launch passes them
    tensor_core: bool  #: a GEMM/MoE dot: the target's tensor-core instruction must be there
    tile: TileConfig | None  #: the table entry this job checks (None: not from a tile table)
    spill_ok: str = ""  #: why a spill is accepted here (empty: a spill fails the config)

    def config(self) -> str:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "waves_per_eu",
                "matrix_instr_nonkdim")  # fmt: skip
        return " ".join(f"{k}={self.kwargs[k]}" for k in keys if k in self.kwargs)


def _expand(kernel: str, launches: list[Any], tensor_core: bool, tiles: Sequence[TileConfig] = ()) -> list[CompileJob]:
    """One job per captured launch, tied to the table tile it launched (if any)."""
    jobs = []
    for rec in launches:
        kw = {k: v for k, v in rec.kwargs.items() if v is not None}
        shape = (kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw.get("num_warps"), kw.get("num_stages"))
        tile = next((t for t in tiles if (t.block_m, t.block_n, t.num_warps, t.num_stages) == shape), None)
        name = f"{kernel} [{rec.kernel.__name__}]" if len(launches) > 1 else kernel
        jobs.append(CompileJob(name, rec.kernel, rec.args, kw, tensor_core, tile, tile.spill_ok if tile else ""))
    return jobs


def shipped_jobs(target: KernelTarget) -> list[CompileJob]:
    """Every kernel config ``target`` ships, as launches captured from the wrappers on
    representative CPU tensors (DeepSeek-V3-like shapes: sizes multiples of 16, as on device).

    Imports the kernel modules: call it in a process where ``TRITON_INTERPRET`` is unset."""
    mods = {m: importlib.import_module(f"dshal.kernels.triton.{m}") for m in
            ("quant", "gemm", "norm", "activation", "rotary", "moe", "sparse_attention")}  # fmt: skip
    e4m3 = target.fp8_e4m3
    jobs: list[CompileJob] = []

    def cap(kernel: str, call: Callable[[], Any], tensor_core: bool = False, tiles: Sequence[TileConfig] = ()) -> None:
        with capture_launches() as launches:
            call()
        jobs.extend(_expand(kernel, launches, tensor_core, tiles))

    def gemm(tile: TileConfig, dtype: torch.dtype, widened: str = "") -> None:
        """One GEMM tile on the shape class it serves: a decode tile on one token (M = 1 is a
        constexpr specialization) over DeepSeek-V3's fused q/kv down-projection, others on a
        prefill chunk."""
        decode = tile in target.gemm_decode_tiles
        m, n, k = (1, 2112, 7168) if decode else (4096, 7168, 2048)
        a, b = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype)
        sa, sb = torch.empty(m, -(-k // 128)), torch.empty(-(-n // 128), -(-k // 128))
        label = ", ".join(part for part in ("decode" if decode else "", widened) if part)
        cap(f"fp8_block_gemm ({label})" if label else "fp8_block_gemm",
            lambda: mods["gemm"].fp8_block_gemm(a, sa, b, sb, target=target, tile=tile), True, (tile,))

    # GEMM: every tile the target may launch (both spaces, tuned-table entries)
    for tile in target.shipped_gemm_tiles():
        gemm(tile, e4m3)
    # and on an E4M3 the dot cannot take (OCP on gfx942, FNUZ on gfx950): widened to f16 in the
    # kernel, from the widened space (the big tiles spill then) and the decode space
    widened = next((d for d in E4M3_DTYPES if d in target.fp8_dtypes and d not in target.fp8_dot_dtypes), None)
    if widened is not None and target.gemm_widened_tiles:
        for tile in dict.fromkeys(target.gemm_widened_tiles + target.gemm_decode_tiles):
            gemm(tile, widened, f"{str(widened).replace('torch.float8_', '')} widened")
    # MoE: FP8 experts (the routed experts' path), T=64 tokens, top-8 of 16 experts
    T, H, inter, E, topk = 64, 1024, 512, 16, 8
    x = torch.empty(T, H, dtype=torch.bfloat16)
    ids = (torch.arange(T * topk) % E).reshape(T, topk)
    wts = torch.empty(T, topk)
    w13 = torch.empty(E, 2 * inter, H, dtype=e4m3)
    w2 = torch.empty(E, H, inter, dtype=e4m3)
    s13 = torch.empty(E, 2 * inter // 128, H // 128)
    s2 = torch.empty(E, H // 128, inter // 128)
    cap("grouped_moe_experts (fp8)",
        lambda: mods["moe"].grouped_moe_experts(x, wts, ids, w13, w2, s13, s2, target=target, check_ids=False),
        True, (target.moe_tile,))  # fmt: skip
    # one choice per token (the expert-parallel path): the down kernel writes x's dtype itself
    cap("grouped_moe_experts (fp8, one choice per token)",
        lambda: mods["moe"].grouped_moe_experts(x, wts[:, :1], ids[:, :1], w13, w2, s13, s2, target=target,
                                                check_ids=False),
        True, (target.moe_tile,))  # fmt: skip
    # elementwise kernels, bfloat16 rows of DeepSeek-V3's widths
    xs = torch.empty(64, 7168, dtype=torch.bfloat16)
    cap("fp8_quantize_blocks (1x128)", lambda: mods["quant"].fp8_quantize_blocks(xs, (1, 128), e4m3, target=target))
    cap("fp8_quantize_blocks (128x128)",
        lambda: mods["quant"].fp8_quantize_blocks(xs, (128, 128), e4m3, target=target))  # fmt: skip
    w = torch.empty(7168, dtype=torch.bfloat16)
    cap("rms_norm (residual)", lambda: mods["norm"].rms_norm(xs, w, 1e-6, xs, target=target))
    cap("silu_and_mul", lambda: mods["activation"].silu_and_mul(xs, target=target))
    cap("silu_and_mul_fp8_quant", lambda: mods["activation"].silu_and_mul_fp8_quant(xs, e4m3, target=target))
    q = torch.empty(1, 64, 128, 64, dtype=torch.bfloat16)  # [B, T, H, rope dim]
    cos = torch.empty(64, 1, 32, dtype=torch.bfloat16)
    cap("rotary_embedding", lambda: mods["rotary"].rotary_embedding(q, cos, cos, True, target=target))
    # DeepSeek-V3.2's sparse MLA over the latent (512 + 64), 128 heads, 2048 kept of 4096 keys:
    # a decode step (T = 1 is a constexpr specialization) and an MTP step's two queries
    kv = torch.empty(4, 4096, 576, dtype=torch.bfloat16)
    for tq in (1, 2):
        qs, kept = torch.empty(4, 128, tq, 576, dtype=torch.bfloat16), torch.zeros(4, tq, 2048, dtype=torch.int64)
        cap(f"sparse_mla_attention (T={tq})",
            lambda qs=qs, kept=kept: mods["sparse_attention"].sparse_mla_attention(qs, kv, kept, 576**-0.5, 512, target=target,
                                                                                 check_indices=False))  # fmt: skip
    # its lightning indexer's scores: 64 heads of 128 over 4096 cached keys, a decode step and a prefill chunk
    index_keys = torch.empty(1, 4096, 128, dtype=torch.bfloat16)
    for tq in (1, 64):
        qi, wi = torch.empty(1, tq, 64, 128, dtype=torch.bfloat16), torch.empty(1, tq, 64)
        cap(f"indexer_topk scores (T={tq})",
            lambda qi=qi, wi=wi: mods["sparse_attention"].indexer_topk(qi, wi, index_keys, 2048, target=target))  # fmt: skip
    return jobs


# ---------------------------------------------------------------- compiling one job
def _specialize(job: CompileJob, gpu_target: Any) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as Triton's JIT builds them for this launch."""
    from triton.compiler import make_backend  # lazy: the vendor runtime
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path  # lazy: as above

    fn = job.fn
    backend = make_backend(gpu_target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    params, spec, options = binder(*job.args, **job.kwargs)
    names = [p.name for p in fn.params]
    kinds = [s[0] for s in spec]
    signature = dict(zip(names, kinds, strict=True))
    constexprs = {p: get_iterable_path(list(params.values()), p) for p in find_paths_if(kinds, lambda _, v: v == "constexpr")}
    attr_vals = ["" if s[0] == "constexpr" else s[1] for s in spec]
    attrs = {p: backend.parse_attr(get_iterable_path(attr_vals, p))
             for p in find_paths_if(attr_vals, lambda _, v: isinstance(v, str))}  # fmt: skip
    return signature, constexprs, attrs, dict(options)


def _root_cause(err: BaseException) -> str:
    """The innermost error's type and first 300 characters (Triton wraps it in source excerpts)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _int(pattern: str, text: str) -> int:
    found = [int(v) for v in re.findall(pattern, text)]
    return max(found) if found else 0


def compile_job(ct: CompileTarget, job: CompileJob, cache_dir: Path | None) -> dict[str, Any]:
    """Compile ``job`` for ``ct`` and read its resources; a dict row of the report."""
    import triton  # lazy: the vendor runtime, imported in the worker with TRITON_INTERPRET unset
    from triton import knobs  # lazy: as above
    from triton.compiler import ASTSource  # lazy: as above

    row: dict[str, Any] = {"target": ct.name, "kernel": job.kernel, "config": job.config(), "tensor_core_required": None}
    stages_asked = int(job.kwargs.get("num_stages", 3 if ct.backend == "cuda" else 2))
    row["num_stages"] = stages_asked
    gpu_target = ct.gpu_target()
    try:
        signature, constexprs, attrs, options = _specialize(job, gpu_target)
    except Exception as err:  # noqa: BLE001 -- a bad launch is reported, not raised
        return row | {"lowered": False, "error": f"specialization failed: {type(err).__name__}: {err}"}
    key = hashlib.sha256(
        repr((RESULTS_REVISION, triton.__version__, job.fn.cache_key, sorted(signature.items()), sorted(constexprs.items()),
              sorted(attrs.items()), sorted(options.items()), ct.name)).encode()
    ).hexdigest()  # fmt: skip
    cached = cache_dir / f"{key}.json" if cache_dir else None
    facts = _read_cached(cached) if cached else None
    if facts is not None:
        return row | facts | _tensor_core(ct, job, facts["mma"]) | {"cached": True}

    log = io.StringIO()
    start = time.perf_counter()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v is run anyway; print its report
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
            kernel = triton.compile(ASTSource(job.fn, signature, constexprs, attrs), target=gpu_target, options=options)
    except OSError as err:  # Triton's cache folder (or the disk), not the kernel
        raise _triton_cache_error(err, knobs.cache.dir) from None
    except Exception as err:  # noqa: BLE001 -- a config that does not lower is a result
        return row | {"lowered": False, "error": _root_cause(err)}
    result: dict[str, Any] = {"lowered": True, "error": "", "compile_s": round(time.perf_counter() - start, 2)}
    shared = int(kernel.metadata.shared)
    result |= {"shared_bytes": shared, "shared_limit": ct.shared_limit, "fits": shared <= ct.shared_limit}
    ttgir = kernel.asm.get("ttgir", "")
    result["stages_built"] = max([int(d) for d in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)] or [0])
    if ct.backend == "cuda":
        ptx, report = kernel.asm["ptx"], log.getvalue()
        result["registers"] = _int(r"Used (\d+) registers", report)
        result["spills"] = _int(r"(\d+) bytes spill stores", report) + _int(r"(\d+) bytes spill loads", report)
        result["spill_detail"] = "bytes of spill stores + loads (ptxas -v)"
        copies = [name for name, pat in (("TMA", r"cp\.async\.bulk"), ("cp.async", r"cp\.async\.(?!bulk)")) if re.search(pat, ptx)]
        result["async_copy"] = ",".join(copies)
        asm = ptx
    else:
        gcn = kernel.asm["amdgcn"]
        result["registers"] = _int(r"\.vgpr_count:\s+(\d+)", gcn)
        vgpr, sgpr = _int(r"\.vgpr_spill_count:\s+(\d+)", gcn), _int(r"\.sgpr_spill_count:\s+(\d+)", gcn)
        result["spills"] = vgpr + sgpr
        result["spill_detail"] = f"vgpr_spill_count {vgpr}, sgpr_spill_count {sgpr}"
        result["async_copy"] = "LDS" if shared and re.search(r"\bds_(read|write|load|store)", gcn) else ""
        asm = gcn
    result["mma"] = sorted(set(re.findall(r"(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync\.aligned|v_mfma_)\S*", asm)))
    if cached:
        try:
            make_private_dir(cached.parent)
            atomic_write(cached, json.dumps(result), private=True)  # another process may read it meanwhile (the other test worker)
        except OSError:  # a full disk, a folder made read-only meanwhile: the result stands uncached
            pass
    return row | result | _tensor_core(ct, job, result["mma"]) | {"cached": False}  # a cached row has the same keys


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A cached result, or None when there is none or it cannot be read (then it is recompiled)."""
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and isinstance(facts.get("mma"), list) else None


def _triton_cache_error(err: OSError, folder: str) -> ConfigError:
    """``triton.compile`` failing with an OSError: its cache folder cannot be written or the
    disk is full (or a file it needs is missing), which every config would meet; one error for
    the run, not a row per config."""
    seen = f"{err.strerror}: {str(err.filename)!r}" if err.strerror and err.filename else str(err)
    head = f"dshal kernels: triton.compile failed with {type(err).__name__} ({seen}), a problem of this machine, not of the kernels"
    in_cache = bool(err.filename) and _on_the_way(str(err.filename), folder)
    if not in_cache and err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        # not the cache: a tool Triton runs (ptxas, ld.lld) missing or not executable, say
        return ConfigError(f"{head}: expected the compilers Triton bundles to be installed and executable")
    setting = os.environ.get("TRITON_CACHE_DIR")
    told = f"TRITON_CACHE_DIR={setting!r}" if setting else f"{folder!r} (TRITON_CACHE_DIR is unset)"
    return ConfigError(f"{head}: Triton's compile cache is {told}, expected a writable folder with free space "
                       "(set TRITON_CACHE_DIR to one)")


def _on_the_way(path: str, folder: str) -> bool:
    """Whether ``path`` is in ``folder`` or one of the folders above it (made on the way to it)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    try:
        return os.path.commonpath([path, folder]) in (path, folder)
    except ValueError:  # different drives
        return False


def _tensor_core(ct: CompileTarget, job: CompileJob, mma: list[str]) -> dict[str, Any]:
    """The tensor-core instructions a GEMM/MoE job was required to have, and those found."""
    if not job.tensor_core:
        return {}
    pattern, meaning = ct.tensor_core_pattern(int(job.kwargs.get("BLOCK_M", 64)), bool(job.kwargs.get("DOT_FP8", True)))
    return {"tensor_core_required": meaning, "tensor_core": [m for m in mma if re.fullmatch(pattern, m)][:3]}


def judge(row: dict[str, Any]) -> list[str]:
    """Why a compiled config must not ship (empty: it is fine)."""
    if not row.get("lowered"):
        return [f"does not lower: {row.get('error')}"]
    why = []
    if not row["fits"]:
        why.append(f"shared memory {row['shared_bytes']} B > limit {row['shared_limit']} B")
    if row["spills"] and not row.get("spill_ok"):
        why.append(f"spills ({row['spill_detail']})")
    if row.get("tensor_core_required") and not row.get("tensor_core"):
        why.append(f"no {row['tensor_core_required']} (found {row.get('mma') or 'no MMA'})")
    if row.get("tensor_core_required") and row["num_stages"] >= 2 and not row.get("async_copy"):
        why.append(f"num_stages={row['num_stages']} but no asynchronous copy / LDS pipeline was built")
    return why


# ---------------------------------------------------------------- worker processes
def compile_worker(
    targets: list[str], worker: int, jobs: int, out: str, cache_dir: str, gemm_tiles: list[dict] | None, only: str,
    parent: int,
) -> None:
    """One compile worker process (started by :func:`cross_compile` in process ``parent``):
    compiles every ``jobs``-th job from number ``worker`` on and writes its rows to ``out``
    as JSON; it exits when ``parent`` is gone."""
    import dataclasses

    exit_with_parent(parent)  # an orphan would keep compiling (where dies_with_parent has no prctl)
    rows = []
    cache = Path(cache_dir) if cache_dir else None
    for name in targets:
        ct = COMPILE_TARGETS[name]
        table = ct.kernel_target()
        if gemm_tiles:
            table = dataclasses.replace(table, gemm_tiles=tuple(TileConfig(**t) for t in gemm_tiles))
        mine = [(i, job) for i, job in enumerate(shipped_jobs(table)) if job.kernel.startswith(only)]
        for n, (i, job) in enumerate(mine):
            if n % jobs != worker:
                continue
            try:
                row = compile_job(ct, job, cache)
            except DshalError as err:  # this machine's problem: said once by the parent, not per row
                Path(out).write_text(json.dumps({"error": type(err).__name__, "message": str(err)}))
                return
            row["index"] = i
            row["spill_ok"] = job.spill_ok
            row["problems"] = judge(row)
            row["ok"] = not row["problems"]
            rows.append(row)
    Path(out).write_text(json.dumps(rows))


def default_cache_dir() -> Path:
    """Where compiled configs are kept between runs: ``kernels`` in dshal's cache."""
    return cache_dir() / "kernels"


def usable_cache_dir(folder: Path | None) -> Path | None:
    """``folder`` when results can be kept there; else None, said once on stderr ("result cache
    off: ..."): a read-only, uncreatable or full cache folder costs the run its cache, not its
    compiles (each worker failed at its first write, after seconds of compiling)."""
    if folder is None:
        return None
    with contextlib.suppress(OSError):  # 0700 whatever the umask; why it cannot be made is said next
        make_private_dir(folder)
    try:
        check_writable(folder, "dshal's cache (DSHAL_CACHE_DIR)", directory=True)
    except ArgumentError as err:
        print(f"dshal kernels: result cache off: {err}", file=sys.stderr, flush=True)
        return None
    return folder


def _triton_default_cache() -> str:
    """Triton's compile cache when TRITON_CACHE_DIR is unset: ``$TRITON_HOME/.triton/cache``,
    ``TRITON_HOME`` defaulting to the home folder (``triton.knobs.cache``; read here without
    importing triton, which this process may have to import for its interpreter)."""
    home = os.environ["TRITON_HOME"] if "TRITON_HOME" in os.environ else os.path.expanduser("~/")
    return os.path.join(home, ".triton", "cache")


def _writable(folder: str) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be written in it."""
    try:
        check_writable(folder, "TRITON_CACHE_DIR", directory=True)
    except ArgumentError:
        return False
    return True


def cross_compile(
    targets: Sequence[str],
    jobs: int = 2,
    cache_dir: Path | None = None,
    gemm_tiles: Sequence[TileConfig] | None = None,
    only: str = "",
) -> list[dict[str, Any]]:
    """Compile every shipped config of ``targets`` in ``jobs`` worker subprocesses; one row
    per config (see :func:`compile_job`), in table order. ``cache_dir`` None: no cache.
    ``gemm_tiles`` replaces the tables' GEMM tiles (to check candidates before shipping them);
    ``only`` keeps the kernels whose name starts with it."""
    import dataclasses

    for name in targets:
        if name not in COMPILE_TARGETS:
            raise ArgumentError(f"dshal kernels: argument '--target' is {name!r}, expected one of {', '.join(COMPILE_TARGETS)}")
    if jobs < 1:
        raise ArgumentError(f"dshal kernels: argument '--jobs' is {jobs}, expected at least 1")
    jobs = min(jobs, host_usable_cpus())  # each worker is a whole Python + Triton; more than the CPUs (or a quota) only thrash
    cache_dir = usable_cache_dir(cache_dir)
    env = {k: v for k, v in child_env().items() if k not in ("TRITON_INTERPRET", "DSHAL_EMULATE")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    tiles = [dataclasses.asdict(t) for t in gemm_tiles] if gemm_tiles else None
    # SIGTERM / SIGHUP kill the workers and remove the folder, as an error or Ctrl-C does
    with cleanup_on_termination(), tempfile.TemporaryDirectory(prefix="dshal-kernels-") as tmp:
        if not os.environ.get("TRITON_CACHE_DIR"):  # unset (Triton cannot use an empty one)
            env.pop("TRITON_CACHE_DIR", None)
            if not _writable(_triton_default_cache()):  # e.g. HOME=/nonexistent: every compile failed
                env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")  # written, never read: always_compile
        procs: list[tuple[subprocess.Popen, str]] = []
        try:
            for w in range(jobs):
                out = os.path.join(tmp, f"{w}.json")
                code = (dies_with_parent(os.getpid()) + "from dshal.kernels.triton.crosscompile import compile_worker\n"
                        f"compile_worker({list(targets)!r}, {w}, {jobs}, {out!r}, {str(cache_dir or '')!r}, {tiles!r}, {only!r}, {os.getpid()})")  # fmt: skip
                procs.append((subprocess.Popen(child_python("-c", code), env=env, stderr=subprocess.PIPE, text=True), out))
            rows = []
            for proc, out in procs:
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"dshal kernels: a compile worker failed (exit {proc.returncode}):\n{err[-2000:]}")
                found = json.loads(Path(out).read_text())
                if isinstance(found, dict):  # the worker met an error of this machine (compile_worker)
                    raise getattr(errors, found["error"], DshalError)(found["message"])
                rows.extend(found)
        finally:  # an error or Ctrl-C here leaves no worker behind
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    order = {name: i for i, name in enumerate(targets)}
    return sorted(rows, key=lambda r: (order[r["target"]], r["index"]))


# ---------------------------------------------------------------- the command
def refuse_unbuildable(archs: Sequence[str], triton_version: str | None) -> None:
    """BackendUnavailableError naming the first of ``archs`` that Triton ``triton_version``
    cannot compile for at all (:data:`dshal.versions.ARCH_FLOORS`), before minutes of compile
    errors from ptxas; an arch it only builds slower kernels for compiles (the rows say how)."""
    for arch in archs:
        floor = triton_arch_shortfall(triton_version, arch)
        if floor is not None and not floor.compiles:
            raise BackendUnavailableError(f"dshal kernels: --target {arch}: {triton_arch_refusal(triton_version, arch)}")


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("kernel", "config", "lowered", "smem KB/limit", "regs", "spills", "stages", "async/LDS", "tensor core", "status")
    lines = []
    for r in rows:
        if r.get("lowered"):
            smem = f"{r['shared_bytes'] / 1024:.0f}/{r['shared_limit'] // 1024}"
            cells = (r["kernel"], r["config"], "yes", smem, str(r["registers"]), str(r["spills"]),
                     f"{r['stages_built']}/{r['num_stages']}", r["async_copy"] or "-",
                     ",".join(r.get("tensor_core") or []) or ("-" if not r["tensor_core_required"] else "MISSING"))  # fmt: skip
        else:
            cells = (r["kernel"], r["config"], "no", "", "", "", "", "", "")
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])
        if r["ok"] and r.get("spills"):
            status += f" (spill accepted: {r['spill_ok']})"
        lines.append((*cells, status))
    widths = [max(len(h), *(len(c) for c in col)) for h, col in zip(head, zip(*lines, strict=True), strict=True)] if lines else []

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return "\n".join([fmt(head), *(fmt(c) for c in lines)])


def main(args: argparse.Namespace) -> int:
    """Print one row per shipped config; exit 1 when any config fails (does not lower, does
    not fit, spills without a reason in the table, lacks its tensor-core instruction)."""
    targets = list(dict.fromkeys(args.target))
    require_triton("dshal kernels")
    refuse_unbuildable(targets, installed("triton"))
    if args.json:  # before minutes of compiling, not after
        check_writable(args.json, "--json")
    rows = cross_compile(targets, args.jobs, None if args.no_cache else default_cache_dir())
    triton_version = installed("triton")  # pytorch-triton-rocm on ROCm
    for name in targets:
        ct = COMPILE_TARGETS[name]
        mine = [r for r in rows if r["target"] == name]
        print(f"target {name} (triton {triton_version}; shared limit {ct.shared_limit // 1024} KB: {ct.shared_source})")
        print(format_table(mine))
        bad = sum(not r["ok"] for r in mine)
        print(f"{len(mine) - bad}/{len(mine)} configs ok\n")
    if args.json:
        report = {"schema": "dshal.kernels/1", "triton": triton_version, "targets": targets, "rows": rows}
        atomic_write(args.json, json.dumps(report, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


__all__ = ["COMPILE_TARGETS", "CompileJob", "CompileTarget", "compile_job", "cross_compile", "refuse_unbuildable", "shipped_jobs"]
