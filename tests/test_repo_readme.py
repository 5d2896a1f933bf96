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


#: The user-facing docs whose `dshal COMMAND ...` lines a reader copies.
COMMAND_DOCS = ("README.md", "CONTRIBUTING.md", "conformance/README.md", "plugins/nvidia/README.md",
                "plugins/amd/README.md", "plugins/ascend/README.md")


def command_flags(command: str) -> set[str]:
    """The flags ``dshal COMMAND`` accepts, read from its own parser's usage line (and the two
    that dshal.cli adds to every command)."""
    import argparse
    import importlib

    from dshal.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser(prog=f"dshal {command}")
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", parser.format_usage())) | {"--help", "--verbose"}


def documented_command_lines(text: str) -> list[tuple[str, str]]:
    """(command, the rest of its line) for every `dshal COMMAND ...` in a code span or code block."""
    text = text.replace("\\|", "|").replace("\\\n", " ")
    chunks = re.findall(r"`([^`\n]*\bdshal [^`\n]*)`", text)
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        chunks += block.splitlines()
    return [(m.group(1), m.group(2).split("#")[0])
            for chunk in chunks for m in re.finditer(r"\bdshal (\w+)([^`]*)", chunk)]


def test_the_documented_command_lines_use_flags_their_command_has():
    from dshal.cli import SUBCOMMANDS

    flags = {command: command_flags(command) for command in SUBCOMMANDS}
    unknown = sorted({f"{doc}: dshal {command} {flag}"
                      for doc in COMMAND_DOCS
                      for command, rest in documented_command_lines((ROOT / doc).read_text())
                      if command in flags
                      for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest) if flag not in flags[command]})
    assert len(documented_command_lines((ROOT / "README.md").read_text())) > 50  # the scan found them
    assert unknown == [], "flags the command does not have (see `dshal COMMAND --help`):\n" + "\n".join(unknown)


def test_the_plan_synopsis_that_says_all_its_flags_lists_them_all():
    text = " ".join((ROOT / "README.md").read_text().split())
    synopsis = re.search(r"All its flags: `dshal plan ([^`]*)`", text)
    assert synopsis is not None, "README.md: the `dshal plan` section's 'All its flags:' synopsis is gone"
    listed = set(re.findall(r"--[a-z][\w-]*", synopsis.group(1)))
    own = command_flags("plan") - {"--help", "--verbose"}
    assert listed == own, f"dshal plan also has {sorted(own - listed)}; it has no {sorted(listed - own)}"


def test_a_bar_is_escaped_only_inside_a_table():
    r"""GitHub reads ``\|`` as a bar inside a table row only; in a code span elsewhere the backslash
    shows (`--baseline REPORT\|DIR` in a synopsis moved out of the Commands table)."""
    for doc in ("README.md", "CONTRIBUTING.md"):
        for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            assert line.startswith("|") or "\\|" not in line, f"{doc}:{number}: \\| outside a table: {line}"


def test_the_cpu_fp8_row_limits_the_readme_states_are_the_code_s():
    """The README says how many rows read FP8 bytes in C before a decode step uses the float32
    copies: the numbers are cpu_native's (it said "decode steps read the FP8 bytes in C" while
    steps of 3+ tokens ran their experts on the copies)."""
    from dshal.backends import cpu_native

    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"Linears of up to {cpu_native.FP8_GEMM_MAX_ROWS} rows read the FP8 bytes in C" in text
    assert f"routed experts for up to {cpu_native.FEW_FP8_TOKENS} tokens" in text
