"""argparse value types shared by the ``dshal`` commands: a bad value is argparse's error
(the command's usage, the flag, what was expected; exit 2), before anything runs."""

from __future__ import annotations

import argparse

#: Seeds are what ``torch.Generator.manual_seed`` takes without wrapping: 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def seed(text: str) -> int:
    """A ``--seed`` value: an integer in [0, 2**63 - 1] (larger ones overflowed deep in torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer in [0, 2**63 - 1]") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"got {text}, expected an integer in [0, 2**63 - 1]")
    return value


__all__ = ["MAX_SEED", "seed"]
