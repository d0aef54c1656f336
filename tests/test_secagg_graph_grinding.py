"""Graph grinding: a hostile server chooses which sites it lists to steer a target's neighbours.

Before commit-and-reveal the neighbour graph was hashed from the cohort list alone, so the
server could try subsets offline until the target's neighbours were its colluders (review
of 2026-12-01: a 20-of-33 list put 3 colluders among a target's 4 neighbours in about
1,100 tries). Now the seed also needs every listed site's graph nonce, each revealed only
after that site fixed the list; the target's own nonce makes its neighbours a fresh draw.

Two tests: the real clients refuse every way of re-drawing after the reveal (end to end
through the ClientApp), and a grinding server, simulated over many sessions on the same
derivation the clients run, places its colluders around the target no more often than chance.
"""

from __future__ import annotations

import os
import random
from math import comb

import pytest
from secagg_attack_support import NO_COLLUDERS, HostileServer

from fedguard.clients.secure_aggregation import SESSION_STATE_KEY
from fedguard.clients.wire import protocol
from fedguard.privacy.secagg.params import GRAPH_NONCE_BYTES, cohort_digest, graph_seed, neighbour_graph

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITES = tuple(range(101, 134))  # 33 sites on the roster
TARGET = 101
COLLUDERS = (102, 103, 104)
LISTED = 20  # the review's 20-of-33 lists
NEIGHBOURS, THRESHOLD = 4, 3
# With the default 5% of 33 sites (2 colluders) a site refuses k=4, t=3 outright (2t <= k + c);
# these tests are about the graph draw, so the sites assume none (secagg_attack_support.NO_COLLUDERS).


def _cfg(compose):
    return compose([
        "model=logreg", f"simulation.num_clients={len(SITES)}", "secure_agg=secaggplus",
        f"secure_agg.neighbours={NEIGHBOURS}", f"secure_agg.threshold={THRESHOLD}", "progress=false", "device=cpu",
    ])


def _listing(rng: random.Random) -> list[int]:
    """A list the server might show: the target, its colluders and honest sites of its choice."""
    honest = [s for s in SITES if s != TARGET and s not in COLLUDERS]
    return sorted([TARGET, *COLLUDERS, *rng.sample(honest, LISTED - 1 - len(COLLUDERS))])


@pytest.mark.simulation  # five 33-site federations through the real ClientApp: over a second
def test_after_the_reveal_the_server_cannot_redraw_the_target_s_neighbours(compose, tmp_path):
    """The target fixes a 20-site list and reveals its nonce. From then on the server knows the
    graph that list gives; every way to try another (a second list, a share request over another
    list, a nonce swapped for one of its choosing, a listed site claimed to have dropped) is refused
    and wipes the target's secrets, so the server gets one draw per session."""
    rng = random.Random(7)
    first = _listing(rng)
    attempts = {
        "second list": lambda s: s.stage(TARGET, s.cohort_request(_listing(rng))),
        "other list at share": lambda s: s.stage(TARGET, s.share_request(TARGET, _listing(rng))),
        "swapped nonce": lambda s: s.stage(TARGET, {**(r := s.share_request(TARGET, first)),
                                                    "nonces": [os.urandom(GRAPH_NONCE_BYTES) if p == COLLUDERS[0] else n
                                                               for p, n in zip(r["peers"], r["nonces"])]}),
        "site claimed dropped": lambda s: s.stage(TARGET, {**(r := s.share_request(TARGET, first)),
                                                           "nonces": r["nonces"][:-1]}),
    }
    reasons = {
        "second list": "out of order",
        "other list at share": "differs from the one it fixed",
        "swapped nonce": "do not match their commitments",
        "site claimed dropped": "must be equally long",
    }
    for name, attempt in attempts.items():
        server = HostileServer(_cfg(compose), SITES, tmp_path / name.replace(" ", "-"), site_settings=NO_COLLUDERS)
        server.train_all()
        for node in first:
            assert not server.reveal(node, first).has_error()
        reply = attempt(server)
        assert reply.has_error() and reasons[name] in reply.error.reason, (name, reply)
        if name != "site claimed dropped":  # a malformed request is refused before the state is touched
            assert SESSION_STATE_KEY not in server.contexts[TARGET].state, name
    # The honest path: the target shares with exactly the neighbours the fixed list and all nonces give.
    server = HostileServer(_cfg(compose), SITES, tmp_path / "honest", site_settings=NO_COLLUDERS)
    server.train_all()
    request = server.share_request(TARGET, first)
    reply = server.stage(TARGET, request)
    assert not reply.has_error(), reply.error.reason
    fields = ("envelope_keys", "mask_keys", "identity_keys", "signatures", "seed_commitments", "nonce_commitments")
    cohort = {p: tuple(request[f][i] for f in fields) for i, p in enumerate(request["peers"])}
    seed = graph_seed(cohort_digest(1, server.session_id, cohort), dict(zip(request["peers"], request["nonces"])))
    assert set(reply.content[protocol.SECAGG_KEY]["to"]) == neighbour_graph(first, NEIGHBOURS, seed)[TARGET]


def _surrounded(neighbours: set[int]) -> bool:
    return set(COLLUDERS) <= neighbours


def _grind(rng: random.Random, predict, tries: int) -> list[int]:
    """The server's search: the first list whose predicted graph puts every colluder next to the target."""
    listing = _listing(rng)
    for _ in range(tries):
        if _surrounded(predict(listing)):
            return listing
        listing = _listing(rng)
    return listing


def _adverts(listing: list[int], commitments: dict[int, bytes]) -> dict[int, tuple[bytes, ...]]:
    return {node: (commitments[node],) for node in listing}


@pytest.mark.simulation
def test_a_grinding_server_places_its_colluders_around_the_target_no_more_than_chance():
    """Over 40 sessions the server grinds up to 1,200 lists each, knowing every advert and
    every nonce but the target's (it guesses that one), and takes the list its prediction
    likes. With the seed hashed from the list alone (the design before) the same search
    surrounds the target in almost every session; with commit-and-reveal the target's real
    neighbours hold all 3 colluders as often as a uniform draw does (4 of 19: 16/3876 per
    session), checked by a binomial tail at a 1e-9 false-failure rate."""
    sessions, tries = 40, 1200
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))  # the search's own choices; no effect on the claim
    chance = comb(len(COLLUDERS), len(COLLUDERS)) * comb(LISTED - 1 - len(COLLUDERS), NEIGHBOURS - len(COLLUDERS)) / comb(
        LISTED - 1, NEIGHBOURS)
    hits = listed_alone_hits = 0
    for session in range(sessions):
        session_id = os.urandom(16)
        nonces = {node: os.urandom(GRAPH_NONCE_BYTES) for node in SITES}
        commitments = {node: os.urandom(32) for node in SITES}  # stands for each signed advert
        guessed = {**nonces, TARGET: bytes(GRAPH_NONCE_BYTES)}  # all the server lacks is the target's nonce

        def with_reveal(listing, known=guessed):
            digest = cohort_digest(session, session_id, _adverts(listing, commitments))
            return neighbour_graph(listing, NEIGHBOURS, graph_seed(digest, {n: known[n] for n in listing}))[TARGET]

        chosen = _grind(rng, with_reveal, tries)
        hits += _surrounded(with_reveal(chosen, known=nonces))

        def listed_alone(listing):  # the seed before commit-and-reveal: a hash of the list only
            digest = cohort_digest(session, session_id, _adverts(listing, commitments))
            return neighbour_graph(listing, NEIGHBOURS, int.from_bytes(digest, "big"))[TARGET]

        listed_alone_hits += _surrounded(listed_alone(_grind(rng, listed_alone, tries)))
    # The smallest count a fair draw reaches with probability below 1e-9.
    bound = next(k for k in range(sessions + 1)
                 if sum(comb(sessions, j) * chance**j * (1 - chance) ** (sessions - j) for j in range(k, sessions + 1)) < 1e-9)
    assert hits < bound, f"{hits} of {sessions} sessions surrounded the target; chance allows fewer than {bound}"
    assert listed_alone_hits >= sessions - 5, f"the search has no power: {listed_alone_hits} of {sessions}"
