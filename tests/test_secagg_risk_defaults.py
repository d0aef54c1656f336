"""SecAgg+ defaults sized from a stated risk bound (privacy/secagg/risk.py, conf/validation.py).

The model: a server that lists every one of its colluders (ceil(collusion x sites)) in every
cohort, over a graph it cannot bias. The issue's reference (k=4, t=3, 5% of 100 sites, no
dropouts) is 2.7e-4 per site-round and 0.73 over 50 rounds; the config refuses a run above
``secure_agg.max_run_exposure`` and names the keys and a (k, t) that meets it.
"""

from __future__ import annotations

from math import comb

import pytest

from fedguard.conf import ConfigError
from fedguard.privacy.secagg.risk import (
    DEFAULT_MAX_ROUND_FAILURE,
    colluders_in,
    listed_risk,
    size_graph,
)


def test_listed_risk_matches_the_issue_reference():
    risk = listed_risk(4, 3, 100, 100, 50, 0.05)
    # 5 colluders among the 99 others: at least 3 of a site's 4 neighbours collude.
    expected = (comb(5, 3) * comb(94, 1) + comb(5, 4)) / comb(99, 4)
    assert risk.per_client_round == pytest.approx(expected)
    assert risk.per_client_round == pytest.approx(2.7e-4, rel=0.1)
    assert risk.per_run == pytest.approx(0.73, abs=0.05)


def test_fewer_colluders_than_the_threshold_expose_no_one_and_dropouts_fail_rounds():
    assert colluders_in(40, 0.05) == 2
    assert listed_risk(4, 3, 40, 40, 50, 0.05).per_run == 0
    assert listed_risk(4, 3, 41, 41, 50, 0.05).per_run > 0  # ceil(2.05) = 3 colluders reach t=3
    assert listed_risk(4, 3, 10, 10, 1, 0.0, dropout=0.05).round_failure == pytest.approx(
        1 - (1 - (1 - 0.95**4 - 4 * 0.05 * 0.95**3)) ** 10)


@pytest.mark.parametrize(("cohort", "collusion", "dropout"), [(100, 0.05, 0.05), (1000, 0.05, 0.0), (33, 0.1, 0.1)])
def test_sized_graph_meets_the_bound_and_a_smaller_one_does_not(cohort, collusion, dropout):
    bound = 1e-3
    k, t = size_graph(cohort, cohort, 50, collusion, dropout, bound)
    risk = listed_risk(k, t, cohort, cohort, 50, collusion, dropout)
    assert 2 * t > k and risk.per_run <= bound and risk.round_failure <= DEFAULT_MAX_ROUND_FAILURE
    for smaller in range(2, k, 2):  # no smaller degree meets both with any t
        assert all(listed_risk(smaller, s, cohort, cohort, 50, collusion, dropout).per_run > bound
                   or listed_risk(smaller, s, cohort, cohort, 50, collusion, dropout).round_failure
                   > DEFAULT_MAX_ROUND_FAILURE for s in range(smaller // 2 + 1, smaller + 1))


@pytest.mark.simulation  # three Hydra compositions: over a second under load
def test_a_run_above_the_bound_is_refused_naming_the_keys_and_the_sized_graph_composes(compose):
    run = ["secure_agg=secaggplus", "simulation.num_clients=100", "simulation.fraction_train=1.0", "simulation.rounds=50"]
    with pytest.raises(ConfigError) as refused:
        compose(run)
    message = str(refused.value)
    for key in ("secure_agg.neighbours=4", "secure_agg.threshold=3", "secure_agg.max_run_exposure",
                "secure_agg.assumed_collusion"):
        assert key in message
    suggested = message.split("; ")[-1].split(" meets")[0].split()
    cfg = compose([*run, *suggested])
    assert (cfg.secure_agg.neighbours, cfg.secure_agg.threshold) == (10, 6)
    with pytest.raises(ConfigError, match="secure_agg.assumed_collusion"):
        compose([*run, *suggested, "secure_agg.assumed_collusion=0.7"])


def test_the_printed_line_states_the_assumptions_and_the_bound(compose):
    from fedguard.conf.plans import secagg_risk_line

    line = secagg_risk_line(compose(["secure_agg=secaggplus", "secure_agg.assumed_dropout=0.1"]))
    assert "5% of sites collude" in line and "10% drop out" in line and "refused above 0.001" in line
