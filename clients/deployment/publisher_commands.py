"""``fedguard publisher key|sign``: the federation's app publisher signs the app every site runs.

The publisher is whoever the sites agree reviews fedguard's code before a release (not
necessarily the server operator): ``key`` once, then ``sign`` for each release of the source
tree. Sites put the publisher's public key line in their trusted-publishers file
(``fedguard client --trusted-publishers``); the submitter of a run passes the signature
(``fedguard run deployment.app_signature=...``). See clients/deployment/app_signing.py for why
fedguard carries the signature itself.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from fedguard.clients.deployment.app_signing import (
    APP_DIR,
    PUBLISHER_KEY_FILE,
    AppSignatureError,
    build_app_fab,
    create_publisher_key,
    load_publisher_key,
    sign_fab,
    trusted_entry,
)
from fedguard.clients.deployment.key_material import KeyMaterialError

DEFAULT_PUBLISHER_DIR = "fedguard-publisher"
DEFAULT_SIGNATURE_FILE = "fedguard-app.sig"


def _key_id_from_public_file(private_key: Path) -> str:
    """The key id `key` wrote as the comment of KEY.pub."""
    public = private_key.with_name(private_key.name + ".pub")
    try:
        fields = public.read_text(encoding="utf-8").split()
    except OSError:
        raise AppSignatureError(f"{public} not found; pass --id with the key id sites trust") from None
    if len(fields) < 3:
        raise AppSignatureError(f"{public} names no key id; pass --id")
    return fields[2]


def key_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard publisher key",
        description="Create the app publisher's Ed25519 signing key (OpenSSH format, private file 0600) and print the "
        "line every site adds to its trusted-publishers file.",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_PUBLISHER_DIR), help=f"directory (default {DEFAULT_PUBLISHER_DIR})")
    parser.add_argument("--id", required=True, help="the key id sites will know this publisher by, e.g. consortium-2026")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        private, public = create_publisher_key(args.out, args.id, force=args.force)
        entry = trusted_entry(args.id, load_publisher_key(private).public_key())
    except (AppSignatureError, KeyMaterialError) as err:
        print(f"fedguard publisher key: {err}", file=sys.stderr)
        return 1
    print(f"# private key {private} (keep offline; it decides what code every site runs)", file=sys.stderr)
    print(f"# public key  {public}; each site adds this line to its trusted-publishers file:", file=sys.stderr)
    print(entry)
    return 0


def sign_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard publisher sign",
        description="Build the app (FAB) from fedguard's source tree exactly as `flwr run` will, and sign it. "
        "Review the tree first: sites run whatever this signs.",
    )
    parser.add_argument("--key", type=Path, default=Path(DEFAULT_PUBLISHER_DIR) / PUBLISHER_KEY_FILE,
                        help="the publisher's private key")
    parser.add_argument("--id", help="the key id (default: the comment of KEY.pub)")
    parser.add_argument("--app", type=Path, default=APP_DIR, help=f"the app's source tree (default {APP_DIR})")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_SIGNATURE_FILE), help=f"signature file (default {DEFAULT_SIGNATURE_FILE})")
    args = parser.parse_args(argv)
    try:
        key_id = args.id or _key_id_from_public_file(args.key)
        key = load_publisher_key(args.key)
        fab = build_app_fab(args.app.resolve())
        signature = sign_fab(fab, key, key_id)
    except AppSignatureError as err:
        print(f"fedguard publisher sign: {err}", file=sys.stderr)
        return 1
    args.out.write_text(signature.to_json() + "\n", encoding="utf-8")
    print(f"signed app {args.app} (FAB sha256 {hashlib.sha256(fab).hexdigest()}) as {key_id!r}: {args.out}")
    return 0


def publisher_main(argv: list[str]) -> int:
    commands = {"key": key_main, "sign": sign_main}
    if not argv or argv[0] not in commands:
        print("usage: fedguard publisher {key,sign} [options]  (fedguard publisher key --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
