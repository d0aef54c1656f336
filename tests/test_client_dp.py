"""Client-level DP (DP-FedAvg): clipping, the server's mechanism, accounting, config rules.

No simulation here (see tests/test_client_dp_sim.py); the strategy wrapper runs against
a stand-in grid and hand-built replies, which is also what lets the noise be measured on
zero updates over many coordinates.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from fedguard.clients.client_dp import UNIFORM_WEIGHT, add_noise_share, client_dp_mod, clip_arrays, update_norm
from fedguard.clients.wire import protocol
from fedguard.conf import ConfigError, compose_config
from fedguard.conf.plans import client_dp_plan
from fedguard.conf.run_config import config_to_yaml
from fedguard.privacy.audit import recompute
from fedguard.privacy.client_dp_accounting import (
    FederationAccountant,
    Release,
    build_accountant,
    calibrate_sigma,
    epsilon_of,
    planned_epsilon,
)
from fedguard.privacy.client_dp_noise import noise_share_std
from fedguard.privacy.ledger_events import ClientDpRelease
from fedguard.server.client_dp import add_central_noise
from fedguard.server.run_state import RunState
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from tests.client_dp_support import (
    DIMENSION,
    StandInGrid,
    client_dp_wrapper,
    random_arrays,
    shifted,
    train_reply,
    variance_in_chi2_range,
)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# -- client side: clipping -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 50.0])
def test_clipped_update_never_exceeds_the_clip_norm(scale):
    rng = np.random.default_rng(0)
    old = random_arrays(rng, scale=10.0)  # large weights: float32 round-off on old + update is worst here
    for clip_norm in (0.01, 0.5, 3.0):
        new = shifted(old, rng.standard_normal(DIMENSION) * scale)
        before = update_norm(new, old)
        clipped, reported = clip_arrays(new, old, clip_norm)
        after = update_norm(clipped, old)
        assert reported == pytest.approx(before)
        assert after <= clip_norm
        if before > clip_norm:
            assert after == pytest.approx(clip_norm, rel=1e-3)  # scaled down, not truncated to zero


def test_mod_clips_and_weighs_every_client_one(compose):
    cfg = compose(["privacy=client_dp", "privacy.client_clip_norm=0.25"])
    rng = np.random.default_rng(1)
    old = random_arrays(rng)
    config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.SERVER_ROUND_KEY: 1})
    msg = Message(RecordDict({protocol.ARRAYS_KEY: old, protocol.CONFIG_KEY: config}), dst_node_id=7, message_type="train")

    def train(_msg, _context):
        metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: 1234, protocol.TRAIN_LOSS_KEY: 0.5})
        return Message(RecordDict({protocol.ARRAYS_KEY: shifted(old, rng.standard_normal(DIMENSION)),
                                   protocol.METRICS_KEY: metrics}), reply_to=msg)

    reply = client_dp_mod(msg, None, train)
    assert update_norm(reply.content[protocol.ARRAYS_KEY], old) <= 0.25
    assert reply.content[protocol.METRICS_KEY][protocol.NUM_EXAMPLES_KEY] == UNIFORM_WEIGHT


# -- server side: the mechanism ----------------------------------------------------------------
def test_central_noise_std_matches_sigma_times_clip_norm():
    sigma, clip_norm, size = 1.3, 0.7, 400_000
    noised = add_central_noise(np.zeros(size), sigma * clip_norm, np.random.default_rng(2))
    statistic, low, high = variance_in_chi2_range(noised, sigma * clip_norm)
    assert low <= statistic <= high
    # and a wrong std (5% off) is detected at this sample size: the test can fail
    statistic_wrong, low, high = variance_in_chi2_range(noised, sigma * clip_norm * 1.05)
    assert not low <= statistic_wrong <= high


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_released_sum_of_zero_updates_has_noise_std_sigma_c(compose, sampling):
    clip_norm, sigma = 0.5, 2.0
    cfg = compose(["privacy=client_dp", f"privacy.client_sampling={sampling}", f"privacy.client_clip_norm={clip_norm}",
                   "privacy.client_target_epsilon=null", f"privacy.client_noise_multiplier={sigma}",
                   "simulation.num_clients=5", "simulation.fraction_train=1.0"])
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, sigma, releases)
    global_arrays = random_arrays(np.random.default_rng(3))
    samples = []
    for server_round in range(1, 41):  # 40 rounds x 3,250 coordinates
        messages = list(strategy.configure_train(server_round, global_arrays, ConfigRecord({}), StandInGrid([1, 2, 3, 4, 5])))
        replies = [train_reply(m, global_arrays) for m in messages]  # zero updates
        released, _ = strategy.aggregate_train(server_round, replies)
        expected_cohort = strategy.last_release["expected_cohort"]
        # the released mean times the expected cohort is the released sum: pure noise here
        samples.append(np.concatenate([(released[k].numpy().astype(np.float64) - global_arrays[k].numpy()).ravel()
                                       for k in global_arrays.keys()]) * expected_cohort)
    statistic, low, high = variance_in_chi2_range(np.concatenate(samples), sigma * clip_norm)
    # float32 storage of the released model adds round-off far below the 1e-6-level test's resolution
    assert low <= statistic <= high
    assert [e.round for e in releases] == list(range(1, 41))
    assert all(e.noise_std == pytest.approx(sigma * clip_norm) and e.sampling == sampling for e in releases)
    assert releases[-1].epsilon == pytest.approx(strategy.accountant.epsilon)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_cohorts_come_from_os_randomness_not_the_runs_seed(compose, sampling):
    """Amplification by sampling needs a secret cohort: the seeded `random` Flower samples with must not decide it."""
    cfg = compose(["privacy=client_dp", f"privacy.client_sampling={sampling}", "privacy.client_target_epsilon=null",
                   "privacy.client_noise_multiplier=1.0", "simulation.num_clients=100", "simulation.fraction_train=0.1"])
    population = list(range(1, 101))
    cohorts = []
    for _ in range(2):
        random.seed(cfg.seed)  # what server/app.py does for Flower's sampler
        strategy = client_dp_wrapper(cfg, 1.0, [])
        cohorts.append({m.metadata.dst_node_id for m in strategy.configure_train(1, random_arrays(np.random.default_rng(0)),
                                                                                 ConfigRecord({}), StandInGrid(population))})
    assert cohorts[0] != cohorts[1]  # equal with probability < 1e-12 (fixed) or far less (Poisson)
    if sampling == "fixed":
        assert [len(c) for c in cohorts] == [10, 10]
        assert [strategy.plan.cohort, strategy.plan.population] == [10, 100]


def test_an_empty_poisson_cohort_gets_a_noise_only_release(compose, monkeypatch):
    clip_norm, sigma, rate, clients = 0.5, 2.0, 0.2, 5
    cfg = compose(["privacy=client_dp", f"privacy.client_clip_norm={clip_norm}", "privacy.client_target_epsilon=null",
                   f"privacy.client_noise_multiplier={sigma}", f"simulation.num_clients={clients}",
                   f"simulation.fraction_train={rate}", "simulation.min_clients_per_round=1"])
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, sigma, releases)
    assert strategy.releases_without_replies
    monkeypatch.setattr(strategy.cohorts, "draw", lambda population: set())  # nobody joins
    global_arrays = random_arrays(np.random.default_rng(4))
    samples = []
    for server_round in range(1, 41):
        assert list(strategy.configure_train(server_round, global_arrays, ConfigRecord({}), StandInGrid([1, 2, 3, 4, 5]))) == []
        released, _ = strategy.aggregate_train(server_round, [])
        samples.append(np.concatenate([(released[k].numpy().astype(np.float64) - global_arrays[k].numpy()).ravel()
                                       for k in global_arrays.keys()]) * rate * clients)
    statistic, low, high = variance_in_chi2_range(np.concatenate(samples), sigma * clip_norm)
    assert low <= statistic <= high  # the noise of a full round, on an empty sum
    assert [(e.cohort_size, e.survivors) for e in releases] == [(0, 0)] * 40
    assert releases[-1].epsilon == pytest.approx(strategy.accountant.epsilon) and releases[-1].epsilon > 0


def test_over_norm_updates_are_rejected_and_the_release_is_recorded_first(compose):
    clip_norm = 1.0
    cfg = compose(["privacy=client_dp", f"privacy.client_clip_norm={clip_norm}", "privacy.client_target_epsilon=null",
                   "privacy.client_noise_multiplier=1.0", "simulation.num_clients=5", "simulation.fraction_train=1.0",
                   "privacy.client_sampling=fixed"])
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, 1.0, releases)
    seen_at_inner: list[int] = []
    inner_aggregate = strategy.inner.aggregate_train
    strategy.inner.aggregate_train = lambda rnd, rs: (seen_at_inner.append(len(releases)), inner_aggregate(rnd, rs))[1]
    rng = np.random.default_rng(4)
    base = random_arrays(rng)
    messages = list(strategy.configure_train(1, base, ConfigRecord({}), StandInGrid([1, 2, 3, 4, 5])))
    directions = [rng.standard_normal(DIMENSION) for _ in messages]
    norms = [0.5, 0.99, 1.01, 1.5, 40.0]
    replies = [train_reply(m, shifted(base, d / np.linalg.norm(d) * n)) for m, d, n in zip(messages, directions, norms)]
    accepted = [r for r in replies if update_norm(r.content[protocol.ARRAYS_KEY], base) <= clip_norm * (1 + 1e-9)]
    strategy.aggregate_train(1, replies)
    assert strategy.last_release["survivors"] == len(accepted) == 2
    assert releases[0].survivors == 2 and releases[0].cohort_size == 5
    assert seen_at_inner == [1]  # the ledger event existed before the strategy saw the release


DISTRIBUTED = ["privacy=client_dp", "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus", "secure_agg.clip_range=8",
               "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.2", "privacy.client_clip_norm=0.5",
               "simulation.num_clients=5", "simulation.fraction_train=1.0"]


@pytest.mark.parametrize("survivors", [5, 3])
def test_distributed_shares_sum_to_the_noise_the_accountant_records(compose, survivors):
    """s survivors' shares of zero updates sum to N(0, σ²C²·s/n); the wrapper records exactly that σ_eff."""
    cfg = compose(DISTRIBUTED)
    sigma, clip_norm, n = 1.2, 0.5, client_dp_plan(cfg).cohort.expected_size()
    assert noise_share_std(client_dp_plan(cfg)) == pytest.approx(sigma * clip_norm / math.sqrt(n))
    rng = np.random.default_rng(5)
    base = random_arrays(rng)
    def share() -> np.ndarray:
        noised = add_noise_share(base, base, noise_share_std(client_dp_plan(cfg)), rng)
        return np.concatenate([(noised[k].numpy().astype(np.float64) - base[k].numpy()).ravel() for k in base.keys()])

    sums = [sum(share() for _ in range(survivors)) for _ in range(40)]  # 40 rounds' worth of coordinates
    statistic, low, high = variance_in_chi2_range(np.concatenate(sums), sigma * clip_norm * math.sqrt(survivors / n))
    assert low <= statistic <= high

    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, sigma, releases)
    strategy.secure_aggregation = True
    messages = list(strategy.configure_train(1, base, ConfigRecord({}), StandInGrid([1, 2, 3, 4, 5])))
    aggregate = train_reply(messages[0], base)  # SecAgg+'s one reply: global + sum / survivors (zero sum here)
    aggregate.content[protocol.METRICS_KEY] = MetricRecord({protocol.NUM_EXAMPLES_KEY: survivors, protocol.TRAIN_LOSS_KEY: 1.0})
    released, _ = strategy.aggregate_train(1, [aggregate])
    for key in base.keys():  # the server adds nothing under distributed noise
        np.testing.assert_array_equal(released[key].numpy(), base[key].numpy())
    assert releases[0].noise_multiplier == pytest.approx(sigma * math.sqrt(survivors / n))
    assert releases[0].noise_std == pytest.approx(sigma * clip_norm * math.sqrt(survivors / n))
    assert releases[0].survivors == survivors


# -- accounting ------------------------------------------------------------------------------
def test_poisson_epsilon_matches_an_independent_recomputation():
    history = [Release(1.1, 0.05, 1000, 50)] * 30 + [Release(0.8, 0.05, 1000, 50)] * 10
    ours = epsilon_of(history, "poisson", 1e-5)
    independent = recompute.rdp_epsilon(recompute.merge([(r.noise_multiplier, r.sample_rate, 1) for r in history]), 1e-5)
    assert ours == pytest.approx(independent, rel=recompute.DEFAULT_TOLERANCE)
    assert not recompute.exceeds(independent, ours, recompute.DEFAULT_TOLERANCE)


def test_fixed_size_accounting_uses_replace_one_sensitivity_2c():
    import dp_accounting

    history = [Release(2.0, 0.1, 100, 10)] * 20
    ours = epsilon_of(history, "fixed", 1e-5)
    # Straight from dp_accounting: replace-one neighbours, noise relative to the sensitivity 2C, i.e. sigma / 2.
    direct = dp_accounting.rdp.RdpAccountant(
        orders=recompute.RDP_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0)), 20)
    assert ours == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
    # The audit's independent recomputation, fed the recorded sigma (relative to C), agrees.
    assert ours == pytest.approx(recompute.fixed_size_rdp_epsilon(((2.0, 100, 10),) * 20, 1e-5), rel=1e-6)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_calibrated_sigma_meets_the_target_tightly(sampling):
    plan = Release(1.0, 0.1, 100, 10)
    sigma = calibrate_sigma(target_epsilon=3.0, delta=1e-5, sampling=sampling, plan=plan, rounds=25)
    at = lambda s: epsilon_of([Release(s, 0.1, 100, 10)] * 25, sampling, 1e-5)  # noqa: E731
    assert at(sigma) <= 3.0
    assert at(sigma * 0.99) > 3.0


def test_stop_reason_before_a_round_that_would_exceed_the_budget(compose):
    cfg = compose(["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.5",
                   "simulation.num_clients=5", "simulation.fraction_train=1.0"])
    sigma = 1.5
    one, two = (epsilon_of([Release(sigma, 1.0, 5, 5)] * k, "poisson", 1e-5) for k in (1, 2))
    cfg.privacy.client_max_epsilon = (one + two) / 2
    strategy = client_dp_wrapper(cfg, sigma, [])
    assert strategy.stop_reason(1, StandInGrid([1, 2, 3, 4, 5])) is None
    strategy.accountant.record(Release(sigma, 1.0, 5, 5))
    reason = strategy.stop_reason(2, StandInGrid([1, 2, 3, 4, 5]))
    assert reason is not None and "client_max_epsilon" in reason
    assert strategy.accountant.epsilon <= cfg.privacy.client_max_epsilon


def test_accountant_survives_the_checkpoint_round_trip(compose):
    cfg = compose(["privacy=client_dp"])
    accountant = build_accountant(client_dp_plan(cfg))
    assert planned_epsilon(client_dp_plan(cfg), accountant.noise_multiplier) <= cfg.privacy.client_target_epsilon
    accountant.record(Release(accountant.noise_multiplier, 1.0, 5, 5))
    state = RunState("lineage", 1, client_dp=accountant.to_payload())
    again = FederationAccountant.from_payload(RunState.from_payload(state.to_payload()).client_dp)
    assert again == accountant and again.epsilon == accountant.epsilon


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["privacy=client_dp", "strategy=fedmedian"], "strategy=fedmedian"),
        (["privacy=client_dp", "privacy.client_noise_multiplier=1.0"], "privacy.client_target_epsilon"),
        (["privacy=client_dp", "privacy.client_target_epsilon=null"], "privacy.client_noise_multiplier"),
        (["privacy=client_dp", "privacy.client_sampling=stratified"], "privacy.client_sampling"),
        (["privacy=client_dp", "privacy.noise=everywhere"], "privacy.noise"),
        (["privacy=client_dp", "privacy.noise=distributed"], "secure_agg=secaggplus"),
        (["privacy=client_dp", "privacy.noise=distributed", "secure_agg=secaggplus"], "privacy.client_sampling=fixed"),
        (["privacy=client_dp", "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus"],
         "secure_agg.clip_range"),
        (["privacy=client_dp", "privacy.client_clip_norm=0"], "privacy.client_clip_norm"),
        (["privacy=client_dp", "privacy.accountant=prv"], "privacy.accountant"),
        (["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=0"],
         "privacy.allow_zero_noise"),
        (["privacy=client_dp", "simulation.fraction_train=0.2"], "simulation.min_clients_per_round"),
        (["privacy=client_dp", "privacy.client_max_epsilon=-1"], "privacy.client_max_epsilon"),
    ],
)
def test_impossible_client_dp_settings_are_refused(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        compose_config(overrides)


def test_client_dp_alone_does_not_switch_on_dp_sgd(compose):
    from fedguard.conf.plans import client_level_dp, trains_privately

    assert client_level_dp(compose(["privacy=client_dp"])) and not trains_privately(compose(["privacy=client_dp"]))
    both = compose(["privacy=sample_and_client_dp"])
    assert client_level_dp(both) and trains_privately(both)


def test_resume_counts_a_release_the_ledger_holds_but_the_checkpoint_lacks(compose, tmp_path):
    """A crash after the ledger write but before the checkpoint: the resumed accountant counts it."""
    from fedguard.server.privacy_ledger import FederationLedger

    cfg = compose(["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.0"])
    ledger = FederationLedger(tmp_path, "lineage", config_to_yaml(cfg), resumed_after=None)
    first = client_dp_wrapper(cfg, 1.0, [])
    first.on_release = ledger.record_release
    base = random_arrays(np.random.default_rng(6))
    for server_round in (1, 2):
        messages = list(first.configure_train(server_round, base, ConfigRecord({}), StandInGrid([1, 2, 3, 4, 5])))
        first.aggregate_train(server_round, [train_reply(m, base) for m in messages])
    checkpointed = FederationAccountant.from_payload(first.accountant.to_payload())
    checkpointed.releases = checkpointed.releases[:1]  # the checkpoint of round 2 never got written
    ledger.close()
    resumed_ledger = FederationLedger(tmp_path, "lineage", config_to_yaml(cfg), resumed_after=1)
    resumed = client_dp_wrapper(cfg, 1.0, [])
    resumed.accountant = checkpointed
    resumed.account_recorded(resumed_ledger.client_dp_releases_after(1))
    resumed_ledger.close()
    assert resumed.accountant.releases == first.accountant.releases
    assert resumed.accountant.epsilon == pytest.approx(first.accountant.epsilon)


def test_fixed_size_rdp_orders_are_opacus_default_grid():
    """RDP_ORDERS is written out (cheap import); it must stay Opacus's grid so both samplings compare."""
    from opacus.accountants.rdp import RDPAccountant

    from fedguard.privacy.client_dp_accounting import RDP_ORDERS

    assert RDP_ORDERS == tuple(RDPAccountant.DEFAULT_ALPHAS)
