"""What the kernels need to know about the hardware: :class:`KernelTarget`, and the tile
tables dshal ships per target, as data keyed by target name (``tiles/<name>.json``, read
into :data:`SHIPPED_TARGETS`).

A plugin maps its device's arch to a target name (``shipped_target("nvidia-sm90")``) -- or,
for a part dshal ships no table for, builds its own :class:`KernelTarget` -- and passes it
to the kernel wrappers; the kernels read only its fields, never a vendor name. The tables
live here, in the core, because ``dshal kernels --target`` cross-compiles them with no
plugin installed; the choice of table is the plugin's. :meth:`KernelTarget.interpreter`
(and :meth:`KernelTarget.emulating`) is the CPU's target under ``TRITON_INTERPRET=1``.

This module does not import triton (plugins may build targets while deciding their
capabilities).

GEMM tile choice (see :func:`dshal.kernels.triton.gemm.select_tile`): M is bucketed to a power
of two; a tuned table shipped as data (``tuned/<target name>.json``, written on a real device
by ``dshal tune``) names the tile per (N, K, M bucket); otherwise the bucket's space
(:meth:`KernelTarget.gemm_space`) is timed once per (bucket, N, K) on the device -- never inside
a CUDA/HIP graph capture, where the space's first tile is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType

import torch

from dshal.cache import cache_dir, make_private_dir, not_private_file
from dshal.errors import ConfigError, DshalError, UnsupportedOpError

log = logging.getLogger(__name__)

#: The E4M3 variants a target may call native.
E4M3_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
#: Every FP8 dtype the kernels know (OCP and FNUZ).
ALL_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


@dataclass(frozen=True)
class TileConfig:
    """One GEMM tiling. ``block_k`` is fixed at 128 by the kernels (one FP8 scale block).

    ``waves_per_eu`` and ``matrix_instr_nonkdim`` are AMD compiler knobs (None = leave to
    the compiler); they are passed to Triton only when set. ``split_k`` > 1 splits the K loop
    over that many programs per output tile (float32 partials, summed in a fixed order), so
    a decode GEMM (M <= 16) fills the GPU with programs.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    waves_per_eu: int | None = None
    matrix_instr_nonkdim: int | None = None
    split_k: int = 1
    #: why a register spill that ``dshal kernels`` finds is accepted (empty: a spill fails it)
    spill_ok: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps", "split_k"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1 and v & (v - 1) == 0):
                raise ValueError(f"TileConfig: {name} is {v!r}, expected a power of two >= 1")
        # group_m < 1 made negative program ids that pass the store mask: out-of-bounds writes.
        for name in ("num_stages", "group_m"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"TileConfig: {name} is {v!r}, expected an int >= 1")

    def kernel_kwargs(self) -> dict[str, int]:
        """The meta-parameters a launch passes for this tiling."""
        kw = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "GROUP_M": self.group_m, "SPLIT_K": self.split_k}
        if self.waves_per_eu is not None:
            kw["waves_per_eu"] = self.waves_per_eu
        if self.matrix_instr_nonkdim is not None:
            kw["matrix_instr_nonkdim"] = self.matrix_instr_nonkdim
        return kw


@dataclass(frozen=True)
class KernelTarget:
    """The hardware facts and tuning choices the portable kernels depend on (Triton's
    ``GPUTarget`` -- backend, arch, warp size -- plus dshal's FP8 rules and tile tables).

    Why a type apart from :class:`~dshal.Capabilities`: the kernel wrappers and ``dshal
    kernels`` / ``dshal tune`` need these facts with no backend and no device (cross-compiling
    for ``sm_90a`` on a CPU machine); it is frozen and hashable, a cache key of the compiled
    kernels; and it holds torch dtypes and tiles the core's decisions never read.
    ``Capabilities`` stays what the core and users see; a plugin derives both from the same arch.

    - ``warp_size``: 32 (NVIDIA warp) or 64 (AMD CDNA wavefront); sizes elementwise blocks.
    - ``fp8_e4m3``: the native E4M3 dtype (``float8_e4m3fn``, or ``float8_e4m3fnuz`` on gfx942).
    - ``fp8_dtypes``: FP8 dtypes Triton can load, store and convert on this hardware at all
      (NVIDIA: the OCP formats; AMD and the interpreter: FNUZ too). The wrappers raise
      UnsupportedOpError for others, so a plugin can fall back instead of failing to compile.
    - ``fp8_dot_dtypes``: FP8 dtypes ``tl.dot`` takes directly on this hardware; other FP8
      inputs are widened to float16 inside the kernel before the dot (exact for E4M3/E5M2).
    - ``bf16_dot``: whether ``tl.dot`` takes bfloat16 operands; when False (the Triton 3.x
      interpreter, whose bfloat16 dot returns garbage) they are widened to float32 first.
      ``float8_e4m3fnuz`` here means the dot runs on ``tl.float8e4b8`` operands (gfx942).
    - ``gemm_tiles``: the autotune space of the block-FP8 GEMM (one entry = no autotuning).
    - ``gemm_decode_tiles``: the space for M <= ``DECODE_M`` (small tiles, split-K); empty:
      ``gemm_tiles`` serve every M.
    - ``gemm_widened_tiles``: the space for M > ``DECODE_M`` when the operands are widened
      (an FP8 format outside ``fp8_dot_dtypes``: the f16 copies need more registers, and the
      big tiles spill); empty: ``gemm_tiles``. Tuned tables (the dot path's) do not apply.
    - ``moe_tile``, ``moe_block_k``: the fixed tiling of the grouped MoE GEMMs (``block_m``
      sets how token rows are grouped per expert, so it is not autotuned; ``moe_block_k``
      divides 128 so FP8 weight blocks have one scale per K step).
    - ``elementwise_warps``: warps per program of the row-wise kernels (norm, activation...).
    - ``sparse_attention_tile``: the sparse MLA kernel's program: ``block_m`` query heads,
      ``block_n`` gathered keys per step (both at least 16: ``tl.dot``'s smallest), warps, stages.
    - ``indexer_tile``: the indexer scores kernel's program: ``block_m`` keys, ``block_n`` head
      columns per step (both at least 16), warps, stages.
    """

    name: str
    warp_size: int = 32
    fp8_e4m3: torch.dtype = torch.float8_e4m3fn
    fp8_dtypes: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
    fp8_dot_dtypes: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
    gemm_tiles: tuple[TileConfig, ...] = (TileConfig(64, 64),)
    gemm_decode_tiles: tuple[TileConfig, ...] = ()
    gemm_widened_tiles: tuple[TileConfig, ...] = ()
    moe_tile: TileConfig = TileConfig(64, 64, num_warps=4, num_stages=2)
    moe_block_k: int = 64
    bf16_dot: bool = True
    elementwise_warps: int = 4
    sparse_attention_tile: TileConfig = TileConfig(16, 32, num_warps=4, num_stages=1)
    indexer_tile: TileConfig = TileConfig(64, 64, num_warps=4, num_stages=1)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.warp_size not in (32, 64):
            raise ValueError(f"KernelTarget: warp_size is {self.warp_size}, expected 32 or 64")
        if self.fp8_e4m3 not in E4M3_DTYPES:
            raise ValueError(f"KernelTarget: fp8_e4m3 is {self.fp8_e4m3}, expected one of {E4M3_DTYPES}")
        if self.moe_block_k not in (16, 32, 64, 128):
            raise ValueError(f"KernelTarget: moe_block_k is {self.moe_block_k}, expected 16, 32, 64 or 128")
        if self.fp8_e4m3 not in self.fp8_dtypes or not set(self.fp8_dot_dtypes) <= set(self.fp8_dtypes):
            raise ValueError(
                f"KernelTarget: fp8_dtypes {self.fp8_dtypes} must hold fp8_e4m3 ({self.fp8_e4m3}) "
                "and every fp8_dot_dtypes entry"
            )
        if not self.gemm_tiles:
            raise ValueError("KernelTarget: gemm_tiles is empty, expected at least one TileConfig")
        for name in ("sparse_attention_tile", "indexer_tile"):
            tile = getattr(self, name)
            if min(tile.block_m, tile.block_n) < 16:
                raise ValueError(f"KernelTarget: {name} is {tile}, expected block_m and block_n of at least 16 (tl.dot's smallest)")

    # ------------------------------------------------------------------ queries
    def dot_takes(self, dtype: torch.dtype) -> bool:
        """Whether ``tl.dot`` takes operands of ``dtype`` directly (else they are widened)."""
        return dtype in self.fp8_dot_dtypes or not dtype.is_floating_point or dtype.itemsize > 1

    def check_fp8_dtype(self, fn: str, arg: str, dtype: torch.dtype) -> None:
        """Raise UnsupportedOpError when the kernels cannot handle FP8 ``dtype`` here."""
        if dtype not in self.fp8_dtypes:
            raise UnsupportedOpError(
                f"{fn}: argument {arg!r} is {dtype}, which Triton cannot handle on target {self.name!r} "
                f"(supported FP8 dtypes there: {', '.join(str(d) for d in self.fp8_dtypes)})"
            )

    def gemm_space(self, m: int, widened: bool = False) -> tuple[TileConfig, ...]:
        """The tiles a GEMM with ``m`` rows chooses among (``widened``: its FP8 operands are
        widened to f16 before the dot, see ``gemm_widened_tiles``)."""
        if m <= DECODE_M and self.gemm_decode_tiles:
            return self.gemm_decode_tiles
        return self.gemm_widened_tiles if widened and self.gemm_widened_tiles else self.gemm_tiles

    def tuned_tile(self, n: int, k: int, m_bucket: int) -> TileConfig | None:
        """The tile the tuned table (:func:`tuned_tables`) names for (N, K, M bucket), if any."""
        return tuned_tables(self.name).get((n, k, m_bucket))

    def shipped_gemm_tiles(self) -> tuple[TileConfig, ...]:
        """Every GEMM tile this target may launch: both spaces and the tuned tables' entries."""
        tiles = dict.fromkeys(self.gemm_tiles + self.gemm_decode_tiles)
        tiles.update(dict.fromkeys(tuned_tables(self.name).values()))
        return tuple(tiles)

    # ------------------------------------------------------------------ the interpreter
    @classmethod
    def interpreter(cls, fp8_e4m3: torch.dtype = torch.float8_e4m3fn) -> KernelTarget:
        """``TRITON_INTERPRET=1`` on CPU tensors: one small tiling (autotuning there is slow).

        ``fp8_e4m3`` picks the emulated hardware's native E4M3 (``float8_e4m3fnuz`` to
        emulate gfx942, whose dots then take FNUZ operands directly, as ``tl.float8e4b8``).
        """
        dots = (fp8_e4m3, torch.float8_e5m2 if fp8_e4m3 == torch.float8_e4m3fn else torch.float8_e5m2fnuz)
        return cls(
            name="interpreter",
            warp_size=32,
            fp8_e4m3=fp8_e4m3,
            fp8_dtypes=ALL_FP8_DTYPES,
            fp8_dot_dtypes=dots,
            # few, wide programs: the interpreter's cost is per program and per op, not per element
            gemm_tiles=(TileConfig(32, 64, num_warps=4, num_stages=1),),
            # decode GEMMs take the split-K path here too, so emulated runs exercise it
            gemm_decode_tiles=(TileConfig(16, 64, num_warps=4, num_stages=1, split_k=2),),
            moe_tile=TileConfig(16, 64, num_warps=4, num_stages=1),
            moe_block_k=64,
            bf16_dot=False,
            elementwise_warps=4,
        )

    @classmethod
    def emulating(cls, real: KernelTarget) -> KernelTarget:
        """The interpreter's tiling with ``real``'s FP8 rules: emulated mode accepts, refuses and
        dots exactly the FP8 dtypes the real hardware does (the interpreter itself takes all)."""
        return dataclasses.replace(
            cls.interpreter(real.fp8_e4m3),
            name=f"interpreter (emulating {real.name})",
            fp8_dtypes=real.fp8_dtypes,
            fp8_dot_dtypes=real.fp8_dot_dtypes,
        )


#: M up to which ``gemm_decode_tiles`` serve (a decode step's tokens per GEMM).
DECODE_M = 16
#: Where the tuned tables ship (data, one JSON per target name).
TUNED_DIR = Path(__file__).with_name("tuned")
TUNING_SCHEMA = "dshal.gemm-tuning/1"


def m_bucket(m: int) -> int:
    """The power of two >= ``m`` (>= 1): GEMMs whose M share a bucket share a tile."""
    return 1 << max(0, int(m) - 1).bit_length()


def user_tuning_dir() -> Path:
    """Where ``dshal tune`` writes by default: ``gemm-tuning`` in dshal's cache
    (:func:`dshal.config.cache_dir`); read after the shipped tables, so it overrides them.
    Made (mode 0700, as every cache folder dshal makes) when missing, if it can be: its tables
    choose the kernels, so no other user may put one there."""
    folder = cache_dir() / "gemm-tuning"
    try:
        make_private_dir(folder)
    except OSError:
        pass  # a writer says why it cannot write there; a reader finds no table
    return folder


def read_tuning(path: Path, target_name: str | None = None) -> dict[tuple[int, int, int], TileConfig]:
    """One tuned table: ``{(N, K, M bucket): tile}``. Dry-run tables (no device timings), other
    schemas, a table tuned for another target than ``target_name`` (when given) and sizes
    below 1 raise ValueError: they must never choose a tile."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, expected an object")
    if data.get("schema") != TUNING_SCHEMA:
        raise ValueError(f"{path}: schema is {data.get('schema')!r}, expected {TUNING_SCHEMA!r}")
    if data.get("dry_run"):
        raise ValueError(f"{path}: a dry-run table (no device timings) cannot choose tiles")
    if target_name is not None and data.get("target") != target_name:
        raise ValueError(f"{path}: tuned for target {data.get('target')!r}, expected {target_name!r}")
    table = {}
    for e in data["entries"]:
        n, k, m = int(e["N"]), int(e["K"]), int(e["M"])
        if min(n, k, m) < 1:
            raise ValueError(f"{path}: entry N={n}, K={k}, M={m}, expected sizes >= 1")
        table[(n, k, m_bucket(m))] = TileConfig(**e["tile"])
    return table


#: Warnings already given by this process (each is given once).
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _user_table(target_name: str) -> Path | None:
    """The user's (``dshal tune``) table for ``target_name``, when there is one that may be
    trusted. A user folder that cannot be read (another user's ~/.cache: ``sudo -u`` keeps
    HOME) or a table another user could have written is skipped with a warning: the shipped
    tables still serve (the first made every FP8 GEMM raise PermissionError)."""
    where = "dshal's cache"
    try:
        folder = cache_dir() / "gemm-tuning"
        where, path = str(folder), folder / f"{target_name}.json"
        if not path.exists():
            return None
        unsafe = not_private_file(path)
    except (OSError, DshalError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        _warn_once(f"dshal: cannot read the dshal tune tables in {where}: {reason}; "
                   "using the shipped tables (set DSHAL_CACHE_DIR to a folder of your own)")
        return None
    if unsafe:
        _warn_once(f"dshal: ignoring the tuned table {path}: {unsafe}; using the shipped tables "
                   "(a table another user could write would choose your GEMM kernels: check it, then chmod go-w "
                   "it or delete it)")
        return None
    return path


@cache
def tuned_tables(target_name: str) -> dict[tuple[int, int, int], TileConfig]:
    """The shipped table of ``target_name`` updated by the user's (``dshal tune``) table."""
    table: dict[tuple[int, int, int], TileConfig] = {}
    shipped = TUNED_DIR / f"{target_name}.json"
    for path in (shipped if shipped.exists() else None, _user_table(target_name)):
        if path is not None:
            try:
                table.update(read_tuning(path, target_name))
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:  # a damaged file in the cache
                raise ConfigError(f"{path}: not a usable tuned table ({type(err).__name__}: {str(err)[:200]}); "
                                  "delete it or run dshal tune again") from None
    return table


# ---------------------------------------------------------------------- shipped tables (data)
#: Where the shipped tile tables live: one JSON per target name (``tiles/<name>.json``).
TILES_DIR = Path(__file__).with_name("tiles")
TARGET_SCHEMA = "dshal.kernel-target/1"
_TILE_FIELDS = ("gemm_tiles", "gemm_decode_tiles", "gemm_widened_tiles")
_DTYPE_FIELDS = ("fp8_dtypes", "fp8_dot_dtypes")


def _fp8_dtype(path: Path, key: str, name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in ALL_FP8_DTYPES:
        raise ValueError(f"{path}: {key} holds {name!r}, expected one of {', '.join(str(d) for d in ALL_FP8_DTYPES)}")
    return dtype


def read_target(path: Path) -> KernelTarget:
    """One shipped tile table: the :class:`KernelTarget` fields by name (dtypes by their torch
    name, tiles as :class:`TileConfig` fields), ``about`` and ``<field>_why`` notes saying why
    (kept in ``notes``). Unknown keys and other schemas raise ValueError naming them."""
    data = json.loads(Path(path).read_text())
    if data.pop("schema", None) != TARGET_SCHEMA:
        raise ValueError(f"{path}: schema is not {TARGET_SCHEMA!r}")
    fields = {f.name for f in dataclasses.fields(KernelTarget)} - {"notes"}
    notes = [data.pop("about", "")] + [f"{k[:-4]}: {data.pop(k)}" for k in list(data) if k.endswith("_why")]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}, expected KernelTarget fields ({', '.join(sorted(fields))})")
    for key in _TILE_FIELDS:
        if key in data:
            data[key] = tuple(TileConfig(**tile) for tile in data[key])
    for key in ("moe_tile", "sparse_attention_tile", "indexer_tile"):
        if key in data:
            data[key] = TileConfig(**data[key])
    for key in _DTYPE_FIELDS:
        if key in data:
            data[key] = tuple(_fp8_dtype(path, key, name) for name in data[key])
    if "fp8_e4m3" in data:
        data["fp8_e4m3"] = _fp8_dtype(path, "fp8_e4m3", data["fp8_e4m3"])
    return KernelTarget(**data, notes=tuple(n for n in notes if n))


#: The targets dshal ships tile tables for, by name (the name also keys ``tuned/<name>.json``).
SHIPPED_TARGETS: Mapping[str, KernelTarget] = MappingProxyType(
    {t.name: t for t in (read_target(path) for path in sorted(TILES_DIR.glob("*.json")))}
)


def shipped_target(name: str) -> KernelTarget:
    """The shipped :class:`KernelTarget` called ``name`` (a key of :data:`SHIPPED_TARGETS`);
    an unknown name is a :class:`~dshal.ConfigError` listing the known ones."""
    try:
        return SHIPPED_TARGETS[name]
    except KeyError:
        raise ConfigError(
            f"kernel target: argument 'name' is {name!r}, expected one of {', '.join(SHIPPED_TARGETS)}"
        ) from None


def default_target(device: torch.device) -> KernelTarget:
    """The target a wrapper uses when the caller passes none: the interpreter's for CPU
    tensors, otherwise the ``generic`` table (plugins should pass their own)."""
    return KernelTarget.interpreter() if device.type == "cpu" else SHIPPED_TARGETS["generic"]


__all__ = [
    "ALL_FP8_DTYPES",
    "DECODE_M",
    "E4M3_DTYPES",
    "KernelTarget",
    "SHIPPED_TARGETS",
    "TileConfig",
    "default_target",
    "m_bucket",
    "read_target",
    "read_tuning",
    "shipped_target",
    "tuned_tables",
]
