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


def test_a_site_that_requires_secure_aggregation_refuses_a_run_without_it():
    """The server's move: switch SecAgg+ off in the run config, and each site's update (or, in
    preprocessing, its statistics) comes back in the clear. A site that sets require-secure-agg
    refuses before anything is read; before the key existed it had no way to, and answered."""
    assert "require-secure-agg" in KNOWN_KEYS
    floor = read_site_floor({"require-secure-agg": True})
    check_site_floor(compose_config(["secure_agg=secaggplus"]), floor)
    with pytest.raises(BelowSiteFloor, match="secure_agg.mode=off"):
        check_site_floor(compose_config(["secure_agg=off"]), floor)
    check_site_floor(compose_config(["secure_agg=off"]), read_site_floor({}))  # not required: the run decides
    with pytest.raises(BelowSiteFloor, match="true or false"):
        read_site_floor({"require-secure-agg": "yes"})


@pytest.mark.usefixtures("flower_task_identity")
def test_the_preprocessing_request_without_secure_aggregation_is_refused_where_required(tmp_path):
    from flwr.app import ConfigRecord, Message  # noqa: PLC0415

    from fedguard.clients.wire import protocol  # noqa: PLC0415
    from fedguard.conf.run_config import config_to_yaml  # noqa: PLC0415
    from tests.preprocessing_support import LoopbackGrid, wine_sites  # noqa: PLC0415

    cfg = compose_config(["dataset=tabular", "model=mlp", "dataset.preprocessing=federated", "simulation.num_clients=3"])
    node, config = next(iter(wine_sites(tmp_path, state=False).items()))
    grid = LoopbackGrid({node: {**config, "require-secure-agg": True}})
    request = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.LINEAGE_KEY: "lineage-clear"})
    (reply,) = grid.send_and_receive([Message(RecordDict({protocol.CONFIG_KEY: request}), dst_node_id=node,
                                              message_type=protocol.PREPROCESS_MESSAGE_TYPE)])
    assert reply.has_error() and "require-secure-agg" in reply.error.reason
    assert not reply.has_content()  # no statistics, in any form
