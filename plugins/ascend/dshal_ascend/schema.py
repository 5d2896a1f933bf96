"""torch_npu op schemas (the ATen function-schema strings of op-plugin's yaml) as data.

Parsed into :class:`Schema` so that (1) the op table can read what a release's kernel
accepts (does ``npu_rotary_mul`` take ``rotary_mode``? is ``group_list`` a Tensor?) and
(2) the signature-checking stand-in of the tests can bind a call site's arguments the way
the torch_npu Python binding would: a wrong keyword, a missing argument, a wrong arity or
a value of the wrong kind is a :class:`SignatureError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

#: Where the per-release signature files live (written by ``tools/extract_op_signatures.py``).
SIGNATURE_DIR = Path(__file__).with_name("op_signatures")


class SignatureError(TypeError):
    """A call does not bind to any overload of a torch_npu op's schema."""


@dataclass(frozen=True)
class Param:
    """One schema argument: ``int? group_type=None`` -> name, type ``int?``, default ``None``."""

    name: str
    type: str
    default: str | None
    keyword_only: bool

    @property
    def required(self) -> bool:
        return self.default is None and not self.type.endswith("?")


@dataclass(frozen=True)
class Schema:
    """``name.overload(params) -> returns``."""

    name: str
    overload: str
    params: tuple[Param, ...]
    returns: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Schema:
        match = re.fullmatch(r"\s*([\w]+)(?:\.(\w+))?\((.*)\)\s*->\s*(.+?)\s*", text)
        if match is None:
            raise ValueError(f"not a function schema: {text!r}")
        name, overload, arg_text, ret_text = match.groups()
        params: list[Param] = []
        keyword_only = False
        for part in _split_top(arg_text):
            if part == "*":
                keyword_only = True
                continue
            decl, _, default = part.partition("=")
            type_, _, pname = decl.strip().rpartition(" ")
            params.append(Param(pname, _strip_alias(type_), default.strip() or None if default else None, keyword_only))
        ret_text = ret_text.strip()
        if ret_text.startswith("("):
            returns = tuple(_strip_alias(r.strip().split(" ")[0]) for r in _split_top(ret_text[1:-1]))
        else:
            returns = (_strip_alias(ret_text.split(" ")[0]),)
        return cls(name, overload or "", tuple(params), returns, " ".join(text.split()))

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name (defaults filled in), or SignatureError saying why not."""
        positional = [p for p in self.params if not p.keyword_only]
        if len(args) > len(positional):
            raise SignatureError(f"{self.text}: takes {len(positional)} positional arguments, {len(args)} given")
        bound: dict[str, Any] = {p.name: v for p, v in zip(positional, args)}
        for key, value in kwargs.items():
            if self.param(key) is None:
                raise SignatureError(f"{self.text}: unexpected keyword argument {key!r}")
            if key in bound:
                raise SignatureError(f"{self.text}: argument {key!r} given twice")
            bound[key] = value
        for p in self.params:
            if p.name not in bound:
                if p.required:
                    raise SignatureError(f"{self.text}: missing required argument {p.name!r}")
                bound[p.name] = None if p.default in (None, "None") else _literal(p.default)
            elif not value_fits(p.type, bound[p.name]):
                raise SignatureError(
                    f"{self.text}: argument {p.name!r} expects {p.type}, got {_describe(bound[p.name])}"
                )
        return bound

    def returns_fit(self, result: Any) -> bool:
        """Whether ``result`` has the schema's return arity and kinds."""
        values = result if len(self.returns) > 1 else (result,)
        if len(self.returns) > 1 and (not isinstance(result, tuple) or len(result) != len(self.returns)):
            return False
        return all(value_fits(t, v) for t, v in zip(self.returns, values))


def _strip_alias(type_: str) -> str:
    return re.sub(r"\([a-z]!?\)", "", type_)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``int[2] a=[1, 1]`` stays whole)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _literal(text: str) -> Any:
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    if text[:1] in "'\"":
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor({value.dtype}, {list(value.shape)})"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"{type(value).__name__}[{shown}]"
    return f"{type(value).__name__} {value!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_or_dtype(v: Any) -> bool:
    # torch.ops' argument conversion takes a torch.dtype for an ``int`` as its ScalarType number
    # (bfloat16 -> 15): op-plugin 26.x declares output_dtype / dst_type ``int?`` and its docs pass
    # torch.bfloat16 there. (``SymInt`` and list elements stay plain ints.)
    return _is_int(v) or isinstance(v, torch.dtype)


_SCALARS = {
    "Tensor": lambda v: isinstance(v, torch.Tensor),
    "int": _is_int_or_dtype,
    "SymInt": _is_int,
    "float": lambda v: isinstance(v, float) or _is_int(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ScalarType": lambda v: isinstance(v, torch.dtype),
    "Scalar": lambda v: isinstance(v, (int, float, bool)),
}


def value_fits(type_: str, value: Any) -> bool:
    """Whether a Python value is accepted for a schema type (``Tensor?``, ``int[]``, ``Tensor[]?``...)."""
    if type_.endswith("?"):
        return value is None or value_fits(type_[:-1], value)
    list_match = re.fullmatch(r"(\w+)\[(\d*)\]", type_)
    if list_match:
        elem = _is_int if list_match.group(1) == "int" else _SCALARS[list_match.group(1)]
        return isinstance(value, (list, tuple)) and all(elem(v) for v in value)
    return _SCALARS[type_](value)


@dataclass(frozen=True)
class ReleaseSignatures:
    """The recorded schemas of one torch_npu release: op name -> overloads, plus sources."""

    release: str
    ops: dict[str, tuple[Schema, ...]]
    sources: dict[str, dict[str, Any]]

    def has(self, op: str) -> bool:
        return op in self.ops

    def accepts(self, op: str, param: str, type_prefix: str = "") -> bool:
        """Whether some overload of ``op`` has argument ``param`` (of a type starting with ``type_prefix``)."""
        return any(
            (p := s.param(param)) is not None and p.type.startswith(type_prefix) for s in self.ops.get(op, ())
        )


def signatures_from_texts(release: str, texts: dict[str, list[str]], sources: dict | None = None) -> ReleaseSignatures:
    ops = {op: tuple(Schema.parse(t) for t in ts) for op, ts in texts.items()}
    return ReleaseSignatures(release, ops, sources or {})


@cache
def recorded_signatures(release: str) -> ReleaseSignatures:
    """The schemas recorded for ``release`` (``op_signatures/<release>.json``)."""
    data = json.loads((SIGNATURE_DIR / f"{release}.json").read_text())
    return signatures_from_texts(data["release"], data["ops"], data["sources"])


def recorded_releases() -> tuple[str, ...]:
    """Every release with recorded signatures, oldest first."""
    names = [p.stem for p in SIGNATURE_DIR.glob("*.json")]
    return tuple(sorted(names, key=lambda r: tuple(int(x) for x in r.split("."))))
