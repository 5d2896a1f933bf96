"""Block-FP8 GEMM tile choice: power-of-two M buckets, tuned tables shipped as data,
no timing inside a graph capture, decode tiles with split-K, and ``dshal tune --dry-run``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")  # mode: root conftest

from dshal.errors import ArgumentError  # noqa: E402
from dshal.kernels.triton import gemm  # noqa: E402
from dshal.kernels.triton.target import (  # noqa: E402
    DECODE_M,
    TUNING_SCHEMA,
    KernelTarget,
    TileConfig,
    m_bucket,
    read_tuning,
    shipped_target,
    tuned_tables,
)
from dshal.ops import reference as ref  # noqa: E402

pytestmark = pytest.mark.needs_interpreter  # Triton kernels on CPU tensors: see the root conftest.py


@pytest.fixture
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path))
    tuned_tables.cache_clear()
    yield tmp_path / "gemm-tuning"
    tuned_tables.cache_clear()


def operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn)
    sa = torch.rand(m, -(-k // 128), generator=g) + 0.5
    sb = torch.rand(-(-n // 128), -(-k // 128), generator=g) + 0.5
    return a, sa, b, sb


def test_m_buckets_are_powers_of_two():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 8, 9, 16, 17, 4097)] == [1, 2, 4, 8, 8, 16, 16, 32, 8192]


def test_hopper_decode_space_has_small_tiles_and_split_k():
    hopper = shipped_target("nvidia-sm90")
    decode = hopper.gemm_space(1)
    assert decode == hopper.gemm_space(DECODE_M) and decode != hopper.gemm_space(DECODE_M + 1)
    assert all(t.block_m == 16 for t in decode) and any(t.split_k > 1 for t in decode)
    # one token over N = 2112: the first decode tile launches enough programs for 132 SMs
    first = decode[0]
    assert -(-2112 // first.block_n) * first.split_k >= 132


@pytest.mark.parametrize("m, n, k", [(1, 200, 1000), (5, 256, 1024), (16, 128, 640)])
def test_split_k_tiles_match_the_reference_and_are_deterministic(m, n, k):
    a, sa, b, sb = operands(m, n, k)
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    interp = KernelTarget.interpreter()
    for tile in shipped_target("nvidia-sm90").gemm_decode_tiles:
        got = gemm.fp8_block_gemm(a, sa, b, sb, torch.float32, target=interp, tile=tile)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        again = gemm.fp8_block_gemm(a, sa, b, sb, torch.float32, target=interp, tile=tile)
        assert torch.equal(got, again)
    bf16 = gemm.fp8_block_gemm(a, sa, b, sb, torch.bfloat16, target=interp, tile=TileConfig(16, 32, split_k=4))
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), want, rtol=1.6e-2, atol=1e-2)


def test_a_tuned_table_chooses_by_m_bucket(tuning_dir):
    tiles = (TileConfig(64, 64), TileConfig(32, 64), TileConfig(16, 32, split_k=2))
    target = KernelTarget(name="test-target", gemm_tiles=tiles)
    tuning_dir.mkdir(parents=True)
    entry = {"N": 256, "K": 512, "M": 8, "tile": {"block_m": 16, "block_n": 32, "split_k": 2}, "us": 3.0}
    table = {"schema": TUNING_SCHEMA, "target": "test-target", "dry_run": False, "entries": [entry]}
    (tuning_dir / "test-target.json").write_text(json.dumps(table))
    for m in (5, 6, 8):  # one bucket: one entry serves them all
        assert gemm.select_tile(target, m, 256, 512) == tiles[2]
    assert gemm.select_tile(target, 9, 256, 512) == tiles[0]  # bucket 16: not in the table
    assert gemm.select_tile(target, 8, 256, 1024) == tiles[0]  # other K


def test_widened_operands_take_the_widened_space_and_no_tuned_tile(tuning_dir):
    """FP8 a dot cannot take (OCP E4M3 on gfx942) is widened to f16 in the kernel, where the
    big tiles spill (128x256: 113 VGPRs): prefill takes the widened space, never the tuned
    table (timed on the dot path); decode keeps its space (its tiles do not spill widened)."""
    tiles = (TileConfig(128, 256), TileConfig(32, 64))
    target = KernelTarget(name="widened-target", gemm_tiles=tiles, gemm_widened_tiles=tiles[1:],
                          gemm_decode_tiles=(TileConfig(16, 64, split_k=4),))
    tuning_dir.mkdir(parents=True)
    entry = {"N": 256, "K": 512, "M": 512, "tile": {"block_m": 128, "block_n": 256}, "us": 3.0}
    table = {"schema": TUNING_SCHEMA, "target": "widened-target", "dry_run": False, "entries": [entry]}
    (tuning_dir / "widened-target.json").write_text(json.dumps(table))
    assert gemm.select_tile(target, 500, 256, 512) == tiles[0]  # the dot path: the tuned tile
    assert gemm.select_tile(target, 500, 256, 512, widened=True) == tiles[1]
    assert gemm.select_tile(target, 1, 256, 512, widened=True) == target.gemm_decode_tiles[0]
    gfx942 = shipped_target("amd-gfx942")
    assert gfx942.gemm_space(4096, widened=True) == gfx942.gemm_widened_tiles != gfx942.gemm_tiles
    assert shipped_target("nvidia-sm90").gemm_space(4096, widened=True) == shipped_target("nvidia-sm90").gemm_tiles


def test_no_timing_inside_a_graph_capture(monkeypatch, tuning_dir):
    target = KernelTarget(name="capture-target", gemm_tiles=(TileConfig(64, 64), TileConfig(32, 64)))

    def run(tile):
        raise AssertionError("tiles were timed during a graph capture")

    monkeypatch.setattr(gemm, "_capturing_graph", lambda: True)
    assert gemm.select_tile(target, 100, 256, 512, (), run) == target.gemm_tiles[0]
    # A tile the eager step before the capture timed for this shape is the one captured: the
    # capture took the space's first whatever was timed (a split-K tile vs another: other bits
    # in the replayed graph than in the eager step).
    monkeypatch.setitem(gemm._TUNED, (target.name, gemm.m_bucket(100), 256, 512), target.gemm_tiles[1])
    assert gemm.select_tile(target, 100, 256, 512, (), run) == target.gemm_tiles[1]
    assert gemm.select_tile(target, 100, 256, 1024, (), run) == target.gemm_tiles[0]  # another K: none timed


def test_tile_argument_is_checked():
    a, sa, b, sb = operands(2, 128, 256)
    with pytest.raises(ArgumentError, match="'tile'"):
        gemm.fp8_block_gemm(a, sa, b, sb, tile=(16, 32))
    with pytest.raises(ValueError, match="split_k"):
        TileConfig(16, 32, split_k=3)


def test_tune_dry_run_writes_a_table_that_cannot_choose_tiles(tmp_path):
    from dshal.cli import main

    out = tmp_path / "sm90.json"
    assert main(["tune", "--dry-run", "--target", "sm_90a", "--shapes", "256,512", "--m", "1,40", "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["dry_run"] is True and table["target"] == "nvidia-sm90" and table["device"] is None
    assert table["complete"] is True
    hopper = shipped_target("nvidia-sm90")
    assert [(e["N"], e["K"], e["M"]) for e in table["entries"]] == [(256, 512, 1), (256, 512, 64)]
    for e in table["entries"]:
        assert e["us"] is None and TileConfig(**e["tile"]) in hopper.gemm_space(e["M"])
        assert len(e["candidates"]) == len(hopper.gemm_space(e["M"]))  # every tile ran and was right
    with pytest.raises(ValueError, match="dry-run"):
        read_tuning(out)


def test_tune_refuses_a_folder_as_output_and_a_backend_with_dry_run(tmp_path, capsys):
    """Both were taken: `--output DIR` failed after every tile had run; `--backend nope
    --dry-run` exited 0 without a word about the backend it ignored."""
    from dshal.cli import main

    assert main(["tune", "--dry-run", "--target", "sm_90a", "--output", str(tmp_path)]) == 1
    assert f"--output: {tmp_path} is a directory, expected a file path" in capsys.readouterr().err
    assert main(["tune", "--dry-run", "--target", "sm_90a", "--backend", "nope"]) == 1
    assert "--backend nope with --dry-run: a dry run uses no backend" in capsys.readouterr().err


def test_tune_budget_stops_between_entries_and_says_so(tmp_path, capsys):
    """A tuning run cut by ``--budget-s`` keeps what it measured, marked incomplete; the
    GPU check gives it only the time its other stages leave."""
    from dshal.cli import main

    out = tmp_path / "sm90.json"
    args = ["tune", "--dry-run", "--target", "sm_90a", "--shapes", "256,512;128,256", "--m", "1", "--output", str(out)]
    assert main([*args, "--budget-s", "0"]) == 0
    table = json.loads(out.read_text())
    assert table["entries"] == [] and table["complete"] is False
    assert "incomplete: 0 of 2 entries" in capsys.readouterr().out
    assert main([*args, "--budget-s", "-1"]) != 0
    assert "'--budget-s' is -1.0, expected seconds >= 0" in capsys.readouterr().err


def test_a_cut_re_tune_keeps_the_entries_it_did_not_redo(tmp_path, capsys):
    """A re-tune cut by its budget (or Ctrl-C: the same writes) replaced a complete table with
    its partial one: every entry not yet re-measured was lost."""
    from dshal.cli import main

    out = tmp_path / "sm90.json"
    args = ["tune", "--dry-run", "--target", "sm_90a", "--shapes", "256,512;128,256", "--m", "1", "--output", str(out)]
    assert main(args) == 0
    before = json.loads(out.read_text())["entries"]
    assert len(before) == 2
    assert main([*args, "--budget-s", "0"]) == 0  # nothing re-tuned
    after = json.loads(out.read_text())
    assert after["complete"] is False and after["entries"] == before
    assert "incomplete: 0 of 2 entries" in capsys.readouterr().out
    # entries timed on another device (or Triton, torch) are not this run's: not kept under its header
    out.write_text(json.dumps({**after, "device": "NVIDIA H100 80GB HBM3"}))
    assert main([*args, "--budget-s", "0"]) == 0
    assert json.loads(out.read_text())["entries"] == []


def test_shipped_tables_load():
    for name in ("nvidia-sm90", "amd-gfx942", "amd-gfx950"):
        tuned_tables(name)  # valid schema, not a dry run


def test_a_damaged_tuned_table_in_the_cache_names_itself(tuning_dir):
    """A user's `dshal tune` table in the cache that is damaged (not JSON, nested past the
    decoder's limit, entries missing) ended kernel use in a raw ValueError / RecursionError."""
    from dshal.errors import ConfigError

    tuning_dir.mkdir(parents=True)
    table = tuning_dir / "nvidia-sm90.json"
    entry = {"N": 256, "K": 512, "M": 8, "tile": {"block_m": 16, "block_n": 32}}
    other_target = {"schema": TUNING_SCHEMA, "target": "amd-gfx942", "entries": [entry]}
    negative = {"schema": TUNING_SCHEMA, "target": "nvidia-sm90", "entries": [{**entry, "N": -5}]}
    # a JSON list (an AttributeError escaped as a traceback), another target's table and a
    # negative size were taken as the sm90 table
    for text in ("{not json", "[" * 100_000 + "]" * 100_000, '{"schema": "dshal.gemm-tuning/1"}', "[]",
                 json.dumps(other_target), json.dumps(negative)):
        table.write_text(text)
        tuned_tables.cache_clear()
        with pytest.raises(ConfigError, match=r"nvidia-sm90.json: not a usable tuned table .*run dshal tune again"):
            tuned_tables("nvidia-sm90")


@pytest.mark.parametrize("command", [["tune", "--dry-run", "--target", "sm_90a"], ["kernels", "--target", "sm_90a"]])
def test_commands_that_compile_kernels_say_when_triton_is_not_installed(command):
    """An install without the ``triton`` extra: ``dshal kernels`` said so in one line, while
    ``dshal tune --dry-run`` printed its header and then a PackageNotFoundError traceback.
    The child process hides the package (``sys.modules['triton'] = None``), as a venv without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            f"from dshal.cli import main\nsys.exit(main({command!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"dshal {command[0]}: error: needs the triton package (pip install 'dshal[triton]')" in proc.stderr


@pytest.mark.parametrize(
    ("parse", "text", "fragment"),
    [("_parse_shapes", "256;0,512", "'--shapes' is '256;0,512'"), ("_parse_m", "1,x", "'--m' is '1,x'")],
)
def test_tune_flag_values_out_of_range_are_argument_errors(parse, text, fragment):
    """A CLI flag out of range is an ArgumentError (README: errors), not a config file's ConfigError."""
    from dshal.kernels.triton import tune

    with pytest.raises(ArgumentError, match=fragment):
        getattr(tune, parse)(text)


def test_tune_checks_its_default_output_folder_before_anything_runs(tmp_path, monkeypatch, capsys):
    """Without --output the table goes to dshal's cache, which was not checked: a run timed
    every tile for minutes and then failed to save. It is checked first, as --output is
    (before the GPU is looked for: this machine has none)."""
    from dshal.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(blocker / "cache"))
    assert main(["tune"]) == 1
    err = capsys.readouterr().err
    assert (f"dshal tune: error: the default output folder (no --output; in dshal's cache, which DSHAL_CACHE_DIR sets): {blocker} is a file, "
            f"expected a folder to hold {blocker / 'cache' / 'gemm-tuning'}") in err  # fmt: skip
