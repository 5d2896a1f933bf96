"""dshal as a notebook or REPL user meets it: what tab completion offers, what the objects
they hold print as, and errors that survive a trip between processes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import dshal
from dshal import errors
from dshal.model.args import ModelArgs
from dshal.model.model import Transformer
from dshal.plan.plan import default_config


def test_tab_completion_offers_the_public_names_and_discovers_nothing():
    """``dir(dshal)`` (what a completer lists) holds the public API, not the helpers the
    package imports for itself, and reading every name it lists (as a completer that shows
    types does) loads no plugin and activates no runtime: discovery is lazy."""
    code = textwrap.dedent(
        """
        import json, dshal
        names = dir(dshal)
        for name in names:
            getattr(dshal, name)
        from dshal.registry import REGISTRY
        print(json.dumps({"names": names, "discovered": bool(REGISTRY._cache),
                          "active": dshal.runtime._state["active"] is not None}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSHAL_")}
    seen = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=env).stdout)
    assert set(dshal.__all__) <= set(seen["names"])
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib", "_LAZY_NAMES"} & set(seen["names"])
    assert (seen["discovered"], seen["active"]) == (False, False)


def test_tab_completion_of_dshal_ops_offers_the_ops_not_the_modules_it_imports():
    names = dir(dshal.ops)
    assert set(dshal.ops.SPECS) | set(dshal.ops.__all__) <= set(names)
    assert not {"torch", "sys", "types", "contextlib", "Any", "overload", "annotations"} & set(names)
    assert "reference" in names and "dispatch" in names  # its own submodules stay listed


def test_tab_completion_of_dshal_model_offers_its_api_and_submodules():
    import dshal.model

    names = dir(dshal.model)
    assert set(dshal.model.__all__) <= set(names) and {"speculative", "cache"} <= set(names)
    assert not {"Any", "annotations"} & set(names)


def test_runtime_prints_as_one_line_naming_backend_device_and_who_serves_what(clean_dshal_env):
    plain = dshal.use(backend="cpu")
    every = len(dshal.ops.SPECS)  # the cpu backend serves every op (natively or by its reference)
    assert repr(plain) == f"<Runtime backend 'cpu' on cpu, config <defaults>: {every} ops served by cpu>"
    mixed = dshal.use(backend="cpu", ops={"rms_norm": "reference", "attention": "reference"})
    assert repr(mixed).endswith(f": {every - 2} ops served by cpu; reference serves rms_norm, attention>")
    assert str(mixed) == repr(mixed)


ERROR_CLASSES = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_survives_pickling_with_its_type_and_message(cls):
    """multiprocessing and notebook parallel tools send a worker's exception back pickled."""
    err = cls("rms_norm: argument 'x' has shape [4], expected [M, K]")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), repr(back)) == (cls, str(err), repr(err))


def test_a_config_error_keeps_where_it_was_raised_through_pickling():
    err = dshal.ConfigError("backend: 'x' is not installed", file="dshal.yaml", line=3, key="backend")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.file, back.line, back.key) == ("dshal.yaml:3: backend: 'x' is not installed",
                                                            "dshal.yaml", 3, "backend")


def test_a_deepseek_v3_sized_model_prints_its_sizes_in_a_screenful():
    """A loaded model shown in a notebook: repeated blocks fold (nn.Module does it), and each
    module says its sizes, as transformers' modules do, not an empty ``RoutedExperts()``."""
    with torch.device("meta"):  # DeepSeek-V3's published config: shapes only, nothing allocated
        shown = repr(Transformer(ModelArgs.from_file(default_config())))
    assert len(shown.splitlines()) < 80
    for line in ("(embed): Embedding(vocab=129280, dim=7168, weight=torch.bfloat16)",
                 "(gate): Gate(experts=256, top_k=8, n_group=8, topk_group=4)",
                 "(experts): RoutedExperts(experts=256, dim=7168, inter=2048, weight=torch.bfloat16)",
                 "(kv_a_layernorm): RMSNorm(dim=512, eps=1e-06)"):
        assert line in shown
