"""Regenerate ``dshal_ascend/op_signatures/<release>.json`` from git clones of the sources.

The signatures of the torch_npu kernels dshal-ascend calls are facts of each release: the
op-plugin schema file ``op_plugin/config/op_plugin_functions.yaml`` on the release branch
of ``Ascend/op-plugin`` (the ``npu_*`` custom ops), and ``npu_format_cast`` from
``torch_npu/csrc/aten/npu_native_functions.yaml`` on the matching branch of
``Ascend/pytorch``. A yaml entry carries version tags (``all_version``, ``v2.0``,
``[v2.1, newest]``) naming the torch lines it is built for; only overloads built for
torch >= 2.4 (what dshal-ascend needs) are kept.

    python plugins/ascend/tools/extract_op_signatures.py OP_PLUGIN_GIT_DIR PYTORCH_GIT_DIR

Run it (in an environment with torch and pyyaml) when a release is added to ``RELEASES`` below
and to ``dshal_ascend.releases``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dshal_ascend.releases import KERNELS as ALL_KERNELS  # noqa: E402 - the one list of kernels the plugin calls

FORMAT_CAST = "npu_format_cast"  # defined by torch_npu itself, not op-plugin
KERNELS = tuple(k for k in ALL_KERNELS if k != FORMAT_CAST)
OP_PLUGIN_PATH = "op_plugin/config/op_plugin_functions.yaml"
PYTORCH_PATH = "torch_npu/csrc/aten/npu_native_functions.yaml"
#: release -> (op-plugin branch, Ascend/pytorch branch for npu_format_cast).
RELEASES = {
    "6.0.0": ("6.0.0", "v2.4.0-6.0.0"),
    "7.0.0": ("7.0.0", "v2.5.1-7.0.0"),
    "7.1.0": ("7.1.0", "v2.6.0-7.1.0"),
    "7.2.0": ("7.2.0", "v2.8.0-7.2.0"),
    "7.3.0": ("7.3.0", "v2.9.0-7.3.0"),
    "26.0.0": ("26.0.0", "v2.10.0-26.0.0"),
    "26.1.0": ("26.1.0", "v2.12.0-26.1.0"),
}
TORCH_LINE = (2, 4)


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def _version(tag: str) -> tuple[int, int]:
    match = re.fullmatch(r"v(\d+)\.(\d+)", tag.strip())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def covers(spec: object, all_versions: list[str]) -> bool:
    """Whether a yaml version tag includes torch ``TORCH_LINE`` (or newer lines)."""
    if spec is None:
        return False
    if spec == "all_version":
        return True
    if isinstance(spec, list):  # [low, high] range; "newest" = open end
        low, high = spec[0], spec[-1]
        return _version(low) <= TORCH_LINE and (high == "newest" or _version(high) >= TORCH_LINE)
    tags = [t.strip() for t in str(spec).split(",")]
    return any(t != "newest" and _version(t) >= TORCH_LINE for t in tags)


def _entries(text: str) -> list[dict]:
    doc = yaml.safe_load(text)
    out = []
    for section, items in doc.items():
        if isinstance(items, list):
            out += [dict(item, section=section) for item in items if isinstance(item, dict) and "func" in item]
    return out


def _select(entries: list[dict], names: tuple[str, ...], all_versions: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for e in entries:
        func = " ".join(str(e["func"]).split())
        base = func.split("(", 1)[0].split(".", 1)[0]
        if base not in names:
            continue
        if func.split("(", 1)[0].endswith(".out"):  # out= variants are not what dshal-ascend calls
            continue
        tags = [e[k] for k in ("op_api", "acl_op", "exposed") if isinstance(e.get(k), (str, list))]
        if tags and not any(covers(t, all_versions) for t in tags):  # untagged (torch_npu's own yaml): kept
            continue
        if func not in found.setdefault(base, []):
            found[base].append(func)
    return found


def extract(op_plugin_git: str, pytorch_git: str, release: str) -> dict:
    plugin_branch, torch_branch = RELEASES[release]
    plugin_commit = _git(op_plugin_git, "rev-parse", plugin_branch).strip()
    torch_commit = _git(pytorch_git, "rev-parse", torch_branch).strip()
    plugin_text = _git(op_plugin_git, "show", f"{plugin_commit}:{OP_PLUGIN_PATH}")
    torch_text = _git(pytorch_git, "show", f"{torch_commit}:{PYTORCH_PATH}")
    all_versions = yaml.safe_load(plugin_text).get("all_version", [])
    ops = _select(_entries(plugin_text), KERNELS, all_versions)
    ops.update(_select(_entries(torch_text), (FORMAT_CAST,), all_versions))
    return {
        "release": release,
        "sources": {
            "op_plugin": {"repository": "https://github.com/Ascend/op-plugin", "branch": plugin_branch,
                          "commit": plugin_commit, "path": OP_PLUGIN_PATH},
            "torch_npu": {"repository": "https://github.com/Ascend/pytorch", "branch": torch_branch,
                          "commit": torch_commit, "path": PYTORCH_PATH, "ops": [FORMAT_CAST]},
        },
        "torch_line": "v{}.{} and newer (overloads whose version tags cover it)".format(*TORCH_LINE),
        "ops": {name: ops[name] for name in sorted(ops)},
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate dshal_ascend/op_signatures/<release>.json from git clones of Ascend/op-plugin and "
        "Ascend/pytorch (each release's branch is read with git show; nothing is checked out).")
    parser.add_argument("op_plugin_git", metavar="OP_PLUGIN_GIT_DIR", help="a git clone of Ascend/op-plugin")
    parser.add_argument("pytorch_git", metavar="PYTORCH_GIT_DIR", help="a git clone of Ascend/pytorch")
    opts = parser.parse_args(argv)
    op_plugin_git, pytorch_git = opts.op_plugin_git, opts.pytorch_git
    out_dir = Path(__file__).resolve().parents[1] / "dshal_ascend" / "op_signatures"
    out_dir.mkdir(exist_ok=True)
    for release in RELEASES:
        data = extract(op_plugin_git, pytorch_git, release)
        (out_dir / f"{release}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(release, ", ".join(f"{k}:{len(v)}" for k, v in data["ops"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
