"""How generation chooses each token from the logits: greedy, or sampled with a temperature and
top-k, nucleus (top-p) and min-p cuts, shared by plain, graph-captured and speculative decoding."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from dshal.errors import ArgumentError, DshalError

#: Below this temperature :func:`sampling_probs` shifts the logits by their max before scaling:
#: the plain ``logits / temperature`` overflows float32 there for any logit of magnitude
#: past ~3e18 (and at 1e-300 the temperature itself rounds to 0 in float32).
TINY_TEMPERATURE = 1e-20


class TokenChooser:
    """How each step's token is chosen from the logits, for one generation: greedy (argmax) when
    ``temperature == 0``, else a sample of :func:`sampling_probs` (``temperature``, ``top_p``,
    ``top_k``, ``min_p``) with ``generator``.

    NaN logits have no answer: greedy, torch's argmax returns a NaN's index, a token the model
    never chose (the "!!!!" output of a broken checkpoint); sampled, torch's multinomial refuses
    the row, on CUDA with a device-side assert (``_assert_async`` in recent torch) that ends the
    process's CUDA context rather than raising. Both mark on the device whether any step met
    one, with no host sync per step (a captured decode step's rule), and :meth:`raise_if_nan`
    raises where the generation ends."""

    def __init__(
        self, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None, top_k: int = 0,
        min_p: float = 0.0,
    ):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.top_k, self.min_p = top_k, min_p
        self._nan_seen: torch.Tensor | None = None  # 0-d bool on the logits' device

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B]`` ids."""
        if self.temperature == 0:
            return self.argmax(logits)
        return self.draw(self.probs(logits))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits -> this generation's sampling weights (:func:`sampling_probs`)."""
        return sampling_probs(logits, self.temperature, self.top_p, self.top_k, self.min_p)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` -> ``[...]``: the greedy ids, remembering whether any logit was NaN."""
        self._mark(logits.isnan().any())
        return logits.argmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` weights (:meth:`probs`) -> ``[B]`` ids sampled from them with the generator.
        A row holding NaN (the model's logits were not finite) is marked, as :meth:`argmax`
        marks one, and drawn from uniform weights so that multinomial never sees it."""
        bad = probs.isnan().any(dim=-1, keepdim=True)  # [B, 1]
        self._mark(bad.any())
        probs = torch.where(bad, torch.ones_like(probs), probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def forget_nan(self) -> None:
        """Drop what earlier steps marked: a chooser kept across generations (a chat's captured
        speculative step) starts each one clean, even after one ended in an exception."""
        self._nan_seen = None

    def _mark(self, nan: torch.Tensor) -> None:
        self._nan_seen = nan if self._nan_seen is None else self._nan_seen | nan

    def raise_if_nan(self, where: str, agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """DshalError if a step since the last call met NaN logits (one host read); resets.
        ``agree``: in a split model, every rank takes the first rank's flag (as it takes its tokens,
        :func:`dshal.model.decode.agreed`), so no rank raises while another goes on to a collective."""
        seen, self._nan_seen = self._nan_seen, None
        if seen is not None and agree is not None:
            seen = agree(seen.reshape(1).to(torch.int32))
        if seen is not None and bool(seen.any()):
            raise DshalError(
                f"{where}: the model's logits hold NaN (or Inf) at a step, so there is no token to choose (greedy: "
                "argmax returns the NaN's index; sampled: no distribution to draw from) and the tokens from that step "
                "on are not the model's; the loader refuses NaN / Inf weights (unless "
                "DSHAL_CHECK_FINITE=0), so an overflow in a reduced precision or a backend's op "
                "(`dshal conformance --backend NAME` checks each op against the reference)"
            )


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> torch.Tensor:
    """``[..., V]`` logits -> the float32 distribution generation samples from (``temperature > 0``):
    ``softmax(logits / temperature)`` cut in the order transformers applies its warpers
    (temperature, top-k, top-p, min-p), each cut seeing the distribution renormalized over what
    the one before kept:

    - ``top_k`` >= 1: only the tokens whose logit is at least the k-th largest (ties at the k-th
      are kept, as transformers' ``TopKLogitsWarper``); 0 or ``>= V``: no cut. An absent
      ``top_k`` is 0 (vLLM's rule), not transformers' ``GenerationConfig`` default of 50.
    - ``top_p < 1``: the most likely tokens whose probabilities reach ``top_p`` together
      (nucleus sampling), by transformers' rule (of tokens tied at the boundary, the higher ids).
    - ``min_p > 0``: only the tokens at least ``min_p`` times as likely as the most likely.

    The most likely token is always kept. Not renormalized: ``torch.multinomial`` takes weights.
    No host sync: a captured decode step chooses its tokens with it every step."""
    logits = logits.float()
    if temperature < TINY_TEMPERATURE:  # logits / temperature could overflow (inf - inf = NaN in softmax)
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) * min(1.0 / temperature, 1e30)  # softmax is shift-free
    else:
        scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)  # before softmax: top-p sees the top-k renormalized
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        # transformers' TopPLogitsWarper (and vLLM's rule): from the least likely up, drop the
        # tokens whose mass stays within 1 - top_p; a stable ascending sort, so among tokens
        # tied at the boundary the higher ids are kept, as theirs are
        sorted_probs, order = probs.sort(dim=-1, stable=True)
        drop = sorted_probs.cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False  # the most likely, even for a top_p below float32's smallest value
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if min_p > 0.0:  # a ratio to the most likely: the same before or after renormalizing
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def check_temperature(temperature: Any, where: str = "generate") -> None:
    """ArgumentError naming ``where`` unless ``temperature`` is a finite number >= 0."""
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not _finite(temperature)
        or temperature < 0
    ):
        raise ArgumentError(f"{where}: argument 'temperature' is {temperature!r}, expected a finite number >= 0")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def check_top_p(top_p: Any, where: str = "generate") -> None:
    """ArgumentError naming ``where`` unless ``top_p`` is a number in (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ArgumentError(f"{where}: argument 'top_p' is {top_p!r}, expected a number in (0, 1]")


def check_top_k(top_k: Any, where: str = "generate") -> None:
    """ArgumentError naming ``where`` unless ``top_k`` is an int >= 0 (0: no cut)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ArgumentError(f"{where}: argument 'top_k' is {top_k!r}, expected an int >= 0 (0: no cut)")


def warn_moot_cuts(where: str, temperature: float, top_p: float, top_k: int, min_p: float) -> None:
    """A UserWarning when a generation that decodes greedily (``temperature`` 0) is given a
    top-p / top-k / min-p cut: they filter what sampling draws from, so greedy ignores them
    (``dshal run`` refuses such flags; HF's generate warns alike)."""
    if temperature != 0:
        return
    cuts = [f"{name}={value!r}" for name, value, off in (("top_p", top_p, 1.0), ("top_k", top_k, 0), ("min_p", min_p, 0.0))
            if value != off]
    if cuts:
        warnings.warn(f"{where}: {', '.join(cuts)} with temperature 0 (greedy) has no effect; pass a temperature > 0 "
                      "to sample with it", UserWarning, stacklevel=_callers_stacklevel())


def _callers_stacklevel() -> int:
    """The ``stacklevel`` that points a warning given by this function's caller at the first
    frame outside dshal and torch: the user's line. A fixed count pointed at torch's
    ``_contextlib`` when the entry point is wrapped in ``@torch.inference_mode()``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("dshal", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def check_min_p(min_p: Any, where: str = "generate") -> None:
    """ArgumentError naming ``where`` unless ``min_p`` is a number in [0, 1] (0: no cut)."""
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ArgumentError(f"{where}: argument 'min_p' is {min_p!r}, expected a number in [0, 1] (0: no cut)")


def check_cuts(where: str, temperature: float, top_p: Any, top_k: Any, min_p: Any) -> None:
    """A generation's cuts: ArgumentError naming ``where`` unless ``top_p``, ``top_k`` and
    ``min_p`` are valid (checked in that order), then :func:`warn_moot_cuts`' warning where
    greedy decoding ignores them. ``temperature`` is the caller's to check first."""
    check_top_p(top_p, where)
    check_top_k(top_k, where)
    check_min_p(min_p, where)
    warn_moot_cuts(where, temperature, top_p, top_k, min_p)


__all__ = [
    "TokenChooser",
    "check_cuts",
    "check_min_p",
    "check_temperature",
    "check_top_k",
    "check_top_p",
    "sampling_probs",
    "warn_moot_cuts",
]
