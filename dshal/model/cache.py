"""The KV cache of the model core: one set of buffers per layer, written in place.

Two MLA layouts (``ModelArgs.mla_mode``):

- ``"absorb"``: one buffer per layer ``[B, S, r + rope]`` holding the normalized latent
  ``c_kv`` and the rotated shared key ``k_pe`` (DeepSeek-V3's compressed cache);
- ``"naive"``: keys ``[B, S, H, nope + rope]`` and values ``[B, S, H, v]`` per layer.

DeepSeek-V3.2 adds one more buffer per layer in either layout: its indexer's keys
``[B, S, index_head_dim]``.

Dynamic attention (``attention: {window: W, global_tokens: G}``) keeps only ``G + W``
slots: the first ``G`` positions stay pinned and the rest is a ring of the last ``W``.
:meth:`KVCache.begin` plans where one forward step's tokens go (once per step, shared by
every layer), and :meth:`LayerCache.update` writes them and returns the cached entries in
position order followed by the new ones, which is what ``attention(..., window, global_tokens)``
expects: its window counts keys from the end.

Static decode steps (for graph capture, see :mod:`dshal.model.decode`):
:meth:`KVCache.begin_at` takes the position as a device tensor, so one captured step serves
every position. :meth:`LayerCache.update` then writes at that position and returns the
*whole* buffer; the slots past the position are masked through :attr:`LayerCache.key_bias`
(0 for written slots, -1e4 for the rest), added to the attention scores
as one more key dimension against a query component of 1. A cache made for static steps
(``bias_columns``) holds spare columns after each entry for that key dimension, so a step
writes it in place (:meth:`LayerCache.biased_keys`) instead of copying the whole buffer
with the column appended, per layer and step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dshal.errors import ArgumentError, DshalError, ShapeError


def check_cache_fits(
    nbytes: int,
    free: int | None,
    device: torch.device,
    what: str,
    lower: str,
    sharing: int = 1,
    limit_note: str | Callable[[], str] = "",
) -> None:
    """Refuse a KV cache of ``nbytes`` on ``device`` when ``free`` (the bytes its backend
    reports free; None: unknown, no check) cannot hold it. ``what`` names the request and
    ``lower`` the arguments to reduce, in the caller's terms. ``sharing``: processes that
    each allocate such a cache from the same ``free`` memory (ranks on one host); each may
    take its share. ``limit_note``: what set ``free`` where it is not the device's own memory
    (a container's limit, :func:`dshal.runtime.free_memory_note`), said in the message; a
    callable is asked only on a refusal (it reads files)."""
    if free is None:
        return
    share = free // sharing
    if nbytes > share:
        shared = f" (the {sharing} ranks on it share {free / 2**30:,.2f} GiB)" if sharing > 1 else ""
        note = limit_note() if callable(limit_note) else limit_note
        held = f", held to {note}" if note else ""
        raise ArgumentError(
            f"{what} needs a KV cache of {nbytes / 2**30:,.2f} GiB, expected at most the "
            f"{share / 2**30:,.2f} GiB free on {device}{shared}{held}: lower {lower}"
        )


@dataclass(frozen=True)
class _StepPlan:
    """Where the ``T`` tokens of one forward step starting at ``start`` go."""

    start: int
    end: int
    #: None: slots are positions (no ring yet); else the ring layout below.
    ordered_slots: torch.Tensor | None = None  # slots of the cached entries, in position order
    keep: tuple[slice, ...] = ()  # which of the new tokens survive: index ranges of T, known on the host
    slots: torch.Tensor | None = None  # where the survivors go
    #: Static decode step: the position(s) as a device tensor ([1], [B] or [B, T]) and the
    #: per-slot score bias ([S], [B, S] or [B, T, S]).
    position: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None


class KVCache:
    """Per-model cache: ``n_layers`` groups of buffers ``[B, S, *entry]`` (S = capacity).

    ``entry_shapes`` gives each buffer's per-token shape (one for "absorb", two for "naive").
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        entry_shapes: Sequence[tuple[int, ...]],
        mode: str,
        dtype: torch.dtype,
        device: torch.device | str,
        window: int | None = None,
        global_tokens: int = 0,
        bias_columns: int = 0,
    ) -> None:
        self.mode = mode
        self.batch = batch
        self.max_len = max_len
        self.window = window
        self.global_tokens = global_tokens if window is not None else 0
        self.capacity = self.slots(max_len, window, global_tokens)
        if bias_columns and (mode != "absorb" or window is not None):
            raise DshalError("KVCache: bias_columns need the 'absorb' layout without an attention window (static steps)")
        #: Spare columns after each absorb latent entry, where a static step writes its key
        #: bias (:meth:`LayerCache.biased_keys`); 0: the step appends them to a copy instead.
        self.bias_columns = bias_columns
        #: A weak reference to the model whose ``new_cache`` made this cache (None when built
        #: directly): another model with the same layout would read keys it never wrote.
        self.owner: weakref.ReferenceType | None = None
        # Each layer's buffers as allocated (with the spare columns), and the entries' views of them.
        # Never inference tensors, even when made under torch.inference_mode(): a step compiled
        # with torch.compile runs under no_grad, where an inference tensor cannot be written.
        with torch.inference_mode(False):
            self._allocated = [  # the spare columns follow the first entry (the latent) only
                [torch.zeros(batch, self.capacity, shape[0] + (bias_columns if i == 0 else 0), *shape[1:], dtype=dtype,
                             device=device)
                 for i, shape in enumerate(entry_shapes)]
                for _ in range(n_layers)
            ]
            self.buffers = [
                [buf[:, :, : shape[0]] if bias_columns else buf for buf, shape in zip(layer, entry_shapes)]
                for layer in self._allocated
            ]
        self.layers = [LayerCache(self, i) for i in range(n_layers)]
        self.length = 0
        self._plan = _StepPlan(0, 0)
        # The model whose one-token step on this cache ran with the ops' input checks. Weak:
        # a cache must not keep a model (and its process groups) alive.
        self._decode_checked_by: weakref.ref | None = None
        self._decode_checked_tokens: set[int] = set()  # step lengths it checked
        self._vouched: weakref.ref | None = None
        #: What the buffers hold, per layer: compared with a model's own layout, so a cache
        #: made for another model is refused before any op sees it.
        self.layout = (n_layers, mode, tuple(tuple(s) for s in entry_shapes), dtype, torch.device(device))

    def __repr__(self) -> str:
        # What a notebook shows for a kept cache: above all how many positions it holds (length).
        n_layers, mode, _, dtype, device = self.layout
        ring = f", window {self.window} + {self.global_tokens} global" if self.window is not None else ""
        return (f"<KVCache {mode}, {n_layers} layers, batch {self.batch}: {self.length} of {self.max_len} positions "
                f"held{ring}, {str(dtype).removeprefix('torch.')} on {device}>")

    def vouch_for(self, ids: torch.Tensor) -> None:
        """Mark ``ids`` (this step's input, made by generate() from the model's own logits)
        as known to be in the vocabulary, so the step skips the id range check's host sync.
        Only that tensor object is trusted: ids from anywhere else are checked."""
        self._vouched = weakref.ref(ids)

    def vouched(self, ids: torch.Tensor) -> bool:
        """Whether ``ids`` is the tensor :meth:`vouch_for` marked last."""
        return self._vouched is not None and self._vouched() is ids

    def decode_checked_for(self, model: object, tokens: int = 1) -> bool:
        """Whether ``model`` ran a step of ``tokens`` tokens on this cache with the ops' input checks."""
        by = self._decode_checked_by
        return by is not None and by() is model and tokens in self._decode_checked_tokens

    def mark_decode_checked(self, model: object, tokens: int = 1) -> None:
        """Record that ``model`` ran a step of ``tokens`` tokens on this cache with the input checks."""
        if not (self._decode_checked_by is not None and self._decode_checked_by() is model):
            self._decode_checked_by, self._decode_checked_tokens = weakref.ref(model), set()
        self._decode_checked_tokens.add(tokens)

    def buffer_pairs(self, other: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This cache's buffers and ``other``'s (the same layout) side by side, layer by layer:
        e.g. to copy one sequence's entries between a batch cache and a one-row cache."""
        return [pair for layers in zip(self.buffers, other.buffers) for pair in zip(*layers)]

    @staticmethod
    def slots(max_len: int, window: int | None, global_tokens: int) -> int:
        """Slots per layer: every position, or the pinned tokens + the ring of the window."""
        return max_len if window is None else min(max_len, global_tokens + window)

    def can_rewind_to(self, start: int) -> bool:
        """Whether a step may start at ``start`` (``0 <= start <= length``): always, unless the
        ring of an attention window has overwritten positions before ``length`` that a restart
        at ``start`` would need (past its slots it can go on, or start again at 0)."""
        return 0 <= start <= self.length and (start in (0, self.length) or self.length <= self.capacity)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes, summed over layers (the spare bias columns included)."""
        return sum(b[0, 0].numel() * b.element_size() for layer in self._allocated for b in layer)

    def begin(self, start: int, length: int, batch: int) -> None:
        """Plan the step that writes positions ``[start, start + length)`` of ``batch``
        sequences (called once per forward)."""
        end = start + length
        if batch != self.batch:
            raise ShapeError(f"KVCache: the input has {batch} sequences, expected {self.batch} (the cache's batch)")
        if start > self.length:
            raise ShapeError(
                f"KVCache: start_pos is {start}, expected at most {self.length} (the tokens cached so far)"
            )
        if not self.can_rewind_to(start):  # the ring overwrote the slots such a restart would read
            raise ShapeError(
                f"KVCache: start_pos is {start}, expected 0 or {self.length}: the attention window's ring holds "
                f"only the last of the {self.length} positions cached, so a step cannot restart inside them"
            )
        if end > self.max_len:
            raise ShapeError(f"KVCache: positions up to {end} do not fit, expected at most max_len={self.max_len}")
        if end <= self.capacity:
            self._plan = _StepPlan(start, end)
        else:
            g, w = self.global_tokens, int(self.window or 0)  # capacity < max_len only with a window
            device = self.buffers[0][0].device
            cached = (
                torch.arange(start, device=device)
                if start <= self.capacity
                else torch.cat((torch.arange(g, device=device), torch.arange(start - w, start, device=device)))
            )
            # The new tokens that survive: the pinned ones (positions < g), then the window's last w;
            # as index ranges worked out on the host (a boolean mask would read the device each step).
            pinned, tail = min(end, g) - start, max(end - w, start, min(end, g)) - start
            keep = tuple(s for s in (slice(0, max(pinned, 0)), slice(tail, length)) if s.stop > s.start)
            pos = torch.cat([torch.arange(start + s.start, start + s.stop, device=device) for s in keep])
            self._plan = _StepPlan(start, end, self._slot(cached), keep, self._slot(pos))
        self.length = end

    @contextlib.contextmanager
    def writing(self, start: int, length: int, batch: int) -> Iterator[None]:
        """:meth:`begin` the step, which the block runs. A block that does not finish (an error,
        Ctrl-C in a notebook) may have written the step's positions in some layers only, so the
        cache then holds the positions before ``start`` (or none, when the step wrote into an
        attention window's ring, over older positions' slots): reused, it must not claim the step."""
        self.begin(start, length, batch)
        try:
            yield
        except BaseException:
            self.length = start if self._plan.ordered_slots is None else 0
            raise

    #: Score bias of a slot not yet written: exp(-1e4) is 0 in every float dtype.
    MASKED_SCORE = -1.0e4
    #: Spare columns of a cache for static steps (``bias_columns``): a step's key bias takes
    #: one per query, and keys 8 elements wider keep their head dim a multiple of 8, which
    #: fused attention kernels want (16-byte rows in 16-bit dtypes).
    STATIC_BIAS_COLUMNS = 8

    def begin_at(self, position: torch.Tensor) -> None:
        """Plan a step at ``position`` (an int64 device tensor: ``[1]`` for one token of every
        row; ``[B]``, one token per row at its own position; or ``[B, T]``, T tokens per row,
        e.g. a token and its speculative draft) without reading it on the host: no host sync,
        and a captured graph of the step replays at any position. Each token sees the slots
        up to its own position. Needs a cache without a window (every position has its own slot)."""
        if self.window is not None:
            raise DshalError("KVCache.begin_at: static decode steps need a cache without an attention window")
        if position.shape not in ((1,), (self.batch,)) and not (position.dim() == 2 and position.shape[0] == self.batch):
            raise ShapeError(
                f"KVCache.begin_at: position has shape {list(position.shape)}, expected [1], [{self.batch}] or [{self.batch}, T]"
            )
        slots = torch.arange(self.capacity, device=position.device)
        bias = torch.where(slots <= position[..., None], 0.0, self.MASKED_SCORE).float()  # [1 or B, S] or [B, T, S]
        self._plan = _StepPlan(-1, -1, position=position, key_bias=bias[0] if position.shape == (1,) else bias)

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        g, w = self.global_tokens, int(self.window or 1)
        return torch.where(pos < g, pos, g + (pos - g) % w)


class LayerCache:
    """One layer's view of a :class:`KVCache`: ``update(*new)`` writes this step's entries."""

    def __init__(self, cache: KVCache, index: int) -> None:
        # Weak: the KVCache owns its layers, and without a cycle dropping the cache frees
        # its buffers at once instead of at the next garbage collection.
        self._cache = weakref.ref(cache)
        self.index = index

    @property
    def cache(self) -> KVCache:
        cache = self._cache()
        if cache is None:
            raise DshalError(f"LayerCache {self.index}: its KVCache no longer exists (keep the KVCache, not only a layer)")
        return cache

    @property
    def mode(self) -> str:
        return self.cache.mode

    @property
    def key_bias(self) -> torch.Tensor | None:
        """In a static decode step (:meth:`KVCache.begin_at`), the score bias ``[S]`` (per row:
        ``[B, S]``; per row and token: ``[B, T, S]``) of the buffer's slots (0: visible, very
        negative: not yet written, or past the token's position); None otherwise."""
        return self.cache._plan.key_bias

    def biased_keys(self, keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | None:
        """In a static step on a cache with spare bias columns: ``keys`` (this layer's whole
        absorb buffer, as :meth:`update` returned it) followed by its spare columns, the first
        ``n`` of them holding ``columns [B, S, n]`` (the step's key bias, one column per query),
        written in place, so the cache is not copied. The other spare columns hold whatever an
        earlier step left there: the query's components for them must be 0. None when the
        cache has fewer than ``n`` spare columns."""
        n = columns.shape[-1]
        if n > self.cache.bias_columns:
            return None
        allocated = self.cache._allocated[self.index][0]
        width = keys.shape[-1]
        allocated[:, :, width : width + n] = columns
        return allocated[:, :, : width + self.cache.bias_columns]

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store ``new`` (each ``[B, T, *entry]``) at the planned positions; return, per
        buffer, the cached entries in position order followed by the new ones (in a static
        decode step: the whole buffer, to be masked with :attr:`key_bias`)."""
        plan = self.cache._plan
        out = []
        for buf, t in zip(self.cache.buffers[self.index], new):
            if plan.position is not None:  # static step: tokens at device-side positions
                if plan.position.shape == (1,):
                    buf.index_copy_(1, plan.position, t)
                elif plan.position.dim() == 1:  # one token per row, each at its own position
                    rows = torch.arange(buf.shape[0], device=buf.device)
                    buf.index_put_((rows, plan.position), t[:, 0])
                else:  # T tokens per row at positions [B, T]
                    rows = torch.arange(buf.shape[0], device=buf.device)[:, None].expand_as(plan.position)
                    buf.index_put_((rows, plan.position), t)
                out.append(buf)
            elif plan.ordered_slots is None:  # slots are positions
                buf[:, plan.start : plan.end] = t
                out.append(buf[:, : plan.end])
            else:
                past = buf.index_select(1, plan.ordered_slots)
                out.append(torch.cat((past, t), dim=1))
                kept = [t[:, s] for s in plan.keep]
                buf[:, plan.slots] = kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)
        return tuple(out)


__all__ = ["KVCache", "LayerCache", "check_cache_fits"]
