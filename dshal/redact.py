"""What a report file may say about the machine that wrote it.

Reports, bundles and matrices are shared: a vendor sends its conformance bundle to others, CI
keeps them as artifacts, a matrix becomes a PR comment. Their fields are chosen (device,
versions; never the environment, the host name or the user name), but free text gets in: a
crash's message, a checkpoint path, a plugin's reason. Before such a file is written,
:func:`shareable` replaces in every string of it

- the value of each environment variable whose name says it holds a secret (``HF_TOKEN``,
  ``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD``...; values of 8 characters or more) with
  ``[redacted NAME]``;
- a password in a URL (``https://user:pw@host``), a ``token=`` / ``key=`` / ``password=`` query
  value, a ``Bearer`` credential and the shapes of well-known tokens (``hf_...``, ``ghp_...``,
  ``AKIA...``) with ``***``;
- the user's home folder with ``~``.

:func:`code_path` names a source file as its module is imported (``dshal_nvidia/backend.py``),
not where this machine keeps it.
"""

from __future__ import annotations

import html
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

#: Environment variable names whose values are secrets.
SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW(?:OR)?D|PASSPHRASE|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|(?:^|_)KEY(?:_|$)|AUTH(?!OR)"
    r"|COOKIE|SESSION",  # AUTH, not AUTHOR: GIT_AUTHOR_NAME holds a name, not a secret
    re.IGNORECASE,
)
#: Shorter values are left alone: ``FOO_TOKEN=1`` would otherwise blank every "1".
MIN_SECRET_CHARS = 8
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+(@)")
_QUERY_SECRET = re.compile(r"([?&;](?:[\w-]*token|[\w-]*key|password|passwd|secret|sig|signature)=)[^&#\s\"'<>]+",
                           re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}")
#: Hugging Face, GitHub, AWS access key id, Slack, OpenAI-style keys.
_TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_])(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|AKIA[0-9A-Z]{16}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|sk-[A-Za-z0-9_-]{20,})"
)


def secret_values(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """``(value, name)`` of each environment variable whose name says it is a secret, longest
    value first (a value inside another is then replaced after it)."""
    environ = os.environ if environ is None else environ
    found = {(v, k) for k, v in environ.items() if SECRET_NAME.search(k) and len(v.strip()) >= MIN_SECRET_CHARS}
    return sorted(found, key=lambda pair: (-len(pair[0]), pair[1]))


def home_folders(environ: Mapping[str, str] | None = None) -> list[str]:
    """This user's home folder(s): ``$HOME`` and the passwd entry's, where absolute and not ``/``."""
    environ = os.environ if environ is None else environ
    found = [environ.get("HOME", "")]
    try:
        import pwd

        found.append(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError, AttributeError):  # Windows; a uid with no passwd entry
        pass
    out = []
    for home in found:
        home = home.rstrip("/\\")
        if home and os.path.isabs(home) and home not in out:
            out.append(home)
    return sorted(out, key=len, reverse=True)


class Redactor:
    """:meth:`text` / :meth:`tree` with the secrets and home folders of ``environ`` (default: this process's)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.secrets = [(spelling, f"[redacted {name}]") for value, name in secret_values(environ)
                        for spelling in dict.fromkeys((value, html.escape(value)))]
        # At a path's start only: HOME=/root is not the "/root" of /data/root/ckpt or /proc/1/root
        self.homes = [re.compile(r"(?<![\w.~+@-])" + re.escape(home) + r"(?=[/\\]|$|[^\w.-])")
                      for home in home_folders(environ)]

    def text(self, text: str) -> str:
        for value, label in self.secrets:
            if value in text:
                text = text.replace(value, label)
        text = _URL_PASSWORD.sub(r"\1***\2", text)
        text = _QUERY_SECRET.sub(r"\1***", text)
        text = _BEARER.sub(r"\1 ***", text)
        text = _TOKEN_SHAPES.sub("***", text)
        for home in self.homes:
            text = home.sub("~", text)
        return text

    def tree(self, value: Any) -> Any:
        """``value`` with :meth:`text` applied to every string in it (dict keys too), a copy;
        other values are kept as they are."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.tree(k): self.tree(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.tree(v) for v in value]
        return value


def shareable(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """``value`` (a report: dicts, lists, strings, numbers) with no secret and no home folder in its strings."""
    return Redactor(environ).tree(value)


def shareable_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` (a rendered HTML or Markdown page) with no secret and no home folder in it."""
    return Redactor(environ).text(text)


def code_path(filename: str) -> str:
    """A source file's path as its module is imported: relative to the deepest ``sys.path``
    folder holding it (``dshal_nvidia/backend.py``, whether it lives in a venv's site-packages
    or a checkout), else with the home folder as ``~``. A report that names the file a crash
    came from then reads the same on every machine and names no one's folders."""
    path = os.path.abspath(filename) if filename and not filename.startswith("<") else filename
    best = ""
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir)
        if root != os.path.dirname(root) and path.startswith(root + os.sep) and len(root) > len(best):
            best = root
    return path[len(best) + 1:] if best else shareable_text(filename)


__all__ = ["SECRET_NAME", "Redactor", "code_path", "home_folders", "secret_values", "shareable", "shareable_text"]
