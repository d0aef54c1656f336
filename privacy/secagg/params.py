"""SecAgg+ parameters, domain tags and the neighbour graph, shared by the client and server sessions."""

from __future__ import annotations

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
