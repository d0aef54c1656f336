"""The tamper-evident privacy ledger: append-only, hash-chained, Ed25519-signed JSON Lines.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one entry::

    {"body": {...}, "key_id": "...", "kind": "...", "ledger": "...", "party": "...",
     "prev": "<sha256 of the previous line>", "seq": 0, "signature": "<base64>", "time": "..."}

``prev`` of entry 0 is ``genesis_hash(ledger_id)``. The signature covers the canonical
JSON of every field but ``signature``. Because lines are canonical, an entry parsed into
a dict hashes and verifies exactly like its line, so a client's signed entry can be
embedded in the server's chain (kind ``client_entry``) and re-checked there verbatim.

Privacy must be recorded before it is released (DESIGN.md, round step 7): ``append``
returns only after the line is flushed and fsync'ed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedguard.privacy.ledger_events import (  # noqa: F401  (re-exported: one import for callers)
    CLIENT_ENTRY_KIND,
    KNOWN_KINDS,
    BudgetRefusal,
    ClientDpRelease,
    LedgerEvent,
    RunFinished,
    RunResumed,
    RunStarted,
    SampleDpTraining,
    config_hash,
)
from fedguard.privacy.signing import KeyRegistry, key_id, sign_bytes, verify_bytes

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "fedguard-ledger-v1"
GENESIS_PREFIX = LEDGER_FORMAT + ":"
LEDGER_FILE = "ledger.jsonl"
SIGNATURE_FIELD = "signature"
ENTRY_FIELDS = frozenset({"seq", "prev", "time", "ledger", "kind", "party", "key_id", "body", SIGNATURE_FIELD})
LINE_END = b"\n"


class LedgerError(ValueError):
    """The ledger cannot be read, resumed or appended to as it is."""


class LedgerFormatError(LedgerError):
    """A line is not a well-formed entry; ``line_number`` is 1-based."""

    def __init__(self, path: Path | str, line_number: int, reason: str) -> None:
        super().__init__(f"{path}: line {line_number}: {reason}")
        self.path = str(path)
        self.line_number = line_number
        self.reason = reason


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and signed; floats use repr, so they round-trip."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def genesis_hash(ledger_id: str) -> str:
    return hashlib.sha256((GENESIS_PREFIX + ledger_id).encode("utf-8")).hexdigest()


def entry_line(entry: dict[str, Any]) -> bytes:
    """The exact bytes of an entry's line, without the newline."""
    return canonical_json(entry).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """What the next entry's ``prev`` must be."""
    return hashlib.sha256(entry_line(entry)).hexdigest()


def signing_payload(entry: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in entry.items() if k != SIGNATURE_FIELD}).encode("ascii")


def sign_entry(unsigned: dict[str, Any], signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return ``unsigned`` with ``key_id`` set and a ``signature`` over everything else."""
    entry = {k: v for k, v in unsigned.items() if k != SIGNATURE_FIELD}
    entry["key_id"] = key_id(signing_key.public_key())
    entry[SIGNATURE_FIELD] = sign_bytes(signing_key, signing_payload(entry))
    return entry


def verify_entry(entry: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when ``entry`` was signed by ``public_key`` and ``key_id`` names that key."""
    if entry.get("key_id") != key_id(public_key) or not isinstance(entry.get(SIGNATURE_FIELD), str):
        return False
    return verify_bytes(public_key, signing_payload(entry), entry[SIGNATURE_FIELD])


def check_entry_shape(entry: Any) -> str | None:
    """Why ``entry`` is not a structurally valid entry, or None."""
    if not isinstance(entry, dict):
        return "entry is not a JSON object"
    missing, extra = ENTRY_FIELDS - entry.keys(), entry.keys() - ENTRY_FIELDS
    if missing or extra:
        return f"fields missing {sorted(missing)} / unexpected {sorted(extra)}"
    if not isinstance(entry["seq"], int) or isinstance(entry["seq"], bool) or entry["seq"] < 0:
        return f"seq {entry['seq']!r} is not a non-negative integer"
    if not isinstance(entry["body"], dict):
        return "body is not a JSON object"
    for name in ("prev", "time", "ledger", "kind", "party", "key_id", SIGNATURE_FIELD):
        if not isinstance(entry[name], str):
            return f"{name} is not a string"
    if entry["kind"] not in KNOWN_KINDS:
        return f"unknown entry kind {entry['kind']!r}"
    return None


def parse_line(raw: bytes, path: Path | str, line_number: int) -> dict[str, Any]:
    """One line (without newline) to an entry; errors name the line."""
    try:
        entry = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise LedgerFormatError(path, line_number, f"not valid JSON ({err})") from err
    problem = check_entry_shape(entry)
    if problem:
        raise LedgerFormatError(path, line_number, problem)
    try:
        canonical = entry_line(entry)
    except ValueError as err:  # NaN or infinity smuggled in
        raise LedgerFormatError(path, line_number, f"not serialisable canonically ({err})") from err
    if canonical != raw:
        raise LedgerFormatError(path, line_number, "line is not in canonical form (edited by hand or tampered)")
    return entry


def entry_to_wire(entry: dict[str, Any]) -> str:
    """A signed entry as one string, e.g. for a Flower ``ConfigRecord`` (which holds no nested dicts)."""
    return entry_line(entry).decode("ascii")


def entry_from_wire(text: str, source: str = "reply") -> dict[str, Any]:
    """Inverse of ``entry_to_wire``, with the same checks as a ledger line."""
    return parse_line(text.encode("ascii", errors="replace"), source, 1)


def iter_raw_lines(path: Path | str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without newline); an unterminated last line is an error.

    Every append ends with a newline, so a last line without one is a write cut short
    (a crash mid-append). It is reported, never dropped or repaired silently.
    """
    with open(path, "rb") as handle:
        line_number = 0
        for line_number, raw in enumerate(handle, start=1):
            if not raw.endswith(LINE_END):
                raise LedgerFormatError(
                    path,
                    line_number,
                    "last line is incomplete (no newline): a write was cut short, e.g. by a crash. "
                    "Inspect it; nothing was appended after it. Move the file aside to start a new chain.",
                )
            yield line_number, raw[: -len(LINE_END)]


def read_ledger(path: Path | str) -> list[dict[str, Any]]:
    """All entries, structurally checked (not the chain or signatures: see ``privacy.audit``)."""
    return [parse_line(raw, path, number) for number, raw in iter_raw_lines(path)]


def check_chain(entries: list[dict[str, Any]], path: Path | str) -> None:
    """Raise on the first broken link (seq gap, wrong ``prev``, foreign ledger id)."""
    if not entries:
        return
    ledger_id = entries[0]["ledger"]
    expected_prev = genesis_hash(ledger_id)
    for index, entry in enumerate(entries):
        line = index + 1
        if entry["ledger"] != ledger_id:
            raise LedgerFormatError(path, line, f"ledger id {entry['ledger']!r} differs from {ledger_id!r}")
        if entry["seq"] != index:
            raise LedgerFormatError(path, line, f"seq {entry['seq']} where {index} was expected")
        if entry["prev"] != expected_prev:
            raise LedgerFormatError(path, line, "prev does not match the hash of the previous entry")
        expected_prev = entry_hash(entry)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class LedgerWriter:
    """Appends signed entries to one ledger file, resuming an existing chain.

    One writer per file: opening takes an exclusive advisory lock (``flock``) so a second
    process fails fast instead of forking the chain. Not thread-safe: call it from one
    thread at a time (the ClientApp/ServerApp round loop), or guard it with a lock.
    """

    def __init__(
        self, path: Path | str, signing_key: Ed25519PrivateKey, party: str, *, ledger_id: str | None = None
    ) -> None:
        self.path = Path(path)
        self.party = party
        self._key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._handle = open(self.path, "ab")
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self._handle.close()
            raise LedgerError(f"{self.path} is open in another LedgerWriter (locked)") from err
        try:
            self._resume(ledger_id)
        except Exception:
            self._handle.close()
            raise
        if created:
            _fsync_dir(self.path.parent)

    def _resume(self, ledger_id: str | None) -> None:
        entries = read_ledger(self.path)
        check_chain(entries, self.path)
        if not entries:
            self.ledger_id = ledger_id or uuid.uuid4().hex
            self.next_seq, self.last_hash = 0, genesis_hash(self.ledger_id)
            return
        last = entries[-1]
        if ledger_id is not None and ledger_id != last["ledger"]:
            raise LedgerError(f"{self.path} holds ledger {last['ledger']!r}, not {ledger_id!r}")
        if last["key_id"] == self.key_id and not verify_entry(last, self._key.public_key()):
            raise LedgerFormatError(self.path, len(entries), "signature of the last entry does not verify")
        if last["key_id"] != self.key_id:
            logger.warning("last entry of %s was signed by key %s, not ours (%s)", self.path, last["key_id"], self.key_id)
        self.ledger_id = last["ledger"]
        self.next_seq, self.last_hash = len(entries), entry_hash(last)
        logger.info("resuming ledger %s at seq %d", self.path, self.next_seq)

    def append(self, event: LedgerEvent) -> dict[str, Any]:
        """Sign and durably append ``event``; returns the entry (e.g. to send to the server)."""
        return self.append_body(event.kind, event.body())

    def append_body(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind not in KNOWN_KINDS:
            raise LedgerError(f"unknown entry kind {kind!r}")
        unsigned = {
            "seq": self.next_seq,
            "prev": self.last_hash,
            "time": utc_now(),
            "ledger": self.ledger_id,
            "kind": kind,
            "party": self.party,
            "body": body,
        }
        entry = sign_entry(unsigned, self._key)
        line = entry_line(entry)
        if self._handle.closed:
            raise LedgerError(f"ledger writer for {self.path} is closed")
        self._handle.write(line + LINE_END)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.next_seq += 1
        self.last_hash = hashlib.sha256(line).hexdigest()
        return entry

    def append_client_entry(self, client_entry: dict[str, Any], registry: KeyRegistry | None = None) -> dict[str, Any]:
        """Countersign a client's own signed entry by embedding it verbatim in this chain.

        With a ``registry`` the client's signature and party binding are checked first, so
        the server never countersigns an entry it could have rejected.
        """
        problem = check_entry_shape(client_entry)
        if not problem and client_entry["kind"] == CLIENT_ENTRY_KIND:
            problem = "a client_entry cannot be nested"
        if problem:
            raise LedgerError(f"client entry rejected: {problem}")
        if registry is not None:
            known = registry.get(client_entry["key_id"])
            if known is None:
                raise LedgerError(f"client entry signed by unregistered key {client_entry['key_id']}")
            if known.party != client_entry["party"] or not verify_entry(client_entry, known.public_key):
                raise LedgerError(f"client entry from {client_entry['party']!r} fails signature or party check")
        return self.append_body(CLIENT_ENTRY_KIND, {"entry": client_entry})

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(directory: Path) -> None:
    """Make a newly created ledger file's directory entry durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
