"""``dshal run --interactive``: a conversation with the model on the terminal, as DeepSeek-V3's
``generate.py --interactive`` holds one.

Each turn sends the whole conversation through the tokenizer's chat template and generates
the answer, printed as it comes (with the MTP layer's drafts under ``--speculative mtp``).
The KV cache is kept across turns: a turn prefills only what its tokens add to the ones the
cache holds (the earlier turns, where the template renders them the same way). With the
backend's graph hook the decode steps run as one captured device graph, kept with the cache. ``/clear`` forgets the conversation, ``/exit`` (or the end
of the input) ends it. A turn that cannot be served (the conversation grew past the model's
positions or the memory) is said and dropped, and the conversation goes on.

In a parallel job every rank holds the conversation: rank 0 reads the terminal and shares
each line (:func:`dshal.parallel.run.shared_input`), every rank generates, rank 0 prints.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import torch

from dshal.errors import ArgumentError, DshalError
from dshal.model.decode import StaticDecoder, static_decode_unsupported
from dshal.model.generate import completions
from dshal.model.speculative import DraftVerifier, SpeculativeStep, generate_speculative
from dshal.model.text import TextStream, encode_chat

#: The commands a turn can be instead of a message.
COMMANDS = {"/clear": "forget the conversation", "/exit": "end it (so does the end of the input, Ctrl-D)"}
#: What a line of input that is not valid UTF-8 is read as (Python's surrogateescape keeps the
#: bytes as lone surrogates): such a line is not sent.
INVALID_TEXT = "\udcff"


def _not_text(text: str) -> bool:
    """Whether ``text`` holds lone surrogates: bytes that were not valid UTF-8 (stdin reads
    them with surrogateescape; the tokenizer and ``str.encode`` refuse them)."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


@dataclass
class ChatSettings:
    """How each answer is generated (``dshal run``'s flags)."""

    max_new_tokens: int
    stop_ids: list[int] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    prefill_chunk: int | None = None
    seed: int = 0
    #: What a turn's generation runs inside, e.g. turning a refused allocation into a DshalError.
    guard: Callable[[], Any] | None = None
    #: In a parallel job: given whether this rank's turn failed, whether any rank's did (every
    #: rank then drops the turn). None: this process alone.
    any_failed: Callable[[bool], bool] | None = None
    #: A rank that does not print (its ``out`` discards): says its own failures on stderr under this name.
    silent_rank: str | None = None
    #: Decode with the model's MTP drafts (:func:`dshal.model.speculative.generate_speculative`).
    speculative: bool = False
    #: The backend's ``graph()`` hook: the decode steps run as one captured device graph, kept
    #: across turns with the cache (:class:`~dshal.model.decode.StaticDecoder`); with
    #: ``speculative``, each step's two forwards, also kept with the caches. None: eager.
    graph: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
    #: The top-k and min-p cuts beside ``top_p`` (:func:`dshal.model.sampling.sampling_probs`;
    #: 0: none), last so that the fields before keep their positions.
    top_k: int = 0
    min_p: float = 0.0


@dataclass
class Conversation:
    """The turns so far, as the chat template takes them, and the KV cache they left."""

    messages: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0  # answers generated
    cache: Any = None  # the model's KV cache, kept across turns
    decoder: Any = None  # with graphs: the decode step on that cache, captured once
    speculative_step: Any = None  # with graphs and MTP drafts: the step on both caches, captured once
    mtp_cache: Any = None  # with speculative decoding: the MTP layer's
    cached_ids: list[int] = field(default_factory=list)  # the tokens it holds
    prefilled: list[int] = field(default_factory=list)  # tokens each answered turn prefilled (the rest was cached)
    drafts: list[tuple[int, int]] = field(default_factory=list)  # speculative: (accepted, drafted) per turn

    def forget(self) -> None:
        """Start again: no messages, nothing cached (the cache's memory is kept)."""
        self.messages.clear()
        self.cached_ids = []

    def reusable(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` the cache holds (at most all but one: the last
        prompt token is prefilled, for the answer's first logits)."""
        same = 0
        for held, new in zip(self.cached_ids, ids):
            if held != new:
                break
            same += 1
        return min(same, len(ids) - 1)


def chat(
    model: Any,
    tokenizer: Any,
    settings: ChatSettings,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> Conversation:
    """Hold the conversation until ``/exit`` or the end of ``read``'s input (EOFError);
    ``out``: where answers and notes are written (default stdout). Returns the conversation."""
    out = out or sys.stdout
    why = static_decode_unsupported(model) if settings.graph is not None else None
    if why:
        raise DshalError(f"chat: ChatSettings.graph is given, but the static decode step it captures cannot run: {why}")
    tokens = settings.max_new_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:  # an answer needs a token
        raise ArgumentError(f"chat: ChatSettings.max_new_tokens is {tokens!r}, expected an int >= 1")
    conversation = Conversation()
    device = model.rope_cos.device
    limit = model.args.max_position_embeddings
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    if tokens >= limit:
        raise ArgumentError(f"chat: ChatSettings.max_new_tokens is {tokens}, expected fewer than the model's "
                            f"max_position_embeddings ({limit}): a conversation needs its prompt's positions too")
    stops = "; Ctrl-C stops an answer" if settings.any_failed is None else ""  # a parallel job ends on Ctrl-C
    print(f"chat: {', '.join(f'{c} to {what}' for c, what in COMMANDS.items())}{stops}", file=out, flush=True)
    while True:
        try:
            text = read(">>> ")
        except EOFError:
            print(file=out)
            return conversation
        except UnicodeDecodeError:  # a strict locale: the terminal's bytes were not UTF-8
            text = INVALID_TEXT
        command = text.strip().lstrip("\ufeff")
        if command == "/exit":
            return conversation
        if command == "/clear":
            conversation.forget()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not command:
            continue
        if command.startswith("/") and " " not in command:
            print(f"(unknown command {command}: {', '.join(COMMANDS)}; to send it as a message, begin it with a "
                  "space)", file=out, flush=True)
            continue
        if _not_text(text):
            print("(not sent: the line is not valid UTF-8)", file=out, flush=True)
            continue
        conversation.messages.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, conversation.messages)
        if len(ids) >= limit:
            conversation.messages.pop()
            print(f"(not sent: the conversation would be {len(ids)} tokens, and the model's positions end at "
                  f"{limit} (max_position_embeddings): /clear starts a new one)", file=out, flush=True)
            continue
        turn = settings
        if len(ids) + settings.max_new_tokens > limit:  # as DeepSeek-V3's generate.py: the answer gets what is left
            turn = replace(settings, max_new_tokens=limit - len(ids))
            print(f"(this answer: at most {turn.max_new_tokens} new tokens, where the model's positions end)",
                  file=out, flush=True)
        answer, error = "", None
        try:
            answer = _answer(model, tokenizer, turn, ids, generator, out, conversation)
        except DshalError as err:
            error, conversation.cached_ids = err, []  # what the cache holds is unknown now
        except KeyboardInterrupt:
            if settings.any_failed is not None:  # ranks of a parallel job cannot agree on a stopped turn: it ends
                raise
            conversation.messages.pop()
            conversation.cache = conversation.mtp_cache = conversation.decoder = conversation.speculative_step = None
            conversation.cached_ids = []  # stopped mid-step: start the cache again
            print("\n(answer stopped: this turn is dropped; /exit or Ctrl-D ends the chat)", file=out, flush=True)
            continue
        if settings.any_failed(error is not None) if settings.any_failed else error is not None:
            conversation.messages.pop()
            if error is not None and settings.silent_rank:
                print(f"{settings.silent_rank}: (not answered: {error})", file=sys.stderr, flush=True)
            print(f"\n(not answered: {error or 'it failed on another rank, which said why'})", file=out, flush=True)
            continue
        conversation.messages.append({"role": "assistant", "content": answer})
        conversation.turns += 1


def _answer(model: Any, tokenizer: Any, settings: ChatSettings, ids: list[int], generator: torch.Generator,
            out: TextIO, conversation: Conversation) -> str:
    """Generate the answer to the conversation ``ids``, writing its text to ``out`` as it comes;
    the conversation's cache is reused for the tokens it holds, or made anew when too small."""
    stream = TextStream(tokenizer)
    prompt = torch.tensor([ids], device=model.rope_cos.device)
    need = len(ids) + settings.max_new_tokens
    cached = conversation.reusable(ids)
    if conversation.cache is not None and not conversation.cache.can_rewind_to(cached):
        cached = 0  # a wrapped attention-window ring: what it holds cannot be reused, only rewritten
    if conversation.cache is None or conversation.cache.max_len < need:
        # Room for a few more turns like this one, within the model's positions.
        room = min(model.args.max_position_embeddings, max(2 * need, 1024))
        conversation.cache = conversation.mtp_cache = conversation.decoder = conversation.speculative_step = None  # old memory first
        conversation.cached_ids, cached = [], 0
        static = settings.graph is not None
        # Kept only once all are made: a refused MTP cache (its memory checked after the main
        # one's) left a main cache without it, and the next turn failed on the missing one.
        cache = model.new_cache(1, room, "absorb" if static else None, static=static)
        mtp_cache = decoder = step = None
        if settings.speculative:
            mtp_cache = model.new_cache(1, room, "absorb" if static else None, mtp=True, static=static)
            if static:
                verifier = DraftVerifier(settings.temperature, settings.top_p, generator, settings.top_k, settings.min_p)
                step = SpeculativeStep(model, cache, mtp_cache, verifier, settings.graph)
        elif static:
            decoder = StaticDecoder(model, cache, settings.graph)
        conversation.cache, conversation.mtp_cache, conversation.decoder, conversation.speculative_step = (
            cache, mtp_cache, decoder, step)

    def show(token: torch.Tensor) -> None:
        out.write(stream.push(int(token[0])))
        out.flush()

    common = dict(eos_token_id=settings.stop_ids, generator=generator, prefill_chunk=settings.prefill_chunk,
                  top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p, stream=show, cache=conversation.cache)
    with settings.guard() if settings.guard else contextlib.nullcontext():
        if settings.speculative:
            # An MTP position's entry was made with the token after it: reusable one short of
            # the main cache's, and no further than the MTP cache got.
            cached = max(0, min(cached - 1, conversation.mtp_cache.length))
            if not (conversation.cache.can_rewind_to(cached) and conversation.mtp_cache.can_rewind_to(cached)):
                cached = 0  # a wrapped attention-window ring
            result, stats = generate_speculative(model, prompt, settings.max_new_tokens, settings.temperature,
                                                 mtp_cache=conversation.mtp_cache, cached=cached,
                                                 step=conversation.speculative_step, **common)
            conversation.drafts.append((stats.accepted, stats.steps))
        else:
            result = model.generate(prompt, settings.max_new_tokens, settings.temperature, cached=cached,
                                    decoder=conversation.decoder, **common)
    print(stream.flush(), file=out, flush=True)
    conversation.cached_ids = result[0, :-1].tolist()  # every token fed to the model: all but the last
    conversation.prefilled.append(len(ids) - cached)
    (new,) = completions(result, [len(ids)], settings.max_new_tokens, settings.stop_ids)
    if len(new) == settings.max_new_tokens and not (settings.stop_ids and new and new[-1] in settings.stop_ids):
        print(f"(answer cut at {settings.max_new_tokens} new tokens)", file=out, flush=True)
    return tokenizer.decode(new, skip_special_tokens=True)


__all__ = ["COMMANDS", "INVALID_TEXT", "ChatSettings", "Conversation", "chat"]
