"""Shamir secret sharing of byte strings, via pycryptodome's GF(2^128) implementation.

pycryptodome shares 16-byte secrets; longer secrets are padded and shared chunk by chunk
with the same share indices.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

CHUNK = 16
INDEX_BYTES = 2
LENGTH_BYTES = 2


class ShamirError(ValueError):
    """Too few or inconsistent shares to reconstruct a secret."""


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """``num_shares`` shares, any ``threshold`` of which rebuild ``secret``."""
    if not 1 < threshold <= num_shares:
        raise ShamirError(f"need 1 < threshold <= shares; got threshold={threshold}, shares={num_shares}")
    padded = len(secret).to_bytes(LENGTH_BYTES, "big") + secret
    padded += b"\0" * (-len(padded) % CHUNK)
    per_chunk = [Shamir.split(threshold, num_shares, padded[i : i + CHUNK], ssss=False) for i in range(0, len(padded), CHUNK)]
    shares = []
    for position in range(num_shares):
        index = per_chunk[0][position][0]
        shares.append(index.to_bytes(INDEX_BYTES, "big") + b"".join(chunk[position][1] for chunk in per_chunk))
    return shares


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}")
    bodies = [(int.from_bytes(s[:INDEX_BYTES], "big"), s[INDEX_BYTES:]) for s in shares[:threshold]]
    if len({len(body) for _, body in bodies}) != 1 or len(bodies[0][1]) % CHUNK:
        raise ShamirError("shares have inconsistent lengths")
    if len({index for index, _ in bodies}) != len(bodies):
        raise ShamirError("duplicate share indices")
    padded = b"".join(
        Shamir.combine([(index, body[i : i + CHUNK]) for index, body in bodies], ssss=False)
        for i in range(0, len(bodies[0][1]), CHUNK)
    )
    length = int.from_bytes(padded[:LENGTH_BYTES], "big")
    if length > len(padded) - LENGTH_BYTES:
        raise ShamirError("reconstructed secret is malformed (wrong or too few shares?)")
    return padded[LENGTH_BYTES : LENGTH_BYTES + length]
