"""A site's record of the secure-aggregation sessions it entered, kept on its own disk.

Why on disk: a second session on a round this site already entered (or a reused session
id) lets the server difference two sums that differ in this site's input. A record in
``Context.state`` lives for one Flower run, so a new ``flwr run`` of the same federation
lineage, or a restarted SuperNode, would forget it. The record sits in the site's state
dir beside its privacy state (``<state-dir>/secagg/sessions.json``), is written atomically
(temporary file, fsync, rename) under a file lock, and a file that does not parse is a
refusal naming it, never a fresh start: a silently reset record is the attack.

It also counts, per Flower run, the sessions this site entered (counted from its advert,
saved with the session id) and never got as far as sending its masked input in. Revealing comes before any masked input
exists, so a server can look at the neighbour graph the nonces give and abort for free,
hoping for a better graph next round; the count caps how many graphs it sees per run
(``secagg-max-unfinished-reveals``).

A site without a state dir keeps the same record in ``Context.state`` (one run only); such
a site has no roster and shares its secrets with no one, so nothing rests on that copy.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedguard.clients.secagg_identity import SECAGG_DIR
from fedguard.clients.site import STATE_DIR_KEY
from fedguard.privacy.secagg.errors import SecAggError

logger = logging.getLogger(__name__)

RECORD_FILE = "sessions.json"
LOCK_FILE = "sessions.lock"
RECORD_FORMAT = "fedguard-secagg-sessions/1"
STATE_KEY = "fedguard.secagg-record"
JSON_FIELD = "json"
MAX_REMEMBERED_SESSIONS = 100_000


class SessionRecordError(SecAggError):
    """The site's session record is unreadable; the site takes part in no session until it is fixed."""


@dataclass
class SessionRecord:
    """Session ids used (hex, every run), rounds entered per lineage, and per Flower run the
    sessions whose graph nonce was revealed but whose masked input was never sent."""

    sessions: list[str] = field(default_factory=list)
    rounds: dict[str, list[int]] = field(default_factory=dict)
    unfinished_reveals: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format": RECORD_FORMAT, "sessions": self.sessions, "rounds": self.rounds,
                           "unfinished_reveals": self.unfinished_reveals}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> SessionRecord:
        try:
            data = json.loads(text)
            if data.get("format") != RECORD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {RECORD_FORMAT!r}")
            sessions = [str(s) for s in data["sessions"]]
            for session in sessions:
                bytes.fromhex(session)
            rounds = {str(k): [int(r) for r in v] for k, v in data["rounds"].items()}
            reveals = {str(k): [str(s) for s in v] for k, v in data["unfinished_reveals"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise SessionRecordError(
                f"the secure-aggregation session record {where} is unreadable ({err}); this site refuses every "
                "session until an operator restores it (starting afresh would let a server reuse sessions and rounds)"
            ) from None
        return cls(sessions, rounds, reveals)

    def check_fresh(self, node_id: int, lineage: str, server_round: int, session_id: bytes) -> None:
        """Refuse an empty or used session id, or a second session on a round of this lineage."""
        if not session_id:
            raise SecAggError(f"client {node_id}: the train request carries no secure-aggregation session id")
        if session_id.hex() in self.sessions:
            raise SecAggError(f"client {node_id}: secure-aggregation session {session_id.hex()} was already used; "
                              "a reused session id is refused")
        if server_round in self.rounds.get(lineage, []):
            raise SecAggError(f"client {node_id}: round {server_round} already entered a secure-aggregation session "
                              f"on this site (lineage {lineage}); a second session on it would let the server "
                              "difference two sums")

    def remember(self, lineage: str, server_round: int, session_id: bytes) -> None:
        self.sessions = [*self.sessions, session_id.hex()][-MAX_REMEMBERED_SESSIONS:]
        self.rounds[lineage] = [*self.rounds.get(lineage, []), server_round][-MAX_REMEMBERED_SESSIONS:]

    def note_entered(self, run_id: int, session_id: bytes) -> None:
        """Count ``session_id`` as unfinished from the moment this site enters it (saved with the
        session id, so the cohort stage needs no write of its own) until its masked input exists."""
        kept = [s for s in self.unfinished_reveals.get(str(run_id), []) if s != session_id.hex()]
        self.unfinished_reveals[str(run_id)] = [*kept, session_id.hex()]

    def check_reveal(self, node_id: int, run_id: int, session_id: bytes, limit: int) -> None:
        """Refuse to reveal a graph nonce once ``limit`` other sessions of this run were abandoned
        before this site's masked input (a server grinding graphs by aborting after each reveal)."""
        unfinished = [s for s in self.unfinished_reveals.get(str(run_id), []) if s != session_id.hex()]
        if len(unfinished) >= limit:
            raise SecAggError(
                f"client {node_id}: {len(unfinished)} session(s) of run {run_id} were abandoned before this site's "
                f"masked input (limit secagg-max-unfinished-reveals={limit}); it reveals no more graph nonces in "
                "this run, since each abort after a reveal shows the server another neighbour graph to choose from"
            )

    def note_masked(self, run_id: int, session_id: bytes) -> None:
        """The session got as far as this site's masked input: it no longer counts as abandoned."""
        kept = [s for s in self.unfinished_reveals.get(str(run_id), []) if s != session_id.hex()]
        if kept:
            self.unfinished_reveals[str(run_id)] = kept
        else:  # a run with nothing abandoned needs no entry: the record stays small over many runs
            self.unfinished_reveals.pop(str(run_id), None)


def _record_dir(context: Context) -> Path | None:
    value = context.node_config.get(STATE_DIR_KEY)
    return Path(str(value)) / SECAGG_DIR if value else None


def _write_atomically(path: Path, text: str, durable: bool) -> None:
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if not durable:
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def session_record(context: Context, durable: bool = True) -> Iterator[SessionRecord]:
    """The site's record, locked for the duration; saved back (atomically) if the block changed it.

    A block that raises saves nothing: a refusal leaves the record as it was. ``durable=False``
    skips the fsyncs, for a change whose loss in a crash errs on the safe side (a session still
    counted as abandoned): on a simulation's shared disk each fsync pair costs milliseconds.
    """
    directory = _record_dir(context)
    if directory is None:
        stored = context.state.get(STATE_KEY)
        record = SessionRecord() if stored is None else SessionRecord.from_json(str(stored[JSON_FIELD]), "in Context.state")
        yield record
        context.state[STATE_KEY] = ConfigRecord({JSON_FIELD: record.to_json()})
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECORD_FILE
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = path.read_bytes().decode("utf-8", errors="replace") if path.exists() else None
            record = SessionRecord() if text is None else SessionRecord.from_json(text, str(path))
            before = record.to_json()
            yield record
            if record.to_json() != before:
                _write_atomically(path, record.to_json(), durable)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
