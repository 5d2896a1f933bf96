"""Text in and out of the model core: a checkpoint's own tokenizer, read with transformers'
``AutoTokenizer`` from the checkpoint folder (``tokenizer.json`` + ``tokenizer_config.json``,
as DeepSeek-V3 ships them; nothing is downloaded). ``dshal run --prompt`` uses it.

The model core itself takes and returns token ids; this module is the only place that
knows about text, so a backend never sees it."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from dshal.config import read_json_file
from dshal.errors import ArgumentError, CheckpointError, ConfigError, DshalError
from dshal.hub import resolve_checkpoint
from dshal.model.args import SPARSE_MODEL_TYPE

#: The files a Hugging Face tokenizer is read from; one of them must be in the checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(checkpoint: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with ``checkpoint`` (a folder), read locally. CheckpointError when
    the folder holds none of :data:`TOKENIZER_FILES` or transformers cannot read them;
    ArgumentError when transformers is not installed. ``trust_remote_code``: let transformers
    import the tokenizer code the checkpoint ships (Kimi-K2's); off, it is refused, never
    asked about on the terminal. A Hugging Face model id reads the local cache's snapshot
    (:func:`dshal.hub.resolve_checkpoint`), never the network."""
    folder = Path(resolve_checkpoint(checkpoint))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer, expected one of {', '.join(TOKENIZER_FILES)} beside config.json "
            "(copy them from the model's release to prompt it with text)"
        )
    try:
        from transformers import AutoTokenizer  # an optional dependency, and seconds to import: only for text
    except ImportError as err:
        raise ArgumentError(
            f"a text prompt needs the transformers package to read {folder}'s tokenizer ({err}): pip install transformers"
        ) from None
    shipped_code = CheckpointError(
        f"{folder}: its tokenizer is code the checkpoint ships (tokenizer_config.json's auto_map), which dshal "
        "does not run unless asked: read it, then pass --trust-remote-code (trust_remote_code=True)"
    )
    tokenizer_config = _json_object(folder / "tokenizer_config.json")
    shipped = "AutoTokenizer" in (tokenizer_config.get("auto_map") or {})
    if shipped and not trust_remote_code and not _transformers_has(tokenizer_config.get("tokenizer_class")):
        raise shipped_code  # (a tokenizer_class transformers has is loaded as that class, the code left alone)
    extra: dict[str, Any] = {}
    if not trust_remote_code and not _known_model_type(folder):
        # transformers reads config.json only to pick a tokenizer class; for a model type it does not
        # know (Kimi-K2's kimi_k2) it then offers to run the config's code, or fails on its rope_scaling
        extra["config"] = _empty_config()
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code,
                                             **extra)
    except Exception as err:  # noqa: BLE001 - the checkpoint's files (or its shipped code) failed: say whose
        text = " ".join(str(err).split())
        if "trust_remote_code" in text and not trust_remote_code:
            raise shipped_code from None
        raise CheckpointError(f"{folder}: cannot read its tokenizer: {type(err).__name__}: {text}") from None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing or not an object (transformers then says what is wrong)."""
    try:
        _, data = read_json_file(path, path.name)
    except DshalError:
        return {}
    return data if isinstance(data, dict) else {}


def _transformers_has(class_name: Any) -> bool:
    """transformers itself has a class of this name (a checkpoint's ``tokenizer_class``)."""
    import transformers  # lazy: transformers is optional

    return isinstance(class_name, str) and class_name.isidentifier() and hasattr(transformers, class_name)


def _known_model_type(folder: Path) -> bool:
    """config.json names a model type the installed transformers knows (or has none to read)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # lazy: transformers is optional

    model_type = _json_object(folder / "config.json").get("model_type")
    return not isinstance(model_type, str) or model_type in CONFIG_MAPPING_NAMES


def _empty_config() -> Any:
    import transformers  # lazy: transformers is optional

    return (getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig)()


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """``text`` as token ids: as one user turn of the tokenizer's chat template (``chat``;
    what DeepSeek-V3's ``generate.py`` sends), else as plain text with the tokenizer's own
    special tokens (DeepSeek-V3's adds its BOS). Refuses an empty prompt."""
    ids = encode_chat(tokenizer, [{"role": "user", "content": text}]) if chat else tokenizer(text)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise ArgumentError(f"--prompt: {text!r} is no tokens, expected at least one")
    return ids


def check_chat_template(tokenizer: Any, flag: str = "--chat") -> None:
    """ArgumentError naming ``flag`` when ``tokenizer`` has no chat template; for a DeepSeek-V3.2
    checkpoint (which ships a Python encoder instead of one) it says how to prompt it."""
    if getattr(tokenizer, "chat_template", None):
        return
    hint = ""
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and _json_object(Path(folder) / "config.json").get("model_type") == SPARSE_MODEL_TYPE:
        hint = (": DeepSeek-V3.2 releases ship no Jinja chat template but a Python encoder (their encoding "
                "folder); build the conversation's text with it and pass that as --prompt without --chat, or add "
                "a chat_template to tokenizer_config.json")
    raise ArgumentError(f"{flag}: the checkpoint's tokenizer has no chat_template (tokenizer_config.json){hint}")


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation (``[{"role": "user" | "assistant", "content": text}, ...]``) as token ids
    through the tokenizer's chat template, ending with the assistant's turn to answer."""
    check_chat_template(tokenizer)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class TextStream:
    """Text of token ids that come one at a time: :meth:`push` returns what the new id adds
    to the decoded text (special tokens skipped). Ids are decoded together, since one
    character can span several byte-level tokens; text that ends in an incomplete character
    (U+FFFD) is held back until the next id completes it, and :meth:`flush` returns the rest."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._shown = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        return self._new(text)

    def flush(self) -> str:
        return self._new(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _new(self, text: str) -> str:
        new, self._shown = text[self._shown :], max(self._shown, len(text))
        return new


#: Where a checkpoint states its generation defaults, the stop ids among them.
GENERATION_CONFIG = "generation_config.json"


def generation_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` ({} when it has none); CheckpointError when
    it is not a JSON object."""
    path = Path(resolve_checkpoint(checkpoint)) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        _, settings = read_json_file(path, "generation config")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: not a JSON object of generation settings (a {type(settings).__name__})")
    return settings


def stop_ids(tokenizer: Any, checkpoint: str | os.PathLike) -> list[int]:
    """The ids that end a generation: the tokenizer's EOS, and the ``eos_token_id`` (an id or
    a list) of the checkpoint's ``generation_config.json`` where it has one, as transformers
    and vLLM stop. A chat model's end-of-turn token is often only there, apart from the
    tokenizer's EOS."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    declared = generation_config(checkpoint).get("eos_token_id")
    for value in declared if isinstance(declared, list) else [declared]:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"{Path(checkpoint) / GENERATION_CONFIG}: eos_token_id holds {value!r}, expected token ids (ints >= 0)"
            )
        if value not in ids:
            ids.append(value)
    return ids


def sampling_defaults(checkpoint: str | os.PathLike) -> dict[str, float]:
    """The sampling the checkpoint's ``generation_config.json`` asks for: its ``temperature``,
    ``top_p``, ``top_k`` (> 1, an int) and ``min_p`` (> 0) where it gives them (DeepSeek-V3's:
    temperature 0.6 and top_p 0.95), as vLLM applies them to a request that sets none;
    temperature 1.0 where it says ``do_sample: true`` without one (transformers' and vLLM's
    default); ``{"temperature": 0.0}`` (greedy) where it says ``do_sample: false`` (as
    transformers reads it) or ``top_k: 1`` (one candidate); {} where it says nothing. A
    ``top_k`` of 0 or ``min_p`` of 0 cuts nothing, as when absent (vLLM's rule: an absent
    ``top_k`` is not transformers' default of 50)."""
    settings = generation_config(checkpoint)
    if settings.get("do_sample") is False:
        return {"temperature": 0.0}
    found = _sampling_keys(checkpoint, settings)
    top_k = found.pop("top_k", 0)
    if top_k == 1:
        return {"temperature": 0.0}
    if top_k > 1:
        found["top_k"] = int(top_k)
    if found.get("min_p") == 0:
        del found["min_p"]
    if settings.get("do_sample") is True:
        found.setdefault("temperature", 1.0)
    return found


def _sampling_keys(checkpoint: str | os.PathLike, settings: dict[str, Any]) -> dict[str, float]:
    """The sampling numbers in ``settings`` (generation_config.json), checked."""
    found: dict[str, float] = {}
    for key, valid, expected in (("temperature", lambda v: v >= 0, "a number >= 0"),
                                 ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
                                 ("top_k", lambda v: v >= 0 and v == int(v), "an int >= 0"),
                                 ("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")):
        value = settings.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 2**63  # before isfinite:
                or not math.isfinite(value) or not valid(value)):  # it overflows on a huge int
            raise CheckpointError(f"{Path(checkpoint) / GENERATION_CONFIG}: {key} is {value!r}, expected {expected}")
        found[key] = float(value)
    return found


def check_vocabulary(tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer's ids must index the model's embedding: a tokenizer from another model is
    refused here rather than as an out-of-range id in the embedding."""
    size = len(tokenizer)
    if size > vocab_size:
        raise CheckpointError(
            f"the checkpoint's tokenizer has {size} tokens, expected at most the model's vocab_size ({vocab_size}): "
            "is it another model's tokenizer?"
        )


__all__ = [
    "GENERATION_CONFIG",
    "TOKENIZER_FILES",
    "TextStream",
    "check_chat_template",
    "check_vocabulary",
    "encode_chat",
    "encode_prompt",
    "generation_config",
    "load_tokenizer",
    "sampling_defaults",
    "stop_ids",
]
