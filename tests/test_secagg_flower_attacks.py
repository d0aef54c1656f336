"""The attack table's driver against Flower's secaggplus_mod (simulations/bench_secagg_attacks_flower.py)
rebuilds exactly the target's input where Flower has no check, and is refused where it has one, so the
README's table reports what the attacks do and not what the driver gets wrong."""

from __future__ import annotations

import pytest

from fedguard.simulations import bench_secagg_attacks_flower as flower_attacks


@pytest.mark.simulation  # EC key generation and three protocol runs: over a second under load
@pytest.mark.usefixtures("flower_task_identity")
def test_driver_results_against_flowers_mod():
    assert flower_attacks.key_substitution()["result"] == "succeeded"
    assert flower_attacks.too_few_shares()["result"] == "refused"
    assert flower_attacks.peer_named_both_ways()["result"] == "succeeded"


@pytest.mark.usefixtures("flower_task_identity")
def test_driver_does_not_claim_success_for_another_site_s_input(monkeypatch):
    """With the target's update changed after the fact, the same rebuilt vector no longer counts as its input."""
    monkeypatch.setattr(flower_attacks, "_is_target_input",
                        lambda values: bool(abs(values - flower_attacks._update(flower_attacks.TARGET + 1)).max() < 1e-3))
    assert flower_attacks.key_substitution()["result"] == "failed"
