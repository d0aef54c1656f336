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


def graph_seed(server_round: int, session_id: bytes, adverts: dict[int, tuple[bytes, ...]]) -> int:
    """The neighbour graph's seed: a hash over every signed advert of the cohort.

    Why: a seed the server picks lets it surround a target with colluding sites. Hashed over
    all sites' fresh, signed round keys, the seed is fixed once the sites have advertised, and
    each site recomputes it from the cohort list and derives its own neighbours; the server's
    remaining lever is which sites it lists (see SitePolicy.min_cohort).
    """
    digest = hashlib.sha256(GRAPH_DOMAIN + str(server_round).encode() + b"|" + session_id)
    for node in sorted(adverts):
        digest.update(str(node).encode() + b"|")
        for part in adverts[node]:
            digest.update(len(part).to_bytes(2, "big") + part)
    return int.from_bytes(digest.digest(), "big")
