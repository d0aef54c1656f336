"""The empirical audit (Steinke et al. 2023): its bound, and that it has teeth on real training."""

from __future__ import annotations

import math

import pytest

from fedguard.privacy.audit.empirical import MAX_EPSILON, epsilon_lower_bound
from fedguard.simulations.empirical_audit import run_empirical_audit

BASE = ["simulation.num_clients=1", "simulation.rounds=1", "simulation.min_clients_per_round=1",
        "dataset=digits", "model=mlp", "train.local_epochs=30", "progress=false"]
CLAIMED = 1.0


def test_bound_matches_the_binomial_tail_in_closed_form():
    # All r guesses right: the bound solves p^r = 1 - confidence with p = e^eps / (1 + e^eps).
    guesses, confidence = 200, 0.95
    p = (1 - confidence) ** (1 / guesses)
    assert epsilon_lower_bound(guesses, guesses, confidence) == pytest.approx(math.log(p / (1 - p)), rel=1e-4)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert epsilon_lower_bound(200, 100) == 0.0
    bounds = [epsilon_lower_bound(200, correct) for correct in (120, 150, 180, 199)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # More guesses, all right, refute more: the bound grows like log(r / log(1 / alpha)).
    assert epsilon_lower_bound(200, 200) < epsilon_lower_bound(10_000, 10_000) < MAX_EPSILON


@pytest.fixture(scope="module")
def audits():
    plain = run_empirical_audit(BASE, canaries=1000)
    private = run_empirical_audit([*BASE, "privacy=sample_dp", f"privacy.target_epsilon={CLAIMED}"], canaries=1000)
    return plain, private


@pytest.mark.simulation  # trains a model for 30 epochs twice: not for the fast loop
def test_non_private_training_is_caught(audits):
    plain, private = audits
    assert plain.claimed_epsilon is None
    # The attack must be strong enough to refute the private run's claim, had the run been non-private.
    assert plain.epsilon_lower_bound > private.claimed_epsilon


@pytest.mark.simulation
def test_private_training_stays_within_its_claim(audits):
    _, private = audits
    assert private.claimed_epsilon == pytest.approx(CLAIMED, abs=0.01)
    assert not private.violates_claim
    assert private.epsilon_lower_bound <= private.claimed_epsilon


def test_baseline_overrides_reach_the_non_private_run_only():
    from fedguard.simulations.audit_cli import build_parser, empirical_runs

    args = build_parser().parse_args(
        ["--empirical", "--epsilons", "1", "3", "--set", "+preset=dp_images", "--baseline-set", "train.learning_rate=0.1"]
    )
    runs = empirical_runs(list(args.overrides), args.baseline_overrides, args.epsilons)
    assert runs[0] == ["+preset=dp_images", "train.learning_rate=0.1"]
    assert runs[1] == ["+preset=dp_images", "privacy=sample_dp", "privacy.target_epsilon=1.0"]
    assert runs[2] == ["+preset=dp_images", "privacy=sample_dp", "privacy.target_epsilon=3.0"]
