"""What torchrun's elastic agent shows of a rank that failed.

torchrun gives each worker a file to describe its failure in (``TORCHELASTIC_ERROR_FILE``);
its summary ("Root Cause (first observed failure)") prints that file's text for each failed
rank, else only ``error_file: <N/A>`` and a link. ``torch.distributed.elastic``'s ``@record``
writes it for a Python exception; dshal writes the same layout itself (torch 2.13's
``ProcessFailure`` reads it): the line the rank says on stderr, or an unexpected exception's
traceback. Standard library only: the CLI and the termination watchdog use it, and
``import dshal`` must not pay for ``torch.distributed.elastic``.

The agent names as root cause the failure with the smallest timestamp (whole seconds), the
first of its list (the lowest rank) on a tie. A rank's own error is stamped with its time
rounded down; a failure that is only a consequence of another rank's (a rank leaving the job
because another failed, a rank the agent then stopped with SIGTERM) with its time rounded up
plus one second: after the failure it follows even where that one has no file (a rank killed
outright, SIGKILL: the agent stamps it with the second it noticed it, within its monitor
interval, 0.1 s by default). The rank that failed first is the root cause whenever it is
seen less than a second after the failures it caused.
"""

from __future__ import annotations

import json
import math
import os
import time

#: The variable in which torchrun names each worker's error file.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def error_line(command: str, err: BaseException) -> str:
    """The line ``dshal COMMAND`` says on stderr for a :class:`~dshal.DshalError`:
    ``dshal run: error: ...`` (a message raised for the command already names it)."""
    prefix = f"dshal {command}: "
    text = str(err).removeprefix(prefix)
    if text.startswith(f"dshal {command} -"):  # or it with the flags at fault: "dshal run --tp 3: ..."
        text = text.removeprefix(f"dshal {command} ")
    return f"{prefix}error: {text}"


def record_failure(message: str, details: str | None = None, *, consequence: bool = False) -> bool:
    """Describe this process's failure in the error file torchrun named for it (nothing
    outside torchrun, or where it names none). ``message``: one line; ``details``: what the
    agent's summary prints under ``traceback`` (default: ``message``). ``consequence``: the
    failure only follows another's (see the module's docstring), and a description this
    process already wrote is kept. True when the file was written."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    if consequence and os.path.exists(path):
        return False
    now = time.time()
    stamp = math.ceil(now) + 1 if consequence else math.floor(now)  # see the module's docstring
    # torch's ErrorHandler.record_exception layout: the agent prints extraInfo.py_callstack
    data = {"message": {"message": message, "extraInfo": {"py_callstack": details or message, "timestamp": str(stamp)}}}
    try:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(data, out)
    except OSError:  # the agent then says <N/A>, as before; the rank's own exit is not held up
        return False
    return True


__all__ = ["ERROR_FILE_ENV", "error_line", "record_failure"]
