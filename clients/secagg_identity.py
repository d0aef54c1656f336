"""Where a site keeps its secure-aggregation identity key and roster, and how peers are verified.

Files, in the site's state dir (``state-dir`` in the node config):

- ``secagg/identity.key``: the site's long-term Ed25519 key (hex, owner-only), created on
  first use. Its public half is what the operator collects from each site.
- ``secagg/roster.json``: the identity public keys of every site of the federation
  (``privacy/secagg/identity.py``), distributed by the operator out of band like the CA
  certificate; ``secagg-roster`` in the node config points elsewhere. Never taken from
  the server: the roster is what the server's relayed keys are checked against.

A simulation writes both per run (``provision_rosters``), as the stand-in for that
out-of-band step. A site without a state dir advertises unsigned keys, and refuses to
share its secrets (it has no roster to check its peers against).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedguard.clients.site import SECAGG_ROSTER_KEY, STATE_DIR_KEY
from fedguard.privacy.secagg.identity import (
    IDENTITY_FILE,
    ROSTER_FILE,
    Roster,
    RosterError,
    load_or_create_identity,
    public_bytes,
    write_roster,
)

SECAGG_DIR = "secagg"

logger = logging.getLogger(__name__)


def _state_dir(node_config: Mapping[str, Any]) -> Path | None:
    value = node_config.get(STATE_DIR_KEY)
    return Path(str(value)) if value else None


def site_identity(node_config: Mapping[str, Any]) -> Ed25519PrivateKey | None:
    """The site's identity key, or None for a site without a state dir."""
    state_dir = _state_dir(node_config)
    return None if state_dir is None else load_or_create_identity(state_dir / SECAGG_DIR / IDENTITY_FILE)


def site_roster(node_config: Mapping[str, Any]) -> Roster:
    """The roster this site pinned; RosterError when it has none."""
    if node_config.get(SECAGG_ROSTER_KEY):
        return Roster.load(Path(str(node_config[SECAGG_ROSTER_KEY])))
    state_dir = _state_dir(node_config)
    if state_dir is None:
        raise RosterError(
            "this site has no state dir, so no secure-aggregation roster to check its peers' keys against; "
            f"set '{STATE_DIR_KEY}' (with secagg/{ROSTER_FILE} in it) or '{SECAGG_ROSTER_KEY}'"
        )
    return Roster.load(state_dir / SECAGG_DIR / ROSTER_FILE)


def provision_rosters(state_dirs: Mapping[str, Path], shared_roster: Path | None = None) -> Roster:
    """Give every site (name -> state dir) its identity key and the roster of all of them.

    Stands in for the out-of-band distribution of a real federation: a simulation harness
    or a test federation on loopback, which holds every site's state dir, calls it. With
    ``shared_roster`` the roster is written once there (sites then need ``secagg-roster``
    pointing at it), else into each site's state dir.
    """
    roster = Roster({name: public_bytes(load_or_create_identity(Path(d) / SECAGG_DIR / IDENTITY_FILE))
                     for name, d in state_dirs.items()})
    targets = [shared_roster] if shared_roster is not None else [Path(d) / SECAGG_DIR / ROSTER_FILE
                                                                for d in state_dirs.values()]
    for path in targets:
        write_roster(path, roster)
    logger.info("wrote the secure-aggregation roster of %d site(s)", len(state_dirs))
    return roster


def verified_peers(
    roster: Roster,
    own_identity: bytes,
    server_round: int,
    session_id: bytes,
    adverts: Mapping[int, tuple[bytes, bytes, bytes, bytes, bytes, bytes]],
) -> dict[int, tuple[bytes, bytes]]:
    """The peers whose round keys (envelope, mask) a roster site signed for this round and session.

    ``adverts``: node -> (envelope key, mask key, identity key, signature, seed commitment, graph-nonce
    commitment), as the server
    relayed them. A peer with a bad or missing signature, a key off the roster, this site's
    own identity, or an identity another relayed peer also claims is left out (the server
    could otherwise stand in for a site, or show one site twice): this site then neither
    shares with it nor masks with it.
    """
    claims: dict[bytes, list[int]] = {}
    for node, (_e, _m, identity, _s, _c, _n) in adverts.items():
        claims.setdefault(identity, []).append(node)
    verified: dict[int, tuple[bytes, bytes]] = {}
    for node, (envelope, mask, identity, signature, commitment, nonce_commitment) in sorted(adverts.items()):
        try:
            if identity == own_identity:
                raise RosterError(f"node {node}: relayed with this site's own identity key")
            if len(claims[identity]) > 1:
                raise RosterError(f"node {node}: its identity key is also claimed by nodes {claims[identity]}")
            roster.verify_advert(identity, signature, server_round, session_id, node, envelope, mask, commitment,
                                 nonce_commitment)
        except (RosterError, ValueError) as err:
            logger.warning("secure aggregation: leaving peer %d out: %s", node, err)
            continue
        verified[node] = (envelope, mask)
    return verified
