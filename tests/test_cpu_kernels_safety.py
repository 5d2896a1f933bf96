"""Memory safety of dshal's C kernels (``dshal.kernels.cpu``): what the C cannot handle
safely (indices it would follow out of bounds, tables too small for the rows it indexes,
counts its int32 outputs cannot hold) is refused by the wrappers with a ``DshalError``;
and every kernel, on edge-case shapes and layouts, runs clean under AddressSanitizer and
UndefinedBehaviorSanitizer (a build of its own, in a child process)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dshal.errors import DeviceError, ShapeError
from dshal.kernels import cpu as K
from dshal.kernels.cpu import _library
from dshal.ops.catalogue import SPECS

needs_kernels = pytest.mark.skipif(
    not K.status().available, reason=f"dshal cpu C kernels unavailable here: {K.status().detail}"
)
GEN = torch.Generator().manual_seed(11)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@needs_kernels
def test_moe_combine_refuses_order_slots_outside_the_tokens():
    y, weights = _randn(4, 8), torch.rand(2, 2, generator=GEN)
    for slot in (4, 1_000_000, -1, -3):  # each indexed weights and out out of bounds (read, then written)
        order = torch.tensor([0, 1, 2, slot])
        with pytest.raises(ShapeError, match=f"argument 'order' holds {slot} at position 3, expected slots in \\[0, 4\\)"):
            K.moe_combine(y, order, weights)
    with pytest.raises(DeviceError, match="argument 'order' is on meta, expected cpu"):
        K.moe_combine(y, torch.arange(4, device="meta"), weights)
    x = _randn(2, 8)
    xs, order, _ = K.moe_group(x, torch.tensor([[1, 0], [0, 1]]), 2)  # a permutation of all four slots: taken
    assert torch.equal(K.moe_combine(xs, order, torch.ones(2, 2)), 2 * x)


@needs_kernels
@pytest.mark.parametrize(
    "x_shape,table_shape",
    [
        ((5, 8), (0, 4)),  # an empty table: the kernel read row 0 of it
        ((2, 5, 2, 8), (2, 3, 2, 4)),  # 3 of x's 5 rows in the middle dim: 20 table rows read, 12 there
        ((5, 8), (7, 4)),
        ((1, 8), (3, 4)),  # the tables would broadcast x up, not x the tables
        ((5, 8), (2, 5, 4)),  # more dims than x
    ],
    ids=str,
)
def test_rotary_refuses_tables_that_do_not_broadcast_to_x(x_shape, table_shape):
    x, table = _randn(*x_shape), _randn(*table_shape)
    with pytest.raises(ShapeError, match=f"argument 'cos' has shape \\[{', '.join(map(str, table_shape))}\\]"):
        K.rotary(x, table, table)


@needs_kernels
def test_rotary_still_takes_every_broadcast_the_op_allows():
    ref = SPECS["rotary_embedding"].reference_impl
    x = _randn(2, 5, 3, 8)
    for table_shape in ((5, 1, 4), (2, 5, 3, 4), (1, 4), (4,), (5, 3, 4), (2, 1, 1, 4)):
        cos, sin = _randn(*table_shape), _randn(*table_shape)
        got = K.rotary(x, cos, sin)
        assert got is not None and torch.allclose(got, ref(x, cos, sin), atol=1e-6), table_shape


@needs_kernels
def test_fp8_wrappers_refuse_weights_of_the_wrong_rank():
    e4m3 = torch.float8_e4m3fn
    for weight, scale in ((torch.zeros(8, dtype=e4m3), torch.ones(1)), (torch.zeros((), dtype=e4m3), torch.ones(()))):
        with pytest.raises(ShapeError, match="argument 'weight' must be 2-D, got shape"):  # was IndexError
            K.fp8_block_gemm(_randn(1, 8), weight, scale)
    w = torch.zeros(4, 8, dtype=e4m3)
    with pytest.raises(ShapeError, match="argument 'w13' must be 3-D, got shape \\[4, 8\\]"):  # was ValueError
        K.moe_tokens_fp8(_randn(1, 8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64), w, w, torch.ones(1, 1),
                        torch.ones(1, 1))  # fmt: skip


@needs_kernels
def test_moe_group_refuses_more_slots_than_its_int32_ends_hold():
    # 2**40 slots of an expanded (storage-free) ids tensor: refused before anything is allocated
    ids = torch.zeros(1, 1, dtype=torch.int64).expand(2**20, 2**20)
    with pytest.raises(ShapeError, match=f"\\({2**40} slots\\), expected at most {2**31 - 1} slots"):
        K.moe_group(torch.empty(2**20, 0), ids, 4)


def _rows_far_apart(dtype: torch.dtype, width: int) -> torch.Tensor:
    """Two rows ``2**31 + 128`` elements apart (offsets past int32) on a lazily allocated
    storage: only the pages of the two rows are ever touched. Skips where the allocation is
    refused (no overcommit)."""
    stride = 2**31 + 128
    try:
        storage = torch.empty(stride + width, dtype=dtype)
    except RuntimeError as err:
        pytest.skip(f"no lazily allocated {(stride * torch.finfo(dtype).bits // 8) >> 30} GiB storage here: {err}")
    rows = storage.as_strided((2, width), (stride, 1))
    rows.copy_(_randn(2, width) * torch.tensor([[1.0], [7.0]]))
    return rows


@needs_kernels
def test_row_offsets_past_int32_are_read_where_they_are():
    """The kernels that read rows in place (fp8_fake_quant_rows, rotary) index with int64: a
    row stride past 2**31 elements reads the second row, not a wrapped address."""
    rows = _rows_far_apart(torch.bfloat16, 300)
    for fp8 in K.FP8_E4M3:
        assert torch.equal(K.fp8_fake_quant_rows(rows, fp8), K.fp8_fake_quant_rows(rows.contiguous(), fp8))
    rows = _rows_far_apart(torch.float32, 64)
    cos, sin = _randn(2, 32), _randn(2, 32)
    assert torch.equal(K.rotary(rows, cos, sin), K.rotary(rows.contiguous(), cos, sin))


#: Every kernel on the edge cases of its wrapper's contract (zero-size dims, block and lane
#: tails, strided and expanded views, non-finite values, the refusals above), run by a child
#: process on a sanitized build of kernels.c. Prints READY once the sanitized build loads.
_SANITIZED_CALLS = """
import sys, torch
from dshal.kernels.cpu import _library
_library.FLAG_SETS = (tuple(sys.argv[1:]),)
from dshal.errors import DshalError
from dshal.kernels import cpu as K
from dshal.ops.catalogue import SPECS
state = K.status()
if not state.available:
    print("UNAVAILABLE:", state.detail)
    sys.exit(0)
print("READY", flush=True)
g = torch.Generator().manual_seed(3)
r = lambda *s: torch.randn(*s, generator=g)

def refused(call):
    try:
        call()
    except DshalError:
        return
    raise AssertionError("not refused")

for k in (1, 33, 64):
    for lead in ((1,), (3,), (2, 2)):
        K.gemv(r(*lead, 2 * k)[..., ::2], r(5, k), r(10)[::2])
K.gemv(r(2, 4), r(0, 4))
for hidden, inter, top in ((16, 8, 2), (40, 33, 3), (0, 4, 2), (16, 0, 1), (16, 8, 0)):  # 40, 33: lanes and tails
    for tokens in (1, 4):
        ids = torch.randint(0, 3, (tokens, top), generator=g)
        # every slot served, some NO_EXPERT (-1: never written, never read), every one -1
        for skip in (0.0, 0.5, 1.0):
            ids = ids.masked_fill(torch.rand(tokens, top, generator=g) < skip, -1)
            K.moe_tokens(r(tokens, hidden), torch.rand(tokens, top), ids, r(3, 2 * inter, hidden), r(3, hidden, inter))
refused(lambda: K.moe_tokens(r(2, 4), torch.rand(2, 1), torch.tensor([[0], [3]]), r(3, 2, 4), r(3, 4, 1)))
refused(lambda: K.moe_tokens(r(2, 4), torch.rand(2, 1), torch.tensor([[-1], [-2]]), r(3, 2, 4), r(3, 4, 1)))
for shape in ((0, 8), (3, 0), (2, 3, 37)):
    K.rms_norm(r(*shape), r(shape[-1]), 1e-6)
    K.rms_norm(r(*shape), r(shape[-1]), 1e-6, r(*shape))
K.rms_norm(r(37, 4).T, r(37), 1e-6)
for tokens in (0, 1, 3):
    logits = r(tokens, 16)
    K.moe_gate(logits, r(16), 4, 4, 2, 2.5)
    K.moe_gate(logits, None, 16, 1, 1, 1.0, False)
    K.moe_gate(logits.T.contiguous().T, r(32)[::2], 3, 8, 8, 1.0)
assert K.moe_gate(torch.tensor([[float("nan"), 1.0]]), None, 1, 1, 1, 1.0) is None
for tokens, hidden, k in ((3, 8, 2), (2, 0, 2), (3, 8, 0), (0, 8, 2)):
    ids = torch.randint(0, 4, (tokens, k), generator=g)
    xs, order, ends = K.moe_group(r(tokens, 2 * hidden)[:, ::2], ids.to(torch.int32), 4)
    K.moe_combine(xs, order, torch.rand(tokens, k, dtype=torch.float64))
refused(lambda: K.moe_group(r(2, 4), torch.tensor([[0], [9]]), 4))
refused(lambda: K.moe_combine(r(4, 8), torch.tensor([0, 1, 2, 99]), torch.rand(2, 2)))
refused(lambda: K.moe_combine(r(4, 8), torch.tensor([0, 1, 2, -1]), torch.rand(2, 2)))
for interleaved in (True, False):
    q = r(2, 7, 4, 24)[..., 8:]
    K.rotary(q, r(7, 1, 8), r(7, 1, 8), interleaved)
    K.rotary(q.transpose(1, 2), r(7, 8), r(7, 8), interleaved)
    K.rotary(r(2, 3, 4, 16), r(2, 1, 4, 8), r(2, 1, 4, 8), interleaved)
    K.rotary(r(0, 8), r(1, 4), r(1, 4), interleaved)
    K.rotary(r(3, 0), r(3, 0), r(3, 0), interleaved)
    K.rotary(r(1, 8).expand(5, 8), r(5, 4), r(5, 4), interleaved)
refused(lambda: K.rotary(r(5, 8), r(0, 4), r(0, 4)))
refused(lambda: K.rotary(r(2, 5, 2, 8), r(2, 3, 2, 4), r(2, 3, 2, 4)))
quantize = SPECS["quantize_fp8"].reference_impl
for fmt in ("e4m3", "e4m3fnuz"):
    for n, k in ((130, 129), (7, 33), (1, 1), (0, 128)):
        w, scale = quantize(r(n, k), (128, 128), fmt, None)
        for lead in ((1,), (3,), (0,)):
            x = r(*lead, k)
            x.view(-1)[: min(3, x.numel())] = torch.tensor([float("nan"), float("inf"), -1e30])[: min(3, x.numel())]
            K.fp8_block_gemm(x, w, scale, r(n))
            K.fp8_block_gemm(x.to(torch.bfloat16), w, scale.T.contiguous().T)
    for hidden, inter in ((200, 72), (128, 128), (1, 1)):
        q13, s13 = zip(*(quantize(t, (128, 128), fmt, None) for t in r(3, 2 * inter, hidden)))
        q2, s2 = zip(*(quantize(t, (128, 128), fmt, None) for t in r(3, hidden, inter)))
        for dtype in (torch.float32, torch.bfloat16):
            # runs of 1, 2 and 4 slots (an expert repeated within a token too), NO_EXPERT slots
            for ids in (torch.tensor([[2, 0]]), torch.tensor([[2, 0], [0, 1], [1, 2]]), torch.tensor([[1, 1], [1, 1]]),
                        torch.tensor([[-1, 0], [0, -1], [-1, -1]]), torch.tensor([[-1, -1]])):
                K.moe_tokens_fp8(r(ids.shape[0], hidden).to(dtype), torch.rand(*ids.shape), ids,
                                 torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2))
        refused(lambda: K.moe_tokens_fp8(r(1, hidden), torch.rand(1, 2), torch.tensor([[-2, 0]]), torch.stack(q13),
                                         torch.stack(q2), torch.stack(s13), torch.stack(s2)))
    fp8 = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e4m3fnuz
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        K.fp8_fake_quant_rows(r(3, 600)[:, 100:400].to(dtype), fp8)
        K.fp8_fake_quant_rows(r(1, 300).expand(4, 300).to(dtype), fp8)
        K.fp8_fake_quant_rows(r(4, 6, 8).transpose(0, 1).to(dtype), fp8)
        K.fp8_fake_quant_rows(r(2, 0, 5).to(dtype), fp8)
        K.fp8_fake_quant_rows(torch.tensor([[float("nan"), float("-inf"), 0.0, -0.0, 1e-40]]).to(dtype), fp8)
print("CLEAN")
"""


def _shared_asan_runtime(compiler: str) -> str | None:
    """The compiler's shared AddressSanitizer runtime (gcc's libasan.so), None without one."""
    try:
        done = subprocess.run(
            [*shlex.split(compiler), "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = done.stdout.strip()
    return found if done.returncode == 0 and os.path.isabs(found) and os.path.exists(found) else None


@needs_kernels
def test_every_kernel_runs_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    compiler = _library._compiler()
    runtime = _shared_asan_runtime(compiler) if compiler else None
    if runtime is None:
        pytest.skip(f"no shared libasan from the C compiler {compiler!r} (a python process preloads it)")
    flags = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
             "-std=c11", "-fPIC", "-shared"]  # fmt: skip
    env = {
        **os.environ,
        "DSHAL_CACHE_DIR": str(tmp_path),
        "LD_PRELOAD": runtime,  # python is not instrumented: the runtime must be loaded first
        "ASAN_OPTIONS": "detect_leaks=0",  # python's own allocations at exit are not the kernels'
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    env.pop("DSHAL_CPU_KERNELS", None)
    script = tmp_path / "sanitized_calls.py"
    script.write_text(textwrap.dedent(_SANITIZED_CALLS))
    done = subprocess.run(
        [sys.executable, str(script), *flags], capture_output=True, text=True, env=env, timeout=300, cwd=Path.cwd()
    )
    if "READY" not in done.stdout:  # no kernel ran yet: the sanitized build or runtime does not work on this machine
        pytest.skip(f"no sanitized build runs here: {(done.stdout + done.stderr).strip()[-400:]}")
    report = done.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in done.stderr and "runtime error:" not in done.stderr, report
    assert done.returncode == 0 and "CLEAN" in done.stdout, report
