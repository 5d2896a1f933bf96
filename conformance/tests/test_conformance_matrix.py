"""`dshal matrix`: hardware, emulated and not-run columns stay apart (checked by parsing the HTML)."""

from __future__ import annotations

import copy
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dshal import cli
from dshal_conformance import runner


class Cells(HTMLParser):
    """Collects every matrix cell's data-* attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self._open: dict[str, str] | None = None
        self.scripts = 0
        self.external = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "td" and "data-kind" in a:
            self._open = {**a, "text": ""}
        elif tag == "th" and "data-kind" in a:
            self.headers.append(a)
        if tag == "script":
            self.scripts += 1
        if a.get("src") or (tag == "link" and a.get("href")):
            self.external.append(a)

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            self.cells.append(self._open)
            self._open = None


def _synthetic_hardware(cpu_report: dict) -> dict:
    """The cpu report relabelled as measured on an H100, with one planted failure."""
    rep = copy.deepcopy(cpu_report)
    rep["backend"] = "nvidia"
    rep["platform"] = {"device": "NVIDIA H100 80GB HBM3", "arch": "sm_90", "torch": "2.13.0+cu129", "triton": "3.6.0",
                       "driver": "580.65", "runtime": "CUDA 12.9", "emulated": False}
    victim = next(c for c in rep["cases"] if c["id"] == "attention/bf16/window16/T96")
    victim.update(status="fail", value=85.8, reason="out: max |err| 1.143 (planted)")
    rep["summary"]["passed"] -= 1
    rep["summary"]["failed"] += 1
    return rep


def _write(tmp_path: Path, name: str, rep: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rep))
    return str(path)


def test_matrix_shows_hardware_emulated_and_not_run_apart(cpu_report: dict, tmp_path: Path) -> None:
    hw = _synthetic_hardware(cpu_report)
    emu = copy.deepcopy(cpu_report)
    emu["backend"], emu["platform"] = "amd", {"device": "CPU emulating gfx942", "arch": "gfx942", "torch": "2.13.0",
                                              "triton": "3.6.0", "driver": None, "runtime": None, "emulated": True}
    # A leg without its hardware writes a 'not run' report through the real command.
    code = cli.main(["conformance", "--backend", "no-such-backend", "--report-dir", str(tmp_path), "--allow-unavailable", "--quiet"])
    assert code == 0
    assert cli.main(["conformance", "--backend", "no-such-backend", "--report-dir", str(tmp_path), "--quiet"]) == 1
    not_run = str(tmp_path / "no-such-backend.json")
    reports = [_write(tmp_path, "cpu", cpu_report), _write(tmp_path, "hw", hw), _write(tmp_path, "emu", emu), not_run]
    html_path, md_path = tmp_path / "m.html", tmp_path / "m.md"
    assert cli.main(["matrix", *reports, "--html", str(html_path), "--markdown", str(md_path)]) == 0

    parser = Cells()
    parser.feed(html_path.read_text())
    assert parser.scripts == 1 and parser.external == []  # self-contained: inline JS, nothing fetched
    kinds = {h["data-backend"]: h["data-kind"] for h in parser.headers}
    assert kinds == {"cpu": "hardware", "nvidia": "hardware", "amd": "emulated", "no-such-backend": "not-run"}

    def cell(backend: str, op: str, dtype: str) -> dict[str, str]:
        return next(c for c in parser.cells if c["data-backend"] == backend and c["data-op"] == op and c["data-dtype"] == dtype)

    real = cell("nvidia", "attention", "bfloat16")
    assert real["data-kind"] == "hardware" and real["data-status"] == "fail" and "kind-hardware" in real["class"]
    assert real["data-failed"] == "1" and "HW" in real["text"] and "worst: out.max_err_ratio 85.8" in real["text"]
    ok = cell("cpu", "attention", "bfloat16")
    assert ok["data-status"] == "pass" and ok["data-failed"] == "0" and "19/19 pass" in ok["text"]
    emulated = cell("amd", "fp8_gemm", "bfloat16")
    assert emulated["data-kind"] == "emulated" and "kind-emulated" in emulated["class"] and "EMU" in emulated["text"]
    missing = cell("no-such-backend", "rms_norm", "bfloat16")
    assert missing["data-status"] == "not-run" and missing["text"].startswith("not run: ")
    assert "not installed" in missing["text"]
    # Every row has one cell per column.
    assert len(parser.cells) % 4 == 0

    md = md_path.read_text()
    head = next(line for line in md.splitlines() if line.startswith("| op | dtype |"))
    row = next(line for line in md.splitlines() if line.startswith("| attention | bfloat16 |"))
    # columns stand in leg order (CI leg, backend, device), not in the order the files were given
    by_backend = {h.split()[0]: c.strip() for h, c in zip(head.strip("|").split("|")[2:], row.strip("|").split("|")[2:], strict=True)}
    assert list(by_backend) == ["amd", "cpu", "no-such-backend", "nvidia"]
    assert by_backend["cpu"].startswith("✅") and by_backend["cpu"].endswith("`HW`")
    assert by_backend["nvidia"].startswith("❌") and "1 fail" in by_backend["nvidia"] and by_backend["nvidia"].endswith("`HW`")
    assert by_backend["amd"].endswith("`EMU`") and by_backend["no-such-backend"].startswith("⏸ not run:")


def test_matrix_command_runs_without_importing_torch(cpu_report: dict, tmp_path: Path) -> None:
    """Merging reports needs no tensors: a CI job that only collects the legs' JSON starts at once."""
    import subprocess
    import sys

    report = _write(tmp_path, "cpu", cpu_report)
    code = (
        "import sys\n"
        "from dshal.cli import main\n"
        f"rc = main(['matrix', {report!r}, '--markdown', {str(tmp_path / 'm.md')!r}])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 False"
    assert "| rms_norm |" in (tmp_path / "m.md").read_text()


def test_a_multiline_not_run_reason_stays_in_its_cell() -> None:
    from dshal_conformance.matrix import to_markdown

    rep = runner.run(runner.resolve("notinstalled"), runner.Options(progress=False))
    rep["platform"]["not_run"] = "no device\nsecond line | with a bar"
    md = to_markdown([rep])
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert "second line \\| with a bar" in md  # GitHub shows it as a bar; it was turned into "/"
    # Every table row is whole: no line of a table starts or ends inside a cell.
    assert all(line.rstrip().endswith("|") for line in rows), rows
    assert not any(line.startswith("second line") for line in md.splitlines())


def test_the_schema_requires_what_the_matrix_reads(cpu_report: dict) -> None:
    """A case's ``kind`` files it under its family's column (model, determinism, graph, hooks)
    and DESIGN fixes ``platform.triton / driver / runtime``; the schema let reports without
    them through, and the matrix then counted every family case under its op's column."""
    import jsonschema

    from dshal_conformance import report

    report.validate(cpu_report)
    no_kind = copy.deepcopy(cpu_report)
    del no_kind["cases"][0]["kind"]
    with pytest.raises(jsonschema.ValidationError, match="'kind' is a required property"):
        report.validate(no_kind)
    for key in ("triton", "driver", "runtime"):
        missing = copy.deepcopy(cpu_report)
        del missing["platform"][key]
        with pytest.raises(jsonschema.ValidationError, match=f"'{key}' is a required property"):
            report.validate(missing)


OLD_REPORT = Path(__file__).parent / "fixtures" / "reports" / "nvidia-emulated-3c76802.json"


def test_a_report_of_an_earlier_suite_merges_with_todays(cpu_report: dict, tmp_path: Path, capsys) -> None:
    """A leg run by an earlier suite (commit 3c76802's, which recorded no platform triton /
    driver / runtime) failed the whole matrix: "does not follow dshal.conformance/1 at platform:
    'triton' is a required property". The reader fills what it did not record as unknown."""
    from dshal_conformance import report

    old = json.loads(OLD_REPORT.read_text())
    assert "triton" not in old["platform"] and "selection" not in old  # a real report of that suite
    read = report.load(OLD_REPORT)
    assert read["platform"]["triton"] is read["platform"]["driver"] is read["platform"]["runtime"] is None
    assert [c["kind"] for c in read["cases"]] == [c["kind"] for c in old["cases"]]
    out = tmp_path / "matrix.md"
    assert cli.main(["matrix", str(OLD_REPORT), _write(tmp_path, "cpu", cpu_report), "--markdown", str(out)]) == 0
    shown = out.read_text()
    assert "nvidia (emu)" in shown and "passed 17, failed 0" in shown
    assert (f"dshal matrix: warning: {OLD_REPORT}: written by an earlier suite: platform triton, driver, runtime "
            "not recorded (read as unknown)") in capsys.readouterr().err


def test_the_kind_of_a_case_an_earlier_suite_did_not_label_is_read_from_its_id() -> None:
    from dshal_conformance import report

    ids = {"comm/all_reduce/w2": "collective", "rms_norm/bad_input/nan": "bad_input", "hooks/timer": "hooks",
           "model/fp8-block/drift": "model", "determinism/rms_norm/f32": "determinism", "graph/rms_norm": "graph",
           "capability/rms_norm": "capability", "rms_norm/bf16/T4xH64": "accuracy"}
    old = {"cases": [{"id": case_id} for case_id in ids]}
    read, notes = report.as_current_revision(old)
    assert [c["kind"] for c in read["cases"]] == list(ids.values())
    assert notes == [f"written by an earlier suite: the kind of {len(ids)} case(s) read from their ids"]


def test_a_report_of_a_later_suite_is_read_without_what_it_added(cpu_report: dict, tmp_path: Path) -> None:
    """Keys a later suite adds (this schema refuses unknown keys) are left out when reading; a
    key this suite requires is still required. The writer's own check stays strict."""
    import jsonschema

    from dshal_conformance import report

    later = copy.deepcopy(cpu_report)
    later["catalogue_digest"] = "abc"
    later["platform"]["firmware"] = "1.2"
    later["cases"][0]["retries"] = 2
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        report.validate(later)
    read = report.load(_write(tmp_path, "later", later))
    assert "catalogue_digest" not in read and "firmware" not in read["platform"] and "retries" not in read["cases"][0]
    assert read["cases"][0] == cpu_report["cases"][0]
    assert read["_read_notes"] == ["keys this suite does not know (a later suite's, or a typo) left out: "
                                   "cases[].retries, catalogue_digest, platform.firmware"]
    broken = copy.deepcopy(cpu_report)
    del broken["backend"]
    with pytest.raises(report.ReportError, match="'backend' is a required property"):
        report.load(_write(tmp_path, "broken", broken))
