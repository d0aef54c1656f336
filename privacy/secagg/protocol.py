"""The SecAgg+ protocol's four stages as transport-free client and server sessions.

Bonawitz et al. 2017 with the sparse neighbour graph of Bell et al. 2020: each client
agrees mask keys with, and Shamir-shares its secrets among, only ``neighbours`` peers,
so its cost grows with the neighbour count, not with the cohort. The sessions exchange
plain Python values; carrying them in Flower messages is a separate layer.

Stages: (0) advertise public keys; (1) share the self-mask seed and the mask private
key among neighbours, encrypted per recipient; (2) send the masked, quantized input;
(3) for each neighbour, reveal the self-mask share if it survived, the mask-key share
if it dropped, never both, so the server can remove exactly the masks left in the sum.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np

from flwr.app import ConfigRecord

from privacy.secagg.envelope import open_sealed, seal
from privacy.secagg.keys import (
    KeyPair,
    derive_shared_key,
    generate_key_pair,
    private_key_bytes,
    private_key_from_bytes,
)
from privacy.secagg.masking import ADD, SUBTRACT, apply_masks
from privacy.secagg.shamir import combine_shares, split_secret

SEED_BYTES = 32
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-envelope"
SELF_MASK_PURPOSE = b"self-mask"


class SecAggError(RuntimeError):
    """The protocol cannot go on (too few survivors, an inconsistent request, a bad share)."""


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

    With k >= n - 1 it is the complete graph. An odd k is rounded up to the next even
    number for the ring (each link is shared by two nodes).
    """
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    count = len(order)
    if neighbours >= count - 1:
        return {node: set(order) - {node} for node in order}
    half = (neighbours + 1) // 2
    graph: dict[int, set[int]] = {node: set() for node in order}
    for position, node in enumerate(order):
        for offset in range(1, half + 1):
            other = order[(position + offset) % count]
            graph[node].add(other)
            graph[other].add(node)
    return graph


def _key_pair(raw_private: bytes) -> KeyPair:
    from cryptography.hazmat.primitives import serialization

    private = private_key_from_bytes(raw_private)
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(private, public)


@dataclass
class ClientSession:
    node_id: int
    params: SecAggParams
    server_round: int
    neighbours: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._envelope_keys = generate_key_pair()
        self._mask_keys = generate_key_pair()
        self._self_seed = os.urandom(SEED_BYTES)
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held_shares: dict[int, tuple[bytes, bytes]] = {}  # peer -> (self-seed share, mask-key share)
        self._masked_sent = False

    def to_record(self) -> ConfigRecord:
        """Everything the session holds, for a client's Context.state between stages.

        The state never leaves the client: it holds private keys.
        """
        peers = sorted(self._peer_keys)
        held = sorted(self._held_shares)
        return ConfigRecord(
            {
                "node_id": self.node_id,
                "round": self.server_round,
                "params": [self.params.modulus_bits, self.params.neighbours, self.params.threshold],
                "envelope_key": private_key_bytes(self._envelope_keys.private),
                "mask_key": private_key_bytes(self._mask_keys.private),
                "self_seed": self._self_seed,
                "neighbours": sorted(self.neighbours),
                "peers": peers,
                "peer_envelope_keys": [self._peer_keys[p][0] for p in peers],
                "peer_mask_keys": [self._peer_keys[p][1] for p in peers],
                "held_from": held,
                "held_seed_shares": [self._held_shares[p][0] for p in held],
                "held_key_shares": [self._held_shares[p][1] for p in held],
                "masked_sent": self._masked_sent,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ClientSession:
        try:
            bits, neighbours, threshold = (int(v) for v in record["params"])
            session = cls(int(record["node_id"]), SecAggParams(bits, neighbours, threshold), int(record["round"]))
            session._envelope_keys = _key_pair(bytes(record["envelope_key"]))
            session._mask_keys = _key_pair(bytes(record["mask_key"]))
            session._self_seed = bytes(record["self_seed"])
            session.neighbours = {int(n) for n in record["neighbours"]}
            session._peer_keys = {
                int(p): (bytes(e), bytes(m))
                for p, e, m in zip(record["peers"], record["peer_envelope_keys"], record["peer_mask_keys"], strict=True)
            }
            session._held_shares = {
                int(p): (bytes(a), bytes(b))
                for p, a, b in zip(record["held_from"], record["held_seed_shares"], record["held_key_shares"], strict=True)
            }
            session._masked_sent = bool(record["masked_sent"])
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"secure aggregation state is malformed: {err}") from err
        return session

    # Stage 0
    def advertise(self) -> tuple[bytes, bytes]:
        return self._envelope_keys.public_bytes, self._mask_keys.public_bytes

    # Stage 1
    def share(self, neighbour_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        peers = sorted(set(neighbour_keys) - {self.node_id})
        if len(peers) < self.params.threshold:
            raise SecAggError(f"client {self.node_id}: {len(peers)} neighbours < threshold {self.params.threshold}")
        if len({keys for keys in neighbour_keys.values()}) != len(neighbour_keys):
            raise SecAggError(f"client {self.node_id}: two neighbours advertised the same keys")
        self.neighbours = set(peers)
        self._peer_keys = {peer: neighbour_keys[peer] for peer in peers}
        seed_shares = split_secret(self._self_seed, self.params.threshold, len(peers))
        key_shares = split_secret(private_key_bytes(self._mask_keys.private), self.params.threshold, len(peers))
        sealed = {}
        for peer, seed_share, key_share in zip(peers, seed_shares, key_shares):
            key = derive_shared_key(self._envelope_keys.private, self._peer_keys[peer][0], SHARE_PURPOSE)
            payload = len(seed_share).to_bytes(2, "big") + seed_share + key_share
            sealed[peer] = seal(key, payload, sender=self.node_id, receiver=peer, server_round=self.server_round)
        return sealed

    # Stage 2
    def mask(self, received: dict[int, bytes], quantized: np.ndarray, *, overwrite_input: bool = False) -> np.ndarray:
        """The quantized input plus all its masks, mod 2^bits.

        ``overwrite_input`` masks a contiguous uint64 ``quantized`` in place (the caller's
        copy of the clear input is then gone), sparing a model-sized copy.
        """
        bits = self.params.modulus_bits
        for sender, ciphertext in received.items():
            if sender not in self.neighbours:
                raise SecAggError(f"client {self.node_id}: share from non-neighbour {sender}")
            key = derive_shared_key(self._envelope_keys.private, self._peer_keys[sender][0], SHARE_PURPOSE)
            payload = open_sealed(key, ciphertext, sender=sender, receiver=self.node_id, server_round=self.server_round)
            seed_length = int.from_bytes(payload[:2], "big")
            self._held_shares[sender] = (payload[2 : 2 + seed_length], payload[2 + seed_length :])
        # Mask only with neighbours that completed stage 1: a neighbour that never shared its
        # mask key could not be unmasked if it dropped later.
        self.neighbours = set(received)
        # One pass over the vector for all masks: the self-mask, then +mask towards each
        # neighbour with a larger id and -mask towards each with a smaller one, so every
        # pair's masks cancel in the sum.
        masks = [(self._self_seed, ADD)] + [
            (
                derive_shared_key(self._mask_keys.private, self._peer_keys[peer][1], MASK_PURPOSE),
                ADD if self.node_id < peer else SUBTRACT,
            )
            for peer in sorted(self.neighbours)
        ]
        flags = quantized.flags
        in_place = overwrite_input and quantized.dtype == np.uint64 and quantized.ndim == 1
        in_place = in_place and flags.c_contiguous and flags.writeable
        masked = quantized if in_place else np.array(quantized, dtype=np.uint64).reshape(-1)
        apply_masks(masked, masks, bits)
        self._masked_sent = True
        return masked

    # Stage 3
    def unmask(self, survivors: set[int], dropped: set[int]) -> dict[int, tuple[str, bytes]]:
        """Shares to reveal: ('seed', share) for surviving neighbours, ('key', share) for dropped ones."""
        if not self._masked_sent:
            raise SecAggError(f"client {self.node_id}: asked to unmask before sending its masked input")
        if survivors & dropped:
            raise SecAggError(f"client {self.node_id}: server claims nodes both survived and dropped")
        if len(survivors) < self.params.threshold:
            raise SecAggError(f"client {self.node_id}: only {len(survivors)} survivors, below threshold")
        revealed: dict[int, tuple[str, bytes]] = {}
        for peer, (seed_share, key_share) in self._held_shares.items():
            if peer in survivors:
                revealed[peer] = ("seed", seed_share)
            elif peer in dropped:
                revealed[peer] = ("key", key_share)
        return revealed


@dataclass
class ServerSession:
    params: SecAggParams
    server_round: int
    graph: dict[int, set[int]]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def route_keys(self, advertised: dict[int, tuple[bytes, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        self.public_keys = dict(advertised)
        alive = set(advertised)
        return {node: {peer: advertised[peer] for peer in self.graph[node] & alive} for node in alive}

    def route_shares(self, shares: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in shares}
        for sender, sealed in shares.items():
            for receiver, ciphertext in sealed.items():
                if receiver in inbox:
                    inbox[receiver][sender] = ciphertext
        return inbox

    def aggregate(
        self,
        masked: dict[int, np.ndarray],
        sharers: set[int],
        revealed: dict[int, dict[int, tuple[str, bytes]]],
    ) -> tuple[np.ndarray, int]:
        """Sum of the survivors' quantized inputs (mod 2^bits) and how many survived."""
        bits, threshold = self.params.modulus_bits, self.params.threshold
        survivors = set(masked)
        if not survivors <= sharers:
            raise SecAggError(f"masked inputs from clients that never shared keys: {sorted(survivors - sharers)}")
        if len(survivors) < threshold:
            raise SecAggError(f"only {len(survivors)} clients sent masked inputs; threshold is {threshold}")
        shapes = {(np.asarray(v).dtype, np.shape(v)) for v in masked.values()}
        if len(shapes) != 1 or next(iter(shapes))[0] != np.uint64 or len(next(iter(shapes))[1]) != 1:
            raise SecAggError(f"masked inputs must be uint64 vectors of one length; got {sorted(map(str, shapes))}")
        vectors = iter(masked.values())
        total = np.array(next(vectors), dtype=np.uint64, copy=True)
        for vector in vectors:
            np.add(total, vector, out=total)  # uint64 wrap-around is congruent mod 2^bits
        removals: list[tuple[bytes, int]] = []
        for node in sorted(sharers):
            kind = "seed" if node in survivors else "key"
            shares = [by_peer[node][1] for by_peer in revealed.values() if node in by_peer and by_peer[node][0] == kind]
            if len(shares) < threshold:
                raise SecAggError(f"only {len(shares)} shares to unmask client {node}; threshold is {threshold}")
            secret = combine_shares(shares, threshold)
            if kind == "seed":
                removals.append((secret, SUBTRACT))
                continue
            mask_private = private_key_from_bytes(secret)
            for peer in sorted(self.graph[node] & survivors):  # they received `node`'s shares, so masked with it
                key = derive_shared_key(mask_private, self.public_keys[peer][1], MASK_PURPOSE)
                # survivor `peer` added +mask if peer < node, else -mask: undo exactly that
                removals.append((key, SUBTRACT if peer < node else ADD))
        apply_masks(total, removals, bits)
        return total, len(survivors)
