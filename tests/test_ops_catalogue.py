"""The op catalogue as a hub: each op's reference is reachable one way (raw through the spec,
checked through ``dshal.ops.reference``), and its example rows build valid inputs that
bench and conformance both draw from."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import dshal.ops.reference as reference
from dshal.ops.catalogue import SPECS
from dshal.ops.examples import KINDS, TIERS, Draw

WITH_REFERENCE = sorted(name for name, spec in SPECS.items() if spec.has_reference)


def test_every_reference_has_exactly_one_explicit_name_in_dshal_ops_reference():
    """Written out (a reader's grep finds them), one per op, and each is the spec's own
    reference behind the op's checks: one function seen two ways."""
    tree = ast.parse(inspect.getsource(reference))
    # At run time: the module's statements, the `else` of `if TYPE_CHECKING:` (what checkers see) in their place.
    runtime = [n for node in tree.body for n in (node.orelse if isinstance(node, ast.If) else [node])]
    assigned = [t.id for node in runtime if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]
    assert sorted(n for n in assigned if n in SPECS) == WITH_REFERENCE
    assert sorted(reference.__all__) == WITH_REFERENCE
    for name in WITH_REFERENCE:
        fn = getattr(reference, name)
        assert fn.__wrapped__ is SPECS[name].reference_impl, name
        assert fn.__name__ == name


def test_the_checked_reference_checks_and_the_raw_one_does_not():
    x = torch.ones(2, 3)  # odd last dim: silu_and_mul's checks reject it
    with pytest.raises(Exception, match="last dim 3"):
        reference.silu_and_mul(x)
    assert SPECS["silu_and_mul"].reference_impl(torch.ones(2, 4)).shape == (2, 2)


def test_every_op_declares_example_rows_of_every_kind_and_tier():
    for name, spec in SPECS.items():
        kinds = {row.kind for row in spec.rows}
        assert {"accuracy", "bench"} <= kinds <= set(KINDS), name
        assert all(row.op == name and row.tiers <= set(TIERS) and row.tiers for row in spec.rows), name
        ids = [row.id for row in spec.rows]
        assert len(ids) == len(set(ids)), f"{name}: duplicate row ids"
        for tier in TIERS:
            assert any(row.kind == "bench" and tier in row.tiers for row in spec.rows), (name, tier)
            assert any(row.kind == "accuracy" and tier in row.tiers for row in spec.rows), (name, tier)


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
