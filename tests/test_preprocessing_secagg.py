"""Federated preprocessing under SecAgg+: the server learns only the sum of the sites' statistics.

Three wine sites (fedguard's real ClientApp, own CSV files, state dirs with identity keys and a
roster) answer the server's real preprocessing stage over a loopback grid. What each site
released (noisy under DP, accounted as before) is recorded at the site; what the server decodes
is recorded at the server; every message a site sends is kept and searched for its vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from secagg_attack_support import NO_COLLUDERS
from flwr.app import ArrayRecord, ConfigRecord

import fedguard.clients.preprocessing as site_side
import fedguard.server.preprocessing as server_side
from fedguard.clients.secagg_identity import provision_rosters
from fedguard.clients.site_state import PRIVACY_DIR
from fedguard.clients.wire import protocol
from fedguard.conf import compose_config
from fedguard.conf.contract import declared_contract_of
from fedguard.conf.run_config import config_to_yaml
from fedguard.server.preprocessing import PreprocessingFailed, run_preprocessing
from tests.preprocessing_support import LoopbackGrid, wine_sites

LINEAGE = "lineage-masked"
pytestmark = [pytest.mark.usefixtures("flower_task_identity"), pytest.mark.simulation]


def _cfg(*extra: str):
    return compose_config(["dataset=tabular", "model=mlp", "dataset.preprocessing=federated",
                           "simulation.num_clients=3", "secure_agg=secaggplus", "secure_agg.neighbours=2",
                           "secure_agg.threshold=2", *extra])


class RecordingGrid(LoopbackGrid):
    """Keeps every reply per site; sites in ``silent_from_mask`` stop answering at the mask stage
    (after they shared their keys: the dropout SecAgg+ recovers from)."""

    def __init__(self, sites, silent_from_mask=()):
        super().__init__(sites)
        self.replies: dict[int, list] = {node: [] for node in sites}
        self.silent = set(silent_from_mask)

    def deliver(self, message):
        node = message.metadata.dst_node_id
        if node in self.silent and message.metadata.message_type == protocol.SECAGG_MESSAGE_TYPE and str(
                message.content[protocol.SECAGG_KEY]["stage"]) not in ("cohort", "share"):
            return None
        reply = super().deliver(message)
        self.replies[node].append(reply)
        return reply


@pytest.fixture
def recorded(monkeypatch):
    """What each site released (at the site, after its noise) and what the server decoded."""
    released, decoded = {}, []
    real_release, real_stats = site_side.release_sums, server_side.statistics_from_sums

    def release(cfg, site, lineage, sums, layout, fingerprint):
        out, std = real_release(cfg, site, lineage, sums, layout, fingerprint)
        released[site.partition_id] = (out.copy(), std)
        return out, std

    def statistics(total, layout, ranges):
        decoded.append(np.array(total, dtype=np.float64))
        return real_stats(total, layout, ranges)

    monkeypatch.setattr(site_side, "release_sums", release)
    monkeypatch.setattr(server_side, "statistics_from_sums", statistics)
    return released, decoded


def _sites(tmp_path):
    sites = wine_sites(tmp_path)
    provision_rosters({f"site-{node}": config["state-dir"] for node, config in sites.items()})
    return sites


def _quantisation_error(cfg, sites: int) -> float:
    layout, _ = site_side.contract_layout(declared_contract_of(cfg.dataset))
    step = 2 * site_side.masked_statistics_bound(cfg, layout) / site_side.statistics_levels(cfg)
    return sites * step


@pytest.mark.parametrize("privacy", ["none", "sample_dp"])
def test_the_server_gets_the_sum_of_what_the_sites_released(tmp_path, recorded, privacy):
    released, decoded = recorded
    cfg = _cfg(f"privacy={privacy}")
    sites = _sites(tmp_path)
    outcome = run_preprocessing(RecordingGrid(sites), cfg, config_to_yaml(cfg), LINEAGE, timeout=60)
    assert outcome.sites == 3 and not outcome.failures
    expected = sum(vector for vector, _ in released.values())
    assert np.max(np.abs(decoded[0] - expected)) <= _quantisation_error(cfg, 3)
    if privacy == "none":  # exact sums: the pooled training rows' count, to the row
        assert round(decoded[0][0]) == sum(int(vector[0]) for vector, _ in released.values())
        return
    sigma = site_side.release_noise_multiplier(cfg)
    assert all(std > 0 for _, std in released.values())  # each site noised its own release ...
    for config in sites.values():  # ... and paid for it, exactly as without masking
        record = json.loads(next((Path(config["state-dir"]) / PRIVACY_DIR / "data").glob("*.json")).read_text())
        assert record["lineages"][f"{LINEAGE}:preprocessing"] == {"sigma": [sigma], "rate": [1.0], "steps": [1]}


def _vectors_in(record) -> list[np.ndarray]:
    """Every numeric vector a record carries (a float list, or an array of any dtype)."""
    if isinstance(record, ArrayRecord):
        return [record[key].numpy() for key in record.keys()]
    if isinstance(record, ConfigRecord):
        return [np.asarray(v) for v in record.values() if isinstance(v, list) and v and
                all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)]
    return []


def test_the_server_never_holds_a_single_sites_statistics(tmp_path, recorded):
    """Each site's released (noisy) vector, searched for in everything the site sent (as floats, and
    every integer vector decoded as one site's encoding): none is within 1e-3 of it. The code before
    the masking sent each vector as a float list in its preprocessing reply and fails here."""
    released, _ = recorded
    cfg = _cfg("privacy=sample_dp")
    sites = _sites(tmp_path)
    grid = RecordingGrid(sites)
    outcome = run_preprocessing(grid, cfg, config_to_yaml(cfg), LINEAGE, timeout=60)
    assert outcome.sites == 3
    layout, _ = site_side.contract_layout(declared_contract_of(cfg.dataset))
    for node, config in sites.items():
        own, _ = released[config["partition-id"]]
        candidates = []
        for reply in grid.replies[node]:
            for name in reply.content.keys():
                for vector in _vectors_in(reply.content[name]):
                    if vector.size == own.size:
                        candidates.append(vector.astype(np.float64))
                        if vector.dtype == np.uint64:
                            from fedguard.privacy.preprocessing import decode_statistics

                            bound = site_side.masked_statistics_bound(cfg, layout)
                            candidates.append(decode_statistics(vector, 1, bound, site_side.statistics_levels(cfg)))
        assert candidates, "the site sent no vector of the statistics' length at all"
        leaked = [c for c in candidates if np.max(np.abs(c - own)) < 1e-3]
        assert not leaked, f"site {node}'s statistics reached the server"


def test_a_site_asked_alone_sends_nothing_the_server_can_read(tmp_path, recorded):
    """A cohort of one: the protocol stops below the threshold and the release never leaves in the
    clear (the code before the masking answered a lone request with the vector)."""
    released, _ = recorded
    cfg = _cfg("privacy=sample_dp")
    sites = dict(list(_sites(tmp_path).items())[:1])
    grid = RecordingGrid(sites)
    with pytest.raises(PreprocessingFailed, match="secure aggregation of the statistics failed"):
        run_preprocessing(grid, cfg, config_to_yaml(cfg), LINEAGE, timeout=60)
    node, config = next(iter(sites.items()))
    own, _ = released[config["partition-id"]]
    for reply in grid.replies[node]:
        for name in reply.content.keys():
            assert not any(v.size == own.size and np.allclose(v.astype(np.float64), own)
                           for v in _vectors_in(reply.content[name]))


def test_a_site_that_drops_out_is_left_out_of_the_sum_as_in_training(tmp_path, recorded):
    released, decoded = recorded
    # Four sites (a fourth reads the first one's file), complete graph: with one gone, each survivor
    # still has threshold-many neighbours to sign the survivor set and reveal the dropout's mask.
    cfg = _cfg("privacy=sample_dp", "simulation.num_clients=4", "secure_agg.neighbours=3",
               "secure_agg.stage_timeout=1")  # stage_timeout: how long the server waits for the dropout
    sites = wine_sites(tmp_path)
    sites[103] = {**sites[100], "partition-id": 3, "state-dir": str(tmp_path / "state-3")}
    # k=3, t=2 over four sites is refused by the sites' default collusion assumption (one colluder
    # out of four breaks t > (k + c)/2); this test is about a dropout, not collusion.
    sites = {node: {**config, **NO_COLLUDERS} for node, config in sites.items()}
    provision_rosters({f"site-{node}": config["state-dir"] for node, config in sites.items()})
    dropped = 102
    outcome = run_preprocessing(RecordingGrid(sites, silent_from_mask={dropped}), cfg, config_to_yaml(cfg),
                                LINEAGE, timeout=60)
    assert outcome.sites == 3 and set(outcome.failures) == {dropped}
    assert "dropped out" in outcome.failures[dropped]
    expected = sum(released[sites[n]["partition-id"]][0] for n in sites if n != dropped)
    assert np.max(np.abs(decoded[0] - expected)) <= _quantisation_error(cfg, 3)


def test_an_exact_release_cannot_be_replayed_under_another_run_name(tmp_path, recorded):
    """The server's attack on statistics without DP (review, 2026-12-02): sum 1 over every site
    under one lineage, sum 2 over all but the target under a lineage it makes up, and the target's
    exact statistics are the difference. Each lineage is fresh to the session record, so before
    clients/exact_release.py every site released again and this test read the target's vector."""
    released, decoded = recorded
    sites = wine_sites(tmp_path)
    sites[103] = {**sites[101], "partition-id": 3, "state-dir": str(tmp_path / "state-3")}
    sites = {node: {**config, **NO_COLLUDERS} for node, config in sites.items()}  # the attack needs no colluder
    provision_rosters({f"site-{node}": config["state-dir"] for node, config in sites.items()})
    everyone = _cfg("privacy=none", "simulation.num_clients=4", "secure_agg.neighbours=3")
    first = run_preprocessing(RecordingGrid(sites), everyone, config_to_yaml(everyone), "lineage-one", timeout=60)
    assert first.sites == 4 and not first.failures
    target = 100
    others = {node: config for node, config in sites.items() if node != target}
    without_target = _cfg("privacy=none")  # three sites, k=2, t=2
    grid = RecordingGrid(others)
    try:
        second = run_preprocessing(grid, without_target, config_to_yaml(without_target), "lineage-two", timeout=60)
    except PreprocessingFailed:
        for node in others:  # each site refused the request itself, before anything left it
            (reply,) = grid.replies[node]
            assert reply.has_error() and "already went into an exact (noise-free) masked statistics sum" in reply.error.reason
    else:  # the old code: every other site released again, and the difference is the target's vector
        target_vector, _ = released[sites[target]["partition-id"]]
        difference = decoded[0] - decoded[1]
        pytest.fail(f"the second sum went through ({second.sites} sites); sum 1 - sum 2 is within "
                    f"{np.max(np.abs(difference - target_vector)):.2g} of the target's exact statistics")
