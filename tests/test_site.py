"""The node-config schema shared by simulation and real sites."""

from __future__ import annotations

import pytest

from fedguard.clients.site import SiteConfigError, read_site_settings


def test_simulation_style_node_config():
    site = read_site_settings({"partition-id": 3, "num-partitions": 10})
    assert (site.partition_id, site.num_partitions, site.data_root, site.device) == (3, 10, None, None)


def test_site_overrides():
    site = read_site_settings({"partition-id": 0, "num-partitions": 2, "data-root": "/data/fm", "device": "cpu"})
    assert site.data_root == "/data/fm" and site.device == "cpu"


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"num-partitions": 3}, "partition-id"),
        ({"partition-id": 3, "num-partitions": 3}, "0 <= partition-id < num-partitions"),
        ({"partition-id": "a", "num-partitions": 3}, "must be an integer"),
        ({"partition-id": 0, "num-partitions": 3, "device": "tpu"}, "auto, cpu, cuda"),
    ],
)
def test_bad_node_config(node_config, message):
    with pytest.raises(SiteConfigError, match=message):
        read_site_settings(node_config)
