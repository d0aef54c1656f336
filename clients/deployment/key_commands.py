"""``fedguard certs`` and ``fedguard keys``: the key material a federation across sites needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedguard.clients.deployment.key_material import (
    DEFAULT_VALID_DAYS,
    NODE_PRIVATE_KEY_FILE,
    KeyMaterialError,
    create_certificates,
    create_node_keys,
)

DEFAULT_CERTS_DIR = "fedguard-server/certs"
DEFAULT_KEYS_DIR = "fedguard-site/keys"


def certs_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard certs",
        description="Create the federation's CA and the server's TLS certificate (files 0600/0644). "
        "Copy ca.crt to every client site; keep ca.key and server.key on the server.",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_CERTS_DIR), help=f"directory (default {DEFAULT_CERTS_DIR})")
    parser.add_argument(
        "--host", action="append", required=True,
        help="a DNS name or IP address clients use to reach the server (repeat for several)",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_VALID_DAYS, help="server certificate validity")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        paths = create_certificates(args.out, args.host, valid_days=args.days, force=args.force)
    except KeyMaterialError as err:
        print(f"fedguard certs: {err}", file=sys.stderr)
        return 1
    print(f"CA certificate    {paths.ca_cert}   (give to every client site)")
    print(f"CA key            {paths.ca_key}   (keep offline; signs server certificates)")
    print(f"server cert+chain {paths.server_cert}")
    print(f"server key        {paths.server_key}")
    print(f"valid for: {', '.join(args.host)}")
    return 0


def keys_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard keys",
        description="Create a client site's SuperNode authentication key pair (P-384, OpenSSH format). "
        "The server registers the .pub file with `fedguard register`; the private key stays on the site.",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_KEYS_DIR), help=f"directory (default {DEFAULT_KEYS_DIR})")
    parser.add_argument("--name", default=NODE_PRIVATE_KEY_FILE, help="file name of the private key")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        paths = create_node_keys(args.out, args.name, force=args.force)
    except KeyMaterialError as err:
        print(f"fedguard keys: {err}", file=sys.stderr)
        return 1
    print(f"private key {paths.private_key}   (stays on this site, mode 0600)")
    print(f"public key  {paths.public_key}   (send to the server operator to register)")
    return 0
