"""The docs that list ops name every op: each GPU/NPU plugin README's op table says how that
plugin serves every op of the catalogue (its own kernel, the reference, or not provided), and
README.md names the ops the cpu backend serves natively. A new op, or a new native provider,
passes every other test without these rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dshal.backends.cpu_native import NATIVE_OPS
from dshal.ops.catalogue import SPECS

ROOT = Path(__file__).resolve().parents[1]
#: README -> the header of its op table (first column: the ops of each row).
OP_TABLES = {"plugins/nvidia/README.md": "| op | how |", "plugins/ascend/README.md": "| op | 910B"}


def _first_column(readme: str, header: str) -> str:
    lines = (ROOT / readme).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"{readme}: no op table (a line starting {header!r}) found"
    rows = []
    for line in lines[start + 2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return "\n".join(rows)


@pytest.mark.parametrize("readme", sorted(OP_TABLES))
def test_each_plugin_op_table_names_every_op(readme: str) -> None:
    named = _first_column(readme, OP_TABLES[readme])
    missing = sorted(op for op in SPECS if not re.search(rf"\b{op}\b", named))
    assert not missing, (
        f"{readme}: its op table has no row for {missing}: add one saying how this plugin serves it "
        f"(e.g. `not provided: served by the reference`, kind `fallback`)"
    )


def test_readme_names_the_ops_the_cpu_backend_serves_natively() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    sentence = re.search(r"The built-in `cpu` backend serves (.*?) natively", text)
    assert sentence, "README.md: the sentence 'The built-in `cpu` backend serves ... natively' is gone"
    named = set(re.findall(r"[a-z][a-z0-9_]*", sentence.group(1))) - {"and"}
    assert named == set(NATIVE_OPS), (
        f"README.md says the cpu backend serves {sorted(named)} natively; NATIVE_OPS in "
        f"dshal/backends/cpu_native.py has {sorted(NATIVE_OPS)}: missing {sorted(set(NATIVE_OPS) - named)}, "
        f"not native {sorted(named - set(NATIVE_OPS))} (update the README sentence and cpu.py's docstring)"
    )
