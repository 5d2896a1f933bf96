"""The op catalogue as a hub: each op's reference is reachable one way (raw through the spec,
checked through ``dshal.ops.reference``), and its example rows build valid inputs that
bench and conformance both draw from."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import dshal.ops.reference as reference
from dshal.ops.catalogue import OP_MODULES, SPECS
from dshal.ops.examples import KINDS, TIERS, Draw
from dshal.ops.spec import OpSpec

ROOT = Path(__file__).resolve().parents[1]
WITH_REFERENCE = sorted(name for name, spec in SPECS.items() if spec.has_reference)


def family_file(op: str) -> str:
    """Where ``op`` is declared, e.g. ``dshal/ops/activation.py``: what a failure tells a contributor to edit."""
    return SPECS[op].check.__module__.replace(".", "/") + ".py"


def test_every_module_declaring_an_op_is_in_the_catalogue():
    """An op declared in a family file that OP_MODULES does not list is in no SPECS: every
    test, bench and conformance run would skip it without a word."""
    missing = []
    for path in sorted((ROOT / "dshal" / "ops").glob("*.py")):
        module_name = f"dshal.ops.{path.stem}"
        if path.stem != "__init__" and module_name not in OP_MODULES:
            module = importlib.import_module(module_name)
            ops = sorted(v.name for v in vars(module).values() if isinstance(v, OpSpec) and v.check.__module__ == module_name)
            if ops:
                missing.append(f"{module_name} declares {ops}")
    assert not missing, f"{'; '.join(missing)}: add the module to OP_MODULES in dshal/ops/catalogue.py"


@pytest.mark.parametrize("op", sorted(SPECS))
def test_every_op_declares_its_whole_hub(op):
    """Spec, reference (the oracle and the fallback), cost (bench's roofline), outputs (what
    dispatch checks every provider's result against) and example rows: an op missing one is
    not refused anywhere, it just goes unchecked (a missing @outputs turns the ProviderError
    check off for that op)."""
    spec = SPECS[op]
    declared = {"reference": spec._reference, "cost": spec._cost, "outputs": spec._outputs, "examples": spec._example}
    missing = [part for part, fn in declared.items() if fn is None]
    assert not missing, (
        f"op {op!r} declares no {', '.join(missing)}: add @{op}.{missing[0]}"
        f"{'(ROWS)' if missing[0] == 'examples' else ''} beside its spec in {family_file(op)} "
        f"(silu_and_mul in dshal/ops/activation.py is a small complete one)"
    )


def test_every_reference_has_exactly_one_explicit_name_in_dshal_ops_reference():
    """Written out (a reader's grep finds them), one per op, and each is the spec's own
    reference behind the op's checks: one function seen two ways."""
    tree = ast.parse(inspect.getsource(reference))
    # At run time: the module's statements, the `else` of `if TYPE_CHECKING:` (what checkers see) in their place.
    runtime = [n for node in tree.body for n in (node.orelse if isinstance(node, ast.If) else [node])]
    assigned = [t.id for node in runtime if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]
    missing = sorted(set(WITH_REFERENCE) - set(assigned))
    assert not missing, (
        f"dshal/ops/reference.py does not write out {missing}: add `{missing[0]} = _{missing[0]}.checked(_{missing[0]}"
        f".reference_impl)` in its `else:` branch, with the import beside the others"
    )
    assert sorted(n for n in assigned if n in SPECS) == WITH_REFERENCE  # each once
    unlisted = sorted(set(WITH_REFERENCE) - set(reference.__all__))
    assert not unlisted, f"{unlisted} missing from __all__ at the end of dshal/ops/reference.py"
    assert sorted(reference.__all__) == WITH_REFERENCE
    for name in WITH_REFERENCE:
        fn = getattr(reference, name)
        assert fn.__wrapped__ is SPECS[name].reference_impl, name
        assert fn.__name__ == name


def test_every_reference_is_visible_to_type_checkers():
    """The ``if TYPE_CHECKING:`` branch of dshal/ops/reference.py is what mypy / pyright read:
    a name missing there passes every run-time test, and a user's ``mypy --strict`` then says
    'Module has no attribute' for ``dshal.ops.reference.<op>``."""
    tree = ast.parse(inspect.getsource(reference))
    typed: set[str] = set()
    for branch in (node for node in tree.body if isinstance(node, ast.If)):  # the `if TYPE_CHECKING:` block
        for node in branch.body:
            if isinstance(node, ast.FunctionDef):  # written out, as attention is
                typed.add(node.name)
            elif isinstance(node, ast.Assign):
                typed.update(t.id for t in node.targets if isinstance(t, ast.Name))
    missing = sorted(set(WITH_REFERENCE) - typed)
    assert not missing, (
        f"dshal/ops/reference.py: {missing} missing from its `if TYPE_CHECKING:` branch: "
        f"add `{missing[0]} = _ops.{missing[0]}` there (beside the run-time `{missing[0]} = ...checked(...)` line)"
    )


@pytest.mark.parametrize("op", sorted(SPECS))
def test_every_reference_has_tests_of_its_own(op):
    """Conformance judges every provider against the reference; only the op's own tests judge
    the reference (against numpy or a formula written another way). Each family's tests live in
    tests/test_ops_<family>*.py and call the checked reference as ``ref.<op>(...)``."""
    family = SPECS[op].check.__module__.rsplit(".", 1)[1]
    files = sorted((ROOT / "tests").glob(f"test_ops_{family}*.py"))
    text = "".join(path.read_text() for path in files)
    assert re.search(rf"\b(?:ref|reference)\.{op}\(", text), (
        f"op {op!r}: no test calls its reference (`ref.{op}(...)`, with `from dshal.ops import reference as ref`) "
        f"in {[str(p.relative_to(ROOT)) for p in files] or f'tests/test_ops_{family}.py (no such file yet)'}: "
        f"add one that checks it against an independent computation (numpy, float64, a hand-worked value)"
    )


def test_the_checked_reference_checks_and_the_raw_one_does_not():
    x = torch.ones(2, 3)  # odd last dim: silu_and_mul's checks reject it
    with pytest.raises(Exception, match="last dim 3"):
        reference.silu_and_mul(x)
    assert SPECS["silu_and_mul"].reference_impl(torch.ones(2, 4)).shape == (2, 2)


def test_every_op_declares_example_rows_of_every_kind_and_tier():
    for name, spec in SPECS.items():
        where = f"in {name}'s example rows ({family_file(name)})"
        kinds = {row.kind for row in spec.rows}
        assert kinds <= set(KINDS), f"kinds {sorted(kinds - set(KINDS))} {where}, expected kinds from {KINDS}"
        assert all(row.op == name and row.tiers <= set(TIERS) and row.tiers for row in spec.rows), name
        ids = [row.id for row in spec.rows]
        assert len(ids) == len(set(ids)), f"{name}: duplicate row ids"
        for kind in ("accuracy", "bench"):
            for tier in TIERS:
                assert any(row.kind == kind and tier in row.tiers for row in spec.rows), (
                    f"no {kind!r} row of tier {tier!r} {where}: add e.g. dict(name=..., kind={kind!r}"
                    f"{', tier=' + repr(tier) if tier != 'ci' else ''}, ...) (a ci row is in both tiers; "
                    f"conformance judges the accuracy rows, dshal bench times the bench rows)"
                )


@pytest.mark.parametrize("op", sorted(SPECS))
def test_ci_examples_are_valid_inputs_of_their_op(op):
    """Every ci row (conformance's and bench's) builds arguments the op's own checks accept,
    and the same seed builds the same values."""
    spec = SPECS[op]
    for row in spec.rows:
        if "ci" not in row.tiers:
            continue
        example = spec.example_inputs(Draw(torch.Generator().manual_seed(3)), row)
        spec.check(**example.kwargs)
        again = spec.example_inputs(Draw(torch.Generator().manual_seed(3)), row)
        for key, value in example.kwargs.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, again.kwargs[key]) or value.isnan().any(), (row.id, key)
