"""Issue #14, item 6: client-level epsilon is stated per observer.

Amplification by client sampling holds only against observers who cannot tell who was
sampled. The server operator draws the cohorts, so against it a round is a plain Gaussian
(sample rate 1); with central noise it even sees the updates before the noise (no epsilon).
"""

from __future__ import annotations

import numpy as np
import pytest
from fedguard.clients.wire import protocol
from fedguard.privacy.client_dp_accounting import (
    COHORT_KNOWERS,
    MODEL_USERS_AND_OTHER_SITES,
    SERVER_OPERATOR,
    Release,
    epsilon_of,
)
from fedguard.privacy.ledger_events import ClientDpRelease
from flwr.app import ConfigRecord, MetricRecord

from tests.client_dp_support import StandInGrid, client_dp_wrapper, random_arrays, train_reply

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CLIENTS = 20


def one_round(cfg, sigma: float, *, secure: bool) -> tuple[dict, list[ClientDpRelease]]:
    releases: list[ClientDpRelease] = []
    strategy = client_dp_wrapper(cfg, sigma, releases, secure=secure)
    base = random_arrays(np.random.default_rng(0))
    grid = StandInGrid(list(range(1, CLIENTS + 1)))
    messages = list(strategy.configure_train(1, base, ConfigRecord({}), grid))
    if secure:
        reply = train_reply(messages[0], base)
        reply.content[protocol.METRICS_KEY] = MetricRecord(
            {protocol.NUM_EXAMPLES_KEY: len(messages), protocol.TRAIN_LOSS_KEY: 1.0})
        replies = [reply]
    else:
        replies = [train_reply(m, base) for m in messages]
    strategy.aggregate_train(1, replies)
    return strategy.federation_summary(), releases


def test_distributed_noise_states_the_unamplified_epsilon_for_the_server(compose):
    cfg = compose(["privacy=client_dp", "privacy.noise=distributed", "privacy.client_sampling=fixed",
                   "secure_agg=secaggplus", "secure_agg.clip_range=8", "privacy.client_target_epsilon=null",
                   "privacy.client_noise_multiplier=2.0", "privacy.client_clip_norm=0.5",
                   f"simulation.num_clients={CLIENTS}", "simulation.fraction_train=0.5"])
    summary, releases = one_round(cfg, 2.0, secure=True)
    by_observer = summary["epsilon_by_observer"]
    assert by_observer[MODEL_USERS_AND_OTHER_SITES] == pytest.approx(summary["epsilon"])
    unamplified = epsilon_of([Release(2.0, 1.0, CLIENTS, CLIENTS)], "fixed", float(cfg.privacy.delta))
    assert by_observer[SERVER_OPERATOR] == pytest.approx(unamplified)
    assert by_observer[SERVER_OPERATOR] > by_observer[MODEL_USERS_AND_OTHER_SITES]
    assert releases[0].epsilon_server_operator == pytest.approx(unamplified)


def test_central_noise_gives_the_server_operator_no_epsilon(compose):
    cfg = compose(["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.5",
                   f"simulation.num_clients={CLIENTS}", "simulation.fraction_train=0.5"])
    summary, releases = one_round(cfg, 1.5, secure=False)
    assert summary["epsilon_by_observer"][SERVER_OPERATOR] is None  # it sees each update before the noise
    assert summary["epsilon_by_observer"][MODEL_USERS_AND_OTHER_SITES] == pytest.approx(summary["epsilon"])
    assert releases[0].epsilon_server_operator is None
    unamplified = epsilon_of([Release(1.5, 1.0, CLIENTS, CLIENTS)], "poisson", float(cfg.privacy.delta))
    assert summary["epsilon_by_observer"][COHORT_KNOWERS] == pytest.approx(unamplified)
    assert unamplified > summary["epsilon"]


def test_console_names_the_observer_of_every_client_level_epsilon():
    """The summary table never prints a client-level epsilon without the party it holds against."""
    from fedguard.server.run_record import _client_level_rows

    rows = dict(_client_level_rows({
        "epsilon": 2.0, "delta": 1e-5,
        "epsilon_by_observer": {"server_operator": None, "knows_cohorts": 7.5, "model_users_and_other_sites": 2.0},
    }))
    assert rows["client-level epsilon, against the server operator"].startswith("none holds")
    assert rows["client-level epsilon, against users of the models and other sites"].startswith("2.000")
    assert rows["client-level epsilon, against anyone who knows the cohorts (run directory, broken TLS)"].startswith("7.500")
