"""The server's side of SecAgg+: route keys and shares, settle who is in the sum, unmask it.

Transport-free like the client session (privacy/secagg/protocol.py): plain values in,
plain values out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedguard.privacy.secagg.errors import SecAggError
from fedguard.privacy.secagg.keys import derive_shared_key, private_key_from_bytes, public_bytes_of
from fedguard.privacy.secagg.masking import ADD, SUBTRACT, apply_masks
from fedguard.privacy.secagg.params import MASK_PURPOSE, SecAggParams, seed_commitment
from fedguard.privacy.secagg.reconstruct import rebuild
from fedguard.privacy.secagg.shamir import combine_shares


@dataclass
class ServerSession:
    params: SecAggParams
    server_round: int
    graph: dict[int, set[int]]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    # Each client's signed commitment to its self-mask seed (rebuilt seeds are checked against it).
    seed_commitments: dict[int, bytes] = field(default_factory=dict)

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

    def _is_seed_of(self, node: int):
        """A check of a rebuilt seed against ``node``'s signed commitment (None without one)."""
        expected = self.seed_commitments.get(node)
        return None if expected is None else (lambda secret: seed_commitment(secret) == expected)

    def _is_mask_key_of(self, node: int):
        """Whether a rebuilt private key is the one behind ``node``'s signed mask public key."""
        expected = self.public_keys[node][1]

        def check(secret: bytes) -> bool:
            try:
                return public_bytes_of(private_key_from_bytes(secret)) == expected
            except ValueError:
                return False

        return check

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
            # Only shares from the node's graph neighbours count: no one else was sent one.
            shares = [
                by_peer[node][1]
                for peer, by_peer in sorted(revealed.items())
                if peer in self.graph.get(node, set()) and node in by_peer and by_peer[node][0] == kind
            ]
            if len(shares) < threshold:
                what = "its self-mask" if kind == "seed" else f"the masks {len(maskers)} survivor(s) added with it"
                raise SecAggError(
                    f"client {node}: only {len(shares)} valid share(s) revealed, threshold is {threshold}; "
                    f"cannot remove {what}"
                )
            check = self._is_seed_of(node) if kind == "seed" else self._is_mask_key_of(node)
            secret = rebuild(shares, threshold, combine_shares, check, owner=f"client {node}")
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
