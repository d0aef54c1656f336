"""Issue #14, item 4: a site's spend and budget follow its data, not the run.

A new run (a new lineage id from the server) on the same training set must continue that
data's spend, a budget the site gives later must win when stricter, and state written before
data records existed is counted (never reset).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedguard.clients.data_spend import data_fingerprint
from fedguard.clients.private_training import PRIOR_KEY, attach_prior_spend
from fedguard.clients.site_state import PRIVACY_DIR, SiteStateStore
from fedguard.privacy.accounting import compute_epsilon
from fedguard.privacy.client_budget import STATE_KEY, ClientPrivacyState

DELTA = 1e-5
ROUND = (1.1, 0.1, 50)  # (sigma, q, steps) of one round


def fingerprint(seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return data_fingerprint((rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 3, 40)))


def train_round(root: Path, lineage: str, fp: str | None, site_budget: float | None = None,
                run_budget: float | None = None) -> ClientPrivacyState:
    """One round as clients/app.py and SampleDPTrainer.train do it, minus the SGD."""
    store = SiteStateStore(root, lineage, data_fingerprint=fp, site_budget=site_budget)
    with store.locked(RecordDict()) as state:
        if STATE_KEY in state:
            priv = ClientPrivacyState.from_dict(state[STATE_KEY])
        else:
            priv = ClientPrivacyState(ROUND[0], ROUND[1], DELTA, "rdp", run_budget)
        prior_budget = attach_prior_spend(priv, state)
        priv.tighten(run_budget, site_budget, prior_budget)
        fits, _ = priv.fits_budget(ROUND[2])
        if fits:
            priv.history.append(ROUND)
            priv.rounds_participated += 1
        state[STATE_KEY] = ConfigRecord(priv.to_dict())
    return priv


def epsilon_of_rounds(rounds: int) -> float:
    return compute_epsilon([(ROUND[0], ROUND[1], ROUND[2] * rounds)], DELTA, "rdp").epsilon


def test_a_new_run_on_the_same_data_continues_its_spend(tmp_path: Path):
    fp = fingerprint()
    train_round(tmp_path, "run1", fp)
    train_round(tmp_path, "run1", fp)
    second = train_round(tmp_path, "run2", fp)  # a new lineage, the same records
    assert second.epsilon()[0] == pytest.approx(epsilon_of_rounds(3), rel=1e-6)
    third = train_round(tmp_path, "run3", fp)
    assert third.epsilon()[0] == pytest.approx(epsilon_of_rounds(4), rel=1e-6)


def test_other_data_starts_at_zero(tmp_path: Path):
    train_round(tmp_path, "run1", fingerprint(0))
    other = train_round(tmp_path, "run2", fingerprint(1))
    assert other.epsilon()[0] == pytest.approx(epsilon_of_rounds(1), rel=1e-6)


def test_the_strictest_site_budget_wins_across_runs(tmp_path: Path):
    fp = fingerprint()
    budget = (epsilon_of_rounds(2) + epsilon_of_rounds(3)) / 2  # fits two rounds, not three
    train_round(tmp_path, "run1", fp, site_budget=10.0)
    train_round(tmp_path, "run1", fp, site_budget=budget)  # stricter, given later: wins over the stored 10
    refused = train_round(tmp_path, "run2", fp, site_budget=None)  # a new run without the flag still obeys it
    assert refused.budget_epsilon == pytest.approx(budget)
    assert refused.rounds_participated == 0 and refused.epsilon()[0] <= budget


def test_a_stored_budget_never_outlives_a_stricter_one():
    priv = ClientPrivacyState(1.0, 0.1, DELTA, "rdp", budget_epsilon=5.0)
    priv.tighten(8.0)
    assert priv.budget_epsilon == 5.0
    priv.tighten(3.0, None)
    assert priv.budget_epsilon == 3.0


def test_existing_lineage_state_is_migrated_not_reset(tmp_path: Path):
    train_round(tmp_path, "old", None)  # written before data records existed
    assert not (tmp_path / PRIVACY_DIR / "data").exists()
    new = train_round(tmp_path, "new", fingerprint())
    assert new.epsilon()[0] == pytest.approx(epsilon_of_rounds(2), rel=1e-6)
    record = json.loads(next((tmp_path / PRIVACY_DIR / "data").glob("*.json")).read_text())
    assert set(record["lineages"]) == {"old", "new"}


def test_prior_spend_is_handed_to_the_trainer(tmp_path: Path):
    fp = fingerprint()
    train_round(tmp_path, "run1", fp, site_budget=40.0)
    state = RecordDict()
    with SiteStateStore(tmp_path, "run2", data_fingerprint=fp).locked(state):
        assert PRIOR_KEY in state and list(state[PRIOR_KEY]["steps"]) == [ROUND[2]]
        assert float(state[PRIOR_KEY]["budget_epsilon"]) == 40.0


@pytest.mark.usefixtures("flower_task_identity")
def test_a_site_without_state_dir_trains_privately_only_when_it_says_so():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from client_app_support import client_app, train_message  # noqa: PLC0415 - test helper module
    from flwr.app import Context

    from fedguard.conf import compose_config

    cfg = compose_config(["model=logreg", "device=cpu", "privacy=sample_dp", "train.max_steps=1"])
    message = train_message(cfg, server_round=1)

    def reply(node_config: dict) -> object:
        context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        return client_app(message, context)

    refused = reply({"partition-id": 0, "num-partitions": 5})
    assert refused.has_error() and "ephemeral-privacy-state" in refused.error.reason
    assert not reply({"partition-id": 0, "num-partitions": 5, "ephemeral-privacy-state": True}).has_error()
