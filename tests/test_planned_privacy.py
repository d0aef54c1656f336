"""The planned sample-level epsilon printed before round 1 is the one the sites will use."""

from __future__ import annotations

import re

import pytest
from flwr.app import RecordDict

from fedguard.clients.planned_privacy import expected_participation, plan_site
from fedguard.clients.private_training import build_trainer
from fedguard.privacy.accounting import compute_epsilon
from fedguard.simulations.planned_privacy import planned_sample_dp_line

FIXED = ["privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.1", "simulation.rounds=4"]


@pytest.mark.parametrize("batches", [1, 7, 40])
@pytest.mark.parametrize("overrides", [FIXED, ["privacy=sample_dp", "privacy.target_epsilon=2.5"]])
def test_plan_matches_the_sites_own_state(compose, overrides, batches):
    cfg = compose(overrides)
    plan = plan_site(cfg, batches)
    fresh = build_trainer(cfg, None)._state(RecordDict(), batches)  # what a site stores before its first step
    assert (fresh.noise_multiplier, fresh.sample_rate) == (plan.noise_multiplier, plan.sample_rate)
    assert plan.epsilon == pytest.approx(fresh.epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)])[0])
    if cfg.privacy.target_epsilon is not None:
        assert plan.epsilon <= cfg.privacy.target_epsilon


def test_console_line_states_the_fixed_noise_epsilon_and_its_observers(compose):
    cfg = compose([*FIXED, "simulation.num_clients=5"])
    line = planned_sample_dp_line(cfg)
    assert line is not None and "per training record" in line and "server operator" in line
    figures = [float(x) for x in re.findall(r"epsilon ([0-9.]+)", line)]
    # digits: 1,437 training rows, 5 IID partitions of ~258 training rows, batch 32 -> 9 batches per epoch
    rounds = expected_participation(cfg)
    per_site = compute_epsilon([(1.1, 1 / 9, rounds * 9)], float(cfg.privacy.delta), "rdp").epsilon
    assert any(f == pytest.approx(per_site, abs=5e-4) for f in figures)


def test_no_line_without_sample_level_dp(compose):
    assert planned_sample_dp_line(compose([])) is None
