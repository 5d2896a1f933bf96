"""A checkpoint named by its Hugging Face model id (``--checkpoint org/name``, as vLLM's
``--model``), read from the local Hugging Face cache and never downloaded (:mod:`dshal.hub`).

The cache is built on disk as huggingface_hub lays one out (``models--org--name/refs/<ref>``
holding a commit hash, ``snapshots/<commit>/<file>`` relative symlinks into ``blobs/``), and
huggingface_hub's own cache reader is asked to agree before dshal reads it. No network:
HF_HUB_OFFLINE=1, and the cache is a temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

import dshal
from dshal.hub import hub_provenance
from dshal.model import ModelArgs, tiny_args
from dshal.model.args import checkpoint_folder
from dshal.model.checkpoint import random_checkpoint, save_checkpoint

hf_constants = pytest.importorskip("huggingface_hub.constants")

REPO = "tiny-org/tiny-v3"
MAIN, V1 = "a" * 40, "b" * 40  # commit hashes: refs/main and refs/v1
ARGS = tiny_args(num_hidden_layers=2)
ARGS_V1 = tiny_args(num_hidden_layers=3)  # another revision: another model, told apart by its config
RUN = ("run", "--no-progress", "--new-tokens", "2", "--prompt-len", "4", "--graphs", "off")


def _blob_name(data: bytes, lfs: bool) -> str:
    """The name the Hub gives a file's blob: an LFS file's sha256, else its git blob id."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_checkpoint(cache: Path, repo: str, folder: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Put ``folder``'s files into ``cache`` as ``repo`` at ``commit`` (named by ``refs``), the
    way huggingface_hub's downloads leave them; the snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / _blob_name(data, lfs=file.suffix == ".safetensors")
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding :data:`REPO` at two revisions (``main``: :data:`ARGS`,
    ``v1``: :data:`ARGS_V1`; their folders beside it in ``src/``), checked with huggingface_hub's
    own reader. Built once: the tests only read it."""
    import huggingface_hub

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf-cache"
    for name, args, commit in (("main", ARGS, MAIN), ("v1", ARGS_V1, V1)):
        save_checkpoint(root / "src" / name, args, random_checkpoint(args, seed=3))
        cache_checkpoint(cache, REPO, root / "src" / name, commit, (name,))
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.refs.keys() == {"main", "v1"}
    assert {r.commit_hash for r in repo.revisions} == {MAIN, V1}
    found = huggingface_hub.try_to_load_from_cache(REPO, "config.json", revision="v1", cache_dir=cache)
    assert found == str(cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / V1 / "config.json")
    return cache


def use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Offline, with ``cache`` as the Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both once, at its import (which another test may have done already)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`module_cache`, made the Hugging Face cache (offline) for the test."""
    use_cache(monkeypatch, module_cache)
    return module_cache


def _snapshot(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def test_hub_id_run_gives_the_folders_tokens(hub_cache, tmp_path, cli_main, capsys, clean_dshal_env):
    """``dshal run --checkpoint org/name`` loads the cache's ``main`` snapshot: the tokens of
    the same checkpoint given as a folder."""
    folder_argv = ["--checkpoint", str(hub_cache.parent / "src" / "main"), "--json", str(tmp_path / "f.json")]
    by_folder = cli_main(capsys, [*RUN, *folder_argv])
    assert by_folder.returncode == 0, by_folder.stderr
    by_id = cli_main(capsys, [*RUN, "--checkpoint", REPO, "--json", str(tmp_path / "i.json")])
    assert by_id.returncode == 0, by_id.stderr
    folder, hub = (json.loads((tmp_path / name).read_text()) for name in ("f.json", "i.json"))
    assert hub["output_ids"] == folder["output_ids"] and len(hub["output_ids"]) == 2
    assert hub["model"] == str(_snapshot(hub_cache, MAIN))
    assert hub["checkpoint_hub"] == {"id": REPO, "revision": None, "commit": MAIN} and folder["checkpoint_hub"] is None
    assert f"Hugging Face model {REPO}, commit {MAIN}" in by_id.stdout and "Hugging Face" not in by_folder.stdout


@pytest.mark.parametrize(
    ("argv", "path_key"),
    [
        (["profile", "--no-progress", "--prompt-len", "2", "--new-tokens", "1", "--overhead-pairs", "0"], "model"),
        (["diff", "--backend", "cpu", "--backend", "reference", "--prompt-len", "2", "--decode", "0"], "checkpoint"),
    ],
    ids=["profile", "diff"],
)
def test_hub_id_reports_name_the_id_revision_and_commit(hub_cache, tmp_path, cli_main, capsys, clean_dshal_env,
                                                         argv, path_key):
    """The reports named the snapshot folder only: which id, which revision was asked for and
    which commit it was were left for the reader to work out from a cache path."""
    html = ["--output", str(tmp_path / "r.html")] if argv[0] == "profile" else ["--html", str(tmp_path / "r.html")]
    done = cli_main(capsys, [*argv, "--checkpoint", f"{REPO}@v1", "--json", str(tmp_path / "r.json"), *html])
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report[path_key] == str(_snapshot(hub_cache, V1))  # the path field, as before
    assert report["checkpoint_hub"] == {"id": REPO, "revision": "v1", "commit": V1}
    assert f"{REPO}@v1, commit {V1}" in (tmp_path / "r.html").read_text()


def test_hub_provenance_is_none_for_a_folder(hub_cache, tmp_path, monkeypatch):
    """A folder, even one named like an id, has no Hub provenance; a commit asked for is its own."""
    assert hub_provenance(f"{REPO}@{V1}", checkpoint_folder(f"{REPO}@{V1}")) == {"id": REPO, "revision": V1, "commit": V1}
    assert hub_provenance(str(_snapshot(hub_cache, MAIN)), _snapshot(hub_cache, MAIN)) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / REPO).mkdir(parents=True)
    assert hub_provenance(REPO, Path(REPO)) is None


def test_hub_id_prompt_reads_the_tokenizer_in_the_snapshot(hub_cache, cli_main, capsys, clean_dshal_env):
    """``--prompt`` reads the tokenizer beside the weights, in the resolved snapshot folder (this
    one ships none: said before any weight is read, naming the snapshot)."""
    done = cli_main(capsys, ["run", "--no-progress", "--checkpoint", f"{REPO}@v1", "--prompt", "hello"])
    assert done.returncode == 1
    assert done.stderr.startswith(f"dshal run: error: {_snapshot(hub_cache, V1)}: no tokenizer, expected one of "
                                  "tokenizer.json"), done.stderr


def test_hub_id_revision_and_the_python_api(hub_cache):
    """``org/name@ref`` and ``org/name@<commit>`` pick that snapshot; the Python API takes ids too."""
    assert ModelArgs.from_file(REPO).num_hidden_layers == 2
    assert ModelArgs.from_file(f"{REPO}@v1").num_hidden_layers == 3
    assert checkpoint_folder(f"{REPO}@{V1}") == _snapshot(hub_cache, V1)
    assert checkpoint_folder(f"{REPO}@main") == _snapshot(hub_cache, MAIN)
    model = dshal.model.from_pretrained(f"{REPO}@v1", {"backend": "cpu"})
    assert model.args.num_hidden_layers == 3
    reader = dshal.model.CheckpointReader(REPO)
    assert reader.path == _snapshot(hub_cache, MAIN) and "model.embed_tokens.weight" in reader


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "--no-progress"], "--checkpoint"),
        (["profile", "--no-progress"], "--checkpoint"),
        (["diff", "--backend", "cpu", "--backend", "reference"], "--checkpoint"),
        (["plan", "--no-progress"], "--config"),
    ],
    ids=["run", "profile", "diff", "plan"],
)
def test_hub_id_not_in_the_cache_says_where_it_looked_and_how_to_fetch(hub_cache, cli_main, capsys, argv, flag):
    done = cli_main(capsys, [*argv, flag, "tiny-org/missing"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    command = argv[0]
    assert done.stderr.startswith(f"dshal {command}: error: {flag} 'tiny-org/missing': neither a folder nor a model in "
                                  f"the local Hugging Face cache (looked for it in {hub_cache}"), done.stderr
    assert "dshal never downloads (a DeepSeek-V3 checkpoint is about 700 GB)" in done.stderr
    assert "fetch it with `hf download tiny-org/missing`" in done.stderr
    assert done.stderr.count("\n") == 1  # one line


def test_hub_id_missing_revision_and_the_python_api_errors(hub_cache):
    with pytest.raises(dshal.ConfigError) as caught:
        dshal.model.from_pretrained(f"{REPO}@nope", {"backend": "cpu"})
    said = str(caught.value)
    assert said.startswith(f"checkpoint '{REPO}@nope': neither a folder nor a model in the local Hugging Face cache")
    assert f"looked for revision 'nope' of it in {hub_cache}" in said
    assert f"`hf download {REPO} --revision nope`" in said


def test_a_folder_named_like_an_id_wins(hub_cache, tmp_path, monkeypatch):
    """A path that exists is never looked up: ``org/name`` in the working folder is that folder."""
    monkeypatch.chdir(tmp_path)
    assert checkpoint_folder(REPO) == _snapshot(hub_cache, MAIN)  # no such folder here yet: the cache's
    local = tmp_path / REPO
    args = tiny_args(num_hidden_layers=1)
    save_checkpoint(local, args, random_checkpoint(args, seed=4))
    assert checkpoint_folder(REPO) == Path(REPO)
    assert ModelArgs.from_file(REPO).num_hidden_layers == 1  # the cache's main has 2
    assert dshal.model.CheckpointReader(REPO).path == Path(REPO)


@pytest.mark.parametrize("given", ["missing-folder", "a/b/c", "./tiny-org/missing", "ckpt/config.json"])
def test_a_missing_path_that_is_no_id_keeps_its_error_naming_the_flag(hub_cache, tmp_path, cli_main, capsys,
                                                                       monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    done = cli_main(capsys, ["run", "--no-progress", "--checkpoint", given])
    assert done.returncode == 1
    assert f"dshal run: error: --checkpoint {Path(given)}: cannot read model config: no such file\n" == done.stderr


def test_a_file_shaped_as_an_id_is_said_to_be_a_file_naming_the_flag(tmp_path, cli_main, capsys, monkeypatch):
    """``org/name`` that exists as a file (not a folder, not a .json) is that file, not an id;
    the error names the flag that gave it, as a missing path's does (it named none: for
    ``plan --config`` it read "checkpoint path is a file")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("{}")
    for command, flag in (("run", "--checkpoint"), ("plan", "--config")):
        done = cli_main(capsys, [command, flag, "org/name"])
        assert done.returncode == 1
        assert done.stderr.startswith(f"dshal {command}: error: {flag} org/name: checkpoint path is a file, expected a "
                                      "folder holding config.json"), done.stderr


def test_a_hub_id_without_huggingface_hub_says_to_install_it(hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what `import` meets where it is not installed
    with pytest.raises(dshal.ConfigError, match=rf"^checkpoint '{REPO}': no such folder, and read as a Hugging Face "
                                                r"model id it needs the huggingface_hub package .*: pip install "
                                                r"huggingface_hub, or pass the checkpoint's folder$"):
        ModelArgs.from_file(REPO)
    assert ModelArgs.from_file(hub_cache.parent / "src" / "main").num_hidden_layers == 2  # a folder needs no hub


def test_an_incomplete_download_is_said_with_how_to_finish_it(module_cache, tmp_path, monkeypatch):
    """An interrupted download (a shard of 163 missing) is refused at once with the fix, not
    loaded for minutes first; huggingface_hub knows it from the file listing it cached."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")  # huggingface_hub >= 1.x
    cache = tmp_path / "hf-cache"
    use_cache(monkeypatch, cache)
    snapshot = cache_checkpoint(cache, REPO, module_cache.parent / "src" / "main", MAIN, ("main",))
    listing = {f.name: tree_cache.TreeCacheEntry(size=1, blob_id="0" * 40) for f in snapshot.iterdir()}
    listing["model-00002-of-00002.safetensors"] = tree_cache.TreeCacheEntry(size=1, blob_id="1" * 40)
    tree_cache.write_tree_cache(str(snapshot.parents[1]), MAIN, listing)
    with pytest.raises(dshal.ConfigError) as caught:
        checkpoint_folder(REPO, "--checkpoint")
    said = str(caught.value)
    assert said.startswith(f"--checkpoint '{REPO}': the local Hugging Face cache holds an incomplete download of it")
    assert "1 file(s) are missing (model-00002-of-00002.safetensors)" in said
    assert said.endswith(f"finish it with `hf download {REPO}`")
    cache_checkpoint(cache, REPO, module_cache.parent / "src" / "v1", V1, ("v1",))
    assert checkpoint_folder(f"{REPO}@v1") == snapshot.parents[1] / "snapshots" / V1  # no listing cached: taken as is


def test_the_ascend_converter_takes_an_id(hub_cache, tmp_path):
    """``dshal-ascend-convert SRC DST`` reads SRC as every dshal command reads --checkpoint."""
    convert = pytest.importorskip("dshal_ascend.convert")
    counts = convert.convert_checkpoint(REPO, tmp_path / "int8")
    assert counts["converted_weights"] > 0
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["dshal_quantization"]["scheme"] == "w8a8-int8"
    with pytest.raises(dshal.ConfigError, match="^src 'tiny-org/missing': neither a folder nor a model in the local"):
        convert.convert_checkpoint("tiny-org/missing", tmp_path / "none")
