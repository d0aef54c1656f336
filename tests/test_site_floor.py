"""Issue #14, item 11: a site pins its own privacy floor and refuses runs below it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedguard.clients.site import KNOWN_KEYS
from fedguard.clients.site_floor import FLOOR_KEYS, BelowSiteFloor, SiteFloor, check_site_floor, read_site_floor
from fedguard.conf import compose_config

SAMPLE = ["model=logreg", "device=cpu", "privacy=sample_dp", "train.max_steps=1"]


def test_floor_keys_are_part_of_the_node_config_schema():
    assert set(FLOOR_KEYS) <= set(KNOWN_KEYS)


@pytest.mark.parametrize(
    ("overrides", "floor", "named"),
    [
        (["privacy.target_epsilon=8"], SiteFloor(max_epsilon=3), "privacy.target_epsilon"),
        (["privacy.target_epsilon=null", "privacy.noise_multiplier=0.5"], SiteFloor(min_noise_multiplier=1.0),
         "privacy.noise_multiplier"),
    ],
)
def test_sample_level_runs_below_the_floor_are_refused(overrides, floor, named, caplog):
    cfg = compose_config([*SAMPLE, *overrides])
    with caplog.at_level(logging.WARNING), pytest.raises(BelowSiteFloor, match=named):
        check_site_floor(cfg, floor)
    assert named in caplog.text


def test_client_level_floor_checks_the_calibrated_sigma():
    cfg = compose_config(["privacy=client_dp", "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=0.8"])
    with pytest.raises(BelowSiteFloor, match="min-client-noise-multiplier"):
        check_site_floor(cfg, SiteFloor(min_client_noise_multiplier=1.0))
    check_site_floor(cfg, SiteFloor(min_client_noise_multiplier=0.5))


def test_runs_at_or_above_the_floor_pass():
    check_site_floor(compose_config([*SAMPLE, "privacy.target_epsilon=3"]), SiteFloor(max_epsilon=3, min_noise_multiplier=None))
    check_site_floor(compose_config(SAMPLE), read_site_floor({}))


@pytest.mark.parametrize("floor", [SiteFloor(max_epsilon=8), SiteFloor(min_client_noise_multiplier=0.5)])
def test_a_site_with_any_floor_refuses_a_run_without_dp(floor):
    with pytest.raises(BelowSiteFloor, match="privacy.mode=none is without differential privacy"):
        check_site_floor(compose_config(["privacy=none"]), floor)
    check_site_floor(compose_config(["privacy=none"]), SiteFloor())  # no floor: the site's choice


def test_bad_floor_values_are_refused():
    with pytest.raises(BelowSiteFloor):
        read_site_floor({"max-epsilon": -1})


@pytest.mark.usefixtures("flower_task_identity")
def test_the_client_app_refuses_before_training():
    sys.path.insert(0, str(Path(__file__).parent))
    from client_app_support import client_app, train_message  # noqa: PLC0415 - test helper module

    cfg = compose_config([*SAMPLE, "privacy.target_epsilon=8"])
    node_config = {"partition-id": 0, "num-partitions": 5, "ephemeral-privacy-state": True, "max-epsilon": 3.0}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    reply = client_app(train_message(cfg, server_round=1), context)
    assert reply.has_error() and "max-epsilon" in reply.error.reason and "privacy.target_epsilon" in reply.error.reason
