"""How the plugin's command-line tools (``dshal-ascend-convert``, ``dshal-ascend-plan``) end, as
``dshal`` itself does: errors and interruptions are one line on stderr, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status; Ctrl-C is 130 with one line, and a reader that left
    (``dshal-ascend-plan | head -1``) 141 in silence (it was a BrokenPipeError traceback)."""
    try:
        code = body()
        if sys.stdout is not None:  # a reader that left is met here, not in the interpreter's flush at exit
            sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout is pointed at devnull so that the interpreter's flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command a pipe ended


__all__ = ["run_tool"]
