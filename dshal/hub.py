"""A checkpoint named by its Hugging Face Hub id, as vLLM's ``--model`` takes one
(``deepseek-ai/DeepSeek-V3``, or ``deepseek-ai/DeepSeek-V3@<branch, tag or commit>``), found in
the local Hugging Face cache.

dshal never downloads: DeepSeek-V3's weights are about 700 GB, a download a user starts on
purpose (``hf download <id>``), not one a typo starts. The cache is the one huggingface_hub
uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read through
huggingface_hub itself (an optional dependency; transformers installs it), imported only when
an id is met. A path that exists always wins over an id; a string not shaped as an id is a
path, and is said to be missing as any path is.

:func:`resolve_checkpoint` is the one place that does this: every command's ``--checkpoint``
and the Python API's checkpoint paths go through it (``dshal.model.args.checkpoint_config_path``
calls it, and the loader, the tokenizer and ``dshal-ascend-convert`` read the folder it gives).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from dshal.errors import ConfigError

log = logging.getLogger(__name__)

#: One part of ``org/name`` as the Hub spells it: letters, digits, ``_``, ``.`` and ``-``, at
#: most 96, starting and ending with a letter or digit (huggingface_hub's validate_repo_id).
_ID_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")
#: Names that are files, not models: ``ckpt/config.json`` is a missing path, not an id.
_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".safetensors", ".git")
#: The ``--checkpoint`` help of every command that takes one (each adds its default).
CHECKPOINT_HELP = (
    "Hugging Face DeepSeek-V3 checkpoint: its folder, or its model id (org/name, org/name@REVISION) "
    "already in the local Hugging Face cache, never downloaded (`hf download ID` fetches one); a folder "
    "of that name wins"
)
CHECKPOINT_METAVAR = "DIR|ID"
#: What a checkpoint of DeepSeek-V3's size weighs, said where dshal refuses to download one.
_DOWNLOAD_SIZE = "a DeepSeek-V3 checkpoint is about 700 GB"


def parse_hub_id(text: Any) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` for a string shaped as a Hub model id, ``org/name`` or
    ``org/name@revision``; None for anything else (a path: absolute, ``./x``, three parts...).
    Only a ``str`` can be an id: a ``Path`` is a path."""
    if not isinstance(text, str):
        return None
    repo, at, revision = text.partition("@")
    if at and (not revision or revision != revision.strip() or any(c.isspace() for c in revision)):
        return None
    parts = repo.split("/")
    if len(parts) != 2 or not all(_ID_PART.fullmatch(part) for part in parts):
        return None
    if "--" in repo or ".." in repo or repo.lower().endswith(_FILE_SUFFIXES):
        return None
    return repo, revision or None


def resolve_checkpoint(path: str | os.PathLike[str], argument: str = "checkpoint") -> str | os.PathLike[str]:
    """The folder ``path`` names. A path that exists (or that cannot be looked at: the caller
    says why), and anything not shaped as a Hub id, is given back as it came. A missing
    ``org/name[@revision]`` is looked up in the local Hugging Face cache, never downloaded:
    its snapshot folder, or a :class:`~dshal.ConfigError` naming ``argument`` (a flag such
    as ``--checkpoint``), the cache looked in and the command that fetches it."""
    hub_id = parse_hub_id(path)
    if hub_id is None:
        return path
    try:
        os.lstat(path)
        return path  # it exists: a folder named like an id wins
    except FileNotFoundError:
        pass
    except OSError:
        return path  # unreadable, a parent that is a file...: the caller's own error says which
    repo, revision = hub_id
    said = f"{argument} {path!r}"
    try:
        # an optional dependency (transformers installs it), and ~0.3 s: only for an id
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise ConfigError(
            f"{said}: no such folder, and read as a Hugging Face model id it needs the huggingface_hub package to "
            f"find it in the local Hugging Face cache ({err}): pip install huggingface_hub, or pass the checkpoint's "
            "folder"
        ) from None
    cache = constants.HF_HUB_CACHE
    fetch = f"`hf download {repo}" + (f" --revision {revision}`" if revision else "`")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as err:
        snapshot = getattr(err, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub >= 1.x)
        if snapshot is not None:
            missing = re.search(r"\d+ file\(s\) (?:are|is) missing(?: \([^)]*\))?", str(err))
            raise ConfigError(
                f"{said}: the local Hugging Face cache holds an incomplete download of it ({snapshot}: "
                f"{missing.group(0) if missing else 'files are missing'}); dshal never downloads "
                f"({_DOWNLOAD_SIZE}): finish it with {fetch}"
            ) from None
        which = f"revision {revision!r} of it" if revision else "it"
        raise ConfigError(
            f"{said}: neither a folder nor a model in the local Hugging Face cache (looked for {which} in {cache}; "
            f"HF_HUB_CACHE or HF_HOME move the cache); dshal never downloads ({_DOWNLOAD_SIZE}): fetch it with "
            f"{fetch}, or pass the checkpoint's folder"
        ) from None
    except ValueError:  # huggingface_hub's own id rules refuse it (HFValidationError): a path after all
        return path
    log.info("%s: the local Hugging Face cache's snapshot %s", said, folder)
    return Path(folder)


def hub_provenance(given: Any, folder: str | os.PathLike[str]) -> dict[str, str | None] | None:
    """Where a checkpoint given as a Hub id came from, for a report to say beside its folder
    (which names neither the id nor the revision asked for): ``{"id": "org/name", "revision":
    the one asked for (None: the default branch), "commit": the snapshot's, its folder's name
    under ``snapshots/``}``. None where ``given`` named the folder itself (a path, or a folder
    named like an id); ``folder`` is what :func:`resolve_checkpoint` (or
    ``checkpoint_folder``) made of ``given``."""
    hub_id = parse_hub_id(given)
    folder = Path(folder)
    if hub_id is None or folder == Path(given) or folder.parent.name != "snapshots":
        return None
    repo, revision = hub_id
    return {"id": repo, "revision": revision, "commit": folder.name}


def hub_provenance_text(provenance: dict[str, str | None]) -> str:
    """:func:`hub_provenance` in a line: ``org/name@v1, commit 0123...``."""
    revision = f"@{provenance['revision']}" if provenance["revision"] else ""
    return f"{provenance['id']}{revision}, commit {provenance['commit']}"


__all__ = ["CHECKPOINT_HELP", "CHECKPOINT_METAVAR", "hub_provenance", "hub_provenance_text", "parse_hub_id",
           "resolve_checkpoint"]
