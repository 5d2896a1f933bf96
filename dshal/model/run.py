"""``dshal run``: the model core on the selected backend, with tokens/s.

By default a tiny DeepSeek-V3-shaped model with random weights is built on the fly
(:func:`dshal.model.args.tiny_args`: first layer dense, grouped MoE with a correction
bias, q LoRA, YaRN); ``--checkpoint DIR`` loads a Hugging Face checkpoint instead, and
``--checkpoint org/name`` one already in the local Hugging Face cache (:mod:`dshal.hub`).

Timing: a warm-up generates with exactly the timed shapes (same batch, prompt length and
number of new tokens), so Triton compilation and autotuning happen there; its extra time
over the timed run is reported apart as ``compile_autotune_s``. Each later batch of another
shape (``--prompt-file`` in several batches) is warmed up too, with its prefill and one
decode step (``warmup_shapes`` counts them). Decode tokens/s counts the
steps after the first decode step (the first runs the ops' input checks, and with graphs
is the capture), with and without device graphs (``--graphs``): the graph run captures a
static decode step with the backend's ``graph()`` hook (:mod:`dshal.model.decode`) and
reports the capture time apart. ``--speculative mtp`` also times decoding with the
checkpoint's multi-token-prediction drafts (:mod:`dshal.model.speculative`), after a warm-up
of its own shapes, and reports how many drafts were accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dshal import __version__ as dshal_version, comm
from dshal.config import read_text_file
from dshal.errors import ArgumentError, ConfigError, DshalError
from dshal.hub import hub_provenance, hub_provenance_text
from dshal.model import from_pretrained, random_model
from dshal.model.args import ModelArgs, checkpoint_folder, tiny_run_args
from dshal.model.cache import check_cache_fits
from dshal.model.chat import ChatSettings, chat
from dshal.model.decode import generate_with_graphs, static_decode_unsupported
from dshal.model.generate import DEFAULT_PREFILL_CHUNK, completions
from dshal.model.precision import precision_summary
from dshal.model.run_report import RunReport
from dshal.model.speculative import SpeculativeStats, generate_speculative, mtp_layers_for, speculative_unsupported
from dshal.model.text import (
    GENERATION_CONFIG,
    check_chat_template,
    check_vocabulary,
    encode_prompt,
    load_tokenizer,
    sampling_defaults,
    stop_ids,
)
from dshal.outputs import atomic_write, check_writable, console as output_console, is_terminal
from dshal.parallel import run as parallel_run
from dshal.redact import shareable_text
from dshal.run_command import add_arguments as add_arguments  # its options, importable without torch (--help)
from dshal.runtime import free_memory, free_memory_note, out_of_memory_as_error, use_for_command

#: The revision of ``dshal run --json``'s layout.
RUN_SCHEMA = "dshal.run/1"


def check_run_fits(model: Any, args: argparse.Namespace, device: torch.device, sharing: int = 1) -> None:
    """Refuse, in the flags' terms (``--batch``, ``--prompt-len``, ``--new-tokens``), a run
    whose KV cache cannot fit the memory free on ``device``: the cache is the run's big
    allocation, and this is said before anything is allocated (the prompt included).
    ``sharing``: ranks of this run that allocate their caches from the same memory."""
    tokens = args.prompt_len + args.new_tokens
    limit = model.args.max_position_embeddings
    if tokens > limit:
        prompt = (f"the longest --prompt ({args.prompt_len} tokens)" if getattr(args, "prompt", None) is not None
                  else f"--prompt-len {args.prompt_len}")
        raise ArgumentError(f"{prompt} + --new-tokens {args.new_tokens} = {tokens} tokens, expected at most the "
                            f"model's max_position_embeddings ({limit})")
    # The stages run one after another, each with its own caches: the eager run's, the graph run's
    # (the absorb layout with spare mask columns) and the MTP run's (the main layers' and the MTP
    # layer's both: in the graph run's layout, or for one sequence without device graphs in the
    # model's own, which under mla_mode naive is the larger; the backend decides, so the larger counts).
    static = model.cache_bytes(args.batch, tokens, "absorb", static=True)
    nbytes = max(model.cache_bytes(args.batch, tokens), static if getattr(args, "graphs", "auto") != "off" else 0)
    drafts = getattr(args, "speculative", None) is not None and speculative_unsupported(model) is None
    if drafts:
        nbytes = max(nbytes, static + model.cache_bytes(args.batch, tokens, "absorb", mtp=True, static=True))
        if args.batch == 1:
            nbytes = max(nbytes, model.cache_bytes(1, tokens) + model.cache_bytes(1, tokens, mtp=True))
    check_cache_fits(
        nbytes,
        free_memory(device),
        device,
        f"--batch {args.batch} x (--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens}) tokens"
        + (f" (with --speculative {args.speculative}'s MTP cache)" if drafts else ""),
        "--batch, --prompt-len or --new-tokens",
        sharing,
        lambda: free_memory_note(device),
    )


def out_of_memory_in_flags(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Inside it, an allocation ``device`` refuses (the prefill's activations, which the KV
    cache check does not cover) is a DeviceError in the flags' terms, not torch's traceback."""
    chunk = getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK)
    what = (f"--batch {args.batch} x --prompt-len {args.prompt_len} (prefilled in forwards of <= {chunk} tokens) "
            f"+ --new-tokens {args.new_tokens}")
    lower = "--batch, --prefill-chunk or --prompt-len" if hasattr(args, "prefill_chunk") else "--batch or --prompt-len"
    return out_of_memory_as_error(device, what, lower)


#: How :func:`generate` runs prompts of different lengths (``ragged_batch`` in the report).
RAGGED_OWN_POSITIONS = "each at its own positions"
RAGGED_FED = "fed into one position"


@dataclass(frozen=True)
class BatchShape:
    """What one generation of a batch runs: ``ragged`` (None: one prompt length, else how
    prompts of different lengths run), the prompt tokens per row that the prefill covers
    (the most), all the prefill's tokens, and the steps after it (one per ``on_token``)."""

    ragged: str | None
    prefill_len: int
    prefill_tokens: int
    steps: int


def batch_shape(model: Any, prompt_lens: list[int], new_tokens: int) -> BatchShape:
    shortest, longest = min(prompt_lens), max(prompt_lens)
    if shortest == longest:
        return BatchShape(None, longest, longest * len(prompt_lens), new_tokens)
    if static_decode_unsupported(model) is None:  # generate_rows
        return BatchShape(RAGGED_OWN_POSITIONS, longest, sum(prompt_lens), new_tokens)
    return BatchShape(RAGGED_FED, shortest, shortest * len(prompt_lens), longest + new_tokens - shortest)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise DshalError(f"dshal run: {name} is {value}, expected an integer >= 1")


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``--prompt-file``: one per non-blank line; in a ``.jsonl`` file each line
    a JSON string or an object with a ``"prompt"`` string. ConfigError naming the file and line."""
    path_, text = read_text_file(path, "--prompt-file")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path_.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--prompt-file: not JSON ({err.msg})", file=str(path_), line=number) from None
        except RecursionError:
            raise ConfigError("--prompt-file: JSON nested too deeply to read", file=str(path_), line=number) from None
        value = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(value, str) or not value:
            raise ConfigError("--prompt-file: no prompt on this line, expected a non-empty JSON string or "
                              '{"prompt": "..."}', file=str(path_), line=number)
        prompts.append(value)
    if not prompts:
        raise ConfigError("--prompt-file: no prompts in it, expected one per line", file=str(path_))
    return prompts


def _check_prompt_flags(args: argparse.Namespace) -> None:
    if args.dtype is not None and args.checkpoint:
        raise DshalError(f"dshal run: --dtype {args.dtype} is given with --checkpoint, expected one of them "
                         "(the checkpoint's config.json sets its dtype)")
    prompt_flag = "--prompt-file" if args.prompt_file is not None and args.prompt is None else "--prompt"  # as given
    if args.prompt_file is not None:
        args.prompt = [*(args.prompt or []), *read_prompt_file(args.prompt_file)]
    if args.interactive:
        _check_interactive_flags(args, prompt_flag)
    elif args.prompt is not None:
        if not all(args.prompt):
            raise DshalError("dshal run: --prompt is empty, expected text")
        if args.prompt_len is not None:
            raise DshalError(f"dshal run: {prompt_flag} and --prompt-len are both given, expected one (the text sets "
                             "the length)")
        if not args.checkpoint:
            raise DshalError(f"dshal run: {prompt_flag} needs --checkpoint DIR, whose tokenizer reads the text "
                             "(the built-in tiny model has none)")
    else:
        for flag in ("chat", "ignore_eos", "trust_remote_code"):
            if getattr(args, flag):
                raise DshalError(f"dshal run: --{flag.replace('_', '-')} is given without --prompt, expected both")
        args.prompt_len = 32 if args.prompt_len is None else args.prompt_len
        _positive("--prompt-len", args.prompt_len)


def _check_interactive_flags(args: argparse.Namespace, prompt_flag: str) -> None:
    """``--interactive`` needs a checkpoint (its tokenizer) and takes no flag of the timed run
    (``prompt_flag``: how the prompts in ``args.prompt`` were given)."""
    if not args.checkpoint:
        raise DshalError("dshal run: --interactive needs --checkpoint DIR, whose tokenizer and chat template carry "
                         "the conversation (the built-in tiny model has none)")
    given = {prompt_flag: args.prompt is not None, "--prompt-len": args.prompt_len is not None,
             "--batch": args.batch not in (None, 1), "--json": bool(args.json), "--report": bool(args.report)}
    for flag, is_given in given.items():
        if is_given:
            raise DshalError(f"dshal run: --interactive is given with {flag}, expected one of them (the conversation "
                             "is one sequence, typed on the terminal, and nothing is timed)")


#: The sampling cuts beside the temperature: (attribute, flag, value when neither the flag nor
#: the checkpoint sets it: no cut).
SAMPLING_CUTS = (("top_p", "--top-p", 1.0), ("top_k", "--top-k", 0), ("min_p", "--min-p", 0.0))


def _resolve_sampling(args: argparse.Namespace, defaults: dict[str, float]) -> None:
    """``--temperature`` / ``--top-p`` / ``--top-k`` / ``--min-p`` where given, else ``defaults``
    (the checkpoint's generation_config.json), else greedy with no cuts; ``args.sampling_from``
    names the file when it set what the run uses."""
    from_file = set()
    cuts_given = [f"{flag} {getattr(args, name):g}" for name, flag, _ in SAMPLING_CUTS if getattr(args, name) is not None]
    for name, fallback in (("temperature", 0.0), *((name, off) for name, _, off in SAMPLING_CUTS)):
        if getattr(args, name) is None:
            from_file |= {name} & defaults.keys()
            setattr(args, name, defaults.get(name, fallback))
    # The cuts are moot when greedy.
    used = "temperature" in from_file or (args.temperature > 0 and bool(from_file))
    args.sampling_from = GENERATION_CONFIG if used else None
    if cuts_given and args.temperature == 0:  # a greedy run would ignore them in silence
        raise DshalError(f"dshal run: {', '.join(cuts_given)} with greedy decoding (temperature 0), expected "
                         f"--temperature > 0 with {'it' if len(cuts_given) == 1 else 'them'}: top-p, top-k and "
                         "min-p filter what sampling draws from")
    if args.temperature == 0:  # the generation config's cuts are moot under greedy decoding
        for name, _, off in SAMPLING_CUTS:
            setattr(args, name, off)


def _sampling_line(temperature: float, top_p: float, top_k: int, min_p: float, source: str | None) -> str:
    how = "greedy" if temperature == 0 else f"temperature {temperature:g}, top-p {top_p:g}"
    if temperature > 0:  # the cuts that cut something
        how += f", top-k {top_k}" if top_k > 0 else ""
        how += f", min-p {min_p:g}" if min_p > 0 else ""
    source = f" (from the checkpoint's {source}; --temperature 0 for greedy)" if source else ""
    return f"sampling: {how}{source}"


def _chat_tokenizer(args: argparse.Namespace, vocab_size: int) -> tuple[Any, list[int] | None]:
    """``--interactive``'s tokenizer (with a chat template) and stop ids; sets the sampling."""
    _resolve_sampling(args, sampling_defaults(args.checkpoint))
    tokenizer = load_tokenizer(args.checkpoint, args.trust_remote_code)
    check_vocabulary(tokenizer, vocab_size)
    check_chat_template(tokenizer, "--interactive")
    return tokenizer, None if args.ignore_eos else (stop_ids(tokenizer, args.checkpoint) or None)


def _read_text(args: argparse.Namespace, groups: Any) -> tuple[Any, ...]:
    """With ``--interactive``: its tokenizer and stop ids (:func:`_chat_tokenizer`); with
    ``--prompt``: the tokenizer, prompt ids and stop ids (:func:`_read_prompts`); else ``()``.
    Read from the checkpoint's config.json and tokenizer files, before its weights; in a
    parallel job an error every rank meets is said once."""
    if not (args.interactive or args.prompt is not None):
        return ()

    def read() -> tuple[Any, ...]:  # config.json inside: a defect every rank meets is said once
        vocab_size = ModelArgs.from_file(args.checkpoint).vocab_size  # both need --checkpoint (_check_prompt_flags)
        return (_chat_tokenizer if args.interactive else _read_prompts)(args, vocab_size)

    return read() if groups is None else parallel_run.agree(read)


def _interactive(args: argparse.Namespace, model: Any, runtime: Any, groups: Any, tokenizer: Any, stops: list[int] | None) -> int:
    """``--interactive``: the conversation (:mod:`dshal.model.chat`) with ``tokenizer`` (read by
    :func:`_read_text`); in a parallel job rank 0 reads and prints, every rank generates."""
    why = speculative_unsupported(model) if args.speculative else None
    if why:
        raise DshalError(f"dshal run: --interactive --speculative {args.speculative}: {why}")
    speaks = groups is None or parallel_run.is_reporting_rank()
    guard = functools.partial(out_of_memory_as_error, runtime.device, "this turn", "--new-tokens, or /clear the conversation")
    static, decode_line = _chat_graphs(args, model, runtime)
    settings = ChatSettings(args.new_tokens, stops, args.temperature, args.top_p, args.prefill_chunk, args.seed, guard,
                            None if groups is None else parallel_run.any_rank,
                            None if speaks else f"rank {comm.get_rank()}", args.speculative == "mtp",
                            runtime.backend.graph if static else None, top_k=args.top_k, min_p=args.min_p)
    with contextlib.ExitStack() as stack:
        out = sys.stdout if speaks else stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115
        if speaks:
            print(_sampling_line(args.temperature, args.top_p, args.top_k, args.min_p, args.sampling_from))
            print(decode_line)
        if speaks and is_terminal(sys.stdin):
            # lazy: line editing for input() on a terminal (arrow keys; lines past the tty's
            # 4095-byte buffer), where it exists; its import sets up the terminal
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401
        read = _read_terminal if groups is None else parallel_run.shared_input(_read_terminal)
        conversation = chat(model, tokenizer, settings, read, out)
    if speaks:
        layout = "" if groups is None else f", TP={groups.tp_size} x EP={groups.ep_size}"
        accepted, drafted = sum(a for a, _ in conversation.drafts), sum(d for _, d in conversation.drafts)
        drafts = f"; {accepted} of {drafted} MTP drafts accepted" if args.speculative else ""
        print(f"dshal run --interactive: {conversation.turns} answer(s) on backend {runtime.backend.name} "
              f"({runtime.device}{layout}){drafts}")
    if groups is not None:
        parallel_run.finish()
    return 0


def _read_terminal(prompt: str) -> str:
    """``input(prompt)``; a closed stdin (``<&-``, a service started without one) is the end of
    the input, as ``</dev/null`` is: input() raised "RuntimeError: lost sys.stdin", a traceback."""
    if sys.stdin is None:
        raise EOFError
    return input(prompt)


def _chat_graphs(args: argparse.Namespace, model: Any, runtime: Any) -> tuple[bool, str]:
    """Whether ``--interactive``'s decode steps go through the static step and the backend's
    graph hook (``--graphs on``, or ``auto`` on a backend that captures), and the line that says how."""
    captures = _captures_graphs(runtime)
    why = _graphs_declined(args, runtime, captures) or static_decode_unsupported(model)
    if why:
        return False, f"decode steps: eager ({why})"
    if captures:
        return True, ("decode steps: their two forwards captured as device graphs, kept across turns" if args.speculative
                      else "decode steps: captured as one device graph, kept across turns")
    return True, f"decode steps: the static (graph) step, eager: backend {runtime.backend.name!r} has no device graphs"


def _read_prompts(args: argparse.Namespace, vocab_size: int) -> tuple[Any, list[list[int]], list[int]]:
    """Each ``--prompt`` through ``--checkpoint``'s tokenizer: ``(tokenizer, token ids per
    sequence, stop ids)``; one prompt is copied ``--batch`` times."""
    _resolve_sampling(args, sampling_defaults(args.checkpoint))
    tokenizer = load_tokenizer(args.checkpoint, args.trust_remote_code)
    check_vocabulary(tokenizer, vocab_size)
    ids = [encode_prompt(tokenizer, text, args.chat) for text in args.prompt]
    return tokenizer, ids * (args.batch or 1) if len(ids) == 1 else ids, stop_ids(tokenizer, args.checkpoint)


def _prompt_batch(args: argparse.Namespace, vocab_size: int, prompts: list[list[int]] | None) -> tuple[torch.Tensor, list[int]]:
    """The batch's input ids ``[B, longest prompt]`` (right-padded) and each row's prompt length:
    ``prompts``' ids, or random ids of ``--prompt-len``."""
    if prompts is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (args.batch, args.prompt_len), generator=gen), [args.prompt_len] * args.batch
    width = max(map(len, prompts))
    return torch.tensor([ids + [0] * (width - len(ids)) for ids in prompts]), [len(ids) for ids in prompts]


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag's value, before anything is loaded (outputs included: before the run, not after it)."""
    given, args.checkpoint_hub = args.checkpoint, None
    if args.checkpoint:  # a config.json or a Hub id given for its folder: the tokenizer and generation config are there
        args.checkpoint = str(checkpoint_folder(args.checkpoint, "--checkpoint"))
        args.checkpoint_hub = hub_provenance(given, args.checkpoint)  # the id and revision asked, the commit found
    _check_prompt_flags(args)
    _positive("--new-tokens", args.new_tokens)
    if args.batch is not None:
        _positive("--batch", args.batch)
    _positive("--prefill-chunk", args.prefill_chunk)
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        raise DshalError(f"dshal run: --temperature is {args.temperature}, expected a finite number >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise DshalError(f"dshal run: --top-p is {args.top_p}, expected a number in (0, 1]")
    if args.top_k is not None and args.top_k < 0:
        raise DshalError(f"dshal run: --top-k is {args.top_k}, expected an int >= 0 (0: no cut)")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise DshalError(f"dshal run: --min-p is {args.min_p}, expected a number in [0, 1] (0: no cut)")
    if not (args.prompt or args.interactive):
        _resolve_sampling(args, {})  # random ids: greedy unless asked
    for flag in ("json", "report"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), f"--{flag}")


def main(args: argparse.Namespace) -> int:
    _check_flags(args)
    parallel = parallel_run.wanted(args)
    if parallel and parallel_run.relaunch_needed():
        return parallel_run.relaunch(args)
    runtime = use_for_command(args.config, args.backend)
    if not parallel:
        return _main(args, runtime, None)
    try:
        return _main(args, runtime, parallel_run.setup(args))
    finally:  # after an error too (setup's included): a process leaving with a live gloo group can abort at exit
        comm.shutdown()


def _main(args: argparse.Namespace, runtime: Any, groups: Any) -> int:
    """:func:`main` once the runtime is chosen and, when parallel, the job joined."""
    started = time.perf_counter()
    mtp = mtp_layers_for(args.speculative)
    show = not args.no_progress and (groups is None or parallel_run.is_reporting_rank())
    text = _read_text(args, groups)  # before the weights: a tokenizer error in seconds, not after minutes of loading
    if groups is not None:
        with load_progress_bar(show and bool(args.checkpoint)) as progress:
            # A checkpoint defect every rank meets is said once (the transforms' collectives are done
            # before any tensor is read, so a failing rank only skips the agreement's own).
            model, source = parallel_run.agree(lambda: parallel_run.load(args, groups, progress))
    elif args.checkpoint:
        with load_progress_bar(show) as progress:
            model = from_pretrained(args.checkpoint, mla_mode=args.mla_mode, mtp_layers=mtp, progress=progress)
        source = str(args.checkpoint)
    else:  # its MTP layer's random weights come after the others': the same model as without it
        model = random_model(tiny_run_args(args.mla_mode, mtp, args.dtype), seed=args.seed)
        source = f"built-in tiny DeepSeek-V3 (random weights, seed {args.seed})"
    load_s = time.perf_counter() - started
    if args.interactive:
        return _interactive(args, model, runtime, groups, *text)
    tokenizer, prompt_ids, stops = None, None, []
    if args.prompt is not None:
        tokenizer, prompt_ids, stops = text
        several = len(args.prompt) > 1 and args.batch is not None
        args.batch = min(args.batch, len(prompt_ids)) if several else len(prompt_ids)  # sequences per generation
        args.prompt_len = max(map(len, prompt_ids))
    else:
        args.batch = args.batch or 1
    if groups is None:
        check_run_fits(model, args, runtime.device)
    else:  # every rank checks its own cache; an error they share is said once
        sharing = parallel_run.ranks_sharing(runtime.device)
        parallel_run.agree(lambda: check_run_fits(model, args, runtime.device, sharing))
    groups_of = [None] if prompt_ids is None else [prompt_ids[i : i + args.batch] for i in range(0, len(prompt_ids), args.batch)]
    batches = [_prompt_batch(args, model.args.vocab_size, ids) for ids in groups_of]
    batches = [(prompt.to(runtime.device), lens) for prompt, lens in batches]
    prompt_lens = [n for _, lens in batches for n in lens]  # every sequence's
    eos = None if args.ignore_eos or not stops else stops
    run_report = _run_report(runtime, model, args.report)
    with out_of_memory_in_flags(args, runtime.device):
        timing, outputs = _generate_and_time(args, model, runtime, batches, eos, run_report, show)
    shape = batch_shape(model, prompt_lens, args.new_tokens)
    report: dict[str, Any] = {
        "schema": RUN_SCHEMA,  # keys are only added within a revision; scripts can check it
        "dshal_version": dshal_version,
        "backend": runtime.backend.name,
        # why it was taken, in its own words: how it serves (the cpu backend: whether its C kernels built)
        "backend_reason": next((d.reason for d in runtime.selection if d.taken), ""),
        "device": str(runtime.device),
        "emulated": runtime.emulated,
        "model": shareable_text(source),  # a checkpoint folder in a home is written from ~
        "checkpoint_hub": args.checkpoint_hub,  # a Hugging Face id's: {id, revision, commit}; else None
        "load_s": round(load_s, 3),
        "batch": args.batch,  # sequences per generation
        "batches": len(batches),
        "prompt_len": args.prompt_len,  # the longest prompt
        "shortest_prompt": min(prompt_lens),
        "ragged_batch": shape.ragged,
        "prefill_len": shape.prefill_len,
        "prefill_chunk": args.prefill_chunk,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,  # 0: no cut
        "min_p": args.min_p,  # 0: no cut
        "sampling_from": args.sampling_from,  # generation_config.json where it set them, else None
        **timing,
        "providers": {op: runtime.provider_entry(op) for op in runtime.providers},
        # computations a provider above served with the reference math (inputs its kernel does not
        # take), in this process so far: load and warm-up included (a --report counts the timed run's)
        "reference_inside": dict(sorted(runtime.backend.reference_calls().items())),
        # strict: batch-invariant providers where the backend has them (other numbers than default)
        "determinism": {"mode": runtime.config.determinism, "batch_invariant_ops": sorted(runtime.batch_invariant),
                        "gaps": dict(runtime.determinism_gaps)},
        "model_description": model.describe(),
        "output_ids": outputs[0],  # the first sequence's
        "generated_tokens": max(map(len, outputs)),  # fewer than new_tokens after an EOS
    }
    if tokenizer is not None:
        texts = args.prompt * len(outputs) if len(args.prompt) == 1 else args.prompt
        report["stop_ids"] = eos or []
        report["sequences"] = [
            {"prompt_text": text, "prompt_len": length, "output_ids": ids,
             "output_text": tokenizer.decode(ids, skip_special_tokens=True),
             "stopped_at_eos": bool(eos and ids and ids[-1] in eos)}
            for text, length, ids in zip(texts, prompt_lens, outputs)
        ]
        first = report["sequences"][0]  # the single-prompt fields, as before
        report.update(prompt_text=first["prompt_text"], output_text=first["output_text"], stopped_at_eos=first["stopped_at_eos"])
    if groups is not None:
        report = parallel_run.report(report, groups)
    if groups is None or parallel_run.is_reporting_rank():
        _print(report)
        if args.json:
            atomic_write(args.json, json.dumps(report, indent=2, default=str))
        if run_report:
            run_report.print()
            print(f"run report: {run_report.write(args.report)}")
    if groups is not None:
        parallel_run.finish()
    return 0


def _generate_and_time(
    args: argparse.Namespace,
    model: Any,
    runtime: Any,
    batches: list[tuple[torch.Tensor, list[int]]],
    eos: list[int] | None,
    run_report: Any,
    show: bool,
) -> tuple[dict[str, Any], list[list[int]]]:
    """The warm-up (on the first batch), the timed run of every batch (recorded by
    ``run_report``) and the graph run: the report's timing fields, and each sequence's new tokens.
    ``show``: a status line on a terminal names each stage while it runs."""
    sync = runtime.backend.synchronize
    sampler = torch.Generator(device=batches[0][0].device).manual_seed(args.seed)
    generate = functools.partial(model.generate, prefill_chunk=args.prefill_chunk, eos_token_id=eos,
                                 temperature=args.temperature, generator=sampler, top_p=args.top_p,
                                 top_k=args.top_k, min_p=args.min_p)
    # Warm-up with exactly the first batch's timed shapes: compilation and autotuning happen here.
    where = f"on {runtime.backend.name} ({runtime.device})"
    warm_start = time.perf_counter()
    with _stage(show, f"dshal run: warm-up {where} (compiles, autotunes)"):
        generate(batches[0][0], args.new_tokens, prompt_lens=batches[0][1])
        sync()
        first_warmup_s = time.perf_counter() - warm_start
        # Each later batch of another shape (rows, prompt lengths): its prefill and one decode step,
        # so that no batch compiles or autotunes inside the timings.
        warmed = {_batch_key(*batches[0])}
        for prompt, lens in batches[1:]:
            if _batch_key(prompt, lens) not in warmed:
                warmed.add(_batch_key(prompt, lens))
                generate(prompt, min(args.new_tokens, 2), prompt_lens=lens)
        sync()
    warmup_s = time.perf_counter() - warm_start

    sampler.manual_seed(args.seed)  # the timed run samples what the warm-up did
    outputs: list[list[int]] = []
    prefill_tokens, prefill_s, decode_tokens, decode_s, first_s = 0, 0.0, 0, 0.0, None
    with run_report.recording() if run_report else contextlib.nullcontext():
        for prompt, lens in batches:
            shape = batch_shape(model, lens, args.new_tokens)
            run = functools.partial(generate, prompt_lens=lens)
            result, start, stamps = _timed_generate(run, prompt, args.new_tokens, shape.steps, sync, show)
            kept = completions(result, lens, args.new_tokens, eos)
            outputs += kept
            prefill_tokens += shape.prefill_tokens
            prefill_s += stamps[0] - start  # the first step's token comes out of the prefill
            fed = [n - min(lens) for n in lens] if shape.ragged == RAGGED_FED else None  # rows fed their prompt first
            tokens, seconds = _decode_span(stamps, kept, fed)
            decode_tokens, decode_s = decode_tokens + tokens, decode_s + seconds
            first_s = stamps[-1] - start if first_s is None else first_s
    if len(batches) == 1:
        with _stage(show, f"dshal run: decode with graphs {where} (when --graphs asks for them)"):
            graphs = _graph_run(args, model, *batches[0], runtime, outputs, eos)
    else:
        graphs = {"graphs": {"run": False, "why": f"{len(batches)} batches: graphs are timed on one batch"},
                  "decode_tokens_per_s_graphs": None}
    with _stage(show and args.speculative is not None, f"dshal run: decode with MTP drafts {where}"):
        graphs.update(_speculative_run(args, model, batches, runtime, outputs, eos))
    timing = {
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s > 0 else None,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 and decode_tokens else None,
        "warmup_s": round(warmup_s, 3),
        "warmup_shapes": len(warmed),
        # What the first batch's warm-up spent beyond its timed run: compilation, autotuning, first-call setup.
        "compile_autotune_s": round(max(first_warmup_s - first_s, 0.0), 3),
        **graphs,
    }
    return timing, outputs


@contextlib.contextmanager
def _stage(show: bool, text: str) -> Iterator[None]:
    """A transient status line on stderr naming what runs now, where stderr is a terminal (a
    warm-up that compiles or autotunes can take a while and prints nothing else)."""
    if not show:
        yield
        return
    console = output_console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(text):
        yield


#: What the load progress bar says in each phase (dshal.model.loader.LoadProgress).
LOAD_PHASES = {
    "read": "loading: reading weights",
    "precision": "loading: applying the precision policy",
    "place": "loading: placing weights on the device",
    "prepare": "loading: the backend's weight layouts",
}


@contextlib.contextmanager
def load_progress_bar(show: bool) -> Any:
    """A progress bar for a checkpoint's load (a full DeepSeek-V3 takes minutes); yields the
    ``progress(phase, done, total)`` callback, or None when not shown."""
    if not show or not is_terminal(sys.stdout):  # a log or a pipe: a bar there is only a stray blank line
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(LOAD_PHASES["read"], total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=LOAD_PHASES.get(phase, phase), completed=done, total=total)

        yield progress


def _run_report(runtime: Any, model: Any, path: str | None) -> Any:
    """A :class:`~dshal.model.run_report.RunReport` when ``--report`` is given, else None."""
    if not path:
        return None
    return RunReport(runtime, model)


def _decode_span(stamps: list[float], kept: list[list[int]], first_steps: list[int] | None = None) -> tuple[int, float]:
    """The decode tokens and seconds of the steps after the first decode step (``stamps[i]``:
    when step i's token was ready; step 0 is the prefill's); (0, 0) with fewer than 3 steps.
    The tokens are the new ones each sequence keeps (``kept``, cut at its stop) that came after
    step 1: a row that stopped is padded to the batch's end, and a row fed its prompt a
    position a step (a ragged batch with an attention window) makes steps with no new token,
    and neither is output (counting every row every step gave ~6x the output rate there).
    ``first_steps``: the step each row's first new token comes at (0 unless fed its prompt)."""
    if len(stamps) < 3 or stamps[-1] <= stamps[1]:
        return 0, 0.0
    first_steps = first_steps or [0] * len(kept)
    late = sum(max(len(row) - max(2 - first, 0), 0) for row, first in zip(kept, first_steps))
    return late, stamps[-1] - stamps[1]


def _decode_rate(stamps: list[float], kept: list[list[int]]) -> float | None:
    """Decode tokens/s of :func:`_decode_span`, or None with fewer than 3 steps or no such token."""
    tokens, seconds = _decode_span(stamps, kept)
    return tokens / seconds if seconds > 0 and tokens else None


def _captures_graphs(runtime: Any) -> bool:
    """Whether the backend captures device graphs (its ``graph()`` hook returns another callable)."""
    probe = lambda: None  # noqa: E731
    return runtime.backend.graph(probe) is not probe


def _graphs_declined(args: argparse.Namespace, runtime: Any, captures: bool) -> str:
    """Why ``--graphs`` asks for no graph steps (``off``, or ``auto`` on a backend without
    device graphs), or "" when it asks for them (``on``, or ``auto`` where ``captures``)."""
    if args.graphs == "off":
        return "--graphs off"
    if args.graphs == "auto" and not captures:
        return f"backend {runtime.backend.name!r} has no device graphs"
    return ""


#: Why a graph run captured nothing on a backend that captures: every sequence's only new token
#: came from the prefill (``--new-tokens 1``, or a stop id there).
NO_DECODE_STEP = "no decode step ran: every sequence ended at the prefill's token"


def _graph_run(
    args: argparse.Namespace,
    model: Any,
    prompt: torch.Tensor,
    prompt_lens: list[int],
    runtime: Any,
    eager_outputs: list[list[int]],
    eos: list[int] | None,
) -> dict[str, Any]:
    """Decode through a captured static step (``--graphs``); the report's graph fields.
    ``eager_outputs``: the eager run's new tokens per sequence (cut after a stop id ``eos``)."""
    captures = _captures_graphs(runtime)
    why = _graphs_declined(args, runtime, captures) or static_decode_unsupported(model)
    if why:
        return {"graphs": {"run": False, "why": why}, "decode_tokens_per_s_graphs": None}
    decoders: list[Any] = []
    sampler = torch.Generator(device=prompt.device).manual_seed(args.seed)

    def graph_generate(prompt: torch.Tensor, new_tokens: int, on_token: Any = None) -> torch.Tensor:
        ids, decoder = generate_with_graphs(model, prompt, new_tokens, runtime.backend.graph, on_token, args.prefill_chunk,
                                            prompt_lens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                            min_p=args.min_p, generator=sampler)
        decoders.append(decoder)
        return ids

    ids, _, stamps = _timed_generate(graph_generate, prompt, args.new_tokens, args.new_tokens, runtime.backend.synchronize,
                                     False)
    decoder = decoders[-1]
    kept = completions(ids, prompt_lens, args.new_tokens, eos)  # it runs past a stop id: what a row keeps counts
    return {
        "graphs": {
            "run": True,
            "captured": bool(decoder and decoder.captured),
            "capture_s": round(decoder.capture_s, 3) if decoder else None,
            # No decoder: the prefill made the only token (said, as "" read as a capture that worked).
            "why": (NO_DECODE_STEP if decoder is None
                    else f"capture failed, the static step ran eagerly: {decoder.capture_error}" if decoder.capture_error
                    else "" if captures else f"backend {runtime.backend.name!r} has no device graphs: the static step ran eagerly"),
            # The graph run never stops at an EOS: its tokens up to each sequence's stop are compared.
            # Sampled, they are drawn from the same distribution, not the same draws: None.
            "tokens_match_eager": kept == eager_outputs if args.temperature == 0 else None,
        },
        # over the steps the eager run took (it stops once every row has; this run does not)
        "decode_tokens_per_s_graphs": _decode_rate(stamps[: max(map(len, kept), default=0)], kept),
    }


def _speculative_run(
    args: argparse.Namespace,
    model: Any,
    batches: list[tuple[torch.Tensor, list[int]]],
    runtime: Any,
    eager_outputs: list[list[int]],
    eos: list[int] | None,
) -> dict[str, Any]:
    """Decoding with MTP drafts (``--speculative mtp``) on the batch, warmed up with its own
    shapes, then timed; the report's ``speculative`` fields. Greedy, its tokens must be the
    eager run's; sampled, they are drawn from the same distribution (not compared). Decode
    tokens/s counts the tokens after its first step, as the eager figure does."""
    if args.speculative is None:
        return {"speculative": None, "decode_tokens_per_s_speculative": None}
    why = speculative_unsupported(model)
    if not why and len(batches) > 1:
        why = f"{len(batches)} batches: speculative decoding is timed on one batch"
    if why:
        return {"speculative": {"run": False, "why": why}, "decode_tokens_per_s_speculative": None}
    prompt, lens = batches[0]
    sync = runtime.backend.synchronize
    sampler = torch.Generator(device=prompt.device)
    marks: list[tuple[int, float]] = []  # (new tokens written so far - 1, when)
    # The steps' forwards as device graphs, as --graphs decides for the plain decode steps.
    captures = _captures_graphs(runtime)
    graph = None if _graphs_declined(args, runtime, captures) else runtime.backend.graph

    def speculative_generate(on_token: Any = None) -> tuple[torch.Tensor, SpeculativeStats]:
        sampler.manual_seed(args.seed)
        return generate_speculative(model, prompt, args.new_tokens, args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, min_p=args.min_p,
                                    generator=sampler, eos_token_id=eos, on_token=on_token,
                                    prefill_chunk=args.prefill_chunk, prompt_lens=lens, graph=graph)

    def mark(i: int) -> None:
        sync()
        marks.append((i, time.perf_counter()))

    speculative_generate()  # warm-up: its own shapes (two-token steps, the MTP layer)
    sync()
    ids, stats = speculative_generate(mark)
    rate = None
    if len(marks) > 2 and marks[-1][1] > marks[1][1]:  # after the first (checked) step
        rate = (marks[-1][0] - marks[1][0]) / (marks[-1][1] - marks[1][1])
    details = stats.as_dict()
    if stats.captured is False and not stats.capture_error:  # not a failed capture: say why, as the graph run does
        details["capture_error"] = (f"backend {runtime.backend.name!r} has no device graphs: its steps ran eagerly"
                                    if not captures else NO_DECODE_STEP)
    return {
        "speculative": {
            "run": True,
            "why": "",
            **details,
            # Sampled tokens are drawn from the eager run's distribution, not the same draws: None.
            "tokens_match_eager": (completions(ids, lens, args.new_tokens, eos) == eager_outputs
                                   if args.temperature == 0 else None),
        },
        "decode_tokens_per_s_speculative": rate,
    }


def _batch_key(prompt: torch.Tensor, lens: list[int]) -> tuple[Any, ...]:
    """What a batch's kernel shapes depend on: its rows and each row's prompt length."""
    return (*prompt.shape, *lens)


def _timed_generate(
    generate: Any, prompt: torch.Tensor, new_tokens: int, steps: int, sync: Any, show: bool
) -> tuple[torch.Tensor, float, list[float]]:
    """Generate with a progress bar of ``steps``; returns (ids, start time, time at which each
    step's token was ready)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stamps: list[float] = []
    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # drawn on stdout: where that is a log or a pipe (a rank's torchrun --redirects file) rich left a
    # blank line at the top of the output
    with Progress(*columns, disable=not (show and is_terminal(sys.stdout)), transient=True) as progress:
        task = progress.add_task("generate", total=steps)

        def on_token(i: int) -> None:
            sync()
            stamps.append(time.perf_counter())
            progress.advance(task)

        start = time.perf_counter()
        out = generate(prompt, new_tokens, on_token=on_token)
    return out, start, stamps


def _chunks(report: dict[str, Any]) -> str:
    """`` in N chunks of C`` when the prompt was prefilled in more than one forward."""
    chunk = report.get("prefill_chunk") or report["prefill_len"]
    n = -(-report["prefill_len"] // chunk)
    return f" in {n} chunks of <= {chunk}" if n > 1 else ""


def _rate(tokens_per_s: float | None) -> str:
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,.1f}"


def _tokens_vs_eager(match: bool | None) -> str:
    """Whether a decode path's tokens matched the eager run's (None: sampled, not compared)."""
    if match is None:
        return "sampled: tokens not compared"
    return f"tokens {'match' if match else 'DIFFER from'} the eager run"


def kv_cache_line(kv: dict[str, Any]) -> str:
    line = f"KV cache ({kv['mode']}): {kv['bytes_per_token']} bytes/token (naive MLA: {kv['bytes_per_token_naive']})"
    if kv.get("bytes_per_token_indexer"):  # DeepSeek-V3.2: its indexer's keys, in both figures
        line += f", of which the sparse-attention indexer's keys: {kv['bytes_per_token_indexer']}"
    if kv.get("window"):
        line += (
            f"; window {kv['window']} + {kv['global_tokens']} global tokens: "
            f"{kv['bytes_per_token_at_context']:.1f} bytes/token at {kv['context']} tokens of context"
        )
    return line


def _throughput_line(report: dict[str, Any]) -> str:
    """Prefill and decode tokens/s, with what was prefilled (ragged prompts, several batches)."""
    batch, prefill, decode = report["batch"], report["prefill_tokens_per_s"], report["decode_tokens_per_s"]
    why_not = " (timed from the second decode step on: needs --new-tokens >= 3)" if decode is None else ""
    prefilled = f"{batch} x {report['prefill_len']} tokens{_chunks(report)}"
    if report["ragged_batch"] == RAGGED_OWN_POSITIONS:
        prefilled = (f"{batch} prompts of {report['shortest_prompt']} to {report['prompt_len']} tokens: the shortest "
                     f"length for all, each longer one's rest alone{_chunks(report)}")
    elif report["ragged_batch"]:
        prefilled += (f"; prompts of {report['shortest_prompt']} to {report['prompt_len']} tokens: the longer ones' "
                      "rest is fed by the decode steps (the model has an attention window)")
    if report["batches"] > 1:
        prefilled = (f"{len(report['sequences'])} prompts of {report['shortest_prompt']} to {report['prompt_len']} "
                     f"tokens in {report['batches']} batches of <= {batch}")
    return (
        f"prefill: [bold]{_rate(prefill)}[/bold] tokens/s ({prefilled}); "
        f"decode: [bold]{_rate(decode)}[/bold] tokens/s ({batch} x {report['generated_tokens']} new tokens){why_not}"
    )


def _graphs_line(report: dict[str, Any]) -> str:
    graphs, decode = report["graphs"], report["decode_tokens_per_s"]
    if not graphs["run"]:
        return f"decode with graphs: not run ({graphs['why']})"
    with_graphs = report["decode_tokens_per_s_graphs"]
    ratio = f" ({with_graphs / decode:.2f}x eager)" if with_graphs and decode else ""
    how = f"captured in {graphs['capture_s']:.2f} s" if graphs["captured"] else graphs["why"]
    return (f"decode with graphs: [bold]{_rate(with_graphs)}[/bold] tokens/s{ratio}; {how}; "
            f"{_tokens_vs_eager(graphs['tokens_match_eager'])}")


def _speculative_line(report: dict[str, Any]) -> str:
    """The MTP-draft decode's line (``report["speculative"]`` is set: it was asked for)."""
    speculative, decode = report["speculative"], report["decode_tokens_per_s"]
    if not speculative["run"]:
        return f"decode with MTP drafts: not run ({speculative['why']})"
    with_drafts = report["decode_tokens_per_s_speculative"]
    ratio = f" ({with_drafts / decode:.2f}x eager)" if with_drafts and decode else ""
    rate = speculative["acceptance_rate"]
    accepted = "no step" if rate is None else f"{speculative['accepted']} of {speculative['drafted']} drafts accepted ({rate:.0%})"
    graphed = report["decode_tokens_per_s_graphs"]
    if speculative["captured"] and graphed and with_drafts:
        ratio += f", {with_drafts / graphed:.2f}x with graphs; its steps captured"
    elif speculative["captured"] is False:
        ratio += f", its steps not captured{': ' + speculative['capture_error'] if speculative['capture_error'] else ''}"
    return (f"decode with MTP drafts: [bold]{_rate(with_drafts)}[/bold] tokens/s{ratio}; {accepted}; "
            f"{_tokens_vs_eager(speculative['tokens_match_eager'])}")


def _print(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = output_console(soft_wrap=True)
    emulated = " (emulated)" if report["emulated"] else ""
    console.print(f"[bold]dshal run[/bold]: backend [cyan]{report['backend']}[/cyan] on {report['device']}{emulated}")
    if report["backend_reason"]:
        console.print(f"  {escape(report['backend_reason'])}", highlight=False)
    console.print(f"model: {report['model']} (loaded in {report['load_s']:.2f} s)")
    if report["checkpoint_hub"]:
        console.print(f"  Hugging Face model {hub_provenance_text(report['checkpoint_hub'])}", highlight=False)
    determinism = report["determinism"]
    if determinism["mode"] != "default":
        gaps = "; ".join(f"{op}: {why}" for op, why in determinism["gaps"].items())
        console.print(f"determinism: {determinism['mode']} (batch-invariant: "
                      f"{', '.join(determinism['batch_invariant_ops']) or 'none'}" + (f"; not: {gaps}" if gaps else "") + ")")
    ops = Table(title="op providers", show_edge=False)
    ops.add_column("op")
    ops.add_column("provider")
    ops.add_column("kind")
    for op, p in report["providers"].items():
        ops.add_row(op, p["provider"], p["kind"])
    console.print(ops)
    if report.get("reference_inside"):
        counts = ", ".join(f"{op} x{n}" for op, n in report["reference_inside"].items())
        console.print(f"reference math inside {report['backend']}'s providers (inputs their kernels do not take; "
                      f"this process, warm-up included): {counts}", highlight=False)
    desc = report["model_description"]
    console.print(precision_summary(desc["precision"]))
    prec = Table(
        title=f"precision per layer group ({desc['layers_total']} layers, {desc['dense_layers']} dense)",
        show_edge=False,
    )
    prec.add_column("group")
    prec.add_column("weights")
    for group, label in desc["precision_groups"].items():
        prec.add_row(group, label)
    console.print(prec)
    console.print(kv_cache_line(desc["kv_cache"]))
    console.print(_throughput_line(report))
    console.print(_sampling_line(report["temperature"], report["top_p"], report["top_k"], report["min_p"],
                                 report["sampling_from"]))
    sequences = report.get("sequences", [])
    if len({seq["prompt_text"] for seq in sequences}) == 1:
        sequences = sequences[:1]  # --batch copies of one prompt: its first output
    for i, seq in enumerate(sequences):  # the model's text is not rich markup
        number = f" {i + 1}" if len(sequences) > 1 else ""
        console.print(f"prompt{number}: {seq['prompt_text']!r}", markup=False, highlight=False)
        eos = " (stopped at an end-of-sequence id)" if seq["stopped_at_eos"] else ""
        console.print(f"output{number}: {seq['output_text']!r}{eos}", markup=False, highlight=False)
    console.print(_graphs_line(report))
    if report["speculative"]:  # None: not asked
        console.print(_speculative_line(report))
    console.print(
        f"warm-up (same shapes{f', {shapes} batch shapes' if (shapes := report['warmup_shapes']) > 1 else ''}): "
        f"{report['warmup_s']:.2f} s, of which compile/autotune/first-call "
        f"{report['compile_autotune_s']:.2f} s (the first batch's; outside the timings)"
    )


__all__ = ["add_arguments", "check_run_fits", "load_progress_bar", "main", "out_of_memory_in_flags"]
