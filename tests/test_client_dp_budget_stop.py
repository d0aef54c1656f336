"""Issue #14, item 5: client_max_epsilon must hold whatever the number of survivors.

Under distributed noise each survivor carries 1/n of the noise variance, so a round that
ends with s < n survivors releases σ·√(s/n). The stop check runs before the round, when
dropouts are unknown; it must therefore assume the fewest survivors SecAgg+ can unmask
(its threshold). The attack here is simply dropping clients: every round ends with exactly
the threshold of survivors, and the recorded epsilon must never pass the budget.
"""

from __future__ import annotations

import pytest
from fedguard.clients.wire import protocol
from fedguard.conf.plans import client_dp_plan
from fedguard.privacy.client_dp_accounting import epsilon_of
from fedguard.privacy.client_dp_noise import worst_case_surviving_fraction
from fedguard.privacy.ledger_events import ClientDpRelease
from flwr.app import ConfigRecord, MetricRecord

from tests.client_dp_support import StandInGrid, client_dp_wrapper, random_arrays, train_reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CLIENTS, THRESHOLD, SIGMA = 20, 5, 2.0
DISTRIBUTED = ["privacy=client_dp", "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus",
               "secure_agg.clip_range=8", "privacy.client_target_epsilon=null", f"privacy.client_noise_multiplier={SIGMA}",
               "privacy.client_clip_norm=0.5", f"simulation.num_clients={CLIENTS}", "simulation.fraction_train=1.0",
               f"secure_agg.threshold={THRESHOLD}", "secure_agg.neighbours=8"]


def run_until_stopped(cfg, survivors: int, max_rounds: int = 40) -> tuple[list[ClientDpRelease], str | None]:
    """Rounds of zero updates, each ending with ``survivors`` clients in SecAgg+'s sum."""
    import numpy as np

    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, SIGMA, releases, secure=True)
    grid = StandInGrid(list(range(1, CLIENTS + 1)))
    base = random_arrays(np.random.default_rng(0))
    for server_round in range(1, max_rounds + 1):
        reason = strategy.stop_reason(server_round, grid)
        if reason is not None:
            return releases, reason
        messages = list(strategy.configure_train(server_round, base, ConfigRecord({}), grid))
        aggregate = train_reply(messages[0], base)
        aggregate.content[protocol.METRICS_KEY] = MetricRecord(
            {protocol.NUM_EXAMPLES_KEY: survivors, protocol.TRAIN_LOSS_KEY: 1.0})
        strategy.aggregate_train(server_round, [aggregate])
    return releases, None


def test_stop_holds_the_budget_when_only_the_threshold_survives(compose):
    cfg = compose(DISTRIBUTED)
    plan = client_dp_plan(cfg)
    assert plan.min_survivors == THRESHOLD
    assert worst_case_surviving_fraction(plan) == pytest.approx(THRESHOLD / CLIENTS)
    # A budget the planned σ (no dropouts) would reach only after 7 rounds (not a multiple of the worst case).
    budget = epsilon_of([plan.cohort.release(SIGMA)] * 7, "fixed", plan.delta)
    cfg.privacy.client_max_epsilon = budget
    releases, reason = run_until_stopped(cfg, survivors=THRESHOLD)
    assert reason is not None and "client_max_epsilon" in reason
    assert releases, "at least one round fits the budget even at the worst case"
    assert all(r.survivors == THRESHOLD for r in releases)
    assert max(r.epsilon for r in releases) <= budget


def test_full_survival_also_stays_within_the_budget(compose):
    cfg = compose(DISTRIBUTED)
    plan = client_dp_plan(cfg)
    cfg.privacy.client_max_epsilon = epsilon_of([plan.cohort.release(SIGMA)] * 7, "fixed", plan.delta)
    releases, reason = run_until_stopped(cfg, survivors=CLIENTS)
    assert reason is not None
    assert max(r.epsilon for r in releases) <= cfg.privacy.client_max_epsilon


def test_central_noise_needs_no_worst_case(compose):
    cfg = compose(["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.5"])
    assert client_dp_plan(cfg).min_survivors is None
    assert worst_case_surviving_fraction(client_dp_plan(cfg)) == 1.0
