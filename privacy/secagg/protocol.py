"""The SecAgg+ protocol's stages as a transport-free client session (the server's: server_session.py).

Bonawitz et al. 2017 with the sparse neighbour graph of Bell et al. 2020: each client
agrees mask keys with, and Shamir-shares its secrets among, only ``neighbours`` peers,
so its cost grows with the neighbour count, not with the cohort. The sessions exchange
plain Python values; carrying them in Flower messages is a separate layer.

Stages: (0) advertise public keys and a commitment to a fresh graph nonce; (1a) fix the
cohort list and reveal the nonce (the graph's seed needs every listed site's nonce, so
the server cannot re-draw the graph by choosing the list); (1b) share the self-mask
seed and the mask private key among neighbours, encrypted per recipient; (2) send the masked, quantized input;
(2b) consistency: sign the survivor set shown; (3) for each neighbour, reveal the
self-mask share if it survived, the mask-key share if it dropped, never both, so the
server can remove exactly the masks left in the sum.

Against a server that deviates (Bell et al. 2020's active model) the session runs each
stage once, in order; refuses to mask with fewer than ``threshold`` valid shares; signs
one survivor set and unmasks only for it, with ``threshold`` neighbour signatures on it,
and never when it is not listed as a survivor; any refusal wipes its secrets. Signed
round keys, the roster and the hash-derived neighbour graph are checked by the caller
(clients/secure_aggregation.py) before ``share``.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedguard.privacy.secagg.envelope import ShareAuthenticationError, open_sealed, seal
from fedguard.privacy.secagg.keys import (
    KeyPair,
    derive_shared_key,
    generate_key_pair,
    private_key_bytes,
    private_key_from_bytes,
)
from fedguard.privacy.secagg.errors import SecAggError
from fedguard.privacy.secagg.identity import count_endorsements, partners_bytes, partners_hold, survivors_bytes
from fedguard.privacy.secagg.masking import ADD, SUBTRACT, apply_masks
from fedguard.privacy.secagg.params import (
    MASK_PURPOSE,
    SEED_BYTES,
    GRAPH_NONCE_BYTES,
    SELF_MASK_PURPOSE,
    SHARE_PURPOSE,
    SecAggParams,
    neighbour_graph,
    nonce_commitment,
    seed_commitment,
)
from fedguard.privacy.secagg.policy import SitePolicy
from fedguard.privacy.secagg.server_session import ServerSession
from fedguard.privacy.secagg.shamir import split_secret

__all__ = [
    "MASK_PURPOSE", "SEED_BYTES", "SELF_MASK_PURPOSE", "SHARE_PURPOSE", "ClientSession", "SecAggError", "SecAggParams",
    "ServerSession", "SitePolicy", "neighbour_graph",
]

logger = logging.getLogger(__name__)

# The client session's states, in order; DONE after unmasking or an abort.
ADVERTISED, COHORT, SHARED, MASKED, ENDORSED, DONE = "advertised", "cohort", "shared", "masked", "endorsed", "done"
STAGES = (ADVERTISED, COHORT, SHARED, MASKED, ENDORSED, DONE)


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
    # The server's id for this round's run of the protocol: signed adverts and stage requests carry it.
    session_id: bytes = b""

    def __post_init__(self) -> None:
        self._envelope_keys = generate_key_pair()
        self._mask_keys = generate_key_pair()
        self._self_seed = os.urandom(SEED_BYTES)
        # Commit-and-reveal for the neighbour graph: committed in the advert, revealed once the
        # cohort list is fixed (``fix_cohort``); the digest of that list is kept to hold the server to it.
        self._graph_nonce = os.urandom(GRAPH_NONCE_BYTES)
        self.cohort_digest = b""
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held_shares: dict[int, tuple[bytes, bytes]] = {}  # peer -> (self-seed share, mask-key share)
        self._stage = ADVERTISED
        # Identity keys of the peers this client shared with (their signed adverts verified), and
        # the survivor set it signed in the consistency round.
        self.peer_identities: dict[int, bytes] = {}
        self._endorsed: list[int] = []
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
            "session": self.session_id,
            "params": [self.params.modulus_bits, self.params.neighbours, self.params.threshold],
            "envelope_key": private_key_bytes(self._envelope_keys.private),
            "mask_key": private_key_bytes(self._mask_keys.private),
            "self_seed": self._self_seed,
            "graph_nonce": self._graph_nonce,
            "cohort_digest": self.cohort_digest,
            "neighbours": sorted(self.neighbours),
            "peers": peers,
            "peer_envelope_keys": [self._peer_keys[p][0] for p in peers],
            "peer_mask_keys": [self._peer_keys[p][1] for p in peers],
            "held_from": held,
            "held_seed_shares": [self._held_shares[p][0] for p in held],
            "held_key_shares": [self._held_shares[p][1] for p in held],
            "stage": self._stage,
            "identity_peers": sorted(self.peer_identities),
            "identity_keys": [self.peer_identities[p] for p in sorted(self.peer_identities)],
            "endorsed": list(self._endorsed),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], policy: SitePolicy | None = None) -> ClientSession:
        try:
            bits, neighbours, threshold = (int(v) for v in record["params"])
            params = SecAggParams(bits, neighbours, threshold)
            session = cls(int(record["node_id"]), params, int(record["round"]), policy=policy or SitePolicy(),
                          session_id=bytes(record["session"]))
            session._envelope_keys = _key_pair(bytes(record["envelope_key"]))
            session._mask_keys = _key_pair(bytes(record["mask_key"]))
            session._self_seed = bytes(record["self_seed"])
            session._graph_nonce = bytes(record["graph_nonce"])
            session.cohort_digest = bytes(record["cohort_digest"])
            session.neighbours = {int(n) for n in record["neighbours"]}
            session._peer_keys = {
                int(p): (bytes(e), bytes(m))
                for p, e, m in zip(record["peers"], record["peer_envelope_keys"], record["peer_mask_keys"], strict=True)
            }
            session._held_shares = {
                int(p): (bytes(a), bytes(b))
                for p, a, b in zip(record["held_from"], record["held_seed_shares"], record["held_key_shares"], strict=True)
            }
            session._stage = str(record["stage"])
            session.peer_identities = {
                int(p): bytes(k) for p, k in zip(record["identity_peers"], record["identity_keys"], strict=True)
            }
            session._endorsed = [int(n) for n in record["endorsed"]]
            if session._stage not in STAGES:
                raise ValueError(f"unknown stage {session._stage!r}")
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
        self._stage = DONE
        self.aborted = True

    def _expect(self, stage: str, request: str) -> None:
        """The stages run once each, in order: a replayed or reordered request is refused (a second
        share would split the secrets again under keys the server may have swapped; a second
        unmask would answer a second survivor list)."""
        if self._stage != stage:
            raise SecAggError(f"client {self.node_id}: {request} request out of order (this session is at {self._stage!r})")

    # Stage 0
    def advertise(self) -> tuple[bytes, bytes]:
        return self._envelope_keys.public_bytes, self._mask_keys.public_bytes

    def seed_commitment(self) -> bytes:
        """The commitment to this round's self-mask seed, advertised (and signed) with the keys."""
        return seed_commitment(self._self_seed)

    def nonce_commitment(self) -> bytes:
        """The commitment to this round's graph nonce, advertised (and signed) with the keys."""
        return nonce_commitment(self._graph_nonce)

    # Stage 1a
    def fix_cohort(self, digest: bytes) -> bytes:
        """Bind this session to one cohort list (its digest) and reveal the graph nonce, once.

        Revealed only now, the nonce enters a graph seed whose other inputs (the list and every
        listed site's nonce commitment) are already fixed, so the server learns this site's
        neighbours only when it can no longer change them.
        """
        self._expect(ADVERTISED, "cohort")
        self.cohort_digest = bytes(digest)
        self._stage = COHORT
        return self._graph_nonce

    # Stage 1b
    def share(self, neighbour_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        self._expect(COHORT, "share")
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
        self._stage = SHARED
        return sealed

    # Stage 2
    def mask(self, received: dict[int, bytes], quantized: np.ndarray, *, overwrite_input: bool = False) -> np.ndarray:
        """The quantized input plus all its masks, mod 2^bits.

        ``overwrite_input`` masks a contiguous uint64 ``quantized`` in place (the caller's
        copy of the clear input is then gone), sparing a model-sized copy.
        """
        if self._stage == MASKED:
            raise SecAggError(f"client {self.node_id}: asked to mask a second time this round")
        self._expect(SHARED, "mask")
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
        self._stage = MASKED
        return masked

    def sign_partners(self, identity: Ed25519PrivateKey) -> bytes:
        """Sign the neighbours this client masked with; sent with the masked input.

        A neighbour reveals this client's seed share only if it is on this signed list: one
        the server kept this client's share from (so no pairwise mask hides the input from
        it) would otherwise hand the server the seed while a colluder or a neighbour named
        dropped gives away the other masks (review of 2026-12-01: 2t - k colluders sufficed).
        """
        self._expect(MASKED, "sign its mask partners")
        return identity.sign(partners_bytes(self.server_round, self.session_id, self.node_id, self.neighbours))

    def _masked_with_me(self, peer: int, statements: Mapping[int, tuple[set[int], bytes]]) -> bool:
        """Whether ``peer`` signed a mask-partner list for this round and session naming this client."""
        identity = self.peer_identities.get(peer)
        if identity is None or peer not in statements:
            return False
        partners, signature = statements[peer]
        return self.node_id in partners and partners_hold(identity, signature, self.server_round, self.session_id,
                                                          peer, partners)

    # Consistency round (between stages 2 and 3)
    def endorse(self, survivors: set[int], identity: Ed25519PrivateKey) -> bytes:
        """Sign the survivor set the server showed this client; it will unmask for no other set."""
        self._expect(MASKED, "consistency")
        self._check_survivors(survivors, set())
        self._endorsed = sorted(survivors)
        self._stage = ENDORSED
        return identity.sign(survivors_bytes(self.server_round, self.session_id, survivors))

    def _check_survivors(self, survivors: set[int], dropped: set[int]) -> None:
        if survivors & dropped:
            self.wipe()
            raise SecAggError(f"client {self.node_id}: server claims nodes both survived and dropped")
        if self.node_id not in survivors:
            # A request naming this client dropped (or not naming it at all) is one the server
            # may be showing only to this client, while others are told it survived: answering
            # would help reveal both its mask key and its self-mask seed.
            self.wipe()
            raise SecAggError(f"client {self.node_id}: the request does not list this client among the survivors")
        if len(survivors) < self.params.threshold:
            self.wipe()
            raise SecAggError(f"client {self.node_id}: only {len(survivors)} survivors, below threshold")

    # Stage 3
    def unmask(
        self,
        survivors: set[int],
        dropped: set[int],
        endorsements: Mapping[int, bytes] | None = None,
        partner_statements: Mapping[int, tuple[set[int], bytes]] | None = None,
    ) -> dict[int, tuple[str, bytes]]:
        """Shares to reveal: ('seed', share) for surviving neighbours, ('key', share) for dropped ones.

        A client with verified peer identities (every client behind the ClientApp) answers
        only after the consistency round: for the survivor set it signed, and only when at
        least ``threshold`` of its neighbours signed that same set (``endorsements``: node ->
        signature), so the server cannot show different clients different survivor sets.
        """
        consistent = endorsements is not None or bool(self.peer_identities)
        if self._stage not in (MASKED, ENDORSED) or (consistent and self._stage != ENDORSED):
            what = "before sending its masked input" if self._stage in (ADVERTISED, COHORT, SHARED) else "out of order"
            raise SecAggError(f"client {self.node_id}: asked to unmask {what} (session at {self._stage!r})")
        self._check_survivors(survivors, dropped)
        if consistent:
            if sorted(survivors) != self._endorsed:
                self.wipe()
                raise SecAggError(f"client {self.node_id}: the unmask survivor set differs from the one it signed")
            agreeing = count_endorsements(self.peer_identities, dict(endorsements or {}), self.server_round,
                                          self.session_id, survivors)
            if agreeing < self.params.threshold:
                self.wipe()
                raise SecAggError(
                    f"client {self.node_id}: only {agreeing} neighbour(s) signed this survivor set, "
                    f"threshold is {self.params.threshold}"
                )
        self._stage = DONE  # one answer per session: a second survivor list gets none
        revealed: dict[int, tuple[str, bytes]] = {}
        statements = dict(partner_statements or {})
        for peer, (seed_share, key_share) in self._held_shares.items():
            if peer in survivors:
                if consistent and not self._masked_with_me(peer, statements):
                    # ``partner_statements``: node -> (its signed mask partners, signature).
                    logger.warning("client %d: no signed mask-partner list of survivor %d naming it; "
                                   "its seed share stays here", self.node_id, peer)
                    continue
                revealed[peer] = ("seed", seed_share)
            elif peer in dropped:
                revealed[peer] = ("key", key_share)
        return revealed
