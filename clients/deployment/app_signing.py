"""Signed apps: a site runs a run's ClientApp only if a publisher it trusts signed that exact app.

Why this exists: in Flower's deployment engine the submitter of a run ships the app (a FAB,
a zip of the app's source tree and its pyproject.toml), and every SuperNode executes the
ClientApp that FAB names, on the site's machine, next to the site's raw data. Whoever can
submit a run could otherwise make every site run code that reads its files and sends them out.

Why not Flower's own ``flower-supernode --trusted-entities``: in Flower 1.41 the signatures it
checks (``Fab.verifications``) are filled in only by the SuperLink's Flower Hub path (a FAB
fetched from the hosted platform, signed there with ``flwr app review``). A FAB submitted with
``flwr run <dir>`` always carries ``verifications={}``, so a SuperNode started with
``--trusted-entities`` refuses every locally submitted run, signed or not, and nothing in the
open-source SuperLink can attach a signature. fedguard therefore carries the signature in the
run config (``fedguard-app-signature``) and checks it on the site, in the process that would
load the ClientApp, before a byte of the FAB is unpacked (clients/deployment/verified_clientapp.py).

The signature is Flower's own format (Ed25519 over 8-byte big-endian ``signed_at`` followed by
SHA-256 of the FAB's bytes) and the site's list of trusted publishers is Flower's
trusted-entities YAML (``key-id: "ssh-ed25519 AAAA..."``): the same keys and file serve
Flower's mechanism unchanged the day a SuperLink can carry signatures itself.

The signature covers the whole FAB: the ClientApp's code and pyproject.toml's
``[tool.flwr.app.components]`` (which module a site imports), not the run config, which the
submitter chooses and each site checks against its own floors (clients/site_floor.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fedguard.clients.deployment.key_material import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    KeyMaterialError,
)
from fedguard.clients.deployment.yaml_file import read_yaml_file
from flwr.common.config import get_fab_config, get_metadata_from_config
from flwr.common.constant import FAB_EXCLUDE_PATTERNS
from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    decode_base64url,
    sign_message,
    verify_signature,
)

# The run config key (declared in pyproject.toml's [tool.flwr.app.config]) that carries the signature.
RUN_CONFIG_APP_SIGNATURE = "fedguard-app-signature"
PUBLISHER_KEY_FILE = "app_publisher_key"
SIGNATURE_VERSION = 1
# Where `flwr run` builds the FAB from, and so what the publisher signs: fedguard's source tree.
APP_DIR = Path(__file__).resolve().parents[2]
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AppSignatureError(ValueError):
    """A signature, key or trusted-publishers file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class AppSignature:
    """A publisher's Ed25519 signature over one FAB (Flower's message format)."""

    key_id: str
    signed_at: int
    signature: str  # base64url, unpadded, as Flower's verification records carry it
    fab_sha256: str  # what was signed; informative (verification recomputes it from the FAB)

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        if not isinstance(self.signed_at, int) or self.signed_at <= 0:
            raise AppSignatureError(f"signed_at must be a positive integer (Unix seconds), got {self.signed_at!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.fab_sha256):
            raise AppSignatureError("fab_sha256 must be 64 lowercase hex digits")
        try:
            raw = decode_base64url(self.signature)
        except (ValueError, TypeError) as err:
            raise AppSignatureError(f"signature is not base64url: {err}") from None
        if len(raw) != 64:
            raise AppSignatureError(f"an Ed25519 signature has 64 bytes, this one {len(raw)}")

    def to_json(self) -> str:
        return json.dumps({"version": SIGNATURE_VERSION, "key_id": self.key_id, "signed_at": self.signed_at,
                           "signature": self.signature, "fab_sha256": self.fab_sha256}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AppSignature:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise AppSignatureError(f"not JSON: {err}") from None
        if not isinstance(data, dict) or data.get("version") != SIGNATURE_VERSION:
            raise AppSignatureError(f"not a fedguard app signature (version {SIGNATURE_VERSION})")
        try:
            return cls(str(data["key_id"]), data["signed_at"], str(data["signature"]), str(data["fab_sha256"]))
        except KeyError as err:
            raise AppSignatureError(f"missing field {err}") from None


def check_key_id(key_id: str) -> None:
    if not _KEY_ID.fullmatch(key_id):
        raise AppSignatureError(
            f"key id {key_id!r} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def fab_digest(fab: bytes) -> bytes:
    return hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, private_key: ed25519.Ed25519PrivateKey, key_id: str, signed_at: int | None = None) -> AppSignature:
    """Sign ``fab`` as Flower does (timestamp || SHA-256(FAB)), so the record also fits Flower's verifier."""
    when = int(time.time()) if signed_at is None else signed_at
    raw = sign_message(private_key, create_message_to_sign(fab_digest(fab), when))
    return AppSignature(key_id, when, _b64url(raw), hashlib.sha256(fab).hexdigest())


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Directories whose every file Flower's FAB builder drops by its own built-in excludes, which no
# app setting can override (``APP_PUBLISH_EXCLUDE_PATTERNS`` and ``FAB_EXCLUDE_PATTERNS`` both hold
# ``.venv/**`` and ``**/__pycache__/**``), so not walking them changes no FAB byte and saves the
# ~10^5 files of a .venv. Nothing else is skipped: ``flwr run`` walks .git/, .pytest_cache/, ...
# and keeps any file there its include patterns match (``*.md``, ``*.json``, ...) unless the app's
# .gitignore drops it; a walk that skipped .git/ signed a FAB other than the one submitted, and
# every site then refused the run as "modified after signing". Derived from the installed Flower's
# patterns: a version without them gets the full walk, exactly Flower's.
_FLOWER_EXCLUDES = frozenset(APP_PUBLISH_EXCLUDE_PATTERNS) & frozenset(FAB_EXCLUDE_PATTERNS)
_SKIP_AT_TOP = frozenset({".venv"} if ".venv/**" in _FLOWER_EXCLUDES else ())
_SKIP_ANYWHERE = frozenset({"__pycache__"} if "**/__pycache__/**" in _FLOWER_EXCLUDES else ())


def _app_files(app_dir: Path) -> dict[str, Path]:
    """What ``flwr.cli.utils.collect_files`` collects (the walk ``flwr run`` builds its FAB from),
    less the directories above, which Flower's built-in excludes drop whole; the FAB built from it
    is byte-identical (tests/test_app_signing.py, and every signed deployment test run)."""
    root = app_dir.resolve()
    files = {}
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        top = Path(dirpath) == app_dir
        dirnames[:] = [name for name in dirnames
                       if name not in _SKIP_ANYWHERE and not (top and name in _SKIP_AT_TOP)]
        for filename in filenames:
            path = Path(dirpath) / filename
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[path.relative_to(app_dir).as_posix()] = path
    return files


def build_app_fab(app_dir: Path = APP_DIR) -> bytes:
    """The FAB exactly as ``flwr run <app_dir>`` builds it (Flower's builder is deterministic:
    same tree, same bytes), so a signature made here matches the FAB a run submits."""
    from flwr.cli.build import build_fab_from_files

    if not (app_dir / "pyproject.toml").is_file():
        raise AppSignatureError(f"{app_dir} has no pyproject.toml: not an app's source tree")
    return build_fab_from_files(_app_files(app_dir))[0]


def public_key_line(public_key: ed25519.Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def create_publisher_key(out_dir: Path, key_id: str, *, force: bool = False) -> tuple[Path, Path]:
    """An Ed25519 key pair in OpenSSH format (what Flower's trusted entities take); private file 0600."""
    check_key_id(key_id)
    private_path, public_path = out_dir / PUBLISHER_KEY_FILE, out_dir / f"{PUBLISHER_KEY_FILE}.pub"
    if not force and (existing := [p for p in (private_path, public_path) if p.exists()]):
        raise KeyMaterialError(f"{', '.join(map(str, existing))} already exist(s); pass --force to replace")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()  # OS randomness (cryptography uses the OS CSPRNG)
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    for path, data, mode in ((private_path, private_bytes, PRIVATE_FILE_MODE),
                             (public_path, f"{public_key_line(key.public_key())} {key_id}\n".encode(), PUBLIC_FILE_MODE)):
        path.unlink(missing_ok=True)
        path.touch(mode=mode)
        path.chmod(mode)
        path.write_bytes(data)
    return private_path, public_path


def load_publisher_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise AppSignatureError(f"cannot read the publisher key {path}: {err}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise AppSignatureError(f"{path} is not an Ed25519 key (create one with `fedguard publisher key`)")
    return key


def trusted_entry(key_id: str, public_key: ed25519.Ed25519PublicKey) -> str:
    """One line of a trusted-publishers file (Flower's trusted-entities YAML)."""
    return f"{key_id}: {json.dumps(public_key_line(public_key))}"


def read_trusted_publishers(path: Path) -> dict[str, ed25519.Ed25519PublicKey]:
    """A site's trusted publishers: Flower's trusted-entities YAML, every entry an Ed25519 OpenSSH key."""
    data = read_yaml_file(path, AppSignatureError, "the trusted publishers file")
    if not isinstance(data, dict) or not data:
        raise AppSignatureError(f"{path} must map at least one key id to an 'ssh-ed25519 ...' public key")
    trusted = {}
    for key_id, line in data.items():
        check_key_id(str(key_id))
        try:
            key = serialization.load_ssh_public_key(str(line).encode("utf-8"))
        except (ValueError, TypeError, AttributeError) as err:
            raise AppSignatureError(f"{path}: the key of {key_id!r} is not an OpenSSH public key: {err}") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise AppSignatureError(f"{path}: the key of {key_id!r} is not Ed25519")
        trusted[str(key_id)] = key
    return trusted


def metadata_refusal(fab: bytes, fab_hash: str, fab_id: str, fab_version: str) -> str | None:
    """Why the run's FAB metadata does not name the bytes just verified, or None if it does.

    Flower loads an installed app by the run's ``fab_id``, ``fab_version`` and ``hash_str``, not by the
    FAB's content: a SuperLink could pair a validly signed FAB with the metadata of another app already
    installed on the site (one from a publisher the site has since revoked) and have that one run.
    """
    actual = hashlib.sha256(fab).hexdigest()
    if fab_hash != actual:
        return f"the run names FAB {fab_hash[:16]}... but carries FAB {actual[:16]}..."
    try:
        declared_id, declared_version = get_metadata_from_config(get_fab_config(fab))
    except (ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        return f"the app's pyproject.toml cannot be read: {err}"
    if (fab_id, fab_version) != (declared_id, declared_version):
        return f"the run names app {fab_id} {fab_version} but the signed FAB is {declared_id} {declared_version}"
    return None


def app_refusal(fab: bytes, signature_text: str | None, trusted: dict[str, ed25519.Ed25519PublicKey]) -> str | None:
    """Why a site must not run this app, or None if a trusted publisher signed exactly these bytes."""
    if not signature_text:
        return f"the app is unsigned (the run config carries no {RUN_CONFIG_APP_SIGNATURE})"
    try:
        signature = AppSignature.from_json(signature_text)
    except AppSignatureError as err:
        return f"the app's signature is malformed: {err}"
    key = trusted.get(signature.key_id)
    if key is None:
        return f"the app is signed by {signature.key_id!r}, which this site does not trust"
    actual = hashlib.sha256(fab).hexdigest()
    message = create_message_to_sign(bytes.fromhex(actual), signature.signed_at)
    if verify_signature(key, message, decode_base64url(signature.signature)):
        return None
    if actual != signature.fab_sha256:
        return (f"the app differs from the one {signature.key_id!r} signed (FAB sha256 {actual[:16]}..., "
                f"signed {signature.fab_sha256[:16]}...): modified after signing")
    return f"the signature does not verify under {signature.key_id!r}'s key"
