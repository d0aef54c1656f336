"""The driver-side keeper of virtual sites' state on a Ray cluster, as a plain object (no Ray)."""

from __future__ import annotations

import os

import pytest

from fedguard.simulations import cluster
from fedguard.simulations.cluster import SiteStateKeeper, placement_summary


@pytest.fixture
def keeper(tmp_path) -> SiteStateKeeper:
    return SiteStateKeeper(str(tmp_path / "client-state"), str(tmp_path / cluster.PLACEMENT_FILE))


def test_a_site_that_never_trained_has_no_state_and_none_is_created(keeper, tmp_path):
    assert keeper.fetch("7") == {}
    assert not (tmp_path / "client-state").exists()


def test_state_written_back_is_what_the_next_node_fetches(keeper, tmp_path):
    files = {"privacy/l1.json": b'{"steps": 3}', "ledger/l1.jsonl": b"entry\n", "ledger.key": b"secret"}
    keeper.store("3", files)
    assert keeper.fetch("3") == files
    assert not list((tmp_path / "client-state").rglob("*.tmp"))
    (tmp_path / "client-state" / "secagg-roster.json").write_bytes(b"roster")
    assert keeper.fetch("3")["../secagg-roster.json"] == b"roster"  # the run's roster travels beside the site


def test_accountant_is_written_before_the_ledger_before_the_replay_cache(keeper, monkeypatch):
    written: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(cluster.os, "replace", lambda src, dst: (written.append(os.path.basename(os.path.dirname(dst))
                                                                                 + "/" + os.path.basename(dst)),
                                                                 real_replace(src, dst)))
    keeper.store("1", {"replay/l.pt": b"r", "ledger/l.jsonl": b"e", "privacy/l.json": b"p"})
    assert written == ["privacy/l.json", "ledger/l.jsonl", "replay/l.pt"]


@pytest.mark.parametrize("partition, relative", [("1", "../partition-2/ledger.key"), ("1", "/etc/passwd"), ("x", "a")])
def test_a_write_outside_the_site_or_for_a_bad_partition_is_refused(keeper, tmp_path, partition, relative):
    with pytest.raises(ValueError):
        keeper.store(partition, {relative: b"x"})
    assert not (tmp_path / "client-state" / "partition-2").exists()


def test_placement_summary_counts_calls_per_node(keeper, tmp_path):
    keeper.placed({"event": "nodes", "nodes": ["a", "b"]})
    for node, ok in (("a", True), ("b", True), ("b", False)):
        keeper.placed({"event": "client", "partition": "0", "node": node, "ok": ok})
    assert placement_summary(tmp_path) == {"client_calls_by_node": {"a": {"ok": 1, "failed": 0}, "b": {"ok": 1, "failed": 1}}}
