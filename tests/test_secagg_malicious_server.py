"""Attacks of a malicious SecAgg+ server (issue #15) against fedguard's real clients.

Each test is a hostile server (tests/secagg_attack_support.py) that deviates from the
protocol to learn one target's input, and asserts the clients refuse in time: the
server cannot rebuild the target's update. Fast (no Flower run, a logistic regression
model); each attack is one protocol round among 4 to 7 in-process clients.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_attack_support import (
    ADVERT_FIELDS,
    NO_COLLUDERS,
    HostileServer,
    inconsistent_survivors_attack,
    is_input_of,
    key_substitution_attack,
    revealed,
    withheld_share_attack,
)

from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
from fedguard.clients.wire import protocol
from fedguard.privacy.secagg.masking import dequantize_sum, levels_for, quantize
from fedguard.privacy.secagg.protocol import SecAggError

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = (11, 22, 33, 44)
TARGET = 22


def _cfg(compose, clients: int = 4, neighbours: int = 3, threshold: int = 2, *extra):
    return compose([
        "model=logreg", f"simulation.num_clients={clients}", "secure_agg=secaggplus",
        f"secure_agg.neighbours={neighbours}", f"secure_agg.threshold={threshold}", "progress=false", "device=cpu", *extra,
    ])


def _masked(reply) -> np.ndarray:
    return reply.content[protocol.SECAGG_KEY]["masked"].numpy()


def test_attack1_substituted_round_keys_are_refused(compose, tmp_path):
    """The server relays its own round keys under the target's peers' node ids (keeping their
    identity keys and signatures, or dropping them): the target must not seal shares for them."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.train_all()
    peers = [n for n in NODES if n != TARGET]
    reply, rebuilt = key_substitution_attack(server, TARGET, peers)
    assert not is_input_of(rebuilt, TARGET), "the server rebuilt the target's input"
    assert reply.has_error() and "fail verification" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state


def test_attack1_relabelled_replayed_or_foreign_adverts_are_left_out(compose, tmp_path):
    """Genuine signed keys moved to another node id, replayed from another session, or signed by a
    key off the roster: each is left out; only correctly signed peers remain."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedguard.clients.secagg_identity import verified_peers
    from fedguard.privacy.secagg.identity import public_bytes, sign_advert

    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.train_all()
    adverts = {
        n: tuple(bytes(server.advertised[n][f])
                 for f in ADVERT_FIELDS)
        for n in NODES
    }
    own = adverts[TARGET][2]
    honest = {n: a for n, a in adverts.items() if n != TARGET}
    assert set(verified_peers(server.roster, own, 1, server.session_id, honest)) == {11, 33, 44}
    assert verified_peers(server.roster, own, 1, b"another-session", honest) == {}
    assert verified_peers(server.roster, own, 2, server.session_id, honest) == {}
    relabelled = {**honest, 55: honest[33]}  # site 33's advert shown again as node 55
    del relabelled[33]
    assert set(verified_peers(server.roster, own, 1, server.session_id, relabelled)) == {11, 44}
    duplicated = {**honest, 55: honest[33]}
    assert set(verified_peers(server.roster, own, 1, server.session_id, duplicated)) == {11, 44}
    stranger = Ed25519PrivateKey.generate()  # a sybil's identity, not on the roster
    env, mask, commitment, nonce_commitment = honest[11][0], honest[11][1], honest[11][4], honest[11][5]
    forged = sign_advert(stranger, 1, server.session_id, 11, env, mask, commitment, nonce_commitment)
    sybil = {**honest, 11: (env, mask, public_bytes(stranger), forged, commitment, nonce_commitment)}
    assert set(verified_peers(server.roster, own, 1, server.session_id, sybil)) == {33, 44}
    myself = {**honest, 11: adverts[TARGET]}  # the target's own advert reflected back
    assert set(verified_peers(server.roster, own, 1, server.session_id, myself)) == {33, 44}


def test_attack1_a_site_without_a_roster_refuses_to_share(compose, tmp_path):
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path, node_configs={TARGET: {"secagg-roster": str(tmp_path / "none.json")}})
    server.train_all()
    reply = server.reveal(TARGET)
    assert reply.has_error() and "roster" in reply.error.reason


def test_attack4_inconsistent_survivor_sets_are_refused(compose, tmp_path):
    """5 sites, k=4, t=3 (2t > k holds, sites assume no colluders), but 2 sites collude with the
    server: their 2 + 2 shares, one honest site told "the target survived" (a seed share) and
    one told "it dropped" (a key share) would give 3 of each. The consistency round stops
    it: the second honest site sees only 2 neighbour signatures on its survivor set."""
    nodes = (11, 22, 33, 44, 55)
    server = HostileServer(_cfg(compose, 5, 4, 3), nodes, tmp_path)
    server.train_all()
    dropped_reply, rebuilt = inconsistent_survivors_attack(server, TARGET, [11, 33], told_survived=44, told_dropped=55)
    assert not is_input_of(rebuilt, TARGET), "the server rebuilt the target's input"
    assert dropped_reply is not None and dropped_reply.has_error()
    assert "neighbour(s) signed this survivor set" in dropped_reply.error.reason


def test_withholding_one_honest_share_cannot_unmask_the_target(compose, tmp_path):
    """5 sites, k=4, t=3, 2 colluders (11, 33), one survivor set shown to all: the server
    withholds 44's share from the target and names 55 dropped. On code that masks only with
    the neighbours it heard from, 44 (a survivor with 4 signatures on the set) reveals the
    target's seed share and 55's key share: 2t - k = 2 colluders suffice. The target signs the
    neighbours it masked with; 44 is not on that list, so 44 keeps the target's seed share."""
    nodes = (11, 22, 33, 44, 55)
    server = HostileServer(_cfg(compose, 5, 4, 3), nodes, tmp_path)
    server.train_all()
    reply, rebuilt = withheld_share_attack(server, TARGET, [11, 33], withheld_from=44, told_dropped=55)
    assert not is_input_of(rebuilt, TARGET), "the server rebuilt the target's input"
    assert reply is not None and not reply.has_error()  # 44 still answers for everyone else
    assert TARGET not in revealed(reply) and 55 in revealed(reply)


def test_attack2_withheld_shares_client_refuses_to_mask(compose, tmp_path):
    """The server withholds every share from the target, then asks its neighbours for the
    target's self-mask seed: with no pairwise mask, seed removal would expose the input."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.train_all()
    inbox = server.honest_shares()
    reply = server.mask(TARGET, {})  # every share to the target withheld
    rebuilt = None
    if not reply.has_error():
        others = [n for n in NODES if n != TARGET]
        for node in others:
            assert not server.mask(node, inbox[node]).has_error()
        seed_shares = []
        endorsements = server.endorse_all(others, set(NODES))
        for node in others:  # "the target survived": reveal its self-mask seed
            answer = server.unmask(node, set(NODES), set(), endorsements)
            if not answer.has_error() and TARGET in revealed(answer):
                seed_shares.append(revealed(answer)[TARGET][1])
        rebuilt = server.rebuild_from_self_seed(_masked(reply), seed_shares)
    assert not is_input_of(rebuilt, TARGET), "the server rebuilt the target's input"
    assert reply.has_error() and "threshold" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state  # secrets wiped on abort


def test_attack2_one_share_short_of_threshold_is_refused_too(compose, tmp_path):
    server = HostileServer(_cfg(compose, 5, 4, 3), (11, 22, 33, 44, 55), tmp_path)
    server.train_all()
    inbox = server.honest_shares()
    kept = dict(list(inbox[TARGET].items())[:2])  # 2 valid shares, threshold 3
    reply = server.mask(TARGET, kept)
    assert reply.has_error() and "only 2 valid share(s)" in reply.error.reason


def test_attack3_unmask_naming_the_client_dropped_is_refused(compose, tmp_path):
    """The server tells the target it dropped (the story it tells others to get its mask key)."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.honest_until_masked()
    reply = server.endorse(TARGET, set(NODES) - {TARGET})  # the consistency round's survivor set
    assert reply.has_error() and "among the survivors" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state


def test_attack3_unmask_naming_a_peer_both_ways_is_refused(compose, tmp_path):
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.honest_until_masked()
    endorsements = server.endorse_all(NODES, set(NODES))
    reply = server.unmask(11, set(NODES), {TARGET}, endorsements)  # TARGET both survived and dropped
    assert reply.has_error() and "both survived and dropped" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[11].state


@pytest.mark.parametrize(
    ("site", "neighbours", "threshold", "clients", "reason"),
    [
        ({"secagg-colluders": 2}, 6, 4, 10, "t > (k + c)/2"),
        ({"secagg-min-threshold": 4}, 4, 3, 10, "below this site's minimum 4"),
        ({"secagg-max-neighbours": 4}, 6, 4, 10, "exceeds this site's maximum 4"),
    ],
    ids=["colluders", "min-threshold", "max-neighbours"],
)
def test_attack6_a_site_refuses_parameters_below_its_own_pins(compose, tmp_path, site, neighbours, threshold, clients, reason):
    """The run's config (the server's) asks for k, t the site's own settings do not allow."""
    server = HostileServer(_cfg(compose, clients, neighbours, threshold), NODES, tmp_path, node_configs={TARGET: site})
    with pytest.raises(SecAggError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        server.train(TARGET)
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state
    server.train(11)  # a site without the pin takes part
    assert SESSION_STATE_KEY in server.contexts[11].state


def test_attack5_a_hand_picked_neighbour_set_is_refused(compose, tmp_path):
    """7 sites, k=4: the server wants the target's peers to be 11, 33, 44 (its colluders) and
    sends it only those (old clients shared with exactly the peers they were sent). The site
    derives its peers from the listed cohort and refuses a cohort below its pinned minimum."""
    nodes = (11, 22, 33, 44, 55, 66, 77)
    server = HostileServer(_cfg(compose, 7, 4, 3), nodes, tmp_path, node_configs={TARGET: {"secagg-min-cohort": 7}})
    server.train_all()
    reply = server.reveal(TARGET, [11, 22, 33, 44])
    assert reply.has_error() and "fewer than this site's minimum 7" in reply.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state


def test_attack5_each_site_derives_its_neighbours_from_the_cohort_it_fixed_and_all_revealed_nonces(compose, tmp_path):
    """Whatever order or subset of keys the server would prefer, a site shares with exactly the
    neighbours the hash of the fixed cohort list and every revealed nonce gives it; altering any advert is refused."""
    from fedguard.privacy.secagg.params import cohort_digest, graph_seed
    from fedguard.privacy.secagg.protocol import neighbour_graph

    nodes = (11, 22, 33, 44, 55, 66, 77)
    server = HostileServer(_cfg(compose, 7, 4, 3), nodes, tmp_path)
    server.train_all()
    request = server.share_request(TARGET)
    cohort = {n: tuple(request[f"{f}s"][i] for f in ADVERT_FIELDS) for i, n in enumerate(request["peers"])}
    seed = graph_seed(cohort_digest(1, server.session_id, cohort), dict(zip(request["peers"], request["nonces"])))
    expected = neighbour_graph(list(nodes), 4, seed)[TARGET]
    reply = server.stage(TARGET, request)
    assert not reply.has_error()
    assert set(reply.content[protocol.SECAGG_KEY]["to"]) == expected and len(expected) == 4
    other = HostileServer(_cfg(compose, 7, 4, 3), nodes, tmp_path / "again")
    other.train_all()
    tampered = other.share_request(TARGET)
    tampered["signatures"] = [s[:-1] + bytes([s[-1] ^ 1]) if p == 55 else s
                              for p, s in zip(tampered["peers"], tampered["signatures"])]
    refused = other.stage(TARGET, tampered)  # one advert altered to grind the seed: refused
    assert refused.has_error() and "fail verification" in refused.error.reason


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["secure_agg.neighbours=4", "secure_agg.threshold=2"], "allowed: 3..4"),
        (["simulation.num_clients=20", "secure_agg.neighbours=5", "secure_agg.threshold=4"], "must be even"),
    ],
    ids=["threshold-half-of-k", "odd-neighbours"],
)
def test_attack6_config_checks_refuse_weak_or_rounded_graphs(compose, overrides, message):
    from fedguard.conf import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose(["secure_agg=secaggplus", *overrides])


def test_site_policy_keys_are_checked():
    from fedguard.clients.site import SiteConfigError, read_secagg_policy

    assert read_secagg_policy({}).colluders == 0
    pinned = read_secagg_policy({"secagg-min-threshold": 3, "secagg-max-neighbours": 8, "secagg-colluders": 1})
    assert (pinned.min_threshold, pinned.max_neighbours, pinned.colluders) == (3, 8, 1)
    for bad in ({"secagg-colluders": -1}, {"secagg-min-threshold": 1}, {"secagg-max-neighbours": 2.5}):
        with pytest.raises(SiteConfigError, match=next(iter(bad))):
            read_secagg_policy(bad)


def test_quantization_at_the_clip_range_does_not_wrap_the_sum_to_the_wrong_sign():
    """62 bits, 2 clients: uncapped levels (2^61 - 1) round up in float64 to 2^61, so two
    inputs at +clip sum to 2^62 = 0 (mod 2^62) and dequantize to -2 x clip."""
    bits, clip = 62, 1.0
    levels = levels_for(bits, 2)
    rng = np.random.default_rng(0)
    values = [quantize(np.full(4, clip), clip, levels, rng) for _ in range(2)]
    total = (values[0] + values[1]) & np.uint64((1 << bits) - 1)
    assert np.allclose(dequantize_sum(total, 2, clip, levels), 2 * clip)


def test_the_server_refuses_more_summands_than_the_levels_assume():
    from fedguard.server.secure_aggregation import check_summands

    check_summands(4, 4)
    with pytest.raises(SecAggError, match="levels assume at most 4"):
        check_summands(5, 4)


def test_honest_round_through_the_hostile_harness_still_completes(compose, tmp_path):
    """The harness itself is sound: honest requests give every client's masked input and shares."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.honest_until_masked()
    endorsements = server.endorse_all(NODES, set(NODES))
    assert set(endorsements) == set(NODES)
    answers = [server.unmask(node, set(NODES), set(), endorsements) for node in NODES]
    assert not any(a.has_error() for a in answers)
    assert all(set(revealed(a)) == set(NODES) - {n} for a, n in zip(answers, NODES))



def test_replayed_reordered_or_foreign_session_stage_requests_are_refused(compose, tmp_path):
    """Stage requests carry round and session; each stage runs once, in order."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.train_all()
    early = server.mask(TARGET, {})  # mask before share: out of order
    assert early.has_error() and "out of order" in early.error.reason
    with pytest.raises(SecAggError, match="already used"):  # the round was wiped; no second session on it
        server.train(TARGET)
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path / "next")
    server.train_all()
    other = server.stage(TARGET, {**server.share_request(TARGET), "session": b"an-old-session!!"})
    assert other.has_error() and "another session" in other.error.reason
    assert SESSION_STATE_KEY in server.contexts[TARGET].state  # a stale request changes nothing
    stale = server.stage(TARGET, {**server.share_request(TARGET), "round": 0})
    assert stale.has_error() and "another session" in stale.error.reason
    inbox = server.honest_shares()
    again = server.stage(TARGET, server.share_request(TARGET))  # a replayed share request
    assert again.has_error() and "out of order" in again.error.reason
    assert SESSION_STATE_KEY not in server.contexts[TARGET].state  # a protocol violation aborts: secrets wiped
    del inbox


def test_a_second_unmask_request_gets_no_answer(compose, tmp_path):
    """Once a client has answered one survivor list, a second (a different story) gets nothing."""
    server = HostileServer(_cfg(compose), NODES, site_settings=NO_COLLUDERS, root=tmp_path)
    server.honest_until_masked()
    endorsements = server.endorse_all(NODES, set(NODES))
    assert not server.unmask(11, set(NODES), set(), endorsements).has_error()
    second = server.unmask(11, set(NODES) - {TARGET}, {TARGET})
    assert second.has_error()


def test_graph_risk_matches_the_issue_reference_and_shrinks_with_the_threshold():
    """k=4, t=3, 5% colluders, no dropouts: the issue's reference is 2.7e-4 per client-round
    (a hypergeometric count); the binomial model gives 4.8e-4, and about 0.7-0.9 over a
    100-site, 50-round run. A larger k at t > k/2 is far safer."""
    from fedguard.privacy.secagg.risk import graph_risk

    risk = graph_risk(4, 3, 100, 50, 0.05)
    assert risk.per_client_round == pytest.approx(4 * 0.05**3 * 0.95 + 0.05**4)
    assert 0.7 < risk.per_run < 0.95 and risk.round_failure == 0
    safer = graph_risk(8, 6, 100, 50, 0.05)
    assert safer.per_run < 0.01
    assert graph_risk(4, 3, 100, 50, 0.05, dropout=0.1).round_failure > 0
    assert "over the run" in risk.line()


def test_roster_commands_print_an_identity_and_write_the_roster_sites_load(tmp_path, capsys):
    from fedguard.clients.deployment.roster_commands import roster_main
    from fedguard.clients.secagg_identity import site_roster

    lines = []
    for name in ("lab-a", "lab-b"):
        assert roster_main(["identity", "--state-dir", str(tmp_path / name), "--name", name]) == 0
        lines.append(capsys.readouterr().out.strip())
    assert roster_main(["identity", "--state-dir", str(tmp_path / "lab-a"), "--name", "lab-a"]) == 0
    assert capsys.readouterr().out.strip() == lines[0]  # the same key on every call
    out = tmp_path / "lab-a" / "secagg" / "roster.json"
    assert roster_main(["make", "--out", str(out), *lines]) == 0
    assert sorted(site_roster({"state-dir": str(tmp_path / "lab-a")}).sites) == ["lab-a", "lab-b"]
    assert roster_main(["make", "--out", str(out), lines[0], lines[0].replace("lab-a", "lab-c")]) == 1
