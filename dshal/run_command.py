"""``dshal run``'s options, importable without torch: ``dshal run --help`` and its usage
errors start at once; :func:`main` imports the command (:mod:`dshal.model.run`) to run it.
(The module lives outside :mod:`dshal.model`, whose package imports torch.)"""

from __future__ import annotations

import argparse
from typing import Any

from dshal.cliargs import seed
from dshal.hub import CHECKPOINT_HELP, CHECKPOINT_METAVAR

#: The names ``--dtype`` takes: the keys of ``dshal.model.args.TINY_DTYPES`` (whose module
#: imports torch; a test keeps the two the same).
TINY_DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: ``--prefill-chunk``'s default: ``dshal.model.prefill.DEFAULT_PREFILL_CHUNK`` (whose module
#: imports torch; a test keeps the two the same).
DEFAULT_PREFILL_CHUNK = 2048


def add_parallel_arguments(parser: Any) -> None:
    """``--tp`` and ``--ep`` on ``parser`` (an ArgumentParser or one of its argument groups)."""
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (default 1)")
    parser.add_argument("--ep", type=int, default=1, metavar="M", help="expert-parallel ranks (default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and backend")
    model.add_argument("--config", metavar="F", help="dshal config file (default: DSHAL_CONFIG or the built-in defaults)")
    model.add_argument("--backend", metavar="NAME", help="backend to use (default: the config's, usually auto)")
    model.add_argument(
        "--checkpoint", metavar=CHECKPOINT_METAVAR, help=f"{CHECKPOINT_HELP} (default: a tiny random model)"
    )
    model.add_argument("--seed", type=seed, default=0, help="seed of the random weights, prompt and sampling (default 0)")
    model.add_argument("--mla-mode", choices=("absorb", "naive"), default=None, help="KV cache layout (default: absorb)")
    model.add_argument("--dtype", choices=TINY_DTYPE_NAMES, default=None,
                       help="dtype of the built-in tiny model (default float32; bfloat16 runs the kernels a real "
                       "checkpoint does, e.g. on Ascend, whose fused attention takes no float32); a --checkpoint's "
                       "config.json sets its own")

    prompt = parser.add_argument_group("prompt and sampling")
    prompt.add_argument("--prompt-len", type=int, default=None, metavar="N", help="prompt tokens (random ids; default 32)")
    prompt.add_argument(
        "--prompt",
        metavar="TEXT",
        action="append",
        help="prompt with this text instead of random ids, through the --checkpoint's own tokenizer (needs "
        "transformers); prints the generated text, and generation stops at the tokenizer's EOS or an eos_token_id "
        "of the checkpoint's generation_config.json. Repeat it for a batch of prompts of any lengths (each "
        "row decoded at its own positions)",
    )
    prompt.add_argument("--chat", action="store_true", help="with --prompt: send it as one user turn of the "
                        "tokenizer's chat template (as DeepSeek-V3's generate.py does)")
    prompt.add_argument("--prompt-file", metavar="F", help="a --prompt per line of F (blank lines skipped); in a .jsonl "
                        "file each line is a JSON string or an object with a \"prompt\" string (text with newlines)")
    prompt.add_argument("--interactive", action="store_true", help="chat with the --checkpoint on the terminal through "
                        "its tokenizer's chat template, answers printed as they come (as DeepSeek-V3's generate.py "
                        "--interactive); /clear forgets the conversation, /exit or Ctrl-D ends it. No timings")
    prompt.add_argument("--ignore-eos", action="store_true", help="with --prompt or --interactive: always generate "
                        "--new-tokens tokens")
    prompt.add_argument("--trust-remote-code", action="store_true", help="with --prompt: let transformers run the "
                        "tokenizer code --checkpoint ships (e.g. Kimi-K2's); off by default, as in vLLM")
    prompt.add_argument("--new-tokens", type=int, default=32, metavar="N",
                        help="tokens to generate (default 32)")
    prompt.add_argument("--temperature", type=float, default=None, metavar="T", help="sample new tokens from "
                        "softmax(logits / T), seeded by --seed; 0 = greedy (default: with --prompt or --interactive, "
                        "the checkpoint's generation_config.json, as vLLM; else 0)")
    prompt.add_argument("--top-p", type=float, default=None, metavar="P", help="with a temperature: sample from the "
                        "most likely tokens whose probabilities reach P together (default: as --temperature; else 1: all)")
    prompt.add_argument("--top-k", type=int, default=None, metavar="K", help="with a temperature: sample from the K "
                        "most likely tokens only, cut before --top-p and --min-p (default: with --prompt or "
                        "--interactive, the checkpoint's generation_config.json top_k where it sets one; else 0: no cut)")
    prompt.add_argument("--min-p", type=float, default=None, metavar="X", help="with a temperature: drop the tokens "
                        "less than X times as likely as the most likely one (default: with --prompt or --interactive, "
                        "the checkpoint's generation_config.json min_p where it sets one; else 0: no cut)")

    shape = parser.add_argument_group("how it runs")
    shape.add_argument("--batch", type=int, default=None, metavar="N",
                       help="sequences generated together (default 1; with one --prompt, N copies of it; with several "
                       "prompts, at most N at a time, in their order: default all)")
    shape.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="C",
        help=f"prompt tokens per prefill forward: a longer prompt is prefilled in chunks, which bounds its "
        f"activations, as `dshal plan --prefill-chunk` plans them (default {DEFAULT_PREFILL_CHUNK})",
    )
    shape.add_argument(
        "--graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="also time decode steps captured as device graphs (with --interactive: answer through them): auto = "
        "when the backend captures graphs (CUDA/HIP), on = always (without device graphs the static step runs "
        "eagerly), off = never",
    )
    shape.add_argument(
        "--speculative",
        choices=("mtp",),
        default=None,
        help="also time decoding with drafts of the checkpoint's multi-token-prediction layer (DeepSeek-V3's "
        "MTP, config.json num_nextn_predict_layers >= 1; loaded only with this flag), every sequence of the batch "
        "keeping its own drafts: greedy, the tokens are the eager run's; sampled, drawn from the same distribution "
        "(speculative sampling); the report says how many drafts were accepted",
    )
    add_parallel_arguments(shape)  # --tp / --ep (dshal.parallel.run)

    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="F", help="also write the results as JSON to F")
    output.add_argument("--report", metavar="F", help="write a run report to F: provider and calls per op, fallbacks "
                        "and why, precision per layer (also printed as tables)")
    output.add_argument("--no-progress", action="store_true", help="no progress bars (loading, generating)")


def main(args: argparse.Namespace) -> int:
    from dshal.model.run import main as run_model  # lazy: start-up time (dshal run --help loads no torch)

    return run_model(args)


__all__ = ["DEFAULT_PREFILL_CHUNK", "TINY_DTYPE_NAMES", "add_arguments", "add_parallel_arguments", "main"]
