"""Issue #14, item 9: the audit recomputes q and the steps from what a site committed to.

The attack: a lying site halves the sample rate (or the steps) it states, computes the
epsilon that would match, and signs the entry with its own key, so chain, signatures and
arithmetic are all consistent. Only its signed batch size, dataset size and epochs give it
away: q = 1/ceil(N/B), steps = epochs x ceil(N/B).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedguard.privacy.audit import ExitCode, run_audit
from fedguard.privacy.audit.commitments import NOT_VERIFIABLE, committed
from fedguard.privacy.audit.spend import MISMATCH, OK
from fedguard.privacy.audit.synthetic import DEFAULT_DELTA, build_synthetic_run, opacus_epsilon
from fedguard.privacy.ledger_events import SampleDpTraining

LIAR = "1"


class LyingSite:
    """Rewrites one site's entries (q or steps scaled) with the epsilon that would match them."""

    def __init__(self, rate_factor: float = 1.0, steps_factor: float = 1.0) -> None:
        self.rate_factor, self.steps_factor = rate_factor, steps_factor
        self.history: list[tuple[float, float, int]] = []

    def __call__(self, event: SampleDpTraining) -> SampleDpTraining:
        if event.client != LIAR:
            return event
        rate, steps = event.sample_rate * self.rate_factor, max(1, int(event.steps * self.steps_factor))
        self.history.append((event.noise_multiplier, rate, steps))
        epsilon = opacus_epsilon(tuple(self.history), DEFAULT_DELTA, event.accountant)
        return dataclasses.replace(event, sample_rate=rate, steps=steps, epsilon=epsilon)


def test_genuine_commitments_pass(tmp_path: Path):
    build_synthetic_run(tmp_path, clients=3, rounds=3)
    result = run_audit(tmp_path, with_pld=False)
    assert result.exit_code == ExitCode.OK, result.as_dict()
    assert all(audit.status == OK and not audit.unverified for audit in result.spend.clients.values())


@pytest.mark.parametrize("lie", [{"rate_factor": 0.5}, {"steps_factor": 0.5}])
def test_a_site_that_understates_q_or_steps_is_caught(tmp_path: Path, lie):
    build_synthetic_run(tmp_path, clients=3, rounds=3, entry_hook=LyingSite(**lie))
    result = run_audit(tmp_path, with_pld=False)
    liar = result.spend.clients[LIAR]
    assert result.exit_code == ExitCode.MISMATCH, result.as_dict()
    assert liar.status == MISMATCH
    assert any("committed" in problem for problem in liar.mismatches)
    # The recomputation uses the committed figures, so it is the honest epsilon, far above the claim.
    assert liar.epsilon_same_method > liar.epsilon_reported * 1.2
    assert all(result.spend.clients[name].status == OK for name in result.spend.clients if name != LIAR)


def test_prv_entries_are_checked_every_round(tmp_path: Path):
    """A site that understates an early round and reports the truth at the end is still caught."""
    def hook(event: SampleDpTraining) -> SampleDpTraining:
        if event.client == LIAR and event.round == 1:
            return dataclasses.replace(event, epsilon=event.epsilon * 0.5)
        return event

    build_synthetic_run(tmp_path, clients=2, rounds=2, accountant="prv", entry_hook=hook)
    result = run_audit(tmp_path, with_pld=False)
    assert any("round 1" in problem for problem in result.spend.clients[LIAR].mismatches), result.as_dict()


def test_old_entries_without_commitments_still_parse_but_say_so(tmp_path: Path):
    def old(event: SampleDpTraining) -> SampleDpTraining:
        return dataclasses.replace(event, batch_size=None, dataset_size=None, local_epochs=None)

    build_synthetic_run(tmp_path, clients=2, rounds=2, entry_hook=old)
    result = run_audit(tmp_path, with_pld=False)
    assert result.exit_code == ExitCode.OK
    assert all(audit.unverified == [NOT_VERIFIABLE] for audit in result.spend.clients.values())
    assert result.as_dict()["clients"]["0"]["unverified"] == [NOT_VERIFIABLE]


def test_committed_rate_is_opacus_loader_rate():
    body = {"batch_size": 32, "dataset_size": 400, "local_epochs": 2, "max_steps": None}
    assert committed(body).sample_rate == pytest.approx(1 / 13) and committed(body).steps == 26
    assert committed({**body, "max_steps": 5}).steps == 5
    assert committed({"batch_size": None, "dataset_size": 400, "local_epochs": 1}) is None


def test_a_site_signs_its_commitments_with_each_entry(tmp_path: Path, compose):
    from fedguard.clients.private_training import training_commitments
    from fedguard.clients.site_state import SiteStateStore
    from fedguard.privacy.ledger import read_ledger

    cfg = compose(["privacy=sample_dp", "train.batch_size=16", "train.local_epochs=2"])
    report = {"noise_multiplier": 1.1, "sample_rate": 1 / 7, "steps_round": 14, "delta": 1e-5, "accountant": "rdp",
              "epsilon": 0.5, "budget_epsilon": -1.0, "refused": False}
    store = SiteStateStore(tmp_path, "lineage1")
    store.record_spend(report, partition_id=0, server_round=1, max_grad_norm=1.0,
                       committed=training_commitments(cfg, dataset_size=100))
    body = read_ledger(store.ledger_path)[-1]["body"]
    assert (body["batch_size"], body["dataset_size"], body["local_epochs"], body["max_steps"]) == (16, 100, 2, None)
    assert committed(body).sample_rate == pytest.approx(1 / 7) and committed(body).steps == 14


def _distributed_release(**changes) -> dict:
    from fedguard.privacy.ledger_events import ClientDpRelease

    sigma = 2.0 * (10 / 20) ** 0.5  # 10 of an expected 20 survived
    event = ClientDpRelease(round=1, clip_norm=0.5, noise_std=sigma * 0.5, noise_multiplier=sigma, sampling="fixed",
                            sample_rate=0.5, cohort_size=20, survivors=10, delta=1e-5, accountant="rdp", epsilon=1.0,
                            population=40, noise="distributed", expected_cohort=20.0, planned_update_noise_multiplier=2.0)
    return dataclasses.replace(event, **changes).body()


def test_distributed_sigma_is_recomputed_from_the_survivors():
    from fedguard.privacy.audit.spend import SpendAudit, _effective_sigma

    honest = SpendAudit(name="federation")
    assert _effective_sigma(_distributed_release(), honest) == pytest.approx(2.0 * 0.5**0.5)
    assert not honest.mismatches
    # A server that states the planned σ (and a matching noise_std) although only 5 survived is caught.
    lying = SpendAudit(name="federation")
    sigma = _effective_sigma(_distributed_release(survivors=5), lying)
    assert sigma == pytest.approx(2.0 * 0.25**0.5)
    assert any("survivors" in problem for problem in lying.mismatches)
