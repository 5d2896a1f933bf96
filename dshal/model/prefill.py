"""The prompt's side of generation, shared by :mod:`dshal.model.generate` and
:mod:`dshal.model.decode`: the checks of a batch of prompts and the (chunked) prefill."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dshal.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from dshal.ops.spec import check_ids_in_range, without_autocast

#: Prompt tokens per sequence in one prefill forward. Activations grow with it (attention's
#: scores with it times the tokens before it), the KV cache does not; ``dshal plan`` plans
#: the activation peak of a chunk this long.
DEFAULT_PREFILL_CHUNK = 2048


def check_prefill_chunk(where: str, prefill_chunk: Any) -> None:
    if prefill_chunk is not None and (
        not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1
    ):
        raise ArgumentError(f"{where}: argument 'prefill_chunk' is {prefill_chunk!r}, expected None or an int >= 1")


def prefill(
    model: nn.Module, input_ids: torch.Tensor, cache: Any, prefill_chunk: int | None, start_pos: int = 0
) -> torch.Tensor:
    """Run the prompt ``input_ids [B, T]`` (positions from ``start_pos``, after what ``cache``
    holds) into ``cache`` in forwards of at most ``prefill_chunk`` tokens (None: one forward);
    returns the last position's logits ``[B, vocab]``. Each chunk attends to the cached tokens
    before it, so the result is the one-forward result."""
    length = input_ids.shape[1]
    chunk = length if prefill_chunk is None else prefill_chunk
    for start in range(0, length, chunk):
        logits = model(input_ids[:, start : start + chunk], start_pos + start, cache, last_only=True)
    return logits[:, -1]


def check_callbacks(where: str, generator: Any = None, **callbacks: Any) -> None:
    """ArgumentError before anything runs unless each callback is None or callable and
    ``generator`` is None or a ``torch.Generator`` (a wrong one failed after the prefill)."""
    for name, fn in callbacks.items():
        if fn is not None and not callable(fn):
            raise ArgumentError(f"{where}: argument {name!r} is a {type(fn).__name__}, expected a callable or None")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentError(f"{where}: argument 'generator' is a {type(generator).__name__}, expected a torch.Generator or None")


def check_input_ids(where: str, input_ids: Any, device: torch.device | None = None) -> None:
    """``input_ids`` must be an integer tensor ``[B, T]`` with ``B, T >= 1`` (on ``device``, when given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise DTypeError(f"{where}: argument 'input_ids' is {got}, expected an int64 (or int32) tensor [B, T]")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ShapeError(
            f"{where}: argument 'input_ids' has shape {list(input_ids.shape)}, expected [B, T] with B >= 1 and T >= 1"
        )
    if device is not None and input_ids.device != device:
        raise DeviceError(f"{where}: argument 'input_ids' is on {input_ids.device}, expected {device} (the model's)")


def check_start_pos(where: str, start_pos: Any) -> None:
    if isinstance(start_pos, torch.Tensor):  # gpt-fast's habit (input_pos); no repr: dynamo cannot trace one
        raise ArgumentError(
            f"{where}: argument 'start_pos' is a tensor, expected an int >= 0; for a position held in a device "
            "tensor (one compiled graph for every position) use dshal.model.decode.static_decode_step(model, token, "
            "position, cache) on a model.new_cache(batch, max_len, 'absorb', static=True)"
        )
    if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
        raise ArgumentError(f"{where}: argument 'start_pos' is {start_pos!r}, expected an int >= 0")


def check_token_ids(where: str, input_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id in ``input_ids`` must be in ``[0, vocab_size)`` (reads the values: a host sync
    on an accelerator)."""
    check_ids_in_range(where, "input_ids", input_ids, vocab_size, "token id", "the vocabulary")


def mask_padding(input_ids: torch.Tensor, prompt_lens: Sequence[int], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, in_prompt)``: ``input_ids [B, T]`` with each row's padding (past its
    ``prompt_lens[b]`` ids) replaced by ``fill``, and ``[B, T]`` True where a row's prompt is."""
    width = input_ids.shape[1]
    lengths = torch.tensor(list(prompt_lens), device=input_ids.device)
    in_prompt = torch.arange(width, device=input_ids.device) < lengths[:, None]
    return input_ids.masked_fill(~in_prompt, fill), in_prompt


def check_prompt_lens(where: str, prompt_lens: Any, batch: int, width: int) -> list[int]:
    """``prompt_lens`` (None: every row is ``width`` long) as a list of ``batch`` ints in ``[1, width]``."""
    if prompt_lens is None:
        return [width] * batch
    if isinstance(prompt_lens, torch.Tensor):
        prompt_lens = prompt_lens.tolist()
    if (
        not isinstance(prompt_lens, Sequence)
        or len(prompt_lens) != batch
        or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= width for n in prompt_lens)
    ):
        raise ArgumentError(
            f"{where}: argument 'prompt_lens' is {prompt_lens!r}, expected None or {batch} ints in [1, {width}] "
            "(one prompt length per row of input_ids, whose rows are right-padded to the longest)"
        )
    return list(prompt_lens)


def own_dtypes(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step(model, ...)`` (a method, or a function of the model) with ``torch.autocast`` off
    while it runs, where it is on: the model's dtypes are chosen at load (FP8 payloads, the
    float32 router, the KV cache's dtype), and its trusted decode steps call the providers
    without the op wrapper that turns autocast off (a bf16 matmul then met a float32 residual)."""

    @functools.wraps(step)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        with without_autocast(model.rope_cos.device):
            return step(model, *args, **kwargs)

    return run


def inference_only(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` under ``torch.inference_mode()``; under ``torch.no_grad()`` while
    ``torch.compile`` traces it: AOT autograd (every backend but "eager": inductor,
    "aot_eager") fails on inference mode inside a graph ("Cannot set version_counter for
    inference tensor"), and under compile no_grad saves what inference mode does."""

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return step(*args, **kwargs)
        with torch.inference_mode():
            return step(*args, **kwargs)

    return run


__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "check_input_ids",
    "check_prefill_chunk",
    "check_prompt_lens",
    "check_start_pos",
    "check_token_ids",
    "inference_only",
    "mask_padding",
    "own_dtypes",
    "prefill",
]
