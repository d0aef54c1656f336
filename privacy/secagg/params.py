"""SecAgg+ parameters, domain tags and the neighbour graph, shared by the client and server sessions."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from fedguard.privacy.secagg.errors import SecAggError

SEED_BYTES = 32
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-envelope"
SELF_MASK_PURPOSE = b"self-mask"


@dataclass(frozen=True)
class SecAggParams:
    modulus_bits: int
    neighbours: int
    threshold: int

    def validate(self, cohort: int) -> None:
        degree = min(self.neighbours, cohort - 1)
        if cohort < 2:
            raise SecAggError("secure aggregation needs at least 2 clients in a round")
        if not 2 <= self.threshold <= degree:
            raise SecAggError(
                f"threshold={self.threshold} must be between 2 and the neighbour count {degree} "
                f"(neighbours={self.neighbours}, {cohort} clients)"
            )


def neighbour_graph(nodes: list[int], neighbours: int, seed: int) -> dict[int, set[int]]:
    """A k-regular graph: a seeded random ring where each node links to k/2 nodes on each side.

    With k >= n - 1 it is the complete graph. Otherwise k must be even (each ring link is
    shared by two nodes); an odd k is refused rather than rounded up, since k + 1 peers
    per client would break the threshold rule the sites checked against k.
    """
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    count = len(order)
    if neighbours >= count - 1:
        return {node: set(order) - {node} for node in order}
    if neighbours % 2:
        raise SecAggError(f"neighbours={neighbours} is odd; a ring graph over {count} clients needs an even count")
    half = neighbours // 2
    graph: dict[int, set[int]] = {node: set() for node in order}
    for position, node in enumerate(order):
        for offset in range(1, half + 1):
            other = order[(position + offset) % count]
            graph[node].add(other)
            graph[other].add(node)
    return graph


GRAPH_DOMAIN = b"fedguard-secagg-graph-v1|"
SEED_COMMITMENT_DOMAIN = b"fedguard-secagg-seed-v1|"
SEED_COMMITMENT_BYTES = 32


def seed_commitment(seed: bytes) -> bytes:
    """SHA-256 of the self-mask seed, signed at advertise time: the server checks a rebuilt seed against it
    (the seed is 256 random bits, so the hash hides it)."""
    return hashlib.sha256(SEED_COMMITMENT_DOMAIN + seed).digest()


GRAPH_NONCE_BYTES = 32
NONCE_COMMITMENT_DOMAIN = b"fedguard-secagg-graph-nonce-v1|"


def nonce_commitment(nonce: bytes) -> bytes:
    """SHA-256 of a site's graph nonce, signed in its advert; the nonce is revealed only after the
    site has fixed the cohort list it will draw its neighbours from."""
    return hashlib.sha256(NONCE_COMMITMENT_DOMAIN + nonce).digest()


def cohort_digest(server_round: int, session_id: bytes, adverts: dict[int, tuple[bytes, ...]]) -> bytes:
    """A hash of the cohort list: every listed site's id and signed advert (nonce commitment included)."""
    digest = hashlib.sha256(GRAPH_DOMAIN + str(server_round).encode() + b"|" + session_id)
    for node in sorted(adverts):
        digest.update(str(node).encode() + b"|")
        for part in adverts[node]:
            digest.update(len(part).to_bytes(2, "big") + part)
    return digest.digest()


def graph_seed(digest: bytes, nonces: dict[int, bytes]) -> int:
    """The neighbour graph's seed: the cohort list's digest and every listed site's revealed nonce.

    Why commit-and-reveal: a seed hashed from the adverts alone let the server re-draw the
    graph by leaving sites out of the list (a 20-of-33 subset put 3 colluders around a target
    in about 1,100 tries). Each site signs a commitment to a fresh OS-random nonce in its
    advert and reveals the nonce only after it has fixed the cohort list (``cohort_digest``);
    its own nonce then enters a seed whose every other input was already bound, so whatever
    list the server chose, this site's neighbours are a fresh uniform draw from it.
    """
    hasher = hashlib.sha256(GRAPH_DOMAIN + b"seed|" + digest)
    for node in sorted(nonces):
        hasher.update(str(node).encode() + b"|" + nonces[node])
    return int.from_bytes(hasher.digest(), "big")
