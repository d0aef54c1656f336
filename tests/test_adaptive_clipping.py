"""Adaptive clipping for client-level DP (Andrew et al. 2021): the σ split, the update rule,
the clip indicator's path (plain and under SecAgg+), accounting, audit, checkpoint, config.

Unit level, no simulation (tests/test_client_dp_sim.py has the one real run): the wrapper
runs against a stand-in grid and hand-built replies, as in tests/test_client_dp.py.
"""

from __future__ import annotations

import logging
import math
import os

import dp_accounting
import numpy as np
import pytest
from fedguard.clients.client_dp import client_dp_mod, round_clip_norm, update_norm
from fedguard.clients.secure_aggregation import INPUT_ARRAY, INPUT_STATE_KEY, encode_held_update, secure_aggregation_mod
from fedguard.clients.wire import protocol
from fedguard.clients.wire.checks import MalformedMessage
from fedguard.conf import ConfigError, compose_config
from fedguard.conf.plans import adaptive_clip_rule, client_dp_plan
from fedguard.conf.run_config import config_to_yaml
from fedguard.privacy.accounting import PrivacyConfigError
from fedguard.privacy.adaptive_clipping import AdaptiveClipState, clip_indicator, next_clip_norm, reachable_clip_norms
from fedguard.privacy.audit import recompute
from fedguard.privacy.audit.spend import MISMATCH, OK, audit_federation
from fedguard.privacy.audit.verify import AttributedEvent
from fedguard.privacy.client_dp_noise import (
    combined_noise_multiplier,
    count_share_std,
    noise_split,
    update_noise_multiplier,
)
from fedguard.privacy.ledger_events import ClientDpRelease, EventError
from fedguard.privacy.secagg.masking import add_mod
from fedguard.server.client_dp import ClientDpStrategy, wrap_for_client_dp
from fedguard.server.federation import sort_train_replies
from fedguard.server.run_state import RunState
from fedguard.server.secure_aggregation import SecureAggregationExchange
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

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

SIGMA, COUNT_STD, CLIP, DELTA = 1.0, 2.0, 0.5, 1e-5
NODES = [1, 2, 3, 4, 5]
ADAPTIVE = ["privacy=client_dp", "privacy.client_clipping=adaptive", "privacy.client_target_epsilon=null",
            f"privacy.client_noise_multiplier={SIGMA}", f"privacy.adaptive_clipping.clipped_count_stddev={COUNT_STD}",
            f"privacy.client_clip_norm={CLIP}", "simulation.num_clients=5", "simulation.fraction_train=1.0"]
DISTRIBUTED = [*ADAPTIVE, "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus", "secure_agg.clip_range=8"]


@pytest.mark.parametrize(("sigma", "count_std"), [(1.0, 1.0), (0.8, 2.5), (3.0, 1.6)])
def test_sigma_split_is_one_gaussian_mechanism(sigma, count_std):
    update_sigma = update_noise_multiplier(sigma, count_std)
    assert update_sigma == pytest.approx((sigma**-2 - (2 * count_std) ** -2) ** -0.5)
    assert update_sigma > sigma and combined_noise_multiplier(update_sigma, count_std) == pytest.approx(sigma)
    # dp_accounting, independently: Gaussian(σ_Δ) on the update (sensitivity 1 in units of C) composed with
    # Gaussian(2σ_b) on the count (sensitivity 1/2) spends exactly what one Gaussian(σ) does.
    def epsilon(event) -> float:
        accountant = dp_accounting.rdp.RdpAccountant(orders=recompute.RDP_ORDERS)
        accountant.compose(event, 10)
        return accountant.get_epsilon(DELTA)

    pair = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(update_sigma),
                                          dp_accounting.GaussianDpEvent(2 * count_std)])
    assert epsilon(pair) == pytest.approx(epsilon(dp_accounting.GaussianDpEvent(sigma)), rel=1e-9)


def test_split_refused_where_twice_sigma_b_does_not_exceed_sigma(compose):
    with pytest.raises(PrivacyConfigError):
        update_noise_multiplier(1.0, 0.5)
    overrides = [o for o in ADAPTIVE if "clipped_count_stddev" not in o]
    with pytest.raises(ConfigError, match=r"privacy\.adaptive_clipping\.clipped_count_stddev=0\.5 .*2 sigma_b > sigma"):
        compose_config([*overrides, "privacy.adaptive_clipping.clipped_count_stddev=0.5"])
    assert noise_split(client_dp_plan(compose([*overrides, "privacy.adaptive_clipping.clipped_count_stddev=0.51"]))).update_sigma > 1
    # the default σ_b (expected cohort / 20) is far too small for 5 clients at sigma 1: refused, saying so
    with pytest.raises(ConfigError, match=r"clipped_count_stddev=null \(expected cohort / 20\)"):
        compose_config(overrides)


# -- the update rule --------------------------------------------------------------------------
def test_geometric_update_on_a_known_sequence():
    state = AdaptiveClipState(clip_norm=1.0, target_quantile=0.5, learning_rate=0.2)
    n = 10.0  # expected cohort; the state gets noisy sums of b - 1/2
    expected, clip = [], 1.0
    for centred_sum, fraction in [(5.0, 1.0), (-5.0, 0.0), (0.0, 0.5), (2.5, 0.75), (50.0, 1.0), (-9.0, 0.0)]:
        assert state.update(centred_sum, n) == pytest.approx(fraction)  # b̄, clamped to [0, 1]
        clip *= math.exp(-0.2 * (fraction - 0.5))
        expected.append(clip)
        assert state.clip_norm == pytest.approx(clip, rel=1e-12)
    assert expected[:4] == pytest.approx([math.exp(-0.1), 1.0, 1.0, math.exp(-0.05)])
    capped = AdaptiveClipState(clip_norm=1.0, target_quantile=0.5, learning_rate=0.2, ceiling=1.05)
    capped.update(-5.0, n)  # nobody within C: C would grow by exp(0.1) = 1.105, but the ceiling holds it
    assert capped.clip_norm == 1.05


@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("start", [0.1, 10.0])
def test_clip_norm_converges_to_the_target_quantile(gamma, start):
    """400 clients with log-normal update norms, Poisson cohorts of expected 200, σ_b = 0.01:
    after 300 rounds C (geometric mean of the last 100) is within 5% of the population's
    γ-quantile, and the share of norms within it within 0.02 of γ (measured: under 1.5% and 0.0075)."""
    rng = np.random.default_rng(7)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=400)
    rate, count_std = 0.5, 0.01
    state = AdaptiveClipState(clip_norm=start * float(np.median(norms)), target_quantile=gamma, learning_rate=0.2)
    history = []
    for _ in range(300):
        cohort = norms[rng.random(norms.size) < rate]
        centred = sum(clip_indicator(float(n), state.clip_norm) for n in cohort)
        state.update(centred + rng.normal(0.0, count_std), rate * norms.size)
        history.append(state.clip_norm)
    settled = math.exp(float(np.mean(np.log(history[-100:]))))
    assert settled == pytest.approx(float(np.quantile(norms, gamma)), rel=0.05)
    assert abs(float(np.mean(norms <= settled)) - gamma) <= 0.02


# -- the client ---------------------------------------------------------------------------------
def _train_message(cfg, old: ArrayRecord, clip_norm: float | None, server_round: int = 1) -> Message:
    config = {protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.SERVER_ROUND_KEY: server_round}
    if cfg.secure_agg.mode != "off":  # the server opens a fresh SecAgg+ session with every train request
        config[protocol.SECAGG_SESSION_KEY] = os.urandom(protocol.SECAGG_SESSION_BYTES)
    if clip_norm is not None:
        config[protocol.CLIENT_CLIP_NORM_KEY] = clip_norm
    return Message(RecordDict({protocol.ARRAYS_KEY: old, protocol.CONFIG_KEY: ConfigRecord(config)}),
                   dst_node_id=7, message_type="train")


def _trainer(old: ArrayRecord, norm: float, seed: int = 0):
    direction = np.random.default_rng(seed).standard_normal(DIMENSION)

    def train(msg, _context):
        metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: 40, protocol.TRAIN_LOSS_KEY: 0.5})
        arrays = shifted(old, direction / np.linalg.norm(direction) * norm)
        return Message(RecordDict({protocol.ARRAYS_KEY: arrays, protocol.METRICS_KEY: metrics}), reply_to=msg)

    return train


def test_client_clips_to_the_servers_norm_and_sends_its_centred_indicator(compose):
    cfg = compose(ADAPTIVE)
    old = random_arrays(np.random.default_rng(1))
    replies = []
    for node, norm in ((1, 2 * CLIP), (2, 0.5 * CLIP)):
        msg = _train_message(cfg, old, CLIP)
        reply = client_dp_mod(msg, None, _trainer(old, norm))
        reply.metadata.__dict__["_src_node_id"] = node
        assert update_norm(reply.content[protocol.ARRAYS_KEY], old) <= CLIP
        assert reply.content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD] == (-0.5 if norm > CLIP else 0.5)
        replies.append(reply)
    forged = client_dp_mod(_train_message(cfg, old, CLIP), None, _trainer(old, CLIP))
    forged.content[protocol.CLIP_INDICATOR_KEY] = ConfigRecord({protocol.CLIP_INDICATOR_FIELD: 0.3})
    forged.metadata.__dict__["_src_node_id"] = 3
    sorted_replies = sort_train_replies(1, [*replies, forged], old)  # the server's reply checks
    assert sorted_replies.usable == replies and sorted_replies.rejected == [forged]


def test_client_refuses_a_clip_norm_the_rule_cannot_have_produced(compose):
    cfg = compose(ADAPTIVE)
    low, high = reachable_clip_norms(CLIP, 0.5, 0.2, 2)  # round 3: two updates so far
    assert round_clip_norm(cfg, ConfigRecord({protocol.CLIENT_CLIP_NORM_KEY: high}), 3) == high
    assert round_clip_norm(cfg, ConfigRecord({protocol.CLIENT_CLIP_NORM_KEY: low}), 3) == low
    for value, server_round in [(CLIP * 1.01, 1), (high * 1.01, 3), (low * 0.99, 3), (math.nan, 3), (math.inf, 3),
                                (0.0, 3), (-CLIP, 3), (None, 3), ("0.5", 3)]:
        config = ConfigRecord({} if value is None else {protocol.CLIENT_CLIP_NORM_KEY: value})
        with pytest.raises(MalformedMessage, match=protocol.CLIENT_CLIP_NORM_KEY):
            round_clip_norm(cfg, config, server_round)
    # distributed noise: no C beyond what secure_agg.clip_range leaves room for, however many rounds passed
    distributed = compose(DISTRIBUTED)
    ceiling = adaptive_clip_rule(distributed).ceiling
    assert math.isfinite(ceiling) and round_clip_norm(distributed, ConfigRecord({protocol.CLIENT_CLIP_NORM_KEY: ceiling}), 50)
    with pytest.raises(MalformedMessage, match="clip_range"):
        round_clip_norm(distributed, ConfigRecord({protocol.CLIENT_CLIP_NORM_KEY: ceiling * 1.01}), 50)


def test_client_app_refuses_a_bad_clip_norm_before_training(compose, monkeypatch):
    """Through the real ClientApp (mods included): the refusal comes before any training or spend."""
    import fedguard.clients.app as client_app_module
    from fedguard.clients.datasets import load_dataset
    from fedguard.clients.models import build_model

    cfg = compose([*ADAPTIVE, "model=logreg", "train.max_steps=1", "device=cpu"])
    bundle = load_dataset(cfg.dataset, cfg.seed)
    model_arrays = ArrayRecord(build_model(cfg.model, bundle.input_shape, bundle.num_classes).state_dict())
    trained = []
    real_build_trainer = client_app_module.build_trainer
    monkeypatch.setattr(client_app_module, "build_trainer", lambda *a: trained.append(1) or real_build_trainer(*a))

    def send(clip_norm):
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 5},
                          state=RecordDict(), run_config={})
        return client_app_module.app(_train_message(cfg, model_arrays, clip_norm), context)

    refused = send(CLIP * 3)
    assert refused.has_error() and protocol.CLIENT_CLIP_NORM_KEY in refused.error.reason and not trained
    accepted = send(CLIP)
    assert not accepted.has_error() and trained == [1]
    assert accepted.content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD] in (-0.5, 0.5)


# -- the server: plain path -------------------------------------------------------------------------
def test_wrapper_sends_c_counts_indicators_and_moves_c(compose):
    cfg = compose(ADAPTIVE)
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, SIGMA, releases)
    strategy.rng = np.random.default_rng(3)
    base = random_arrays(np.random.default_rng(4))
    messages = list(strategy.configure_train(1, base, ConfigRecord({}), StandInGrid(NODES)))
    assert {m.content[protocol.CONFIG_KEY][protocol.CLIENT_CLIP_NORM_KEY] for m in messages} == {CLIP}
    indicators = [0.5, 0.5, 0.5, -0.5, 0.5]
    replies = [train_reply(m, base, b) for m, b in zip(messages, indicators)]
    replies.append(train_reply(messages[0], base, None))  # no indicator: refused under adaptive clipping
    strategy.aggregate_train(1, replies)
    count_noise = np.random.default_rng(3)
    count_noise.normal(0.0, 1.0, size=DIMENSION)  # the update's noise is drawn first
    noisy = sum(indicators) + count_noise.normal(0.0, COUNT_STD)
    fraction = min(1.0, max(0.0, noisy / 5 + 0.5))
    record = strategy.last_release
    assert record["survivors"] == 5 and record["unclipped_count"] == pytest.approx(noisy + 2.5)
    assert record["unclipped_fraction"] == pytest.approx(fraction)
    assert record["next_clip_norm"] == pytest.approx(next_clip_norm(CLIP, fraction, 0.5, 0.2)) == strategy.clip_norm
    split = noise_split(client_dp_plan(cfg))
    assert (record["noise_multiplier"], record["update_noise_multiplier"], record["count_noise_std"]) == pytest.approx(
        (SIGMA, split.update_sigma, COUNT_STD))
    event = releases[0]
    assert (event.clipping, event.clip_norm, event.noise_multiplier) == ("adaptive", CLIP, SIGMA)
    assert event.noise_std == pytest.approx(split.update_sigma * CLIP) and event.count_noise_std == COUNT_STD
    second = list(strategy.configure_train(2, base, ConfigRecord({}), StandInGrid(NODES)))
    assert second[0].content[protocol.CONFIG_KEY][protocol.CLIENT_CLIP_NORM_KEY] == strategy.clip_norm


def test_noisy_count_noise_std_matches_sigma_b(compose):
    """2,000 rounds of 5 clients: the released count minus the true count is N(0, σ_b²) (chi-square
    at 1e-6, which a 50% wrong std fails), on a model small enough to make rounds cheap."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = compose(ADAPTIVE)
    strategy = client_dp_wrapper(cfg, SIGMA)
    base = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    indicators = [0.5, -0.5, 0.5, 0.5, -0.5]
    errors = []
    for server_round in range(1, 2001):
        strategy.accountant.releases.clear()  # keep the epsilon recomputation per round cheap
        strategy.adaptive.clip_norm = CLIP  # and C away from float extremes
        messages = list(strategy.configure_train(server_round, base, ConfigRecord({}), StandInGrid(NODES)))
        strategy.aggregate_train(server_round, [train_reply(m, base, b) for m, b in zip(messages, indicators)])
        errors.append(strategy.last_release["unclipped_count"] - 3)  # three clients were within C
    statistic, low, high = variance_in_chi2_range(np.asarray(errors), COUNT_STD)
    assert low <= statistic <= high
    assert abs(float(np.mean(errors))) < 5 * COUNT_STD / math.sqrt(len(errors))  # unbiased
    wrong, low, high = variance_in_chi2_range(np.asarray(errors), COUNT_STD * 1.5)
    assert not low <= wrong <= high


# -- distributed noise under SecAgg+ --------------------------------------------------------------
def test_indicator_rides_masked_and_the_server_strips_its_sum(compose):
    """The client's SecAgg+ mod appends the noised indicator to the held vector (the reply shows
    neither update nor indicator); the server's aggregate carries the indicators' sum apart
    from the model, and the wrapper records σ from the noise that survived on both parts."""
    cfg = compose(DISTRIBUTED)
    n = client_dp_plan(cfg).cohort.expected_size()
    assert count_share_std(client_dp_plan(cfg)) == pytest.approx(COUNT_STD / math.sqrt(n))
    old = random_arrays(np.random.default_rng(5))
    exchange = SecureAggregationExchange(cfg)
    total, held, keyed = None, [], {}
    for node, norm in zip((1, 2, 3), (2 * CLIP, 0.1 * CLIP, 0.2 * CLIP)):
        context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
        reply = secure_aggregation_mod(_train_message(cfg, old, CLIP), context,
                                       lambda m, c, norm=norm: client_dp_mod(m, c, _trainer(old, norm, node)))
        assert set(reply.content.keys()) == {protocol.METRICS_KEY, protocol.SECAGG_KEY}
        vector = context.state[INPUT_STATE_KEY][INPUT_ARRAY].numpy().astype(np.float64)
        assert vector.size == DIMENSION + 1
        held.append(vector)
        encoded = encode_held_update(context)
        total = encoded if total is None else add_mod(total, encoded, int(cfg.secure_agg.modulus_bits))
        keyed[node] = reply
    content = exchange._aggregate_content(total, 3, {1, 2, 3}, keyed, old)  # noqa: SLF001 - the unmasked-sum step
    indicator_sum = content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD]
    assert indicator_sum == pytest.approx(sum(v[-1] for v in held), abs=1e-4)
    released = np.concatenate([content[protocol.ARRAYS_KEY][k].numpy().astype(np.float64).ravel()
                               - old[k].numpy().ravel() for k in old.keys()])
    np.testing.assert_allclose(released, sum(v[:-1] for v in held) / 3, atol=1e-4)

    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, SIGMA, releases, secure=True)
    messages = list(strategy.configure_train(1, old, ConfigRecord({}), StandInGrid(NODES)))
    aggregate = Message(content, reply_to=messages[0])
    strategy.aggregate_train(1, [aggregate])
    split, kept = noise_split(client_dp_plan(cfg)), math.sqrt(3 / n)
    event = releases[0]
    assert event.update_noise_multiplier == pytest.approx(split.update_sigma * kept)
    assert event.count_noise_std == pytest.approx(COUNT_STD * kept)
    assert event.noise_multiplier == pytest.approx(SIGMA * kept)  # both parts scale alike, so σ does too
    assert strategy.last_release["unclipped_count"] == pytest.approx(indicator_sum + n / 2)  # no central noise


# -- accounting, audit, checkpoint --------------------------------------------------------------
def _rounds(strategy: ClientDpStrategy, rounds: int, nodes: list[int] = NODES) -> None:
    base = random_arrays(np.random.default_rng(6))
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, base, ConfigRecord({}), StandInGrid(nodes)))
        strategy.aggregate_train(server_round, [train_reply(m, base, 0.5) for m in messages])


def _attributed(event: ClientDpRelease) -> AttributedEvent:
    return AttributedEvent(event.kind, event.body(), "server", event.round, event.round, "", False)


def test_adaptive_epsilon_equals_an_independent_recomputation_and_the_audit_checks_sigma(compose):
    cfg = compose([*ADAPTIVE, "simulation.num_clients=20", "simulation.fraction_train=0.5"])
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, SIGMA, releases)
    _rounds(strategy, 6, nodes=list(range(1, 21)))  # Poisson cohorts at q = 0.5
    # dp_accounting from the recorded noise alone: σ recombined from (noise_std / C, σ_b) here, in the test
    accountant = dp_accounting.rdp.RdpAccountant(orders=recompute.RDP_ORDERS)
    for event in releases:
        sigma = ((event.noise_std / event.clip_norm) ** -2 + (2 * event.count_noise_std) ** -2) ** -0.5
        accountant.compose(dp_accounting.PoissonSampledDpEvent(event.sample_rate, dp_accounting.GaussianDpEvent(sigma)))
    assert releases[-1].epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=recompute.DEFAULT_TOLERANCE)
    assert audit_federation([_attributed(e) for e in releases], None, recompute.DEFAULT_TOLERANCE).status == OK
    # a ledger claiming more noise than its noise stds add up to, or less epsilon, fails the audit
    inflated = [_attributed(e) for e in releases]
    inflated[2].body["noise_multiplier"] *= 1.2
    audit = audit_federation(inflated, None, recompute.DEFAULT_TOLERANCE)
    assert audit.status == MISMATCH and any("combined" in m for m in audit.mismatches)
    understated = [_attributed(e) for e in releases]
    understated[-1].body["epsilon"] *= 0.8
    assert audit_federation(understated, None, recompute.DEFAULT_TOLERANCE).status == MISMATCH
    with pytest.raises(EventError, match="count_noise_std"):
        ClientDpRelease(1, CLIP, 1.0, 1.0, "poisson", 0.5, 5, 5, DELTA, "rdp", 1.0, 10, "adaptive", 1.0, None)


def test_checkpoint_round_trip_keeps_the_clip_norm(compose):
    cfg = compose(ADAPTIVE)
    strategy = client_dp_wrapper(cfg, SIGMA)
    strategy.rng = np.random.default_rng(8)
    _rounds(strategy, 3)  # every client within C: C moves (mostly down)
    assert strategy.clip_norm != CLIP
    state = RunState("lineage", 3, client_dp=strategy.state_payload())
    saved = RunState.from_payload(state.to_payload()).client_dp
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                   min_available_nodes=1, weighted_by_key=protocol.NUM_EXAMPLES_KEY)
    resumed = wrap_for_client_dp(cfg, inner, saved)
    assert resumed.clip_norm == strategy.clip_norm and resumed.accountant == strategy.accountant
    base = random_arrays(np.random.default_rng(6))
    messages = list(resumed.configure_train(4, base, ConfigRecord({}), StandInGrid(NODES)))
    assert messages[0].content[protocol.CONFIG_KEY][protocol.CLIENT_CLIP_NORM_KEY] == strategy.clip_norm
    assert resumed.federation_summary()["clipping"] == "adaptive"
    assert resumed.federation_summary()["initial_clip_norm"] == CLIP


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ([*ADAPTIVE, "privacy.client_clipping=sometimes"], "privacy.client_clipping"),
        (["privacy=sample_dp", "privacy.client_clipping=adaptive"], "privacy.client_clipping"),
        ([*ADAPTIVE, "privacy.adaptive_clipping.target_quantile=1.5"], "privacy.adaptive_clipping.target_quantile"),
        ([*ADAPTIVE, "privacy.adaptive_clipping.learning_rate=0"], "privacy.adaptive_clipping.learning_rate"),
        ([*ADAPTIVE, "privacy.adaptive_clipping.clipped_count_stddev=-1"], "privacy.adaptive_clipping.clipped_count_stddev"),
        ([*ADAPTIVE, "privacy.adaptive_clipping.clipped_count_stddev=0.4"], "privacy.adaptive_clipping.clipped_count_stddev"),
        ([*ADAPTIVE, "+privacy.adaptive_clipping.surprise=1"], "privacy.adaptive_clipping.surprise"),
        ([*ADAPTIVE, "secure_agg=secaggplus", "secure_agg.clip_range=0.4"], "secure_agg.clip_range"),
        ([*DISTRIBUTED[:-1], "secure_agg.clip_range=5"], "secure_agg.clip_range"),  # C fits; the noised indicator does not
    ],
)
def test_impossible_adaptive_settings_are_refused(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        compose_config(overrides)
