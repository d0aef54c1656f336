"""The SecAgg+ protocol's four stages as transport-free client and server sessions.

Bonawitz et al. 2017 with the sparse neighbour graph of Bell et al. 2020: each client
agrees mask keys with, and Shamir-shares its secrets among, only ``neighbours`` peers,
so its cost grows with the neighbour count, not with the cohort. The sessions exchange
plain Python values; carrying them in Flower messages is a separate layer.

Stages: (0) advertise public keys; (1) share the self-mask seed and the mask private
key among neighbours, encrypted per recipient; (2) send the masked, quantized input;
(3) for each neighbour, reveal the self-mask share if it survived, the mask-key share
if it dropped, never both, so the server can remove exactly the masks left in the sum.

A share that fails authentication (tampered, re-addressed, replayed) does not stop the
honest receiver: it leaves that sender out of its masks and names it in its stage-2
answer. The server then leaves the named sender's input out of the round (as if it had
dropped) and cancels only the masks the survivors really added, so one hostile client
can cost the round its own input but not the others' (unless it corrupted so many of
its shares that fewer than ``threshold`` valid ones remain, which fails that round with
a message naming it). The server cannot tell whether the sender or the receiver lied;
it never excludes anyone beyond the current round.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedguard.privacy.secagg.envelope import ShareAuthenticationError, open_sealed, seal
from fedguard.privacy.secagg.keys import (
    KeyPair,
    derive_shared_key,
    generate_key_pair,
    private_key_bytes,
    private_key_from_bytes,
)
from fedguard.privacy.secagg.errors import SecAggError
from fedguard.privacy.secagg.masking import ADD, SUBTRACT, apply_masks
from fedguard.privacy.secagg.policy import SitePolicy
from fedguard.privacy.secagg.shamir import combine_shares, split_secret

__all__ = ["ClientSession", "SecAggError", "SecAggParams", "ServerSession", "SitePolicy", "neighbour_graph"]

SEED_BYTES = 32
MASK_PURPOSE = b"pairwise-mask"
SHARE_PURPOSE = b"share-envelope"
SELF_MASK_PURPOSE = b"self-mask"

logger = logging.getLogger(__name__)


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
    # This site's own limits on k and t (never serialized: re-read from the site's settings).
    policy: SitePolicy = field(default_factory=SitePolicy)

    def __post_init__(self) -> None:
        self._envelope_keys = generate_key_pair()
        self._mask_keys = generate_key_pair()
        self._self_seed = os.urandom(SEED_BYTES)
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held_shares: dict[int, tuple[bytes, bytes]] = {}  # peer -> (self-seed share, mask-key share)
        self._masked_sent = False
        self.rejected_senders: set[int] = set()  # shares that failed authentication at the mask stage
        self.aborted = False  # set by wipe(): the caller must drop this session

    def to_dict(self) -> dict[str, Any]:
        """Everything the session holds, as plain values (ints, bytes, lists of them), for a
        client's persistent state between stages. The state never leaves the client: it holds
        private keys.
        """
        peers = sorted(self._peer_keys)
        held = sorted(self._held_shares)
        return {
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

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], policy: SitePolicy | None = None) -> ClientSession:
        try:
            bits, neighbours, threshold = (int(v) for v in record["params"])
            params = SecAggParams(bits, neighbours, threshold)
            session = cls(int(record["node_id"]), params, int(record["round"]), policy=policy or SitePolicy())
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

    def wipe(self) -> None:
        """Forget every secret of the round (on abort): fresh random keys and seed replace them,
        held shares are dropped, and the session can no longer mask or unmask."""
        self._envelope_keys = generate_key_pair()
        self._mask_keys = generate_key_pair()
        self._self_seed = os.urandom(SEED_BYTES)
        self._held_shares = {}
        self._peer_keys = {}
        self._masked_sent = False
        self.aborted = True

    # Stage 0
    def advertise(self) -> tuple[bytes, bytes]:
        return self._envelope_keys.public_bytes, self._mask_keys.public_bytes

    # Stage 1
    def share(self, neighbour_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        peers = sorted(set(neighbour_keys) - {self.node_id})
        if len(peers) < self.params.threshold:
            raise SecAggError(f"client {self.node_id}: {len(peers)} neighbours < threshold {self.params.threshold}")
        self.policy.check_degree(len(peers), self.params.neighbours, self.params.threshold)
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
        if self._masked_sent:
            raise SecAggError(f"client {self.node_id}: asked to mask a second time this round")
        bits = self.params.modulus_bits
        unknown = sorted(set(received) - self.neighbours)
        if unknown:
            raise SecAggError(f"client {self.node_id}: share(s) from non-neighbour(s) {unknown}")
        self.rejected_senders = set()
        for sender, ciphertext in received.items():
            key = derive_shared_key(self._envelope_keys.private, self._peer_keys[sender][0], SHARE_PURPOSE)
            try:
                payload = open_sealed(key, ciphertext, sender=sender, receiver=self.node_id, server_round=self.server_round)
            except ShareAuthenticationError as err:
                logger.warning("client %d: leaving neighbour %d out of its masks: %s", self.node_id, sender, err)
                self.rejected_senders.add(sender)
                continue
            seed_length = int.from_bytes(payload[:2], "big")
            self._held_shares[sender] = (payload[2 : 2 + seed_length], payload[2 + seed_length :])
        if len(self._held_shares) < self.params.threshold:
            # Bell et al.'s client-side check: with fewer than `threshold` neighbours holding
            # this client's shares, a server that later names it a survivor to those few can
            # collect its self-mask seed while no pairwise mask hides the input (with zero
            # shares received the masked input is the input plus the self-mask alone).
            held = len(self._held_shares)
            self.wipe()
            raise SecAggError(
                f"client {self.node_id}: only {held} valid share(s) received, threshold is "
                f"{self.params.threshold}; refusing to send a masked input"
            )
        # Mask only with neighbours whose shares this client holds: a neighbour that never
        # shared its mask key (or whose share was forged) could not be unmasked if it dropped.
        self.neighbours = set(self._held_shares)
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
            self.wipe()
            raise SecAggError(f"client {self.node_id}: server claims nodes both survived and dropped")
        if self.node_id not in survivors:
            # A request naming this client dropped (or not naming it at all) is one the server
            # may be showing only to this client, while others are told it survived: answering
            # would help reveal both its mask key and its self-mask seed.
            self.wipe()
            raise SecAggError(f"client {self.node_id}: the unmask request does not list this client among the survivors")
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
        """Deliver each share to its addressee, if that is a neighbour of its sender that shared too."""
        inbox: dict[int, dict[int, bytes]] = {node: {} for node in shares}
        for sender, sealed in shares.items():
            for receiver, ciphertext in sealed.items():
                if receiver in inbox and receiver in self.graph.get(sender, set()):
                    inbox[receiver][sender] = ciphertext
        return inbox

    def settle(
        self, masked_nodes: set[int], inbox: dict[int, dict[int, bytes]], rejected: dict[int, set[int]]
    ) -> tuple[set[int], dict[int, set[int]]]:
        """Which inputs enter the sum, and whom each of those clients masked with.

        A client masked with the senders it received shares from minus those it rejected.
        Survivors' pairwise masks cancel only where both sides masked with each other, so a
        client that some survivor did not mask with (its share was rejected, or it never sent
        one) is left out of the sum, which needs its mask key instead of its self-mask seed.
        """
        masked_with = {node: set(inbox.get(node, {})) - rejected.get(node, set()) for node in masked_nodes}
        left_out = {
            other
            for node in masked_nodes
            for other in masked_nodes - {node}
            if node in masked_with[other] and other not in masked_with[node]
        }
        return masked_nodes - left_out, masked_with

    def aggregate(
        self,
        masked: dict[int, np.ndarray],
        sharers: set[int],
        revealed: dict[int, dict[int, tuple[str, bytes]]],
        masked_with: dict[int, set[int]],
    ) -> tuple[np.ndarray, int]:
        """Sum of the survivors' quantized inputs (mod 2^bits) and how many survived.

        ``masked`` holds exactly the inputs to sum (see ``settle``); ``masked_with`` says,
        for each of them, which peers it added a pairwise mask with.
        """
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
            maskers = {peer for peer in survivors if node in masked_with.get(peer, set())}
            if kind == "key" and not maskers:
                continue  # nobody in the sum masked with it: nothing of it to remove
            shares = [by_peer[node][1] for by_peer in revealed.values() if node in by_peer and by_peer[node][0] == kind]
            if len(shares) < threshold:
                what = "its self-mask" if kind == "seed" else f"the masks {len(maskers)} survivor(s) added with it"
                raise SecAggError(
                    f"client {node}: only {len(shares)} valid share(s) revealed, threshold is {threshold}; "
                    f"cannot remove {what}"
                )
            secret = combine_shares(shares, threshold)
            if kind == "seed":
                removals.append((secret, SUBTRACT))
                continue
            mask_private = private_key_from_bytes(secret)
            for peer in sorted(maskers):
                key = derive_shared_key(mask_private, self.public_keys[peer][1], MASK_PURPOSE)
                # survivor `peer` added +mask if peer < node, else -mask: undo exactly that
                removals.append((key, SUBTRACT if peer < node else ADD))
        apply_masks(total, removals, bits)
        return total, len(survivors)
