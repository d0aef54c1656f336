"""Integrity of a ledger: every line parses, the hash chain holds, every signature verifies.

The check stops at the *first* broken entry and says which and why: a reviewer needs
one precise place to look, and nothing after a break can be trusted anyway. Events are
returned only for the verified prefix, attributed to the party that signed them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedguard.privacy.ledger import (
    CLIENT_ENTRY_KIND,
    LedgerFormatError,
    check_entry_shape,
    entry_hash,
    genesis_hash,
    iter_raw_lines,
    parse_line,
    verify_entry,
)
from fedguard.privacy.ledger_events import (
    EVENT_TYPES,
    BudgetRefusal,
    ClientDpRelease,
    EventError,
    PreprocessingRelease,
    SampleDpTraining,
)
from fedguard.privacy.signing import SERVER_PARTY, KeyRegistry, client_party

logger = logging.getLogger(__name__)

# Problem codes (stable: they appear in --json output).
UNPARSABLE = "unparsable"
MISSING_ENTRY = "missing_entry"
REORDERED = "reordered"
HASH_MISMATCH = "hash_mismatch"
FOREIGN_LEDGER = "foreign_ledger"
UNKNOWN_KEY = "unknown_key"
PARTY_MISMATCH = "party_mismatch"
BAD_SIGNATURE = "bad_signature"
NOT_SIGNED_BY_SPENDER = "not_signed_by_spender"
MALFORMED_EVENT = "malformed_event"
CLIENT_CHAIN_BROKEN = "client_chain_broken"
NO_REGISTRY = "no_key_registry"
EMPTY_LEDGER = "empty_ledger"

# Who must have signed each kind: privacy is attested by the party that spent it.
CLIENT_SPENT_KINDS = (SampleDpTraining.kind, BudgetRefusal.kind, PreprocessingRelease.kind)
SERVER_SPENT_KINDS = (ClientDpRelease.kind,)


@dataclass(frozen=True)
class IntegrityProblem:
    code: str
    line: int  # 1-based line in the ledger file (0: the file as a whole)
    seq: int | None
    reason: str

    def describe(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.code}: {self.reason}"


@dataclass(frozen=True)
class AttributedEvent:
    """A verified event, with the ledger line that carries it and the party that signed it."""

    kind: str
    body: dict[str, Any]
    party: str
    line: int
    seq: int
    time: str
    embedded: bool  # True when a client's entry was countersigned inside the server's chain


@dataclass
class VerificationResult:
    path: str
    ledger_id: str | None = None
    entries_total: int = 0
    entries_verified: int = 0
    embedded_entries: int = 0
    problem: IntegrityProblem | None = None
    events: list[AttributedEvent] = field(default_factory=list)
    signers: dict[str, int] = field(default_factory=dict)  # party -> signatures checked

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Broken(Exception):
    def __init__(self, problem: IntegrityProblem) -> None:
        super().__init__(problem.describe())
        self.problem = problem


@dataclass
class _ClientChain:
    next_seq: int
    last_hash: str


class _Verifier:
    def __init__(self, registry: KeyRegistry, result: VerificationResult) -> None:
        self.registry = registry
        self.result = result
        self.client_chains: dict[str, _ClientChain] = {}

    def signature(self, entry: dict[str, Any], line: int, seq: int, label: str) -> None:
        known = self.registry.get(entry["key_id"])
        if known is None:
            raise _Broken(IntegrityProblem(UNKNOWN_KEY, line, seq, f"{label} signed by unregistered key {entry['key_id']}"))
        if known.party != entry["party"]:
            raise _Broken(
                IntegrityProblem(
                    PARTY_MISMATCH, line, seq, f"{label} claims party {entry['party']!r} but key is {known.party!r}'s"
                )
            )
        if not verify_entry(entry, known.public_key):
            raise _Broken(IntegrityProblem(BAD_SIGNATURE, line, seq, f"{label} signature does not verify"))
        self.result.signers[known.party] = self.result.signers.get(known.party, 0) + 1

    def event(self, entry: dict[str, Any], line: int, seq: int, embedded: bool) -> AttributedEvent:
        kind, body, party = entry["kind"], entry["body"], entry["party"]
        try:
            EVENT_TYPES[kind](**body)
        except (EventError, TypeError, ValueError) as err:
            raise _Broken(IntegrityProblem(MALFORMED_EVENT, line, seq, f"{kind} body invalid: {err}")) from err
        if kind in CLIENT_SPENT_KINDS and party != client_party(body["client"]):
            raise _Broken(
                IntegrityProblem(
                    NOT_SIGNED_BY_SPENDER, line, seq, f"{kind} for client {body['client']} is signed by {party!r}"
                )
            )
        if kind in SERVER_SPENT_KINDS and party != SERVER_PARTY:
            raise _Broken(IntegrityProblem(NOT_SIGNED_BY_SPENDER, line, seq, f"{kind} is signed by {party!r}"))
        return AttributedEvent(kind, body, party, line, seq, entry["time"], embedded)

    def embedded(self, outer: dict[str, Any], line: int, seq: int) -> AttributedEvent:
        inner = outer["body"].get("entry")
        label = "embedded client entry"
        problem = check_entry_shape(inner)
        if problem or inner["kind"] == CLIENT_ENTRY_KIND:
            reason = problem or "nested client_entry"
            raise _Broken(IntegrityProblem(MALFORMED_EVENT, line, seq, f"{label}: {reason}"))
        self.signature(inner, line, seq, f"{label} (client seq {inner['seq']})")
        chain = self.client_chains.get(inner["ledger"]) or _ClientChain(0, genesis_hash(inner["ledger"]))
        if inner["seq"] != chain.next_seq:
            what = "replayed or reordered" if inner["seq"] < chain.next_seq else "missing from this ledger"
            raise _Broken(
                IntegrityProblem(
                    CLIENT_CHAIN_BROKEN,
                    line,
                    seq,
                    f"{inner['party']}'s entry seq {inner['seq']} where {chain.next_seq} was expected "
                    f"(client entries {what})",
                )
            )
        if inner["prev"] != chain.last_hash:
            raise _Broken(
                IntegrityProblem(CLIENT_CHAIN_BROKEN, line, seq, f"{inner['party']}'s entry does not chain to its previous")
            )
        self.client_chains[inner["ledger"]] = _ClientChain(inner["seq"] + 1, entry_hash(inner))
        self.result.embedded_entries += 1
        return self.event(inner, line, seq, embedded=True)


def _seq_problem(seq: int, expected: int, later_seqs: set[int], line: int) -> IntegrityProblem:
    if expected in later_seqs:
        return IntegrityProblem(REORDERED, line, seq, f"seq {seq} where {expected} was expected; seq {expected} comes later")
    if seq > expected:
        return IntegrityProblem(MISSING_ENTRY, line, seq, f"seq {seq} follows seq {expected - 1}: entries missing")
    return IntegrityProblem(REORDERED, line, seq, f"seq {seq} repeats or goes back (expected {expected})")


def verify_ledger(path: Path | str, registry: KeyRegistry | None) -> VerificationResult:
    """Check ``path`` line by line; the result holds the first problem and the verified events."""
    result = VerificationResult(path=str(path))
    entries: list[tuple[int, dict[str, Any]]] = []
    parse_problem: IntegrityProblem | None = None
    try:
        for number, raw in iter_raw_lines(path):
            result.entries_total = number
            entries.append((number, parse_line(raw, path, number)))
    except LedgerFormatError as err:
        parse_problem = IntegrityProblem(UNPARSABLE, err.line_number, None, err.reason)
    except OSError as err:
        result.problem = IntegrityProblem(UNPARSABLE, 0, None, f"cannot read ledger: {err}")
        return result
    if registry is None or len(registry) == 0:
        result.problem = IntegrityProblem(NO_REGISTRY, 0, None, "no public keys given: signatures cannot be verified")
        return result
    if not entries and parse_problem is None:
        result.problem = IntegrityProblem(EMPTY_LEDGER, 0, None, "the ledger holds no entries")
        return result
    verifier = _Verifier(registry, result)
    all_seqs = [entry["seq"] for _, entry in entries]
    result.ledger_id = entries[0][1]["ledger"] if entries else None
    expected_prev = genesis_hash(result.ledger_id) if result.ledger_id else ""
    try:
        for index, (line, entry) in enumerate(entries):
            seq = entry["seq"]
            if entry["ledger"] != result.ledger_id:
                raise _Broken(IntegrityProblem(FOREIGN_LEDGER, line, seq, f"ledger id {entry['ledger']!r} differs"))
            if seq != index:
                raise _Broken(_seq_problem(seq, index, set(all_seqs[index + 1:]), line))
            if entry["prev"] != expected_prev:
                reason = "prev is not the hash of the previous line (an earlier line was altered or removed)"
                if index == 0:
                    reason = "prev is not the genesis hash of this ledger"
                raise _Broken(IntegrityProblem(HASH_MISMATCH, line, seq, reason))
            verifier.signature(entry, line, seq, "entry")
            if entry["kind"] == CLIENT_ENTRY_KIND:
                result.events.append(verifier.embedded(entry, line, seq))
            else:
                result.events.append(verifier.event(entry, line, seq, embedded=False))
            expected_prev = entry_hash(entry)
            result.entries_verified += 1
    except _Broken as broken:
        result.problem = broken.problem
        return result
    result.problem = parse_problem
    if result.problem:
        logger.warning("ledger %s: %s", path, result.problem.describe())
    return result
