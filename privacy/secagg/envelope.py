"""Authenticated encryption of secret shares between two clients (AES-GCM from `cryptography`).

The associated data binds a ciphertext to its sender, receiver and round, so a share
replayed into another round or re-addressed to another client fails authentication.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class ShareAuthenticationError(ValueError):
    """A share ciphertext was tampered with, replayed, or addressed to someone else."""


def _associated_data(sender: int, receiver: int, server_round: int) -> bytes:
    return b"fedguard-share|" + f"{sender}|{receiver}|{server_round}".encode()


def seal(key: bytes, plaintext: bytes, *, sender: int, receiver: int, server_round: int) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(sender, receiver, server_round))


def open_sealed(key: bytes, ciphertext: bytes, *, sender: int, receiver: int, server_round: int) -> bytes:
    if len(ciphertext) <= NONCE_BYTES:
        raise ShareAuthenticationError("share ciphertext is too short")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _associated_data(sender, receiver, server_round))
    except InvalidTag as err:
        raise ShareAuthenticationError(
            f"share from {sender} to {receiver} for round {server_round} failed authentication"
        ) from err
