"""The DP throughput goal is judged on paired ratios (simulations/bench_dp.py::paired_ratios)."""

from __future__ import annotations

import pytest

from fedguard.simulations.bench_dp import paired_ratios


def test_the_median_pair_decides_and_one_outlier_pair_cannot():
    # Four pairs near 0.75 and one lucky pair at 1.5: best-of would say 1.5, the median says 0.75.
    pairs = [(1000.0, 750.0), (1200.0, 900.0), (800.0, 600.0), (1000.0, 1500.0), (1100.0, 825.0)]
    summary = paired_ratios(pairs)
    assert summary["pairs"] == 5
    assert summary["median"] == pytest.approx(0.75)
    assert summary["highest"] == pytest.approx(1.5)
    assert summary["lowest"] == pytest.approx(0.75)
    assert summary["each_pair"] == pytest.approx([0.75, 0.75, 0.75, 1.5, 0.75])


def test_an_even_count_interpolates_and_quartiles_bracket_the_median():
    summary = paired_ratios([(10.0, 6.0), (10.0, 7.0), (10.0, 8.0), (10.0, 9.0)])
    assert summary["median"] == pytest.approx(0.75)
    assert summary["lower_quartile"] == pytest.approx(0.675)
    assert summary["upper_quartile"] == pytest.approx(0.825)
    assert summary["lowest"] <= summary["lower_quartile"] <= summary["median"] <= summary["upper_quartile"]


def test_a_ratio_is_private_over_its_own_pairs_non_private_not_the_best_non_private():
    # A slow non-private run pairs with a slow private run: the ratio stays 0.8 in both pairs.
    summary = paired_ratios([(2000.0, 1600.0), (1000.0, 800.0)])
    assert summary["median"] == pytest.approx(0.8)
    assert summary["lowest"] == pytest.approx(0.8)


@pytest.mark.parametrize("pairs", [[], [(0.0, 1.0)], [(1.0, -1.0)]])
def test_no_pairs_or_a_non_positive_speed_is_refused(pairs):
    with pytest.raises(ValueError):
        paired_ratios(pairs)
