"""dshal.outputs: a file written through atomic_output is replaced whole or left as it was."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dshal import outputs
from dshal.errors import ArgumentError
from dshal.outputs import atomic_output, atomic_write, check_writable


def test_atomic_output_replaces_the_file_when_the_block_ends(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "r.json", "old\n")
    with atomic_output(target) as f:
        f.write(b"new ")
        assert target.read_text() == "old\n"  # readers still see the previous file mid-write
        f.write(b"report\n")
    assert target.read_text() == "new report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_atomic_output_interrupted_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "r.json", "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as f:
        f.write(b"half a rep")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_check_writable_names_a_file_that_stands_where_a_folder_should(tmp_path: Path) -> None:
    """``--json afile/out.json`` said "cannot write to afile (File exists); expected a writable
    folder": the path names a file as a folder."""
    (tmp_path / "afile").write_text("x")
    for path in (tmp_path / "afile" / "out.json", tmp_path / "afile" / "deeper" / "out.json"):
        with pytest.raises(ArgumentError, match=r"--json: .*afile is a file, expected a folder to hold"):
            check_writable(path, "--json")
    assert check_writable(tmp_path / "new" / "out.json", "--json") == tmp_path / "new" / "out.json"


def test_reading_the_umask_leaves_it_alone_for_other_threads():
    """The umask was read by setting it to 022 and back: for that instant a file another thread
    made got 022's mode. On Linux it is read from /proc, never set."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status: the umask can only be read by setting it")
    set_to = []
    real = os.umask

    def watching(mask: int) -> int:
        set_to.append(mask)
        return real(mask)

    was = real(0o027)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "umask", watching)
            assert outputs._umask() == 0o027
        assert set_to == []
    finally:
        real(was)


# ---------------------------------------------------------------- tables at narrow widths
BOX_DRAWING = re.compile(r"[\u2500-\u257f]")


def tokens(text: str) -> set[str]:
    """The words of a rendered table, its borders left out."""
    return set(BOX_DRAWING.sub(" ", text).split())


def rendered(table_of: Callable[[], Any], width: int) -> str:
    out = io.StringIO()
    outputs.console(file=out, width=width, color_system=None).print(table_of())
    return out.getvalue()


def bench_like() -> Any:
    """The shape of `dshal bench`'s summary: a long unbreakable case id (rich: no_wrap), six
    number columns."""
    from rich.table import Table

    table = Table(show_edge=False)
    for header in ("case", "median (p10 – p90)", "FLOP/s", "bytes/s", "% roofline", "× ref", "× torch"):
        table.add_column(header, no_wrap=header == "case")
    table.add_row("fp8_gemm/bench/block/M64xN256xK512", "960 us (859 us – 4.03 ms)", "17.5 GFLOP/s", "206 MB/s",
                  "7.92 % compute", "0.837×", "—")
    table.add_row("fp8_gemm/bench/rowwise/M64xN256xK512", "27.9 ms (27.9 ms – 27.9 ms)", "601 MFLOP/s", "7.09 MB/s",
                  "0.272 % compute", "1.14×", "1.15×")
    return table


def diff_like() -> Any:
    """The shape of `dshal diff`'s op table: ten short columns of names and numbers."""
    from rich.table import Table

    table = Table(title="op calls (the 2 with the largest local drift)", show_edge=False, title_justify="left")
    for header in ("step", "call", "layer", "op", "drift", "local drift", "", "worst at", "cpu value", "ref value"):
        table.add_column(header)
    table.add_row("prefill", "52", "lm_head", "linear#0", "3.041e-07", "2.181e-07", "", "[0, 2, 342]", "-1.039", "-1.039")
    table.add_row("decode 1", "27", "layers.1", "moe_experts#0", "4.040e-07", "2.581e-07", "OVER", "[0, 58]",
                  "-0.0856", "-0.08561")
    return table


def info_like() -> Any:
    """The shape of `dshal info`'s backends table: names, an entry point and a long reason."""
    from rich.table import Table

    table = Table(title="dshal 0.1.0 backends (api_version 1)")
    for column in ("name", "version", "entry point", "available", "reason"):
        table.add_column(column, overflow="fold")
    table.add_row("nvidia", "0.1.0", "dshal_nvidia:NvidiaBackend", "no",
                  "torch 2.13.0+cpu is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch "
                  "for NVIDIA GPUs, or set DSHAL_EMULATE=1 to run this plugin's kernels on the CPU")
    table.add_row("dequantize_fp8_with_a_long_name", "0.1.0", "dshal.backends.cpu:CpuBackend", "yes", "torch CPU kernels")
    return table


@pytest.mark.parametrize("table_of", [bench_like, diff_like, info_like])
@pytest.mark.parametrize("width", [40, 60, 80, 100])
def test_a_table_keeps_every_number_and_name_at_a_narrow_width(table_of: Callable[[], Any], width: int) -> None:
    """At 60 or 80 columns rich cut `dshal bench`'s and `dshal diff`'s numbers and op names
    to "…" (every cell of bench's table at 60), and folded entry points mid-name."""
    wide, narrow = rendered(table_of, outputs.UNBOUNDED_WIDTH), rendered(table_of, width)
    assert "…" not in narrow
    assert tokens(narrow) == tokens(wide), f"lost: {tokens(wide) - tokens(narrow)}; split: {tokens(narrow) - tokens(wide)}"
    assert max(len(line) for line in narrow.splitlines()) <= width


def test_a_table_that_fits_is_printed_as_rich_lays_it_out() -> None:
    from rich.console import Console

    plain = io.StringIO()
    Console(file=plain, width=200, color_system=None).print(bench_like())
    assert rendered(bench_like, 200) == plain.getvalue()


def test_output_that_is_not_a_terminal_is_as_wide_as_its_lines_unless_columns_says(monkeypatch) -> None:
    """Piped output was 160 columns whatever COLUMNS said (and 80 for `dshal run`'s tables)."""
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.delenv("COLUMNS", raising=False)
    assert outputs.console().width == outputs.UNBOUNDED_WIDTH
    monkeypatch.setenv("COLUMNS", "60")
    assert outputs.console().width == 60
    monkeypatch.setenv("COLUMNS", "wide")
    assert outputs.console().width == outputs.UNBOUNDED_WIDTH


@pytest.mark.parametrize("terminal", [False, True])
def test_a_size_in_unicode_digits_is_ignored_not_a_crash(monkeypatch, terminal: bool) -> None:
    """COLUMNS=² ("²".isdigit() is True) crashed inside rich's Console with a ValueError on a
    terminal (rich reads COLUMNS itself) and through dshal's own reading in a pipe: a size that is
    not ASCII digits is ignored as one that is not a number."""
    if terminal:
        leader, follower = os.openpty()  # a real terminal, so rich sizes the console itself
        stream = open(follower, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    else:
        stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        monkeypatch.setenv("COLUMNS", "\u00b2")
        monkeypatch.setenv("LINES", "\u0663")  # ARABIC-INDIC DIGIT THREE
        out = outputs.console()
        out.print("still printed")
        assert out.width > 0 and (terminal or out.width == outputs.UNBOUNDED_WIDTH)
        if terminal:
            assert b"still printed" in os.read(leader, 4096)
        else:
            assert "still printed" in stream.getvalue()
        monkeypatch.setenv("COLUMNS", "60")
        assert outputs.console().width == 60
    finally:
        if terminal:
            stream.close()
            os.close(leader)


def fallbacks_like() -> Any:
    """The shape of `dshal run --report`'s fallbacks table: a reason with a long dotted name."""
    from rich.table import Table

    table = Table(title="fallbacks and overrides", show_edge=False)
    for header in ("op", "provider", "kind", "calls", "reason"):
        table.add_column(header)
    table.add_row("attention", "reference", "fallback", "18",
                  "torch.nn.functional.scaled_dot_product_attention_with_window is missing on this release")
    return table


@pytest.mark.parametrize("width", [30, 40, 50])
def test_a_stacked_cell_keeps_every_character_in_a_soft_wrapping_console(width: int) -> None:
    """`dshal run` prints through a soft_wrap console (no wrapping, no cropping for plain lines),
    whose options a stacked cell on the lines below its header inherited: it was cropped at the
    width (at 50 columns, "torch.nn.functional.scaled_dot_product_attention" and nothing after)."""
    out = io.StringIO()
    outputs.console(file=out, width=width, color_system=None, soft_wrap=True).print(fallbacks_like())
    squeezed = "".join(out.getvalue().split())  # a word folded over lines reads whole again
    assert [w for w in tokens(rendered(fallbacks_like, outputs.UNBOUNDED_WIDTH)) if w not in squeezed] == [], out.getvalue()
