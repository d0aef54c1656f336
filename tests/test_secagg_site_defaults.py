"""A site's own SecAgg+ defence against a server that picks the cohort (issue #15, review's high finding).

Each test is a hostile server (tests/secagg_attack_support.py) driving fedguard's real
clients in-process:

- the server announces a config for 3 clients (so every check on the config's own numbers
  passes) and shows the target a cohort of itself and ``threshold`` colluders: with the
  colluders a site derives from its own roster (ceil(5% of 40 sites) = 2), the target
  refuses ``threshold`` 2, so the colluders never hold enough shares;
- the server shows the target a list the other sites did not fix: every listed site signs
  the digest of the list it fixed, and the target refuses a share request without every
  listed site's signature over its own digest;
- the server looks at each graph the revealed nonces give and aborts: the site counts the
  sessions of a run it revealed in and never masked, on disk, and reveals no more beyond
  ``secagg-max-unfinished-reveals``, also after a SuperNode restart.

Fast: logreg, at most 5 sites through the protocol (a 40-site roster is only keys on disk).
"""

from __future__ import annotations

import pytest
from secagg_attack_support import ADVERT_FIELDS, HostileServer, is_input_of, small_cohort_attack

from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
from fedguard.clients.site import read_secagg_policy
from fedguard.privacy.secagg.params import cohort_digest

pytestmark = pytest.mark.usefixtures("flower_task_identity")

TARGET = 22


def _hostile(colluders) -> dict[int, dict]:
    """Colluding sites run whatever the server likes: here fedguard's code with no limits of their own."""
    return {node: {"secagg-colluders": 0, "secagg-min-cohort": 0} for node in colluders}


def _cfg(compose, clients: int, neighbours: int, threshold: int):
    return compose([
        "model=logreg", f"simulation.num_clients={clients}", "secure_agg=secaggplus",
        f"secure_agg.neighbours={neighbours}", f"secure_agg.threshold={threshold}", "progress=false", "device=cpu",
    ])


@pytest.mark.simulation  # a 40-site roster on disk and three sites through the protocol: over a second
def test_a_target_shown_only_threshold_colluders_refuses_with_its_roster_defaults(compose, tmp_path):
    """Roster of 40 sites; the server's config claims 3 clients, k=2, t=2 and lists the target
    with 2 colluders (a complete graph). The old site (no colluders assumed, no minimum cohort)
    shared with both and the server rebuilt its input; now it refuses before training."""
    roster = (11, 22, 33, *range(100, 137))
    server = HostileServer(_cfg(compose, 3, 2, 2), roster, tmp_path, node_configs=_hostile([11, 33]))
    refusal, rebuilt = small_cohort_attack(server, TARGET, [11, 33])
    assert not is_input_of(rebuilt, TARGET), "the colluders rebuilt the target's input"
    assert refusal is not None and "does not exceed the 2 colluder(s) this site assumes" in refusal
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state


@pytest.mark.simulation  # two 40-site rosters, four sites through the protocol: over a second
def test_the_same_cohort_with_a_threshold_above_the_colluders_completes(compose, tmp_path):
    """Control: t=3 with 3 peers over a 40-site roster is allowed (t > c = 2, 2t > k + c), and the
    harness really rebuilds an input when the colluders outnumber the assumption (three of them);
    a list of the target and two colluders is below the derived minimum cohort (c + 2 = 4)."""
    roster = (11, 22, 33, 44, *range(100, 136))
    server = HostileServer(_cfg(compose, 4, 3, 3), roster, tmp_path, node_configs=_hostile([11, 33, 44]))
    refusal, rebuilt = small_cohort_attack(server, TARGET, [11, 33, 44])
    assert refusal is None and rebuilt is not None  # three colluders (beyond the assumption) do succeed
    assert is_input_of(rebuilt, TARGET)
    two = HostileServer(_cfg(compose, 4, 3, 3), roster, tmp_path / "two", node_configs=_hostile([11, 33]))
    refusal, rebuilt = small_cohort_attack(two, TARGET, [11, 33])  # a list too short: refused before the reveal
    assert refusal is not None and "fewer than this site's minimum 4" in refusal and rebuilt is None


def test_site_defaults_come_from_the_roster_and_pins_win():
    from fedguard.privacy.secagg.policy import colluders_for, min_cohort_for

    assert [colluders_for(0.05, n) for n in (1, 20, 21, 40, 60, 100)] == [1, 1, 2, 2, 3, 5]
    assert colluders_for(0, 100) == 0
    assert [min_cohort_for(c, n) for c, n in ((1, 3), (1, 10), (5, 100))] == [3, 3, 7]
    derived = read_secagg_policy({}, roster_size=100)
    assert (derived.colluders, derived.min_cohort, derived.max_unfinished_reveals) == (5, 7, 3)
    pinned = read_secagg_policy({"secagg-colluders": 1, "secagg-min-cohort": 9, "secagg-collusion-fraction": 0.2}, 100)
    assert (pinned.colluders, pinned.min_cohort) == (1, 9)
    assert read_secagg_policy({"secagg-collusion-fraction": 0.2}, 10).colluders == 2
    assert read_secagg_policy({}, roster_size=None).colluders == 0  # no roster: it shares with no one anyway
    from fedguard.clients.site import SiteConfigError

    for bad in ({"secagg-collusion-fraction": 1}, {"secagg-collusion-fraction": "x"},
                {"secagg-max-unfinished-reveals": -1}):
        with pytest.raises(SiteConfigError, match=next(iter(bad))):
            read_secagg_policy(bad, 10)


FIVE = (11, 22, 33, 44, 55)


@pytest.mark.simulation  # four rounds of five sites through the protocol: over a second
def test_a_target_shown_another_cohort_list_than_the_listed_sites_fixed_refuses(compose, tmp_path):
    """The other sites fix the whole list; the target is shown the list without site 55. Its share
    request carries the others' signatures, over the digest of the list they fixed: refused. A
    signature missing, or made with a key of the server's, is refused too; the honest list passes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    server = HostileServer(_cfg(compose, 5, 4, 3), FIVE, tmp_path)
    server.train_all()
    for node in FIVE:
        if node != TARGET:
            assert not server.reveal(node).has_error()
    shown = [11, 22, 33, 44]
    assert not server.reveal(TARGET, shown).has_error()
    reply = server.stage(TARGET, server.share_request(TARGET, shown))
    assert reply.has_error() and "no valid signature on the cohort list this site fixed from [11, 33, 44]" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state

    honest = HostileServer(_cfg(compose, 5, 4, 3), FIVE, tmp_path / "honest")
    honest.train_all()
    request = honest.share_request(TARGET)
    forged = dict(request, cohort_signatures=[b"" if p == 44 else g for p, g in zip(request["peers"], request["cohort_signatures"])])
    refused = honest.stage(TARGET, forged)
    assert refused.has_error() and "from [44]" in refused.error.reason
    honest = HostileServer(_cfg(compose, 5, 4, 3), FIVE, tmp_path / "forged")
    honest.train_all()
    request = honest.share_request(TARGET)
    from fedguard.privacy.secagg.identity import cohort_bytes

    own_key = Ed25519PrivateKey.generate()  # the server signs the digest itself
    cohort = {p: tuple(request[f"{f}s"][i] for f in ADVERT_FIELDS) for i, p in enumerate(request["peers"])}
    digest = cohort_digest(honest.server_round, honest.session_id, cohort)
    request["cohort_signatures"] = [own_key.sign(cohort_bytes(p, digest)) if p == 33 else g
                                    for p, g in zip(request["peers"], request["cohort_signatures"])]
    refused = honest.stage(TARGET, request)
    assert refused.has_error() and "from [33]" in refused.error.reason
    again = HostileServer(_cfg(compose, 5, 4, 3), FIVE, tmp_path / "again")
    again.train_all()
    assert not again.stage(TARGET, again.share_request(TARGET)).has_error()  # every site fixed the same list


@pytest.mark.simulation  # four sessions of five sites through the protocol: over a second
def test_a_server_aborting_after_each_reveal_gets_a_bounded_number_of_graphs(compose, tmp_path):
    """The server lets the sites reveal their nonces, looks at the graph and abandons the session,
    round after round. After secagg-max-unfinished-reveals (here 2) abandoned sessions in a run the
    target reveals no more, also after its SuperNode restarts (a fresh Context on the same state dir);
    a session that reaches the target's masked input does not count. The refusal comes before
    training, so a DP site spends nothing on a round it would abandon."""
    from flwr.app import Context, RecordDict

    server = HostileServer(_cfg(compose, 5, 4, 3), FIVE, tmp_path, node_configs={TARGET: {"secagg-max-unfinished-reveals": 2}})

    def session(number: int, finish: bool):
        server.server_round, server.session_id = number, f"session-{number:08d}".encode()
        server.nonces, server.cohort_signatures = {}, {}
        if finish:
            server.honest_until_masked()
            return None
        server.train_all()
        replies = {node: server.reveal(node) for node in FIVE}
        return replies[TARGET]

    assert not session(1, finish=False).has_error()
    assert session(2, finish=True) is None  # masked: its reveal is settled
    assert not session(3, finish=False).has_error()
    old = server.contexts[TARGET]
    server.contexts[TARGET] = Context(run_id=old.run_id, node_id=TARGET, node_config=old.node_config, state=RecordDict(),
                                      run_config={})  # the SuperNode restarted: Context.state is gone
    from fedguard.privacy.secagg.errors import SecAggError

    server.server_round, server.session_id = 4, b"session-00000004"
    with pytest.raises(SecAggError, match="2 session.s. of run 1 were abandoned before this site's masked input"):
        server.train(TARGET)  # refused before it trains: it would not reveal in this run again
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state
