"""The federation's privacy ledger in the run directory: every site's signed spend, embedded in order.

Each train reply of a privately training site carries that site's whole chain for this
lineage (clients/site_state.py). Before anything from the round is aggregated (released),
the server checks the new entries (the site's signature, its party, the continuity of its
chain) and embeds each exactly once in its own chain, which it signs. ``fedguard audit``
re-verifies all of it.

Site keys are trusted on first use and written to ``<run dir>/keys/``; an auditor who wants
more than self-consistency collects the sites' ``ledger.key.pub`` files independently and
passes them with ``--keys``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedguard.clients.wire import protocol
from fedguard.privacy.ledger import (
    LEDGER_FILE,
    LedgerError,
    LedgerWriter,
    entry_from_wire,
    entry_hash,
    read_ledger,
    verify_entry,
)
from fedguard.privacy.ledger_events import CLIENT_ENTRY_KIND, ClientDpRelease, RunFinished, RunResumed, RunStarted, config_hash
from fedguard.privacy.signing import KeyFileError, KeyRegistry, key_id, load_or_create_signing_key, parse_public_key

logger = logging.getLogger(__name__)

SERVER_PARTY = "server"
KEYS_DIR = "keys"
# The server's signing key stays on the server: $FEDGUARD_HOME (set by `fedguard server` to its state dir).
FEDGUARD_HOME_ENV = "FEDGUARD_HOME"
DEFAULT_FEDGUARD_HOME = "~/.fedguard"
SERVER_KEY_FILE = "server-ledger.key"


def server_key_path() -> Path:
    return Path(os.environ.get(FEDGUARD_HOME_ENV, DEFAULT_FEDGUARD_HOME)).expanduser() / SERVER_KEY_FILE


class FederationLedger:
    """The server's side of the ledger for one run (and its resumptions)."""

    def __init__(
        self,
        run_dir: Path,
        lineage: str,
        config_yaml: str,
        *,
        resumed_after: int | None,
        federation_budget: float | None = None,
        federation_delta: float | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.keys_dir = run_dir / KEYS_DIR
        key = load_or_create_signing_key(server_key_path())
        self.registry = KeyRegistry.load(self.keys_dir) if any(self.keys_dir.glob("*.pub")) else KeyRegistry()
        self.registry.add(SERVER_PARTY, key.public_key(), str(server_key_path()))
        self.writer = LedgerWriter(run_dir / LEDGER_FILE, key, SERVER_PARTY, ledger_id=lineage)
        self.lineage = lineage
        self.last_seq = self._embedded_seqs()
        self._save_keys()
        if resumed_after is None:
            self.writer.append(
                RunStarted(lineage, config_hash(config_yaml), federation_budget, federation_delta)
            )
        else:
            self.writer.append(RunResumed(run_id=lineage, from_round=resumed_after, reason="server restarted"))

    def _embedded_seqs(self) -> dict[str, tuple[int, str]]:
        """party -> (seq, hash) of the last site entry already in this ledger (after a resume)."""
        last: dict[str, tuple[int, str]] = {}
        for entry in read_ledger(self.writer.path):
            if entry["kind"] == CLIENT_ENTRY_KIND:
                embedded = entry["body"]["entry"]
                last[embedded["party"]] = (embedded["seq"], entry_hash(embedded))
        return last

    def _save_keys(self) -> None:
        self.registry.save_dir(self.keys_dir)

    def record_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Embed the new entries of each reply; returns the replies whose ledger was unacceptable."""
        bad: list[Message] = []
        for reply in replies:
            if protocol.LEDGER_KEY not in reply.content:
                continue
            try:
                self._embed(reply)
            except (LedgerError, KeyFileError, KeyError, TypeError, ValueError) as err:
                logger.warning(
                    "round %d: rejected the reply of client node %d: its privacy ledger is not acceptable: %s",
                    server_round, reply.metadata.src_node_id, err,
                )
                bad.append(reply)
        return bad

    def _embed(self, reply: Message) -> None:
        record = reply.content[protocol.LEDGER_KEY]
        wire = record[protocol.LEDGER_ENTRIES_FIELD]
        entries = [entry_from_wire(text, source=f"node {reply.metadata.src_node_id}") for text in wire]
        if not entries:
            return
        report = reply.content.config_records.get(protocol.PRIVACY_KEY)
        party = entries[0]["party"]
        if report is not None and party != f"client:{report[protocol.PARTITION_ID_KEY]}":
            raise LedgerError(f"entries are for {party!r} but the privacy report is partition {report[protocol.PARTITION_ID_KEY]}")
        if any(entry["party"] != party for entry in entries):
            raise LedgerError("entries of several parties in one reply")
        self._check_signatures(entries, str(record[protocol.LEDGER_PUBLIC_KEY_FIELD]))
        known_seq, known_hash = self.last_seq.get(party, (-1, ""))
        new = [entry for entry in entries if entry["seq"] > known_seq]
        if known_seq >= 0 and (len(entries) <= known_seq or entry_hash(entries[known_seq]) != known_hash):
            raise LedgerError(f"{party}'s chain differs from the one already recorded (at seq {known_seq})")
        for entry in new:
            self.writer.append_client_entry(entry, self.registry)
            self.last_seq[party] = (entry["seq"], entry_hash(entry))

    def _check_signatures(self, entries: list[dict[str, Any]], public_key_text: str) -> None:
        """Trust a site's key on first use; afterwards only that key may sign for the party."""
        party, kid = entries[0]["party"], entries[0]["key_id"]
        known = self.registry.get(kid)
        if known is None:
            if party in self.registry.parties().values():
                raise LedgerError(f"{party} signs with key {kid}, not the key it used before")
            public_key = parse_public_key(public_key_text, f"{party}'s reply")
            if key_id(public_key) != kid:
                raise LedgerError(f"{party}'s public key does not match the key id {kid} of its entries")
            self.registry.add(party, public_key, "trusted on first use")
            self._save_keys()
            logger.info("recorded %s's ledger key %s (trusted on first use)", party, kid)
            known = self.registry.get(kid)
        if known.party != party:
            raise LedgerError(f"key {kid} belongs to {known.party}, not {party}")
        for entry in entries:
            if not verify_entry(entry, known.public_key):
                raise LedgerError(f"{party}'s entry seq {entry['seq']} has a signature that does not verify")

    def record_release(self, event: ClientDpRelease) -> None:
        """A round's client-level DP release; called before the aggregate leaves the strategy."""
        self.writer.append(event)

    def client_dp_releases_after(self, completed_round: int) -> list[dict[str, Any]]:
        """Bodies of client-level releases recorded after the checkpointed round (a crash
        between the ledger and the checkpoint): a resumed run must count them too."""
        return [
            entry["body"]
            for entry in read_ledger(self.writer.path)
            if entry["kind"] == ClientDpRelease.kind and int(entry["body"]["round"]) > completed_round
        ]

    def finish(self, rounds: int, stop_reason: str) -> None:
        self.writer.append(RunFinished(run_id=self.lineage, rounds=rounds, stop_reason=stop_reason))
        self.writer.close()

    def close(self) -> None:
        self.writer.close()
