"""Ed25519 keys for the privacy ledger: generate, save, load, fingerprint, and a registry.

Each party that spends privacy (the server, every client site) signs its own ledger
entries with a private key that never leaves its site. An auditor checks signatures
against a *key registry* it obtained independently of the ledger, so a forger who
can rewrite the ledger still cannot produce entries the registry accepts.

Key registry layouts (``KeyRegistry.load`` accepts either):

* a directory of public key files, one per party, named after the party:
  ``server.pub`` -> party ``server``; ``client-<partition-id>.pub`` -> party
  ``client:<partition-id>``. Each file holds one OpenSSH line (``ssh-ed25519 AAAA...``)
  or a PEM ``PUBLIC KEY`` block.
* a JSON file ``{"keys": [{"party": "server", "public_key": "ssh-ed25519 AAAA..."}, ...]}``.

A key is bound to its party: an entry is only accepted if its ``party`` is the one the
registry names for its ``key_id``, so client 3 cannot sign events as client 4.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

# Hex digits of SHA-256(raw public key) used as the key id: 64 bits, ample for a registry.
KEY_ID_HEX_CHARS = 16
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_SUFFIX = ".pub"
CLIENT_FILE_PREFIX = "client-"
CLIENT_PARTY_PREFIX = "client:"
SERVER_PARTY = "server"


class KeyFileError(ValueError):
    """A key file is missing, malformed, of the wrong type, or would be overwritten."""


def client_party(partition_id: int | str) -> str:
    """The ledger party name of a client site."""
    return f"{CLIENT_PARTY_PREFIX}{partition_id}"


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint that names a key in every entry it signs."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:KEY_ID_HEX_CHARS]


def public_key_openssh(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def save_signing_key(key: Ed25519PrivateKey, path: Path, *, force: bool = False) -> Path:
    """Write the private key (PKCS#8 PEM, unencrypted, mode 0600) and ``<path>.pub`` (OpenSSH).

    Refuses to overwrite an existing key unless ``force``: losing a site's key means its
    past ledger entries can no longer be tied to a key the site still holds.
    """
    path = Path(path)
    if path.exists() and not force:
        raise KeyFileError(f"{path} exists; refusing to overwrite a signing key (pass force=True)")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    # Created 0600 from the start, so the key is never briefly world-readable.
    fd = os.open(path, flags, PRIVATE_KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, PRIVATE_KEY_MODE)
    public_path = path.with_name(path.name + PUBLIC_KEY_SUFFIX)
    public_path.write_text(public_key_openssh(key.public_key()) + "\n", encoding="ascii")
    return public_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(f"cannot load signing key {path}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """A site's key: loaded if present, else generated and saved (with ``<path>.pub`` to register)."""
    path = Path(path)
    if path.exists():
        return load_signing_key(path)
    key = generate_signing_key()
    public_path = save_signing_key(key, path)
    logger.info("created signing key %s (key id %s); register %s with the auditor", path, key_id(key.public_key()), public_path)
    return key


def parse_public_key(text: str, source: str = "<text>") -> Ed25519PublicKey:
    """An Ed25519 public key from an OpenSSH line or a PEM block."""
    data = text.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, IndexError) as err:
        raise KeyFileError(f"cannot parse public key in {source}: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key in {source} is not Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"cannot read public key {path}: {err}") from err
    return parse_public_key(text, str(path))


def sign_bytes(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify_bytes(public_key: Ed25519PublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64.encode("ascii"), validate=True)
        public_key.verify(signature, message)
    except (InvalidSignature, ValueError, UnicodeEncodeError, AttributeError):
        return False
    return True


def party_from_filename(stem: str) -> str:
    if stem.startswith(CLIENT_FILE_PREFIX):
        return client_party(stem[len(CLIENT_FILE_PREFIX):])
    return stem


@dataclass(frozen=True)
class RegisteredKey:
    party: str
    public_key: Ed25519PublicKey
    source: str


class KeyRegistry:
    """Public keys an auditor trusts, by key id, each bound to one party."""

    def __init__(self) -> None:
        self._keys: dict[str, RegisteredKey] = {}

    def add(self, party: str, public_key: Ed25519PublicKey, source: str = "<added>") -> str:
        kid = key_id(public_key)
        known = self._keys.get(kid)
        if known is not None and known.party != party:
            raise KeyFileError(f"key {kid} registered for both {known.party!r} ({known.source}) and {party!r} ({source})")
        self._keys[kid] = RegisteredKey(party, public_key, source)
        return kid

    def get(self, kid: str) -> RegisteredKey | None:
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)

    def parties(self) -> dict[str, str]:
        return {kid: entry.party for kid, entry in self._keys.items()}

    def save_dir(self, directory: Path) -> None:
        """Write the directory layout (one ``<party>.pub`` per key)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for entry in self._keys.values():
            stem = entry.party.replace(CLIENT_PARTY_PREFIX, CLIENT_FILE_PREFIX, 1)
            (directory / f"{stem}{PUBLIC_KEY_SUFFIX}").write_text(public_key_openssh(entry.public_key) + "\n")

    @classmethod
    def load(cls, source: Path) -> KeyRegistry:
        source = Path(source)
        registry = cls()
        if source.is_dir():
            files = sorted(source.glob(f"*{PUBLIC_KEY_SUFFIX}"))
            if not files:
                raise KeyFileError(f"key registry {source} holds no *{PUBLIC_KEY_SUFFIX} files")
            for path in files:
                registry.add(party_from_filename(path.stem), load_public_key(path), str(path))
        elif source.is_file():
            try:
                document = json.loads(source.read_text(encoding="utf-8"))
                rows = document["keys"]
                for row in rows:
                    registry.add(str(row["party"]), parse_public_key(row["public_key"], str(source)), str(source))
            except (ValueError, KeyError, TypeError) as err:
                raise KeyFileError(f"key registry {source} is not a valid registry JSON: {err}") from err
        else:
            raise KeyFileError(f"key registry {source} does not exist")
        logger.info("loaded %d public keys from %s", len(registry), source)
        return registry
