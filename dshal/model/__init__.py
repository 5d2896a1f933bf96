"""The DeepSeek-V3 model core on ``dshal.ops``.

    import dshal.model
    model = dshal.model.from_pretrained("path/to/DeepSeek-V3", config="dshal.yaml")
    logits = model(input_ids)                        # [B, T, vocab]
    ids = model.generate(input_ids, max_new_tokens=32)   # [B, T + 32], greedy
    model.describe()                                 # precision per layer, KV bytes per token

    drafting = dshal.model.from_pretrained("path/to/DeepSeek-V3", mtp_layers=1)  # + its MTP layer
    ids, stats = dshal.model.generate_speculative(drafting, input_ids, 32)  # MTP drafts; plain greedy's ids

``random_model(args)`` builds a randomly initialized model (``tiny_args()`` for the
built-in tiny one ``dshal run`` uses).
"""

from __future__ import annotations

from typing import Any

from dshal.model.args import ModelArgs, RopeScaling, tiny_args
from dshal.model.cache import KVCache
from dshal.model.checkpoint import random_checkpoint
from dshal.model.loader import (
    CheckpointError,
    CheckpointReader,
    DictReader,
    build_model,
    from_pretrained,
    with_runtime_attention,
)
from dshal.model.model import ParallelState, Transformer
from dshal.model.precision import apply_precision
from dshal.model.speculative import generate_speculative


def random_model(args: ModelArgs | None = None, seed: int = 0, std: float = 0.02, precision: Any = None) -> Transformer:
    """A model with random weights (the official tensor names, through the same loader),
    on the active runtime's device, with ``precision`` (default: the runtime config's) and the
    runtime config's ``attention:`` window where ``args`` sets none."""
    args = with_runtime_attention(args or tiny_args())
    return build_model(args, DictReader(random_checkpoint(args, seed, std), path=f"<random seed={seed}>"), precision)


def __dir__() -> list[str]:
    # What tab completion offers: the public names and the submodules, not this file's imports.
    submodules = {name for name, value in globals().items() if getattr(value, "__name__", None) == f"{__name__}.{name}"}
    return sorted({*__all__, *submodules})


__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "DictReader",
    "KVCache",
    "ModelArgs",
    "ParallelState",
    "RopeScaling",
    "Transformer",
    "apply_precision",
    "build_model",
    "from_pretrained",
    "generate_speculative",
    "random_model",
    "tiny_args",
]
