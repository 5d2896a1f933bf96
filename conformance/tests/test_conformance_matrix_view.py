"""`dshal matrix` artifacts as CI maintainers view them: the Markdown in GitHub's step summary
(size limits, tables a report's text cannot break), the HTML in a browser (well formed, self
contained, accessible, escaped) and both byte-identical for the same reports."""

from __future__ import annotations

import copy
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from dshal import cli
from dshal_conformance.legs import md_cell
from dshal_conformance.report import summarize

#: Text a plugin could put in a device name, a version or a reason: table and code-span
#: breakers, every line ending, HTML and Markdown links.
HOSTILE = ("max |err| 1.1 `code` </td></tr><script>alert(1)</script><img src=x onerror=alert(2)> "
           "[click](https://evil.example) ![i](https://evil.example/p.png)\r| x | y |\nnext\r\nline & &lt;b&gt;")
GITHUB_STEP_SUMMARY_BYTES = 1024 * 1024
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _write(folder: Path, name: str, rep: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _vendor(cpu_report: dict, name: str, reason: str, passing: bool = False) -> dict:
    """The cpu report as a hardware leg of a hostile vendor: every op case failing with ``reason``."""
    rep = copy.deepcopy(cpu_report)
    rep["backend"] = name
    rep["plugin_version"] = "1.0'\"><script>alert('pv')</script>"
    rep["platform"] = {**rep["platform"], "device": "Acme <b>X1</b> | `rev` '\"", "arch": "ax<1>", "emulated": False,
                       "leg": name}
    for case in rep["cases"]:
        if case["kind"] not in ("model", "determinism", "graph", "hooks"):
            case["status"], case["reason"] = ("pass", "") if passing else ("fail", reason)
    rep["summary"] = summarize(rep["cases"])
    return rep


def _broken(cpu_report: dict, reason: str) -> dict:
    rep = copy.deepcopy(cpu_report)
    rep["backend"], rep["cases"], rep["summary"] = "broken", [], summarize([])
    rep["platform"] = {**rep["platform"], "device": "not run", "not_run": reason, "broken": "the plugin failed to load",
                       "leg": "brk"}
    return rep


def _hostile_run(cpu_report: dict, tmp_path: Path, reason: str) -> tuple[list[str], str]:
    """Reports of a run with two hostile vendors and a broken leg, and a baseline where the vendors passed."""
    now = [_write(tmp_path / "now", "cpu", cpu_report), _write(tmp_path / "now", "acme", _vendor(cpu_report, "acme", reason)),
           _write(tmp_path / "now", "zeta", _vendor(cpu_report, "zeta", reason)),
           _write(tmp_path / "now", "broken", _broken(cpu_report, reason))]
    for name in ("acme", "zeta"):
        _write(tmp_path / "then", name, _vendor(cpu_report, name, "", passing=True))
    return now, str(tmp_path / "then")


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_report_text_neither_breaks_the_markdown_tables_nor_injects_markup(cpu_report: dict, tmp_path: Path) -> None:
    """A reason with ``\\r`` ended its table row on GitHub (only ``\\n`` was joined), a backtick
    paired with the cell's own `HW` code span, and ``[click](url)`` became a link."""
    now, then = _hostile_run(cpu_report, tmp_path, HOSTILE)
    md = tmp_path / "m.md"
    assert cli.main(["matrix", *now, "--baseline", then, "--markdown", str(md)]) == 0
    text = md.read_bytes().decode()
    assert "\r" not in text  # GitHub ends a line (a table row) at a lone \r too
    lines = text.split("\n")
    tables = 0
    for i, line in enumerate(lines[:-1]):
        if re.fullmatch(r"\|(---\|)+", lines[i + 1]):  # a table: every row has its header's cells
            tables += 1
            width = _unescaped_pipes(line)
            for row in lines[i + 2:]:
                if not row.strip():
                    break
                assert _unescaped_pipes(row) == width, row[:200]
    assert tables >= 3  # the matrix, the changes, the legs
    assert not re.search(r"<(script|img|/td)", text, re.I), "raw HTML from a report"
    assert "](" not in text, "a report's text made a Markdown link"
    for line in lines:  # every code span the matrix opens closes where it meant to
        assert len(re.findall(r"(?<!\\)`", line)) % 2 == 0, line[:200]
    acme = next(line for line in lines if line.startswith("| attention | bfloat16 |"))
    assert acme.count("`HW`") == 3  # cpu, acme, zeta: their kind badges intact


def test_the_markdown_fits_a_github_step_summary_however_long_the_reasons(cpu_report: dict, tmp_path: Path) -> None:
    """A broken leg's reason was repeated in every row of the op table and each failing case's
    reason shown whole: a 50 kB traceback made the summary several MB, and GitHub drops a step
    summary over 1 MiB. Cells are cut now, and the whole document to --markdown-max-bytes."""
    now, then = _hostile_run(cpu_report, tmp_path, "Traceback (most recent call last):\n" + "  frame\n" * 6000)
    md = tmp_path / "m.md"
    assert cli.main(["matrix", *now, "--baseline", then, "--markdown", str(md)]) == 0
    text = md.read_text()
    assert len(text.encode()) < GITHUB_STEP_SUMMARY_BYTES and len(text) < 65536  # even a PR comment
    assert max(len(line) for line in text.splitlines()) < 4000  # no cell holds a whole traceback
    assert "more characters in the HTML/JSON" in text  # and says where the rest is
    assert "| broken (not-run) · not run @brk |" in text  # the legs table, at the end, is still there

    # Cut smaller (a PR comment holds 65,536 characters): the document ends, whole lines, with what was left out.
    comment = tmp_path / "comment.md"
    assert cli.main(["matrix", *now, "--baseline", then, "--markdown", str(comment), "--markdown-max-bytes", "20000"]) == 0
    cut = comment.read_text()
    assert len(text.encode()) > 20000 >= len(cut.encode())
    body, _, last = cut.rstrip("\n").rpartition("\n")
    assert re.fullmatch(r"\*\*✂️ Cut at 20000 bytes: \d+ more lines \(\d+ bytes\) not shown here; see the HTML matrix "
                        r"and the JSON reports \(the workflow's artifacts\) for all of it\.\*\*", last), last
    assert body.endswith("\n")  # a blank line before the note: a table above it ends there
    assert text.startswith(body.rstrip("\n"))  # whole lines of the full document, nothing rewritten


def test_a_markdown_size_too_small_for_the_cut_note_is_refused(cpu_report: dict, tmp_path: Path, capsys) -> None:
    report = _write(tmp_path, "cpu", cpu_report)
    assert cli.main(["matrix", report, "--markdown", str(tmp_path / "m.md"), "--markdown-max-bytes", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dshal matrix: error: --markdown-max-bytes: got 10, expected at least 1000"), err
    assert not (tmp_path / "m.md").exists()


class Page(HTMLParser):
    """Checks tag balance and collects what a reviewer of the page's safety and accessibility asks about."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.mismatched: list[tuple[str, list[str]]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.in_body = False
        self.title = ""
        self._in_title = False
        self.cell_texts: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.append((tag, {**a, "_in_body": "1" if self.in_body else None}))
        self.in_body = self.in_body or tag == "body"
        self._in_title = tag == "title"
        if tag == "td" and "data-status" in a:
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False
        if tag == "td" and self._cell is not None:
            self.cell_texts.append("".join(self._cell))
            self._cell = None
        if not self.stack or self.stack[-1] != tag:
            self.mismatched.append((tag, self.stack[-3:]))
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cell is not None:
            self._cell.append(data)


def test_the_html_is_well_formed_self_contained_accessible_and_escaped(cpu_report: dict, tmp_path: Path) -> None:
    """The page had ``<th>`` without ``scope`` (a screen reader could not tie a cell to its leg),
    a ``<style>`` in the body, filter controls that did nothing without JavaScript and a
    status told by the cell's colour (and a count) only."""
    now, then = _hostile_run(cpu_report, tmp_path, HOSTILE)
    page = tmp_path / "m.html"
    assert cli.main(["matrix", *now, "--baseline", then, "--html", str(page)]) == 0
    text = page.read_text()
    parsed = Page()
    parsed.feed(text)
    parsed.close()
    assert parsed.stack == [] and parsed.mismatched == []
    assert parsed.title == "dshal hardware matrix"
    tags = [tag for tag, _ in parsed.tags]
    assert tags.count("script") == 1 and "img" not in tags  # only the page's own script; no report markup
    assert not [a for _, a in parsed.tags if any(k.startswith("on") for k in a)]  # no event handler attributes
    assert not [a for tag, a in parsed.tags if a.get("src") or (tag == "link" and a.get("href"))]  # nothing fetched
    assert "url(" not in text and "@import" not in text
    assert all(a.get("scope") in ("col", "row") for tag, a in parsed.tags if tag == "th")
    assert not [tag for tag, a in parsed.tags if tag in ("style", "link", "meta", "title") and a["_in_body"]]
    controls = next(a for tag, a in parsed.tags if a.get("id") == "controls")
    assert "hidden" in controls  # shown by the script: without JavaScript there are no dead controls
    # Each op cell says its status in a symbol too, not by colour alone.
    assert parsed.cell_texts and all(t[:1] in "✅❌➖⏭⏸" or t.startswith("not run") or not t for t in parsed.cell_texts)
    assert any(t.startswith("❌ 0/") for t in parsed.cell_texts)
    assert "1.0&#x27;&quot;&gt;&lt;script&gt;" in text  # the plugin version, as text


def _matrix(paths: list[str], out: Path) -> tuple[bytes, bytes]:
    html, md = out / "m.html", out / "m.md"
    out.mkdir(parents=True, exist_ok=True)
    assert cli.main(["matrix", *paths, "--html", str(html), "--markdown", str(md)]) == 0
    return html.read_bytes(), md.read_bytes()


def test_the_same_reports_give_the_same_bytes_in_whatever_order_they_are_given(cpu_report: dict, tmp_path: Path) -> None:
    """Columns followed the order of the command line (a shell glob's, ``find | sort``'s: the
    locale's), so a CI artifact's diff showed columns moving; they stand in leg order now."""
    emulated = copy.deepcopy(cpu_report)
    emulated["backend"] = "amd"
    emulated["platform"] = {**cpu_report["platform"], "device": "CPU emulating gfx942", "emulated": True}
    hardware = _vendor(cpu_report, "acme", "out: max |err| 3.2")
    paths = [_write(tmp_path, "cpu", cpu_report), _write(tmp_path, "amd", emulated), _write(tmp_path, "acme", hardware),
             _write(tmp_path, "broken", _broken(cpu_report, "no module named acme_runtime"))]
    first = _matrix(paths, tmp_path / "a")
    assert _matrix(paths, tmp_path / "b") == first
    assert _matrix(paths[::-1], tmp_path / "c") == first
    head = next(line for line in first[1].decode().splitlines() if line.startswith("| op | dtype |"))
    assert [h.split()[0] for h in re.split(r"(?<!\\)\|", head.strip("|"))[2:]] == ["amd", "cpu", "acme", "broken"]


def test_a_cut_never_leaves_a_table_header_without_its_rows() -> None:
    """The cut kept whole lines, and could keep a table's header and drop the ``|---|`` line
    under it: GitHub then showed the header as a stray paragraph of bars above the note."""
    from dshal_conformance.matrix import cap_markdown

    rows = [f"| r{i} | {'x' * 60} |" for i in range(40)]
    lines = ["# matrix", "", "| op | cpu |", "|---|---|", *rows, "", "## Legs", "", "| leg | notes |", "|---|---|",
             *(f"| leg{i} | {'n' * 90} |" for i in range(8))]
    text = "\n".join(lines) + "\n"
    headers = {"| op | cpu |", "| leg | notes |"}
    header_dropped = 0
    for max_bytes in range(1000, len(text.encode()), 7):
        kept = cap_markdown(text, max_bytes).split("\n\n**✂️ Cut at")[0].rstrip("\n").split("\n")
        assert len("\n".join(kept).encode()) <= max_bytes
        assert text.startswith("\n".join(kept))
        assert kept[-1] not in headers, (max_bytes, kept[-3:])
        header_dropped += kept[-1] == "## Legs"  # (the blank line after it stripped above)
    assert header_dropped  # some sizes cut where the legs table's header would have stood last


@pytest.mark.parametrize("text", [
    "2*3*4 ulp and *not bold*", "_not em_ x_y __nor bold__", "a & b &amp; &nbsp; <b>x</b>",
    "max |err| `code` [l](u) ![i](p)", "back\\slash \\_ \\* \\|", HOSTILE,
    "drift ~~1e-6~~ or a few 1e-2, ~50% move",
])
def test_a_markdown_cell_renders_to_the_reports_text_exactly(text: str) -> None:
    """``2*3*4`` became 2<em>3</em>4 on GitHub and ``&nbsp;`` a space: a cell (and a list item)
    renders, by a CommonMark parser with GitHub's tables and strikethrough (rich's markdown-it), to
    the report's text itself (``~~1e-6~~`` was struck through)."""
    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    flat = " ".join(text.splitlines())
    cell = md_cell(text, limit=10_000)
    for rendered, pattern in ((parser.render(f"| h |\n|---|\n| {cell} |\n"), r"<td>(.*)</td>"),
                              (parser.render(f"- {cell}\n"), r"<li>(.*)</li>")):
        body = re.search(pattern, rendered, re.S)
        assert body, rendered
        assert not re.search(r"<(?!/?(td|li)\b)", body.group(1)), body.group(1)  # no tag of the report's making
        assert html.unescape(body.group(1)).strip() == flat.strip()
