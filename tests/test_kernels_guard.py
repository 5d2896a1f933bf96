"""Guard-band checks of the Triton kernels' masking (interpreter, CPU tensors).

On a GPU an unmasked load past a tensor's end reads its neighbour (wrong numbers) and an
unmasked store corrupts it; the interpreter shows neither by itself. Here every tensor a
kernel sees lives inside a larger buffer whose other elements are poison, at ragged sizes
(no multiple of any block size):

* wrapper level: the inputs are views with poison before, after and between their rows
  (and columns); the outputs must match the reference op, finite where it is finite, and
  no input buffer may change;
* launch level: the wrapper's launches are captured (:func:`capture_launches`) and run again
  on copies of every argument -- outputs and the wrapper's index tensors included -- with
  their strides, inside poison bands, once with each of two poisons. A band must be left
  as it was (no stray store) and the two runs must agree bit for bit (no read of a band).

Every GEMM and MoE tile the shipped tile tables hold runs once at a ragged shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest
from dshal.kernels.triton._checks import capture_launches, launch  # noqa: E402
from dshal.kernels.triton.activation import silu_and_mul, silu_and_mul_fp8_quant  # noqa: E402
from dshal.kernels.triton.gemm import fp8_block_gemm  # noqa: E402
from dshal.kernels.triton.moe import grouped_moe_experts  # noqa: E402
from dshal.kernels.triton.norm import rms_norm  # noqa: E402
from dshal.kernels.triton.quant import fp8_quantize_blocks  # noqa: E402
from dshal.kernels.triton.rotary import rotary_embedding  # noqa: E402
from dshal.kernels.triton.sparse_attention import indexer_topk, sparse_mla_attention  # noqa: E402
from dshal.kernels.triton.target import SHIPPED_TARGETS, KernelTarget, TileConfig  # noqa: E402
from dshal.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py

FP8 = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}


# ---------------------------------------------------------------- poisoned buffers
def poison_element(dtype: torch.dtype, variant: int) -> torch.Tensor:
    """One element's bytes of poison ``variant``: 0 and 1 are two different poisons (launch
    level), 2 the inputs' (wrapper level).

    Floats: NaN (0, 2), or a finite value no test input holds (1). FP8: 0x7F (NaN in e4m3fn
    and e5m2; the interpreter decodes it as a number, 480 or the FNUZ max, which still spoils
    a sum), or 0xC8 (-3 in e4m3fn). Integers (ids, the kernels' row tables, FP8 outputs'
    bytes): all bytes 0xFF (-1: a negative index reads the band before its tensor) or 0xFE;
    for inputs 0x7F bytes (an expert id far out of range; -1 is a valid id, "no expert")."""
    if dtype.is_floating_point and dtype.itemsize > 1:
        return torch.tensor([-7.25e3 if variant == 1 else math.nan], dtype=dtype).view(torch.uint8)
    byte = (0x7F, 0xC8, 0x7F)[variant] if dtype.is_floating_point else (0xFF, 0xFE, 0x7F)[variant]
    return torch.full((dtype.itemsize,), byte, dtype=torch.uint8)


@dataclasses.dataclass
class Guarded:
    """``view``: a tensor inside ``buffer`` (1-D, its whole storage); every element of the
    buffer outside the view is poison."""

    view: torch.Tensor
    buffer: torch.Tensor
    inside: torch.Tensor  # bool per buffer element: the view's own

    def bytes_outside(self) -> torch.Tensor:
        outside = (~self.inside).repeat_interleave(self.buffer.dtype.itemsize)
        return self.buffer.view(torch.uint8)[outside]

    def view_bytes(self) -> torch.Tensor:
        return _dedup_broadcast(self.view).contiguous().view(torch.uint8)


def _dedup_broadcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its 0-stride (broadcast) dims cut to one element: each stored element once."""
    for dim, stride in enumerate(t.stride()):
        if stride == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def place(t: torch.Tensor, strides: tuple[int, ...], variant: int, band: int) -> Guarded:
    """A copy of ``t`` with ``strides``, ``band`` poison elements before and after it (and
    poison in every gap its strides leave)."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, strides)) if t.numel() else 0
    total = band + span + band
    buffer = poison_element(t.dtype, variant).repeat(total).view(t.dtype)
    view = buffer.as_strided(t.shape, strides, band)
    _dedup_broadcast(view).copy_(_dedup_broadcast(t))
    inside = torch.zeros(total, dtype=torch.bool)
    inside.as_strided(t.shape, strides, band).fill_(True)
    return Guarded(view, buffer, inside)


def padded(t: torch.Tensor, variant: int = 2, col_stride: int = 1) -> Guarded:
    """``t`` as an input view with poison before, after, between its rows (3 elements past
    each row's end) and, with ``col_stride`` > 1, between its columns."""
    strides: list[int] = []
    step = col_stride
    for n in reversed(t.shape):
        strides.insert(0, step)
        step = step * n + 3
    return place(t, tuple(strides), variant, band=max(256, t.numel()))


def assert_untouched(g: Guarded, before: torch.Tensor, what: str) -> None:
    changed = (g.buffer.view(torch.uint8) != before).nonzero().flatten()
    assert changed.numel() == 0, f"{what}: {changed.numel()} bytes of its buffer changed, first at byte {changed[:4].tolist()}"


def call_guarded(wrapper, tensors: dict[str, torch.Tensor], col_strides: dict[str, int] | None = None, **kw):
    """Call ``wrapper`` on guarded views of ``tensors`` (keyword arguments); the input buffers
    (bands and data) must come back unchanged. Returns the wrapper's result."""
    col_strides = col_strides or {}
    guarded = {name: padded(t, col_stride=col_strides.get(name, 1)) for name, t in tensors.items()}
    before = {name: g.buffer.view(torch.uint8).clone() for name, g in guarded.items()}
    for name, g in guarded.items():  # the views hold the inputs' own bits
        assert torch.equal(g.view_bytes(), tensors[name].contiguous().view(torch.uint8)), name
    out = wrapper(**{name: g.view for name, g in guarded.items()}, **kw)
    for name, g in guarded.items():
        assert_untouched(g, before[name], f"input {name!r}")
    return out


@contextlib.contextmanager
def watched_accesses(guards: list[Guarded]) -> Iterator[list[str]]:
    """Within the block, every load and store the Triton interpreter performs must touch an
    element of one of ``guards``' views; the list collects the ones that did not (a read whose
    value is never used included, which no value check sees). Yields None where this Triton's
    interpreter has no ``InterpreterBuilder.create_masked_load/store`` to watch."""
    from triton.runtime import interpreter  # lazy: imported after the root conftest chose the interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    if not all(hasattr(builder, f) for f in ("create_masked_load", "create_masked_store")):
        yield None
        return
    regions = [
        (g.buffer.data_ptr(), g.buffer.numel() * g.buffer.dtype.itemsize, g.buffer.dtype.itemsize, g.inside.numpy())
        for g in guards
    ]
    strays: list[str] = []

    def kept_lanes(kind: str, ptrs, mask, size: int):
        """``mask`` less its lanes outside every argument's elements (noted in ``strays``):
        the stray access is reported, not performed (it could crash the test process)."""
        active = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        addr = ptrs.data.astype(np.uint64)
        ok = np.zeros(addr.shape, dtype=bool)
        for base, nbytes, itemsize, inside in regions:
            hit = (addr >= base) & (addr + size <= base + nbytes)
            first = (addr[hit] - base) // itemsize
            last = (addr[hit] + size - 1 - base) // itemsize
            ok[hit] = inside[first.astype(np.int64)] & inside[last.astype(np.int64)]
        stray = active & ~ok
        if stray.any():
            strays.append(f"{kind} of {int(stray.sum())} element(s) outside every argument's elements")
            return interpreter.TensorHandle(active & ok, mask.dtype)
        return mask

    real_load, real_store = builder.create_masked_load, builder.create_masked_store

    def load(ptrs, mask, other, *rest):
        mask = kept_lanes("a load", ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        return real_load(ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
        return real_store(ptrs, value, kept_lanes("a store", ptrs, mask, value.data.dtype.itemsize), *rest)

    own = {name: vars(builder)[name] for name in ("create_masked_load", "create_masked_store") if name in vars(builder)}
    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield strays
    finally:
        del builder.create_masked_load, builder.create_masked_store  # the class's methods again
        vars(builder).update(own)


def assert_launches_stay_inside(wrapper, *args, **kw) -> int:
    """Capture ``wrapper``'s launches and run them on band-guarded copies of every tensor
    argument (same strides): every load and store must touch the arguments' own elements
    (:func:`watched_accesses`), no band may change, and a second run with another poison must
    end bit-identical. Returns the number of launches."""
    with capture_launches() as launches:
        wrapper(*args, **kw)
    assert launches, "the wrapper launched no kernel"
    originals: dict[int, torch.Tensor] = {}
    for lau in launches:
        for a in (*lau.args, *lau.kwargs.values()):
            if isinstance(a, torch.Tensor):
                originals.setdefault(id(a), a)
    runs = []
    for variant in (0, 1):
        copies = {
            key: place(t, t.stride(), variant, band=max(1024, t.numel() + 64)) for key, t in originals.items()
        }
        bands = {key: g.bytes_outside() for key, g in copies.items()}

        def swap(a, copies=copies):
            return copies[id(a)].view if isinstance(a, torch.Tensor) else a

        for lau in launches:
            with watched_accesses(list(copies.values())) as strays:
                launch(lau.kernel, lau.grid, *map(swap, lau.args), **{k: swap(v) for k, v in lau.kwargs.items()})
            assert not strays, f"{getattr(lau.kernel, '__name__', lau.kernel)}: {strays[0]}"
        for key, g in copies.items():
            t = originals[key]
            assert torch.equal(g.bytes_outside(), bands[key]), (
                f"a kernel wrote outside its {t.dtype} {list(t.shape)} argument (strides {t.stride()})"
            )
        runs.append({key: g.view_bytes() for key, g in copies.items()})
    for key, t in originals.items():
        same = torch.equal(runs[0][key], runs[1][key])
        assert same, f"the {t.dtype} {list(t.shape)} argument's values depend on the poison around the arguments"
    return len(launches)


def assert_matches(out: torch.Tensor, want: torch.Tensor, **tol) -> None:
    assert out.shape == want.shape and out.dtype == want.dtype
    finite = want.isfinite()
    assert out[finite].isfinite().all(), "a non-finite output where the reference is finite (poison read?)"
    torch.testing.assert_close(out, want, **tol)


# ---------------------------------------------------------------- GEMM
def gemm_operands(m: int, n: int, k: int, fmt: str = "e4m3fn", seed: int = 0):
    torch.manual_seed(seed)
    qa, sa = ref.quantize_fp8(torch.randn(m, k), (1, 128), fmt)
    qb, sb = ref.quantize_fp8(torch.randn(n, k) * 0.1, (128, 128), fmt)
    return qa, sa, qb, sb


@pytest.mark.parametrize(
    "m, n, k", [(1, 70, 200), (3, 130, 256), (17, 33, 328), (129, 70, 200)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("fmt", FP8)
def test_block_gemm_stays_inside_ragged_operands(m, n, k, fmt):
    qa, sa, qb, sb = gemm_operands(m, n, k, fmt)
    target = KernelTarget.interpreter(FP8[fmt])
    tensors = dict(a=qa, a_scale=sa, b=qb, b_scale=sb)
    assert_launches_stay_inside(fp8_block_gemm, qa, sa, qb, sb, torch.bfloat16, target=target)
    out = call_guarded(fp8_block_gemm, tensors, col_strides={"a": 2, "b": 3}, out_dtype=torch.float32, target=target)
    want = ref.fp8_gemm(qa, sa, qb, sb, torch.float32)
    assert_matches(out, want, rtol=1e-5, atol=1e-5 * max(1, k // 128))


def shipped_gemm_tiles() -> dict[TileConfig, str]:
    """Every GEMM tile of the shipped tables (both spaces, widened and tuned tiles), with the
    first target naming it."""
    tiles: dict[TileConfig, str] = {}
    for name, t in SHIPPED_TARGETS.items():
        for tile in (*t.shipped_gemm_tiles(), *t.gemm_widened_tiles):
            tiles.setdefault(tile, name)
    return tiles


GEMM_TILES = shipped_gemm_tiles()


def tile_id(tile: TileConfig) -> str:
    return f"{GEMM_TILES[tile]}-{tile.block_m}x{tile.block_n}-g{tile.group_m}-s{tile.split_k}-w{tile.num_warps}"


@pytest.mark.parametrize("tile", list(GEMM_TILES), ids=tile_id)
def test_every_shipped_gemm_tile_stays_inside(tile):
    # 3 K blocks, the last partial: uneven split-K; N crosses a 128 scale block
    qa, sa, qb, sb = gemm_operands(19, 133, 328)
    assert_launches_stay_inside(fp8_block_gemm, qa, sa, qb, sb, torch.float32, tile=tile)
    out = call_guarded(fp8_block_gemm, dict(a=qa, a_scale=sa, b=qb, b_scale=sb), out_dtype=torch.float32, tile=tile)
    assert_matches(out, ref.fp8_gemm(qa, sa, qb, sb, torch.float32), rtol=1e-5, atol=1e-5 * 2)


# ---------------------------------------------------------------- MoE
def moe_problem(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(tokens, hidden).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter) / inter**0.5).to(dtype)
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    ids[1, 0] = -1  # a slot no expert here serves
    weights = torch.rand(tokens, top_k)
    return x, weights, ids, w13, w2


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_stays_inside_ragged_operands(top_k, dtype):
    x, weights, ids, w13, w2 = moe_problem(17, 99, 45, 5, top_k, dtype)
    tensors = dict(x=x, weights=weights, ids=ids, w13=w13, w2=w2)
    assert_launches_stay_inside(grouped_moe_experts, x, weights, ids, w13, w2)
    out = call_guarded(grouped_moe_experts, tensors, col_strides={"x": 2, "w2": 2})
    assert_matches(out, ref.moe_experts(x, weights, ids, w13, w2))


@pytest.mark.parametrize("fmt", FP8)
def test_moe_fp8_weights_stay_inside_ragged_operands(fmt):
    x, weights, ids, w13, w2 = moe_problem(9, 136, 72, 3, 2, torch.bfloat16)
    q13, s13 = ref.quantize_fp8(w13.float(), (128, 128), fmt)
    q2, s2 = ref.quantize_fp8(w2.float(), (128, 128), fmt)
    target = KernelTarget.interpreter(FP8[fmt])
    tensors = dict(x=x, weights=weights, ids=ids, w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)
    assert_launches_stay_inside(grouped_moe_experts, x, weights, ids, q13, q2, s13, s2, target=target)
    out = call_guarded(grouped_moe_experts, tensors, target=target).double()
    want = ref.moe_experts(x, weights, ids, q13, q2, s13, s2).double()
    assert out.isfinite().all()
    # as tests/test_kernels_moe.py judges FP8 weights (activation blocks quantized per kernel tile)
    torch.testing.assert_close(out, want, rtol=0, atol=0.05 * want.abs().max().item())


def shipped_moe_targets() -> dict[tuple[TileConfig, int], KernelTarget]:
    """The interpreter's target with each shipped table's MoE tiling (block_m, block_n, K step)."""
    base = KernelTarget.interpreter()
    return {
        (t.moe_tile, t.moe_block_k): dataclasses.replace(base, moe_tile=t.moe_tile, moe_block_k=t.moe_block_k)
        for t in SHIPPED_TARGETS.values()
    }


MOE_TARGETS = shipped_moe_targets()


@pytest.mark.parametrize(
    "key", list(MOE_TARGETS), ids=lambda k: f"{k[0].block_m}x{k[0].block_n}-k{k[1]}-w{k[0].num_warps}"
)
def test_every_shipped_moe_tile_stays_inside(key):
    target = MOE_TARGETS[key]
    x, weights, ids, w13, w2 = moe_problem(67, 99, 45, 3, 2)  # 134 rows: a partial third 64-row tile
    assert_launches_stay_inside(grouped_moe_experts, x, weights, ids, w13, w2, target=target)
    out = call_guarded(grouped_moe_experts, dict(x=x, weights=weights, ids=ids, w13=w13, w2=w2), target=target)
    assert_matches(out, ref.moe_experts(x, weights, ids, w13, w2))


# ---------------------------------------------------------------- quantization
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, 64)], ids=str)
@pytest.mark.parametrize("fmt", FP8)
def test_quantize_stays_inside_ragged_input(block, fmt):
    torch.manual_seed(0)
    x = (torch.randn(3, 131, 200) * 3).to(torch.bfloat16)

    def quantize(x):
        return fp8_quantize_blocks(x, block, FP8[fmt])

    assert_launches_stay_inside(fp8_quantize_blocks, x, block, FP8[fmt])
    q, scale = call_guarded(quantize, dict(x=x), col_strides={"x": 2})
    q_ref, scale_ref = ref.quantize_fp8(x, block, fmt)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


# ---------------------------------------------------------------- norm, activation, rotary
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "fused-add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_stays_inside_ragged_rows(residual, dtype):
    torch.manual_seed(0)
    x, w, res = torch.randn(17, 99).to(dtype), torch.randn(99).to(dtype), torch.randn(17, 99).to(dtype)
    tensors = dict(x=x, weight=w, residual=res) if residual else dict(x=x, weight=w)
    assert_launches_stay_inside(rms_norm, x, w, 1e-6, res if residual else None)
    out = call_guarded(rms_norm, tensors)
    want = ref.rms_norm(x, w, residual=res if residual else None)
    if residual:
        assert torch.equal(out[1], want[1])  # the sum rounded to x's dtype, exactly
        out, want = out[0], want[0]
    assert_matches(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_silu_and_mul_stays_inside_ragged_rows(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 17, 2 * 99).to(dtype)
    assert_launches_stay_inside(silu_and_mul, x)
    out = call_guarded(silu_and_mul, dict(x=x), col_strides={"x": 2})
    assert_matches(out, ref.silu_and_mul(x))


@pytest.mark.parametrize("fmt", FP8)
def test_silu_and_mul_fp8_quant_stays_inside_ragged_rows(fmt):
    torch.manual_seed(0)
    x = (torch.randn(17, 2 * 200) * 3).to(torch.bfloat16)

    def fused(x):
        return silu_and_mul_fp8_quant(x, FP8[fmt])

    assert_launches_stay_inside(silu_and_mul_fp8_quant, x, FP8[fmt])
    q, scale = call_guarded(fused, dict(x=x))
    got = ref.dequantize_fp8(q, scale, (1, 128), torch.float32)
    want = ref.dequantize_fp8(*ref.quantize_fp8(ref.silu_and_mul(x), (1, 128), fmt), (1, 128), torch.float32)
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=0.07, atol=1e-3)  # as tests/test_kernels_elementwise.py


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
def test_rotary_stays_inside_ragged_rows(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 17, 3, 38).to(torch.bfloat16)  # [B, T, H, D]: 19 pairs
    theta = torch.randn(17, 1, 19) * 3  # [T, 1, D/2], broadcast over B and H
    cos, sin = theta.cos(), theta.sin()

    def rotate(x, cos, sin):
        return rotary_embedding(x, cos, sin, interleaved)

    assert_launches_stay_inside(rotary_embedding, x, cos, sin, interleaved)
    out = call_guarded(rotate, dict(x=x, cos=cos, sin=sin), col_strides={"x": 2, "cos": 3})
    assert_matches(out, ref.rotary_embedding(x, cos, sin, interleaved))


# ---------------------------------------------------------------- sparse MLA
#: The sparse MLA tilings the shipped tables hold (warps and stages do not change the interpreter's run).
SPARSE_TILES = sorted({(t.sparse_attention_tile.block_m, t.sparse_attention_tile.block_n) for t in SHIPPED_TARGETS.values()})


@pytest.mark.parametrize("tile", SPARSE_TILES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_mla_attention_stays_inside_ragged_operands(tile, dtype):
    """19 heads (a partial head block), D = 70 (a partial column step), 37 keys a query (a
    partial key block), -1 entries: the gathered rows and the output stay inside."""
    torch.manual_seed(0)
    q, kv = torch.randn(2, 19, 3, 70).to(dtype), torch.randn(2, 23, 70).to(dtype)
    indices = torch.randint(-1, 23, (2, 3, 37))
    target = dataclasses.replace(KernelTarget.interpreter(), sparse_attention_tile=TileConfig(*tile, num_stages=1))

    def attend(q, kv, indices):
        return sparse_mla_attention(q, kv, indices, 0.2, 45, target=target)

    assert_launches_stay_inside(attend, q, kv, indices)
    out = call_guarded(attend, dict(q=q, kv=kv, indices=indices), col_strides={"q": 2})
    assert_matches(out, ref.sparse_mla_attention(q, kv, indices, 0.2, 45), **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_indexer_scores_stay_inside_ragged_operands(dtype):
    """5 heads, Di = 70 (a partial column step), 83 keys (a partial key block)."""
    torch.manual_seed(0)
    q, weights, k = torch.randn(2, 3, 5, 70).to(dtype), torch.randn(2, 3, 5), torch.randn(2, 83, 70).to(dtype)
    target = dataclasses.replace(KernelTarget.interpreter(), indexer_tile=TileConfig(32, 32, num_stages=1))

    def select(q, weights, k):
        return indexer_topk(q, weights, k, 9, target=target)

    assert_launches_stay_inside(select, q, weights, k)
    got = call_guarded(select, dict(q=q, weights=weights, k=k), col_strides={"k": 2})
    assert torch.equal(got.sort(dim=-1).values, ref.indexer_topk(q, weights, k, 9).sort(dim=-1).values)


# ---------------------------------------------------------------- the check itself
@pytest.mark.parametrize("fault", ["load", "store"])
def test_the_guard_catches_an_unmasked_load_or_store(fault):
    """A kernel whose load reaches one element past its input, or whose store one past its
    output, fails the checks."""
    import triton  # lazy: triton is imported only after the root conftest chose the interpreter
    import triton.language as tl

    @triton.jit
    def doubled(x_ptr, y_ptr, n, SHIFT: tl.constexpr, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs + SHIFT, mask=offs < n)
        tl.store(y_ptr + offs, v * 2.0, mask=offs < n + EXTRA)

    load_shift, store_extra = (1, 0) if fault == "load" else (0, 1)

    def sloppy(x):
        y = torch.empty(x.numel() + 8)[: x.numel()]  # its stray store stays in this allocation
        launch(doubled, (1,), x, y, x.numel(), SHIFT=load_shift, EXTRA=store_extra, BLOCK=32)
        return y

    x = torch.arange(1.0, 18.0)
    with pytest.raises(AssertionError, match=f"doubled: a {fault} of 1 element"):
        assert_launches_stay_inside(sloppy, x)
    if fault == "load":
        with pytest.raises(AssertionError, match="non-finite"):
            assert_matches(call_guarded(sloppy, dict(x=x)), x * 2)
