"""Long-term site identities (Ed25519) and the roster each site pins, against key substitution.

Why: in SecAgg+ the server relays every client's per-round public keys. A server that
swaps a neighbour's keys for its own agrees the envelope key with the victim itself,
decrypts every share the victim sends, and rebuilds both its self-mask seed and its mask
key: the victim's input in the clear. So each site signs its round keys with a long-term
identity key, and every site checks its peers' signatures against a roster of identity
public keys it holds locally.

The roster is the out-of-band part: it must not come from the server (a server that
wrote the roster would list its own keys). On real sites the operator distributes the
roster file like the CA certificate, and each site admin checks it (the same public key
list every site registered); a simulation harness writes one per run as the stand-in.
TLS and SuperNode authentication keys are no substitute: the server operator runs the CA
and registers the SuperNode keys.

What a signature binds: the round, the node id the server assigned, the session id, and
both round public keys, under a domain tag, so a signed advert cannot be replayed into
another round, another session, or under another node's id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedguard.privacy.secagg.errors import SecAggError

IDENTITY_KEY_BYTES = 32
SIGNATURE_BYTES = 64
ADVERT_DOMAIN = b"fedguard-secagg-advert-v1|"
ROSTER_FINGERPRINT_DOMAIN = b"fedguard-secagg-roster-fingerprint-v1|"
ROSTER_FORMAT = "fedguard-secagg-roster-v1"
IDENTITY_FILE = "identity.key"
ROSTER_FILE = "roster.json"

logger = logging.getLogger(__name__)


class RosterError(SecAggError):
    """A roster or identity file is missing or malformed, or a peer is not on the roster."""


def public_bytes(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_or_create_identity(path: Path) -> Ed25519PrivateKey:
    """The site's identity key at ``path`` (created, owner-only, on first use)."""
    if path.exists():
        try:
            return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(path.read_text().strip()))
        except ValueError as err:
            raise RosterError(f"identity key {path} is malformed: {err}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(raw.hex() + "\n")
    logger.info("created the secure-aggregation identity key %s", path)
    return private


def advert_bytes(server_round: int, session_id: bytes, node_id: int, envelope_key: bytes, mask_key: bytes,
                 seed_commitment: bytes, nonce_commitment: bytes) -> bytes:
    """What a site signs: its round keys, self-mask seed commitment and graph-nonce commitment,
    bound to round, session and node id."""
    return b"|".join([ADVERT_DOMAIN, str(server_round).encode(), session_id.hex().encode(), str(node_id).encode(),
                      envelope_key.hex().encode(), mask_key.hex().encode(), seed_commitment.hex().encode(),
                      nonce_commitment.hex().encode()])


def sign_advert(identity: Ed25519PrivateKey, server_round: int, session_id: bytes, node_id: int,
                envelope_key: bytes, mask_key: bytes, seed_commitment: bytes, nonce_commitment: bytes) -> bytes:
    return identity.sign(advert_bytes(server_round, session_id, node_id, envelope_key, mask_key, seed_commitment,
                                      nonce_commitment))


@dataclass(frozen=True)
class Roster:
    """Identity public keys of the sites allowed in a secure-aggregation round, by site name."""

    sites: dict[str, bytes]

    def __post_init__(self) -> None:
        if len(set(self.sites.values())) != len(self.sites):
            raise RosterError("the roster lists one identity key under two site names")
        for name, key in self.sites.items():
            if len(key) != IDENTITY_KEY_BYTES:
                raise RosterError(f"roster entry {name!r}: an Ed25519 public key is {IDENTITY_KEY_BYTES} bytes")
        object.__setattr__(self, "_by_key", {key: name for name, key in self.sites.items()})

    def name_of(self, identity_key: bytes) -> str | None:
        return self._by_key.get(identity_key)

    def verify_advert(self, identity_key: bytes, signature: bytes, server_round: int, session_id: bytes,
                      node_id: int, envelope_key: bytes, mask_key: bytes, seed_commitment: bytes,
                      nonce_commitment: bytes) -> str:
        """The site name whose identity signed these round keys for ``node_id``; RosterError otherwise."""
        name = self.name_of(identity_key)
        if name is None:
            raise RosterError(f"node {node_id}: its identity key is not on this site's roster")
        signed = advert_bytes(server_round, session_id, node_id, envelope_key, mask_key, seed_commitment,
                              nonce_commitment)
        if not _signature_holds(identity_key, signature, signed):
            raise RosterError(f"node {node_id} ({name}): round keys not signed by its identity key")
        return name

    def fingerprint(self) -> str:
        """A short, human-comparable digest of every (name, key) entry, in any order.

        Why: the operator writes the roster, and an entry it slips in is a colluder every site
        would trust. Sites read this aloud or paste it to each other over a channel the operator
        does not control; equal fingerprints mean they pinned the same sites. 128 bits of
        SHA-256, in groups of four hex digits.
        """
        digest = hashlib.sha256(ROSTER_FINGERPRINT_DOMAIN)
        for name, key in sorted(self.sites.items()):
            encoded = name.encode()
            digest.update(len(encoded).to_bytes(2, "big") + encoded + key)
        text = digest.hexdigest()[:32]
        return f"{len(self.sites)} sites " + "-".join(text[i:i + 4] for i in range(0, len(text), 4))

    def to_json(self) -> str:
        return json.dumps({"format": ROSTER_FORMAT, "sites": {n: k.hex() for n, k in sorted(self.sites.items())}},
                          indent=2)

    @classmethod
    def load(cls, path: Path) -> Roster:
        """The roster in ``path`` (parsed once per file version: sites check peers every round)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        return _load_roster(path, None if stat is None else (stat.st_mtime_ns, stat.st_size))

    @classmethod
    def _parse(cls, path: Path) -> Roster:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != ROSTER_FORMAT:
                raise RosterError(f"roster {path}: format must be {ROSTER_FORMAT!r}")
            return cls({str(n): bytes.fromhex(k) for n, k in data["sites"].items()})
        except FileNotFoundError as err:
            raise RosterError(
                f"no secure-aggregation roster at {path}: the operator distributes it (the identity public "
                f"keys of all sites) out of band, like the CA certificate"
            ) from err
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise RosterError(f"roster {path} is malformed: {err}") from err


@lru_cache(maxsize=1 << 16)
def _signature_holds(identity_key: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification, remembered: every site of a cohort checks the same adverts, and a
    simulation runs many sites in one process."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@lru_cache(maxsize=16)
def _load_roster(path: Path, version: tuple[int, int] | None) -> Roster:
    roster = Roster._parse(path)  # noqa: SLF001 - the cached half of Roster.load
    # Once per file version: the fingerprint the site compares with the other sites (fedguard roster fingerprint).
    logger.info("secure aggregation: pinned roster %s, fingerprint %s", path, roster.fingerprint())
    return roster


def write_roster(path: Path, roster: Roster) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(roster.to_json() + "\n")


SURVIVORS_DOMAIN = b"fedguard-secagg-survivors-v1|"
PARTNERS_DOMAIN = b"fedguard-secagg-mask-partners-v1|"


def partners_bytes(server_round: int, session_id: bytes, node_id: int, partners: set[int]) -> bytes:
    """What a client signs with its masked input: the neighbours it masked with this round."""
    listed = ",".join(str(node) for node in sorted(partners)).encode()
    return b"|".join([PARTNERS_DOMAIN, str(server_round).encode(), session_id.hex().encode(), str(node_id).encode(),
                      listed])


def partners_hold(identity_key: bytes, signature: bytes, server_round: int, session_id: bytes, node_id: int,
                  partners: set[int]) -> bool:
    """Whether ``node_id``'s identity key signed ``partners`` as its mask partners for this round and session."""
    return _signature_holds(identity_key, signature, partners_bytes(server_round, session_id, node_id, partners))


def survivors_bytes(server_round: int, session_id: bytes, survivors: set[int]) -> bytes:
    """What a survivor signs in the consistency round: the one survivor set it was shown."""
    listed = ",".join(str(node) for node in sorted(survivors)).encode()
    return b"|".join([SURVIVORS_DOMAIN, str(server_round).encode(), session_id.hex().encode(), listed])


def count_endorsements(
    identities: dict[int, bytes],
    signatures: dict[int, bytes],
    server_round: int,
    session_id: bytes,
    survivors: set[int],
) -> int:
    """How many distinct known identities (node -> identity key, this client's verified peers)
    signed exactly this survivor set for this round and session. Signers outside the set, or
    not among ``identities``, do not count."""
    message = survivors_bytes(server_round, session_id, survivors)
    valid: set[bytes] = set()
    for node, signature in signatures.items():
        identity = identities.get(node)
        if identity is None or node not in survivors or identity in valid:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(identity).verify(signature, message)
        except (InvalidSignature, ValueError):
            logger.warning("secure aggregation: node %d's signature on the survivor set does not verify", node)
            continue
        valid.add(identity)
    return len(valid)


COHORT_DOMAIN = b"fedguard-secagg-cohort-v1|"


def cohort_bytes(node_id: int, digest: bytes) -> bytes:
    """What a site signs in the cohort stage: the digest of the cohort list it was shown
    (``params.cohort_digest``: round, session, every listed site's signed advert), under its node id."""
    return b"|".join([COHORT_DOMAIN, str(node_id).encode(), digest.hex().encode()])


def unconfirmed_cohort(identities: dict[int, bytes], signatures: dict[int, bytes], digest: bytes) -> list[int]:
    """The listed sites (node -> identity key, each checked against the roster) without a valid
    signature on ``digest`` in ``signatures``: a site shown another list signed another digest."""
    return sorted(node for node, identity in identities.items()
                  if not _signature_holds(identity, signatures.get(node, b""), cohort_bytes(node, digest)))
