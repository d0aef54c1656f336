"""``fedguard roster``: a site's secure-aggregation identity, and the roster every site pins.

The out-of-band step of SecAgg+ against a malicious server (clients/secagg_identity.py):
each site prints its identity public key (``fedguard roster identity``) and hands it to
the operator with its SuperNode key; the operator builds the roster of all of them
(``fedguard roster make``) and gives the file to every site, like the CA certificate.
Each site admin checks the listed keys (their own included) before installing it at
``<state-dir>/secagg/roster.json``: the server only relays round keys, the roster is what
the sites check them against. ``fedguard roster fingerprint`` prints a short digest of the
installed roster that the sites compare among themselves, over a channel the operator does
not run: a fake entry the operator added would be a colluder every site trusts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedguard.clients.secagg_identity import SECAGG_DIR
from fedguard.privacy.secagg.identity import (
    IDENTITY_FILE,
    IDENTITY_KEY_BYTES,
    ROSTER_FILE,
    Roster,
    RosterError,
    load_or_create_identity,
    public_bytes,
    write_roster,
)

DEFAULT_STATE_DIR = "fedguard-site"


def _entry(text: str) -> tuple[str, bytes]:
    name, _, key = text.partition("=")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = b""
    if not name or len(raw) != IDENTITY_KEY_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=<{2 * IDENTITY_KEY_BYTES} hex digits>")
    return name, raw


def roster_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedguard roster", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    identity = commands.add_parser("identity", help="print this site's identity public key (created on first use)")
    identity.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR))
    identity.add_argument("--name", default="site", help="the site's name in the roster line printed")
    make = commands.add_parser("make", help="write a roster from NAME=HEXKEY entries")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("entries", nargs="+", type=_entry, metavar="NAME=HEXKEY")
    fingerprint = commands.add_parser("fingerprint", help="print the pinned roster's fingerprint, to compare among sites")
    where = fingerprint.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR))
    where.add_argument("--roster", type=Path, help="a roster file (default: <state-dir>/secagg/roster.json)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fingerprint":
            path = args.roster or args.state_dir / SECAGG_DIR / ROSTER_FILE
            print(f"{Roster.load(path).fingerprint()}  ({path})")
            return 0
        if args.command == "identity":
            key = load_or_create_identity(args.state_dir / SECAGG_DIR / IDENTITY_FILE)
            print(f"{args.name}={public_bytes(key).hex()}")
            return 0
        names = [name for name, _ in args.entries]
        if len(set(names)) != len(names):
            raise RosterError(f"a site name appears twice: {sorted(n for n in names if names.count(n) > 1)}")
        write_roster(args.out, Roster(dict(args.entries)))
    except RosterError as err:
        print(f"fedguard roster: {err}", file=sys.stderr)
        return 1
    print(f"roster of {len(args.entries)} site(s) written to {args.out}; install it at <state-dir>/{SECAGG_DIR}/roster.json")
    print(f"fingerprint {Roster(dict(args.entries)).fingerprint()}: every site compares it with the others "
          f"(fedguard roster fingerprint) before trusting the roster")
    return 0
