"""The A/B gate's slower self-tests (a real gate run each, about 90 s on 2 cores): an A/A comparison passes,
and a planted slowdown smaller than the measured noise floor is `unresolved`, never `pass`. The planted
slowdown that must be caught runs in the default suite (tests/test_ab_gate.py)."""

from __future__ import annotations

import pytest

from tests import ab_plant
from tests.test_ab_gate import _gate, candidate  # noqa: F401  (candidate is a fixture)


@pytest.mark.benchmark_heavy
def test_an_aa_comparison_passes(candidate, tmp_path):  # noqa: F811
    result = _gate(candidate, tmp_path)
    assert result.exit_code == 0, result.render()
    assert set(result.table["verdict"]) <= {"pass", "unresolved"}
    assert result.table["noise_floor"].notna().all()


@pytest.mark.benchmark_heavy
def test_a_slowdown_below_the_noise_floor_is_unresolved_not_pass(candidate, tmp_path):  # noqa: F811
    ab_plant.plant_prefill_slowdown(candidate, 0.03)
    result = _gate(candidate, tmp_path, tolerance=0.002)
    for row in result.table.to_dict("records"):
        assert row["verdict"] != "pass", result.render()
        if abs(row["ratio"] - 1.0) < row["noise_floor"]:
            assert row["verdict"] == "unresolved", result.render()
    if (result.table["verdict"] == "unresolved").any():
        assert "unresolved: the noise floor" in result.render()
