"""The README's two command lines are what CI runs, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block is not None, "README.md must start with a code block holding the two command lines"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_command_lines():
    text = (ROOT / "README.md").read_text()
    first_block = text.index("```")
    assert text[:first_block].strip() == "# dshal", "only the title may precede the two command lines"
    lines = readme_command_lines()
    assert len(lines) == 2, lines
    install, tests = lines
    assert "dshal run" in install and "-c constraints.txt" in install
    assert "pytest" in tests


def test_ci_runs_the_readme_lines_verbatim():
    """Each line as it stands; a line with ``&&`` ends in ``|| exit 1``, because ``set -e``
    does not stop a script on a failure left of ``&&`` (a failed install went on to test)."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in readme_command_lines():
        want = f"{line} || exit 1" if "&&" in line else line
        assert want in ci, f".ci/run must run the README line {line!r} as {want!r}"


def test_constraints_pin_the_cpu_torch():
    pins = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in pins
