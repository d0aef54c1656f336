"""X25519 key agreement and HKDF key derivation (from `cryptography`)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DERIVED_KEY_BYTES = 32
KDF_DOMAIN = b"fedguard-secagg-v1/"


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey
    public_bytes: bytes


def generate_key_pair() -> KeyPair:
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(private, public)


def private_key_bytes(private: X25519PrivateKey) -> bytes:
    """Raw private key, for Shamir-sharing a mask key so survivors can remove a dropout's masks."""
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def derive_shared_key(private: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both peers derive alike; ``purpose`` separates keys used for different jobs."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, salt=None, info=KDF_DOMAIN + purpose).derive(
        shared
    )


def public_bytes_of(private: X25519PrivateKey) -> bytes:
    """The raw public key of ``private`` (to check a rebuilt mask key against the one advertised)."""
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
