"""The ``dshal.yaml`` config: load, validate (errors carry file:line), environment overrides.

Precedence, lowest first: built-in defaults < the file or dict < environment
(``DSHAL_BACKEND``, ``DSHAL_EMULATE``) < keyword overrides passed to :func:`dshal.use`.
``DSHAL_CONFIG`` names the file used when ``dshal.use()`` gets none.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dshal.cache import cache_dir as cache_dir  # where it was defined: importers keep working
from dshal.cgroups import cgroup_root
from dshal.errors import ArgumentError, ConfigError

DEFAULT_PREFER = ("nvidia", "amd", "ascend", "cpu")
#: The provider that serves an op with its reference implementation (the oracle): what
#: serves a fallback, and a valid ``ops:`` override. It is no backend (``cpu`` is the
#: built-in backend's own implementation), so ``backend:`` and ``prefer:`` refuse it.
REFERENCE_PROVIDER = "reference"
#: What ``Runtime.providers`` names for an op no provider serves (the backend lacks it and
#: ``fallback: error``, or it has no reference to fall back to): its calls raise
#: UnsupportedOpError. No backend may take this name either.
REFUSED_PROVIDER = "none"
#: ``auto`` runs the checkpoint in its own format; ``high`` keeps the checkpoint's high
#: precision (``bf16`` is its older name, still accepted); the others quantize on load.
GEMM_MODES = ("auto", "high", "fp8-block", "fp8-row", "fp8-tensor", "int8", "bf16")
FP8_FORMATS = ("auto", "e4m3fn", "e4m3fnuz")
FALLBACK_MODES = ("warn", "error")
#: default: each op's usual provider; strict: the backend's batch-invariant providers where
#: it has them (``Backend.batch_invariant_ops``), and a warning naming the ops it has none for.
DETERMINISM_MODES = ("default", "strict")
#: Longest ``distributed.timeout_s``: a week. Larger values overflow the timedelta that
#: torch.distributed takes, and no collective should wait that long.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: What a YAML file may make the loader build: nesting depth, and nodes after alias
#: expansion. An alias bomb or a deep nest fails fast with file:line instead of hanging
#: or overflowing the stack; real configs and shape files are far below both.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000
#: Spellings accepted for on/off environment variables.
_ENV_TRUE, _ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class PrecisionConfig:
    """Which linears run in which precision (the model core's precision policy)."""

    #: auto (the checkpoint's own format) | high (its bf16/fp32, alias bf16) | fp8-block
    #: (128x128 weight blocks, 1x128 activations) | fp8-row | fp8-tensor | int8 (W8A8)
    gemm: str = "auto"
    #: auto (the backend's native E4M3) | e4m3fn | e4m3fnuz
    fp8_format: str = "auto"
    #: Module-name globs that always stay in high precision (DeepSeek-V3's checkpoint stores
    #: these unquantized; the last two are the MTP layer's input projection and head).
    keep_high_precision: tuple[str, ...] = ("embed", "lm_head", "*.gate", "*.eh_proj", "*.shared_head.head")
    #: key -> where its value was set (``file:line``, or what set it), for errors raised later.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``precision.<key>`` at the file and line that set it, if any."""
        return located_error(message, self.origins.get(key), f"precision.{key}")


@dataclass(frozen=True)
class DistributedConfig:
    #: Seconds a collective may wait for its peers before raising CommError.
    timeout_s: float = 300.0


@dataclass(frozen=True)
class AttentionConfig:
    """Dynamic attention for the model core: keep only a window of recent keys plus the first tokens."""

    window: int | None = None
    global_tokens: int = 0


@dataclass(frozen=True)
class Config:
    """A validated dshal config. Build it with :func:`load_config`."""

    backend: str = "auto"
    prefer: tuple[str, ...] = DEFAULT_PREFER
    fallback: str = "warn"
    #: op name -> provider (a backend name, or ``reference`` for the op's reference
    #: implementation), overriding the selected backend for that op.
    ops: Mapping[str, str] = field(default_factory=dict)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    emulate: bool = False
    #: ``default`` | ``strict`` (see DETERMINISM_MODES).
    determinism: str = "default"
    #: Where the settings came from (file path, "<dict>", env...), for messages.
    source: str = "<defaults>"
    #: key ("backend", "ops.attention"...) -> where its value was set ("dshal.yaml:3",
    #: "environment variable DSHAL_BACKEND"...), so errors found later can say so.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def origin(self, key: str) -> str:
        """Where ``key``'s value came from, for messages ("the built-in default" if unset)."""
        return self.origins.get(key, "the built-in default")

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key`` at the file and line that set it, if any."""
        return located_error(message, self.origins.get(key), key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "prefer": list(self.prefer),
            "fallback": self.fallback,
            "ops": dict(self.ops),
            "precision": {
                "gemm": self.precision.gemm,
                "fp8_format": self.precision.fp8_format,
                "keep_high_precision": list(self.precision.keep_high_precision),
            },
            "distributed": {"timeout_s": self.distributed.timeout_s},
            "attention": {"window": self.attention.window, "global_tokens": self.attention.global_tokens},
            "emulate": self.emulate,
            "determinism": self.determinism,
        }


# ---------------------------------------------------------------- YAML with line marks


class _Doc:
    """A parsed mapping plus the line of every key path, for file:line errors."""

    def __init__(self, data: Any, lines: dict[tuple[str, ...], int], file: str | None):
        self.data, self.lines, self.file = data, lines, file

    def where(self, path: tuple[str, ...]) -> str:
        """``file:line`` of ``path`` (or just the source name) for messages raised later."""
        line = self.lines.get(path)
        return f"{self.file}:{line}" if self.file and line else (self.file or "<unknown>")

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        line = None
        for n in range(len(path), -1, -1):  # nearest enclosing key with a known line
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        key = ".".join(path).replace(".[", "[") if path else None  # prefer[1], not prefer.[1]
        return ConfigError(f"{key}: {message}" if key else message, file=self.file, line=line, key=key)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a bound on nesting depth (the composer recurses per level)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, file: str, sizes: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded, computed once per shared node; raises
    at the smallest node that crosses :data:`MAX_YAML_NODES` (an alias bomb)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, file, sizes) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, file, sizes) + _expanded_size(v, file, sizes) for k, v in node.value)
    if size > MAX_YAML_NODES:
        raise ConfigError(
            f"invalid YAML: this value expands to {size} nodes through aliases, more than {MAX_YAML_NODES} "
            "(an alias bomb?); write the values out or use fewer nested aliases",
            file=file,
            line=node.start_mark.line + 1,
        )
    sizes[id(node)] = size
    return size


def _compose(text: str, file: str) -> _Doc:
    """Parse ``text`` into a :class:`_Doc`; every failure is a ConfigError with file:line."""
    loader = _BoundedLoader(text)
    try:
        # Constructing can fail too (e.g. an unhashable key), so it stays inside the try.
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, file, {})
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context:  # e.g. "while parsing a flow sequence" that started on an earlier line
            problem += f" ({context}" + (f" started on line {context_mark.line + 1})" if context_mark else ")")
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    except RecursionError:  # a bound above should catch it first; never let it escape raw
        raise ConfigError(f"invalid YAML: nesting too deep (more than {MAX_YAML_DEPTH} levels)", file=file) from None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    if node is None:
        return _Doc({}, lines, file)
    lines[()] = node.start_mark.line + 1
    doc = _Doc(data, lines, file)
    _record_lines(doc, node, ())
    return doc


def read_text_file(path: Any, what: str) -> tuple[Path, str]:
    """``(path, its UTF-8 text)``; each way a file can fail to read gets its own ConfigError
    naming ``what`` and the file (missing, a folder, no permission, a symlink loop or a
    dangling link, bytes that are not UTF-8)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ConfigError(f"{what}: got {path!r} ({type(path).__name__}), expected a file path (str or os.PathLike)")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what}: {os_error_reason(path, err)}", file=str(path)) from None
    try:
        return path, raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{what} is not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column {column} "
            "(save the file as UTF-8)",
            file=str(path),
            line=line,
        ) from None


def read_json_file(path: Any, what: str) -> tuple[Path, Any]:
    """``(path, its JSON value)``: :func:`read_text_file`'s errors, and invalid JSON as a
    ConfigError naming the file and line."""
    path, text = read_text_file(path, what)
    try:
        return path, json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what}: invalid JSON: {err.msg}", file=str(path), line=err.lineno) from None
    except RecursionError:  # json's decoder recurses per level: a file of "[[[[..." exhausts the stack
        raise ConfigError(f"{what}: JSON nested too deeply to read", file=str(path)) from None


def os_error_reason(path: Path, err: OSError) -> str:
    """One clear sentence for why ``path`` could not be opened."""
    if err.errno == errno.ELOOP:
        return "symlink loop (the link points back to itself through other links)"
    if isinstance(err, IsADirectoryError):
        return "it is a directory, expected a file"
    if isinstance(err, NotADirectoryError):
        return "a parent of this path is a file, not a directory"
    if isinstance(err, PermissionError):
        return "permission denied (the file exists but this user may not read it)"
    if isinstance(err, FileNotFoundError):
        if path.is_symlink():
            return f"it is a symlink to {os.readlink(path)!r}, which does not exist"
        return "no such file"
    return err.strerror or str(err)


def _record_lines(doc: _Doc, node: yaml.Node, path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            doc.lines[path + (f"[{index}]",)] = item.start_mark.line + 1
            _record_lines(doc, item, path + (f"[{index}]",))  # keys inside list items (bench shape files)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = path + (str(key_node.value),)
            line, first = key_node.start_mark.line + 1, doc.lines.get(sub)
            doc.lines[sub] = line
            if first is not None:  # safe_load would silently keep the last one
                raise doc.error(sub, f"duplicate key (first set on line {first})")
            _record_lines(doc, value_node, sub)


# ---------------------------------------------------------------- validation

_Check = Callable[[_Doc, tuple[str, ...], Any], Any]


def _choice(*allowed: str) -> _Check:
    def check(doc: _Doc, path: tuple[str, ...], v: Any) -> str:
        if v not in allowed:
            raise doc.error(path, f"got {v!r}, expected one of: {', '.join(allowed)}")
        return v

    return check


def _name(doc: _Doc, path: tuple[str, ...], v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise doc.error(path, f"got {v!r}, expected a backend name (auto, cpu, nvidia, amd, ascend or an installed plugin)")
    if v.strip() == REFERENCE_PROVIDER:
        raise doc.error(path, f"got {v!r}, expected a backend name: {REFERENCE_PROVIDER!r} names the ops' reference "
                              f"implementations, a provider only under ops: (e.g. ops: {{attention: {REFERENCE_PROVIDER}}})")
    return v.strip()


def _provider(doc: _Doc, path: tuple[str, ...], v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise doc.error(path, f"got {v!r}, expected a provider: {REFERENCE_PROVIDER} (the op's reference implementation) "
                              "or a backend name (cpu, nvidia, amd, ascend or an installed plugin)")
    return v.strip()


def _name_list(doc: _Doc, path: tuple[str, ...], v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise doc.error(path, f"got {v!r}, expected a non-empty list of backend names, e.g. [nvidia, amd, ascend, cpu]")
    names = tuple(_name(doc, path + (f"[{i}]",), x) for i, x in enumerate(v))
    if "auto" in names:
        raise doc.error(path + (f"[{names.index('auto')}]",), "got 'auto', expected concrete backend names (auto is not a backend)")
    return names


def _str_list(doc: _Doc, path: tuple[str, ...], v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise doc.error(path, f"got {v!r}, expected a list of name globs, e.g. [embed, lm_head, '*.gate']")
    return tuple(v)


def _bool(doc: _Doc, path: tuple[str, ...], v: Any) -> bool:
    if not isinstance(v, bool):
        raise doc.error(path, f"got {v!r}, expected true or false")
    return v


def _timeout_seconds(doc: _Doc, path: tuple[str, ...], v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= MAX_TIMEOUT_S):
        raise doc.error(path, f"got {v!r}, expected a positive finite number of seconds, at most {MAX_TIMEOUT_S:g} (7 days)")
    return float(v)


def _optional_positive_int(doc: _Doc, path: tuple[str, ...], v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise doc.error(path, f"got {v!r}, expected null or a positive integer (number of keys)")
    return v


def _non_negative_int(doc: _Doc, path: tuple[str, ...], v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise doc.error(path, f"got {v!r}, expected an integer >= 0")
    return v


def _op_map(doc: _Doc, path: tuple[str, ...], v: Any) -> dict[str, str]:
    from dshal.ops.catalogue import SPECS  # lazy: start-up time (reading a config loads no torch; the catalogue does)

    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise doc.error(path, f"got {v!r}, expected a mapping of op name to provider (a backend name or "
                              f"{REFERENCE_PROVIDER}), e.g. {{attention: cpu, moe_gate: {REFERENCE_PROVIDER}}}")
    out = {}
    for op, provider in v.items():
        if op not in SPECS:
            raise doc.error(path + (str(op),), f"unknown op, expected one of: {', '.join(sorted(SPECS))}")
        out[op] = _provider(doc, path + (str(op),), provider)
        if out[op] == REFERENCE_PROVIDER and not SPECS[op].has_reference:
            raise doc.error(path + (str(op),), f"got {REFERENCE_PROVIDER!r}, but op {op!r} has no reference implementation yet")
    return out


_SECTIONS: dict[str, dict[str, _Check]] = {
    "precision": {
        "gemm": _choice(*GEMM_MODES),
        "fp8_format": _choice(*FP8_FORMATS),
        "keep_high_precision": _str_list,
    },
    "distributed": {"timeout_s": _timeout_seconds},
    "attention": {"window": _optional_positive_int, "global_tokens": _non_negative_int},
}
_TOP: dict[str, _Check] = {
    "backend": _name,
    "prefer": _name_list,
    "fallback": _choice(*FALLBACK_MODES),
    "ops": _op_map,
    "emulate": _bool,
    "determinism": _choice(*DETERMINISM_MODES),
}
_SECTION_TYPES = {"precision": PrecisionConfig, "distributed": DistributedConfig, "attention": AttentionConfig}


def _apply(base: Config, doc: _Doc) -> Config:
    data = doc.data
    if data is None:
        return base
    if not isinstance(data, Mapping):
        raise doc.error((), f"the config must be a mapping of keys, got {type(data).__name__}")
    allowed = sorted([*_TOP, *_SECTIONS])
    changes: dict[str, Any] = {}
    origins = dict(base.origins)
    for key, value in data.items():
        path = (str(key),)
        if not isinstance(key, str):
            raise doc.error(path, f"key {key!r} is a {type(key).__name__}, expected one of: {', '.join(allowed)}")
        if key in _TOP:
            changes[key] = _TOP[key](doc, path, value)
            origins[key] = doc.where(path)
            if key == "ops":  # merged op by op, as the sections are: a keyword override keeps the file's others
                origins.update({f"ops.{op}": doc.where(path + (op,)) for op in changes[key]})
                changes[key] = {**base.ops, **changes[key]}
        elif key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise doc.error(path, f"got {value!r}, expected a mapping with keys: {', '.join(_SECTIONS[key])}")
            section = getattr(base, key)
            sub = {}
            for sub_key, sub_value in value.items():
                if sub_key not in _SECTIONS[key]:
                    raise doc.error(
                        path + (str(sub_key),), f"unknown key, expected one of: {', '.join(_SECTIONS[key])}"
                    )
                sub[sub_key] = _SECTIONS[key][sub_key](doc, path + (str(sub_key),), sub_value)
            where = {sub_key: doc.where(path + (str(sub_key),)) for sub_key in sub}
            origins.update({f"{key}.{sub_key}": at for sub_key, at in where.items()})
            if hasattr(section, "origins"):  # errors raised after loading name the file and line
                sub["origins"] = {**section.origins, **where}
            changes[key] = replace(section, **sub)
        else:
            raise doc.error(path, f"unknown key {key!r}, expected one of: {', '.join(allowed)}")
    attention = changes.get("attention", base.attention)
    if attention.window is not None and attention.global_tokens >= attention.window:
        raise doc.error(
            ("attention", "global_tokens"),
            f"got {attention.global_tokens}, expected fewer than attention.window ({attention.window})",
        )
    if attention.window is None and attention.global_tokens:
        raise doc.error(
            ("attention", "global_tokens"),
            f"got {attention.global_tokens}, expected 0 without attention.window (global tokens are the "
            "leading tokens a window keeps; with no window every token is kept)",
        )
    return replace(base, **changes, source=doc.file or base.source, origins=origins)


def located_error(message: str, origin: str | None, key: str) -> ConfigError:
    """A ConfigError about ``key`` whose value came from ``origin`` (``file:line`` as
    :meth:`Config.origin` gives it): the error then carries that file and line."""
    file, _, line = (origin or "").rpartition(":")
    if file and line.isdigit():
        return ConfigError(message, file=file, line=int(line), key=key)
    return ConfigError(message, key=key)


def precision_config(value: Any, where: str = "argument 'precision'") -> PrecisionConfig:
    """``value`` as a :class:`PrecisionConfig`: one already, a mapping with the keys of a config
    file's ``precision`` section (``{"gemm": "fp8-block"}``, checked as the file's are), or a
    gemm mode name (``"fp8-block"``). ArgumentError for anything else."""
    if isinstance(value, PrecisionConfig):
        return value
    if isinstance(value, str):
        value = {"gemm": value}
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{where}: got {type(value).__name__}, expected a PrecisionConfig, a mapping such as "
                            "{'gemm': 'fp8-block'} (a config's precision section) or a gemm mode name")
    return _apply(Config(), _Doc({"precision": dict(value)}, {}, where)).precision


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable (1/0, true/false, yes/no, on/off; unset or empty:
    ``default``); any other value is a ConfigError naming the variable."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in _ENV_TRUE + _ENV_FALSE:
        raise ConfigError(f"environment variable {name}: got {raw!r}, expected 1 or 0 (true/false, yes/no, on/off)")
    return raw in _ENV_TRUE


def env_number(name: str, default: float, low: float, high: float, *, low_inclusive: bool = False) -> float:
    """A number from environment variable ``name`` in ``(low, high]`` (``[low, high]`` with
    ``low_inclusive``; unset or empty: ``default``); anything else is a ConfigError naming the
    variable, the value and the range."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not ((low <= value if low_inclusive else low < value) and value <= high):
        bracket = "[" if low_inclusive else "("
        raise ConfigError(f"environment variable {name}: got {raw!r}, expected a number in {bracket}{low:g}, {high:g}]")
    return value


def dequant_cache_gib(default: float) -> float:
    """``DSHAL_CPU_DEQUANT_CACHE_GIB``: GiB of float32 copies of FP8 weights the cpu backend
    may keep for prefill (0 = none; unset: ``default``)."""
    return env_number("DSHAL_CPU_DEQUANT_CACHE_GIB", default, 0, 1e6, low_inclusive=True)


def emulate_from_env() -> bool | None:
    """``DSHAL_EMULATE`` (the one place it is read): None when unset or empty, else its
    on/off value (a ConfigError naming the variable for anything else)."""
    return env_flag("DSHAL_EMULATE", False) if os.environ.get("DSHAL_EMULATE", "").strip() else None


def _env_overrides(config: Config) -> Config:
    if os.environ.get("DSHAL_BACKEND"):
        config = _apply(config, _Doc({"backend": os.environ["DSHAL_BACKEND"]}, {}, "environment variable DSHAL_BACKEND"))
    emulate = emulate_from_env()
    if emulate is not None:
        config = _apply(config, _Doc({"emulate": emulate}, {}, "environment variable DSHAL_EMULATE"))
    env_flag("DSHAL_CPU_KERNELS", True)  # read by the cpu backend; a typo must not pass unseen
    dequant_cache_gib(0.0)  # likewise
    cgroup_root()  # likewise (DSHAL_CGROUP_ROOT: read by the host memory and CPU facts)
    return config


def read_yaml(path: Any, what: str) -> _Doc:
    """Read and parse a YAML file (``what`` names it in messages: "config file", "shapes
    file") with the bounds above; every failure is a ConfigError with file[:line]."""
    path, text = read_text_file(path, what)
    return _compose(text, str(path))


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | Config | None = None,
    *,
    overrides_source: str = "<keyword arguments>",
    **overrides: Any,
) -> Config:
    """Build a validated :class:`Config`.

    ``source`` is a YAML path, a dict, a Config, or None (``DSHAL_CONFIG`` if set, else
    defaults). Environment overrides apply next, then ``overrides`` (same keys as the
    file; sections as dicts are merged key by key). ``overrides_source`` is what messages
    say set them (a command passes its flag, e.g. ``"--backend"``).
    """
    config = Config()
    if source is None and os.environ.get("DSHAL_CONFIG"):
        source = os.environ["DSHAL_CONFIG"]
    if isinstance(source, Config):
        config = source
    elif isinstance(source, Mapping):
        config = _apply(config, _Doc(dict(source), {}, "<dict>"))
    elif source is not None:
        if not isinstance(source, (str, os.PathLike)):
            raise ConfigError(
                f"config: got {source!r} ({type(source).__name__}), expected a YAML file path, "
                "a dict, a dshal.Config or None"
            )
        path, text = read_text_file(source, "config file")
        config = _apply(config, _compose(text, str(path)))
    primary = config.source  # messages about file-level settings keep naming the file
    config = _env_overrides(config)
    if overrides:
        config = _apply(config, _Doc(overrides, {}, overrides_source))
    return replace(config, source=primary)


__all__ = [
    "read_json_file",
    "Config",
    "PrecisionConfig",
    "DistributedConfig",
    "AttentionConfig",
    "load_config",
    "read_yaml",
    "read_text_file",
    "os_error_reason",
    "env_flag",
    "GEMM_MODES",
    "FP8_FORMATS",
    "FALLBACK_MODES",
    "DETERMINISM_MODES",
    "DEFAULT_PREFER",
]

