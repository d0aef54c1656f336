"""Property tests (Hypothesis) on privacy/'s numeric core, now that it takes plain numbers.

Each property is one a privacy claim rests on: a calibrated noise level never spends more
than its target, spending only grows with use, and adaptive clipping's split of the run's
sigma recombines to exactly that sigma.
"""

from __future__ import annotations

import math

import pytest
from fedguard.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from fedguard.privacy.client_dp_accounting import (
    CLIP_COUNT_SENSITIVITY,
    FIXED,
    POISSON,
    ClientDpPlan,
    CohortPlan,
    Release,
    calibrate_sigma,
    epsilon_of,
    planned_epsilon,
    planned_noise_multiplier,
)
from fedguard.privacy.client_dp_noise import (
    NoiseSplit,
    combined_noise_multiplier,
    update_noise_multiplier,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_support import scaled_examples

# Calibration runs an accountant per example (about 0.5 s per sigma tried): the counts are
# the full suite's (CI); the inner loop runs a tenth (scaled_examples), the deadline off.
SLOW = settings(max_examples=scaled_examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])
CALIBRATION = settings(max_examples=scaled_examples(6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
DELTA = 1e-5

targets = st.floats(min_value=0.5, max_value=8.0)
sample_rates = st.floats(min_value=0.005, max_value=0.5)


@CALIBRATION
@given(target=targets, rate=sample_rates, steps=st.integers(min_value=1, max_value=400))
def test_sample_level_calibration_never_overshoots_its_target(target, rate, steps):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=rate, steps=steps, accountant="rdp")
    assert compute_epsilon([(sigma, rate, steps)], DELTA, "rdp").epsilon <= target


@CALIBRATION
@given(target=targets, population=st.integers(min_value=10, max_value=2000), rate=st.floats(0.01, 0.5),
       rounds=st.integers(min_value=1, max_value=50))
def test_client_level_calibration_never_overshoots_its_target(target, population, rate, rounds):
    """Poisson cohorts here; fixed-size calibration (seconds per case) is checked at fixed
    points in tests/test_client_dp.py::test_calibrated_sigma_meets_the_target_tightly."""
    sampling = POISSON
    cohort = CohortPlan(sampling, population, rate, max(1, int(population * rate)))
    plan = ClientDpPlan(cohort=cohort, rounds=rounds, delta=DELTA, clip_norm=1.0, target_epsilon=target)
    sigma = planned_noise_multiplier(plan)
    assert planned_epsilon(plan, sigma) <= target
    assert sigma == calibrate_sigma(target_epsilon=target, delta=DELTA, sampling=sampling,
                                    plan=cohort.release(1.0), rounds=rounds)


@SLOW
@given(sigma=st.floats(min_value=0.3, max_value=5.0), rate=sample_rates, population=st.integers(10, 1000),
       rounds=st.integers(min_value=1, max_value=30), sampling=st.sampled_from([POISSON, FIXED]))
def test_epsilon_grows_with_every_round(sigma, rate, population, rounds, sampling):
    cohort = max(1, int(population * rate))
    release = Release(sigma, rate if sampling == POISSON else cohort / population, population, cohort)
    spent = [epsilon_of([release] * k, sampling, DELTA) for k in (rounds, rounds + 1, 2 * rounds + 1)]
    assert 0 < spent[0] <= spent[1] <= spent[2]


@settings(max_examples=scaled_examples(300), deadline=None)
@given(sigma=st.floats(min_value=1e-3, max_value=100.0), factor=st.floats(min_value=1.0001, max_value=1e3))
def test_adaptive_clipping_split_recombines_to_the_runs_sigma(sigma, factor):
    count_std = sigma * factor * CLIP_COUNT_SENSITIVITY  # 2 sigma_b = factor * sigma > sigma
    update_sigma = update_noise_multiplier(sigma, count_std)
    assert update_sigma >= sigma  # the update gets less noise budget... so more noise per unit, never less
    assert combined_noise_multiplier(update_sigma, count_std) == pytest.approx(sigma, rel=1e-9)
    split = NoiseSplit.of(sigma, count_std)
    assert (split.sigma, split.update_sigma, split.count_std) == (sigma, update_sigma, count_std)


@settings(max_examples=scaled_examples(200), deadline=None)
@given(sigma=st.floats(min_value=1e-2, max_value=20.0), factor=st.floats(min_value=1.01, max_value=100.0),
       kept=st.floats(min_value=0.01, max_value=1.0))
def test_dropouts_never_leave_more_noise_than_planned(sigma, factor, kept):
    """Distributed noise after dropouts: the recombined sigma shrinks as sqrt(kept), never grows."""
    split = NoiseSplit.of(sigma, sigma * factor * CLIP_COUNT_SENSITIVITY)
    surviving = split.surviving(kept)
    assert surviving.sigma <= split.sigma * (1 + 1e-12)
    assert surviving.sigma == pytest.approx(split.sigma * math.sqrt(kept), rel=1e-9)


def test_plans_refuse_impossible_numbers():
    from fedguard.privacy.accounting import PrivacyConfigError

    with pytest.raises(PrivacyConfigError):
        CohortPlan("shuffle", 10, 0.1, 1)
    with pytest.raises(PrivacyConfigError):
        CohortPlan(POISSON, 10, 0.0, 1)
    cohort = CohortPlan(POISSON, 10, 0.5, 5)
    with pytest.raises(PrivacyConfigError):
        ClientDpPlan(cohort=cohort, rounds=3, delta=DELTA, clip_norm=1.0)  # neither sigma nor a target
    with pytest.raises(PrivacyConfigError):
        ClientDpPlan(cohort=cohort, rounds=3, delta=1.5, clip_norm=1.0, noise_multiplier=1.0)


@settings(max_examples=scaled_examples(25), deadline=None)
@given(history=st.lists(st.tuples(st.sampled_from([0.6, 1.0, 2.5]), st.sampled_from([0.01, 0.2, 1.0]),
                                  st.integers(min_value=1, max_value=500)), min_size=1, max_size=6))
def test_cached_rdp_is_opacus_rdp_accountant_bit_for_bit(history):
    """compute_epsilon caches the per-step RDP vector; the figure must be Opacus's own."""
    from fedguard.privacy.accounting import merge_history
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.history = merge_history(history)
    assert compute_epsilon(history, DELTA, "rdp").epsilon == reference.get_epsilon(delta=DELTA)


def test_calibration_cache_returns_the_uncached_search_and_refusals_are_not_cached():
    """calibrate_noise_multiplier is memoized per process (a worker plans many sites alike)."""
    from fedguard.privacy.accounting import PrivacyConfigError

    args = {"target_epsilon": 2.0, "delta": DELTA, "sample_rate": 0.05, "steps": 40, "accountant": "rdp"}
    assert calibrate_noise_multiplier(**args) == calibrate_noise_multiplier.__wrapped__(**args)
    hits = calibrate_noise_multiplier.cache_info().hits
    assert calibrate_noise_multiplier(**args) == calibrate_noise_multiplier.__wrapped__(**args)
    assert calibrate_noise_multiplier.cache_info().hits == hits + 1
    for _ in range(2):  # an impossible target raises every time, never a cached value
        with pytest.raises(PrivacyConfigError):
            calibrate_noise_multiplier(**{**args, "target_epsilon": -1.0})
