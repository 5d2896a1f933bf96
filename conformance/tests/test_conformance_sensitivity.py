"""``dshal_conformance.sensitivity``: the drift of the model family when a correct backend
rounds differently (the measurement behind the model bounds)."""

from __future__ import annotations

import json

import torch

import dshal
from dshal_conformance import sensitivity


def test_a_perturbed_provider_scales_float_outputs_by_at_most_the_given_ulps() -> None:
    x = torch.full((1000,), 3.0)
    generator = torch.Generator().manual_seed(0)
    out = sensitivity.perturbed(lambda t: t.clone(), generator, 64 * 2.0**-24)(x)
    relative = (out / x - 1).abs()
    assert 0 < float(relative.max()) <= 64 * 2.0**-24 * 1.01  # float32 rounding of the product
    ids = torch.arange(4)
    assert sensitivity.perturbed(lambda t: t, generator, 1.0)(ids) is ids  # integer outputs untouched


def test_the_measurement_is_seeded_grows_with_the_perturbation_and_leaves_the_runtime(tmp_path) -> None:  # noqa: ANN001
    active = dshal.use({"backend": "cpu"})
    spreads = sensitivity.measure("high", "ci", [0, 16, 1024], seeds=2)
    assert dshal.current() is active
    unperturbed, small, large = spreads
    assert len(unperturbed.logit_drift) == 1 and len(small.logit_drift) == 2
    assert unperturbed.logit_drift[0] < 1e-6  # the cpu backend as it is: float32 vs float64 rounding
    # high mode has no requantization: the drift follows the perturbation's size
    assert unperturbed.logit_drift[0] < min(small.logit_drift) < min(large.logit_drift)
    assert max(small.logit_drift) < small.bound < min(large.logit_drift)  # ~1e-4 relative fails float32's bound
    assert large.over == 2
    assert all(a == 1.0 for a in small.token_agreement) and small.tokens_under == 0  # every decisive token agrees
    assert sensitivity.measure("high", "ci", [16], seeds=2)[0].logit_drift == small.logit_drift

    report = tmp_path / "spread.json"
    assert sensitivity.main(["--mode", "high", "--size", "ci", "--ulps", "16", "--seeds", "1", "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["mode"] == "high" and saved["spreads"][0]["ulps"] == 16 and saved["spreads"][0]["over_bound"] == 0
    assert saved["spreads"][0]["tokens_under_bound"] == 0


def test_the_sensitivity_tool_starts_with_docstrings_stripped():
    """``python -OO`` strips docstrings: the tool built its --help from its module's and died
    with AttributeError on None."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-OO", "-m", "dshal_conformance.sensitivity", "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
