"""A child process that ends with the process that started it.

Shared by the ranks ``dshal run --tp N`` starts (:mod:`dshal.parallel.launch`) and the
``dshal kernels`` compile workers: stdlib only, so importing it costs a worker nothing.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int, period_s: float = 0.5) -> None:
    """End this process when ``parent``, the process that started it, is gone (killed by a
    signal that skips its cleanup, e.g. SIGKILL): an orphan would keep working."""

    def watch() -> None:
        while True:
            time.sleep(period_s)
            if os.getppid() != parent:
                os._exit(1)

    if os.getppid() != parent:  # gone while this process was starting
        os._exit(1)
    threading.Thread(target=watch, name="dshal-parent-watch", daemon=True).start()


__all__ = ["exit_with_parent"]
