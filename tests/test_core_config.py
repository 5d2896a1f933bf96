"""dshal.yaml loading: the bad-config catalogue (file:line + message), env overrides, precedence."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

import dshal
from dshal import config as config_module
from dshal.config import Config, load_config
from dshal.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_dshal_env")

OPS_LIST = "attention, dequantize_fp8"  # start of the sorted catalogue in "unknown op" messages

# (id, YAML text, line of the error, fragments the message must contain)
BAD_CONFIGS = [
    ("unknown-top-level-key", "backend: cpu\nbakend: cpu\n", 2,
     ["unknown key 'bakend'", "expected one of: attention, backend, determinism, distributed, emulate, fallback, ops, precision, prefer"]),
    ("unknown-nested-key", "precision:\n  gemm: bf16\n  gem: bf16\n", 3,
     ["precision.gem: unknown key", "expected one of: gemm, fp8_format, keep_high_precision"]),
    ("backend-wrong-type", "backend: 3\n", 1, ["backend: got 3", "expected a backend name"]),
    ("fallback-bad-enum", "prefer: [cpu]\nfallback: ignore\n", 2,
     ["fallback: got 'ignore'", "expected one of: warn, error"]),
    ("gemm-bad-enum", "precision:\n  gemm: fp4\n", 2,
     ["precision.gemm: got 'fp4'", "expected one of: auto, high, fp8-block, fp8-row, fp8-tensor, int8, bf16"]),
    ("fp8-format-bad-enum", "precision:\n  fp8_format: e5m2\n", 2,
     ["precision.fp8_format: got 'e5m2'", "expected one of: auto, e4m3fn, e4m3fnuz"]),
    ("prefer-not-a-list", "prefer: cpu\n", 1, ["prefer: got 'cpu'", "expected a non-empty list of backend names"]),
    ("prefer-contains-auto", "prefer:\n  - cpu\n  - auto\n", 3,
     ["prefer[1]: got 'auto'", "expected concrete backend names"]),
    ("prefer-item-wrong-type", "prefer: [cpu, 7]\n", 1, ["prefer[1]: got 7", "expected a backend name"]),
    ("timeout-negative", "distributed:\n  timeout_s: -5\n", 2,
     ["distributed.timeout_s: got -5", "expected a positive finite number of seconds"]),
    ("timeout-infinite", "distributed: {timeout_s: .inf}\n", 1, ["distributed.timeout_s: got inf"]),
    ("window-zero", "attention:\n  window: 0\n", 2,
     ["attention.window: got 0", "expected null or a positive integer"]),
    ("global-tokens-not-below-window", "attention:\n  window: 8\n  global_tokens: 8\n", 3,
     ["attention.global_tokens: got 8", "expected fewer than attention.window (8)"]),
    ("global-tokens-without-window", "attention:\n  global_tokens: 3\n", 2,
     ["attention.global_tokens: got 3", "expected 0 without attention.window"]),
    ("global-tokens-negative", "attention: {global_tokens: -1}\n", 1,
     ["attention.global_tokens: got -1", "expected an integer >= 0"]),
    ("unknown-op", "ops:\n  attention: cpu\n  atention: cpu\n", 3,
     ["ops.atention: unknown op", f"expected one of: {OPS_LIST}"]),
    ("ops-not-a-mapping", "ops: [attention]\n", 1, ["ops: got ['attention']", "expected a mapping of op name"]),
    ("ops-provider-wrong-type", "ops:\n  attention: reference\n  linear: [cpu]\n", 3,
     ["ops.linear: got ['cpu']", "expected a provider: reference (the op's reference implementation) or a backend name"]),
    # `reference` names the ops' oracles, never a backend: only ops: accepts it.
    ("backend-reference", "fallback: warn\nbackend: reference\n", 2,
     ["backend: got 'reference', expected a backend name", "a provider only under ops:"]),
    ("prefer-contains-reference", "prefer: [cpu, reference]\n", 1, ["prefer[1]: got 'reference', expected a backend name"]),
    ("invalid-yaml-syntax", "backend: cpu\nprefer: [cpu\nfallback: warn\n", 3,
     ["invalid YAML: expected ',' or ']'", "while parsing a flow sequence started on line 2"]),
    ("tab-indentation", "precision:\n\tgemm: bf16\n", 2, ["invalid YAML"]),
    ("non-mapping-document", "- backend: cpu\n", 1, ["the config must be a mapping of keys, got list"]),
    ("scalar-document", "\n\ncpu\n", 3, ["the config must be a mapping of keys, got str"]),
    ("emulate-not-bool", "emulate: 'yes'\n", 1, ["emulate: got 'yes'", "expected true or false"]),
    ("section-not-a-mapping", "precision: bf16\n", 1,
     ["precision: got 'bf16'", "expected a mapping with keys: gemm, fp8_format, keep_high_precision"]),
    ("keep-high-precision-not-strings", "precision:\n  keep_high_precision: [embed, 3]\n", 2,
     ["precision.keep_high_precision: got ['embed', 3]", "expected a list of name globs"]),
    ("duplicate-key", "backend: cpu\nfallback: warn\nbackend: auto\n", 3, ["backend: duplicate key (first set on line 1)"]),
    ("unhashable-key", "? [a, b]\n: 1\n", 1, ["invalid YAML", "unhashable key"]),
    ("multiple-documents", "backend: cpu\n---\nbackend: auto\n", 2, ["invalid YAML", "single document"]),
    ("non-string-key", "backend: cpu\n3: cpu\n", 2, ["3: key 3 is a int, expected one of: attention, backend"]),
]


@pytest.mark.parametrize("text,line,fragments", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_line_key_and_allowed_values(tmp_path, text, line, fragments):
    path = tmp_path / "dshal.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    msg = str(caught.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert (caught.value.file, caught.value.line) == (str(path), line)
    for fragment in fragments:
        assert fragment in msg, msg


def test_bad_config_through_use_and_missing_file(tmp_path):
    path = tmp_path / "dshal.yaml"
    path.write_text("fallback: maybe\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: fallback: got 'maybe'"):
        dshal.use(path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file"):
        dshal.use(tmp_path / "nope.yaml")


def test_good_file_round_trips(tmp_path):
    path = tmp_path / "dshal.yaml"
    path.write_text(textwrap.dedent("""\
        backend: cpu            # comment
        prefer: [amd, cpu]
        fallback: error
        ops: {rms_norm: cpu, moe_gate: reference}
        precision:
          gemm: fp8-row
          fp8_format: e4m3fnuz
          keep_high_precision: [embed]
        distributed: {timeout_s: 12}
        attention: {window: 64, global_tokens: 4}
        emulate: false
        """))
    cfg = load_config(path)
    assert cfg.to_dict() == {
        "backend": "cpu", "prefer": ["amd", "cpu"], "fallback": "error", "ops": {"rms_norm": "cpu", "moe_gate": "reference"},
        "precision": {"gemm": "fp8-row", "fp8_format": "e4m3fnuz", "keep_high_precision": ["embed"]},
        "distributed": {"timeout_s": 12.0}, "attention": {"window": 64, "global_tokens": 4}, "emulate": False,
        "determinism": "default",
    }
    assert cfg.source == str(path)
    assert load_config(cfg.to_dict()) == dataclasses.replace(cfg, source="<dict>")


def test_empty_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert dataclasses.replace(load_config(path), source="<defaults>") == Config()


def test_dict_and_keyword_errors_name_their_source():
    with pytest.raises(ConfigError, match=r"^<dict>: precision.gemm: got 'fp4'"):
        load_config({"precision": {"gemm": "fp4"}})
    with pytest.raises(ConfigError, match=r"^<keyword arguments>: attention.window: got -1"):
        load_config(attention={"window": -1})


def test_python_callers_may_pass_tuples():
    cfg = load_config(prefer=("cpu",), precision={"keep_high_precision": ("lm_head",)})
    assert cfg.prefer == ("cpu",) and cfg.precision.keep_high_precision == ("lm_head",)


def test_precedence_defaults_file_env_keywords(tmp_path, monkeypatch):
    path = tmp_path / "dshal.yaml"
    path.write_text("backend: amd\nfallback: error\nattention: {window: 32, global_tokens: 2}\n")
    cfg = load_config(path)
    assert (cfg.backend, cfg.fallback, cfg.emulate, cfg.precision.gemm) == ("amd", "error", False, "auto")

    monkeypatch.setenv("DSHAL_BACKEND", "cpu")
    monkeypatch.setenv("DSHAL_EMULATE", "1")
    cfg = load_config(path)
    assert (cfg.backend, cfg.emulate, cfg.fallback) == ("cpu", True, "error")  # env beats file

    cfg = load_config(path, backend="nvidia", emulate=False, attention={"window": 16})
    assert (cfg.backend, cfg.emulate) == ("nvidia", False)  # keywords beat env
    assert (cfg.attention.window, cfg.attention.global_tokens) == (16, 2)  # sections merge key by key
    assert cfg.source == str(path)


def test_dshal_config_env_names_the_default_file(tmp_path, monkeypatch):
    path = tmp_path / "env.yaml"
    path.write_text("backend: cpu\nfallback: error\n")
    monkeypatch.setenv("DSHAL_CONFIG", str(path))
    assert load_config().fallback == "error"
    rt = dshal.use(None)
    assert rt.config.fallback == "error" and rt.config.source == str(path)
    assert load_config({"backend": "cpu"}).fallback == "warn"  # an explicit source wins over DSHAL_CONFIG


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)])
def test_dshal_emulate_values(monkeypatch, value, expected):
    monkeypatch.setenv("DSHAL_EMULATE", value)
    assert load_config().emulate is expected
    # One reader serves the config and discovery (dshal.backends() without emulate=).
    assert config_module.emulate_from_env() is expected
    assert dshal.registry.emulate_from_env is config_module.emulate_from_env
    monkeypatch.setenv("DSHAL_EMULATE", " ")
    assert config_module.emulate_from_env() is None and load_config().emulate is False


def test_bad_environment_values(monkeypatch):
    monkeypatch.setenv("DSHAL_EMULATE", "maybe")
    with pytest.raises(ConfigError, match="DSHAL_EMULATE: got 'maybe', expected 1 or 0"):
        load_config()
    monkeypatch.delenv("DSHAL_EMULATE")
    monkeypatch.setenv("DSHAL_BACKEND", "nope")
    with pytest.raises(dshal.PluginLoadError, match="backend 'nope' is not installed"):
        dshal.use()


def test_use_accepts_dict_path_none_and_config(tmp_path):
    assert dshal.use({"backend": "cpu", "fallback": "error"}).config.fallback == "error"
    path = tmp_path / "c.yaml"
    path.write_text("backend: cpu\nprecision: {gemm: bf16}\n")
    assert dshal.use(path).config.precision.gemm == "bf16"
    assert dshal.use(str(path)).config.source == str(path)
    rt = dshal.use(None)
    assert rt.config == Config() and rt.selection[-1].taken and rt.backend.name == rt.selection[-1].name
    cfg = load_config(backend="cpu", fallback="error")
    assert dshal.use(cfg).config == cfg
    assert dshal.use(cfg, fallback="warn").config.fallback == "warn"


def test_every_config_field_has_a_validator():
    top = {f.name for f in dataclasses.fields(Config)} - {"source", "origins"}
    assert top == set(config_module._TOP) | set(config_module._SECTIONS)
    for section, checks in config_module._SECTIONS.items():
        section_type = type(getattr(Config(), section))
        assert {f.name for f in dataclasses.fields(section_type)} - {"origins"} == set(checks), section
        assert config_module._SECTION_TYPES[section] is section_type


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().backend = "cpu"  # type: ignore[misc]


def test_one_cache_directory_for_every_kind_of_cached_build(tmp_path, monkeypatch):
    """The C kernels, the cross-compiled kernels and the `dshal tune` tables share one cache:
    $DSHAL_CACHE_DIR, else $XDG_CACHE_HOME/dshal, else ~/.cache/dshal (the tune table and the
    cross-compile cache used to ignore XDG_CACHE_HOME and land apart from the C kernels)."""
    from dshal.kernels.cpu._library import cache_dir as c_kernels_cache
    from dshal.kernels.triton.crosscompile import default_cache_dir
    from dshal.kernels.triton.target import user_tuning_dir

    def parents() -> set:
        return {c_kernels_cache(), default_cache_dir().parent, user_tuning_dir().parent}

    monkeypatch.delenv("DSHAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert parents() == {tmp_path / "xdg" / "dshal"}
    monkeypatch.setenv("DSHAL_CACHE_DIR", str(tmp_path / "mine"))
    assert parents() == {tmp_path / "mine"}
    monkeypatch.delenv("DSHAL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parents() == {tmp_path / "home" / ".cache" / "dshal"}


def test_an_ops_keyword_overrides_one_op_and_keeps_the_files_others(tmp_path) -> None:
    """`ops=` replaced the file's whole `ops:` mapping (its moe_gate override vanished) while
    `precision=` merged key by key, as load_config says every section does."""
    from dshal.config import load_config

    path = tmp_path / "dshal.yaml"
    path.write_text("ops:\n  attention: reference\n  moe_gate: reference\nprecision:\n  fp8_format: e4m3fnuz\n")
    config = load_config(path, ops={"attention": "cpu"}, precision={"gemm": "int8"})
    assert dict(config.ops) == {"attention": "cpu", "moe_gate": "reference"}
    assert config.precision.gemm == "int8" and config.precision.fp8_format == "e4m3fnuz"
    assert config.origin("ops.moe_gate").startswith(str(path)) and "keyword" in config.origin("ops.attention")


def test_errors_about_a_files_values_raised_after_loading_name_its_file_and_line(tmp_path) -> None:
    """Validation at load names file:line; two errors raised later did not: an ``ops:``
    override naming a backend without that op (the file only), and FP8 weights in a format
    the backend does not declare (neither; raised at from_pretrained)."""
    from dshal.backend import Capabilities
    from dshal.model.precision import refuse_undeclared_fp8_format

    path = tmp_path / "dshal.yaml"
    path.write_text("backend: cpu\nops:\n  rms_norm: reference\n  silu_and_mul: cpu\nprecision:\n"
                    "  gemm: fp8-block\n  fp8_format: e4m3fnuz\n")
    config = load_config(path)
    assert config.origin("precision.fp8_format") == f"{path}:7"
    fnuz_only = Capabilities(device_name="a gfx942 stand-in", fp8_formats=("e4m3fnuz",))
    with pytest.raises(ConfigError) as err:
        refuse_undeclared_fp8_format("e4m3fn", fnuz_only, "amd", precision=dataclasses.replace(config.precision,
            fp8_format="auto", origins={"gemm": f"{path}:6"}))
    assert (err.value.file, err.value.line, err.value.key) == (str(path), 6, "precision.gemm")
    assert str(err.value).startswith(f"{path}:6: precision.fp8_format: FP8 weights would be stored as 'e4m3fn'")
    with pytest.raises(ConfigError) as err:
        refuse_undeclared_fp8_format("e4m3fnuz", Capabilities(fp8_formats=("e4m3fn",)), "nvidia", precision=config.precision)
    assert (err.value.file, err.value.line) == (str(path), 7)


def test_file_readers_refuse_a_non_path_and_name_invalid_json_with_its_line(tmp_path):
    """The readers behind every config, index and shapes file: a non-path argument and a file
    that is not JSON each name what was being read."""
    for reader in (config_module.read_text_file, config_module.read_json_file, config_module.read_yaml):
        with pytest.raises(ConfigError, match=r"^shapes file: got 7 \(int\), expected a file path \(str or os.PathLike\)"):
            reader(7, "shapes file")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {\n  "a": "x.safetensors",\n}}')
    with pytest.raises(ConfigError, match=rf"^{index}:3: checkpoint index: invalid JSON: Expecting property name") as caught:
        config_module.read_json_file(index, "checkpoint index")
    assert (caught.value.file, caught.value.line) == (str(index), 3)
