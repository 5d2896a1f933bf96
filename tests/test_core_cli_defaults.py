"""Every ``dshal COMMAND --help`` that states an option's default states the one used.

Users read the default from ``--help``; a default changed in ``add_argument`` and not in
its help (or the other way round) is caught here, for every command's every option.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dshal.cli import SUBCOMMANDS, build_parser

#: "ci: small shapes (default); full: ..." -- a choice's description marked as the default.
CHOICE_MARKED = re.compile(r"(?:^|; )([\w-]+): [^;]*\(default\)")
#: "of the run: auto (default: the checkpoint's own format), high, ..." -- a listed value marked.
VALUE_BEFORE = re.compile(r"(?:^|: |, )([\w.-]+) \(default(?::[^)]*)?\)(?:,|;|$)")
#: "(default 3)", "default: ci", "(default 1000000: GitHub ...)" -- the value just after it.
VALUE_AFTER = re.compile(r"\bdefault:?\s+([^\s;,:)]+)")


def _resolved_tiny_model() -> Any:
    from dshal.model.args import tiny_run_args  # torch: only where this test needs it

    return tiny_run_args(None, 0, None)


def _default_case_timeout() -> str:
    from dshal_conformance.runner import default_timeout

    return f"{default_timeout('ci'):g}"


def _default_context() -> str:
    from dshal.plan.plan import DEFAULT_CONTEXT

    return str(DEFAULT_CONTEXT)


def _default_tune_m() -> str:
    from dshal.kernels.triton.tune import DEFAULT_M

    return f"{min(DEFAULT_M)}..{max(DEFAULT_M)}"


#: Options whose help states a value (a number, or one of its choices) while the parser holds
#: None, because the command resolves the default later: how to get the value it resolves to,
#: or None where only a run shows it (then the reason).
RESOLVED_LATER: dict[tuple[str, str], Callable[[], str] | None] = {
    ("conformance", "--timeout"): _default_case_timeout,  # per --tier
    ("run", "--mla-mode"): lambda: _resolved_tiny_model().mla_mode,  # a checkpoint's too: runtime-only
    ("run", "--dtype"): lambda: str(_resolved_tiny_model().dtype).removeprefix("torch."),  # --checkpoint's own
    ("run", "--prompt-len"): None,  # --prompt sets it: run.main, after reading the prompts
    ("run", "--batch"): None,  # with several prompts, all of them: run.main
    ("bench", "--min-runs"): None,  # min(DEFAULT_MIN_RUNS, --runs): the help is built from the constant
    ("plan", "--context"): _default_context,  # capped at the model's max_position_embeddings
    ("tune", "--m"): _default_tune_m,  # --dry-run has its own
}


def stated_default(action: argparse.Action, parser: argparse.ArgumentParser) -> str | None:
    """The default ``action``'s help states (its ``%(default)s`` expanded), or None."""
    text = parser._get_formatter()._expand_help(action)
    for pattern in (CHOICE_MARKED, VALUE_BEFORE, VALUE_AFTER):
        if match := pattern.search(text):
            return match.group(1)
    return None


def _options() -> Iterator[tuple[str, argparse.Action, argparse.ArgumentParser]]:
    for name in SUBCOMMANDS:
        top = build_parser(name)
        commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        parser = commands.choices[name]
        for action in parser._actions:
            if action.help and action.help != argparse.SUPPRESS and action.option_strings:
                yield name, action, parser


@pytest.fixture(scope="module")
def stated() -> list[tuple[str, str, str, Any, Any]]:
    """(command, flag, stated default, parser default, choices) of every option stating one."""
    rows: list[tuple[str, str, str, Any, Any]] = []
    for name, action, parser in _options():
        said = stated_default(action, parser)
        if said is not None:
            rows.append((name, action.option_strings[-1], said, action.default, action.choices))
    return rows


def _same(said: str, default: object) -> bool:
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(said) == default
        except ValueError:
            return False
    return said == str(default)


def _is_value(said: str, choices: Any) -> bool:
    """A number or one of the option's choices, not prose ("the config's", "no limit")."""
    return bool(re.match(r"-?\d", said)) or (choices is not None and said in choices)


def test_every_stated_default_is_the_parsers_or_resolved_later(stated):
    assert len(stated) > 40  # the extraction still finds the commands' defaults
    wrong = [f"dshal {name} {flag}: help says default {said!r}, the parser holds {default!r}"
             for name, flag, said, default, _ in stated if default is not None and not _same(said, default)]
    unlisted = [f"dshal {name} {flag}: help says default {said!r}, the parser holds None"
                for name, flag, said, default, choices in stated
                if default is None and _is_value(said, choices) and (name, flag) not in RESOLVED_LATER]
    assert not wrong + unlisted


def test_defaults_resolved_later_are_the_stated_ones(stated):
    by_flag = {(name, flag): (said, default) for name, flag, said, default, _ in stated}
    for key, resolve in RESOLVED_LATER.items():
        assert key in by_flag, f"dshal {key[0]} {key[1]} states no default any more: drop it from RESOLVED_LATER"
        said, default = by_flag[key]
        assert default is None, f"dshal {key[0]} {key[1]}: the parser holds {default!r} now: drop it from RESOLVED_LATER"
        if resolve is not None:
            assert resolve() == said, f"dshal {key[0]} {key[1]}"


def test_the_option_modules_copies_are_the_commands_values():
    """``dshal kernels`` / ``tune`` / ``run`` build their parsers without torch, from copies of
    values whose own modules import it: the targets ``--target`` takes, the M rows ``tune
    --dry-run`` uses, the dtypes ``run --dtype`` takes and ``run --prefill-chunk``'s default."""
    from dshal.kernels.kernels_command import TARGET_NAMES
    from dshal.kernels.triton.crosscompile import COMPILE_TARGETS
    from dshal.kernels.triton.target import DECODE_M
    from dshal.kernels.tune_command import DRY_RUN_M
    from dshal.model.args import TINY_DTYPES
    from dshal.model.prefill import DEFAULT_PREFILL_CHUNK
    from dshal.run_command import DEFAULT_PREFILL_CHUNK as RUN_PREFILL_CHUNK, TINY_DTYPE_NAMES

    assert TARGET_NAMES == tuple(COMPILE_TARGETS)
    assert DRY_RUN_M == (1, DECODE_M, 48)
    assert TINY_DTYPE_NAMES == tuple(TINY_DTYPES)
    assert RUN_PREFILL_CHUNK == DEFAULT_PREFILL_CHUNK
