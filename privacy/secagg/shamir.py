"""Shamir secret sharing of byte strings, via pycryptodome's GF(2^128) implementation.

pycryptodome shares 16-byte secrets; longer secrets are padded to whole chunks and shared
chunk by chunk with the same share indices. Each share says in the clear how many pad
bytes to drop (the secret's length is no secret), so a 32-byte key or seed takes two
chunks, not three: the server rebuilds one secret per client per round, and each chunk
costs a Lagrange interpolation in pure-Python GF(2^128) arithmetic.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

CHUNK = 16
INDEX_BYTES = 2
PAD_BYTES = 1  # how many zero bytes pad the secret to whole chunks: 0..CHUNK-1
HEADER_BYTES = INDEX_BYTES + PAD_BYTES


class ShamirError(ValueError):
    """Too few or inconsistent shares to reconstruct a secret."""


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """``num_shares`` shares, any ``threshold`` of which rebuild ``secret``."""
    if not 1 < threshold <= num_shares:
        raise ShamirError(f"need 1 < threshold <= shares; got threshold={threshold}, shares={num_shares}")
    if not secret:
        raise ShamirError("cannot share an empty secret")
    pad = -len(secret) % CHUNK
    padded = secret + b"\0" * pad
    per_chunk = [
        Shamir.split(threshold, num_shares, padded[i : i + CHUNK], ssss=False) for i in range(0, len(padded), CHUNK)
    ]
    shares = []
    for position in range(num_shares):
        index = per_chunk[0][position][0]
        header = index.to_bytes(INDEX_BYTES, "big") + pad.to_bytes(PAD_BYTES, "big")
        shares.append(header + b"".join(chunk[position][1] for chunk in per_chunk))
    return shares


def combine_shares(shares: list[bytes], threshold: int) -> bytes:
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares cannot rebuild a secret shared with threshold {threshold}")
    if any(len(share) <= HEADER_BYTES for share in shares[:threshold]):
        raise ShamirError("share too short")
    chosen = shares[:threshold]
    bodies = [(int.from_bytes(s[:INDEX_BYTES], "big"), s[HEADER_BYTES:]) for s in chosen]
    pads = {s[INDEX_BYTES] for s in chosen}
    if len({len(body) for _, body in bodies}) != 1 or len(bodies[0][1]) % CHUNK:
        raise ShamirError("shares have inconsistent lengths")
    if len(pads) != 1 or not 0 <= (pad := pads.pop()) < CHUNK:
        raise ShamirError("shares disagree on the secret's length")
    if len({index for index, _ in bodies}) != len(bodies):
        raise ShamirError("duplicate share indices")
    padded = b"".join(
        Shamir.combine([(index, body[i : i + CHUNK]) for index, body in bodies], ssss=False)
        for i in range(0, len(bodies[0][1]), CHUNK)
    )
    secret, padding = padded[: len(padded) - pad], padded[len(padded) - pad :]
    if padding.strip(b"\0"):
        raise ShamirError("reconstructed secret is malformed (wrong or too few shares?)")
    return secret
