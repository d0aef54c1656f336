"""A client site's privacy state on its own disk, so a server restart neither loses nor doubles spend.

Within one Flower run the accountant history lives in ``Context.state``. A resumed run is a
new Flower run (fresh contexts), so a site that trains privately also keeps, per federation
lineage (the id that survives resumes):

- ``privacy/<lineage>.json``: the accountant state (``ClientPrivacyState`` as a ConfigRecord),
  written and fsync'ed before the reply leaves;
- ``replay/<lineage>.pt``: the last round's reply. Asked again for the same round with the
  same global model (a resumed server re-running the round it crashed in), the site sends
  that reply again when the server saw it in the clear the first time: re-releasing the same
  output costs no privacy, retraining would. Under secure aggregation it does not: the
  resend would be masked afresh into a second, different sum (two sums over cohorts that
  differ by this site reveal its update) and, under distributed noise, with a fresh noise
  share nobody accounted. There the cache keeps only which round was released (no update)
  and the site sits the repeated round out (:class:`ResendRefused`);
- ``ledger/<lineage>.jsonl``: the site's own signed, hash-chained privacy ledger
  (privacy/ledger.py), appended before each reply leaves and signed with ``ledger.key``,
  a key that never leaves the site. Every reply carries the whole chain so far, so the
  server's ledger can embed each entry exactly once even after replies were lost.

A file lock serialises training per lineage, so the old run's ClientApp finishing late and
the resumed run's starting early never both spend for the same round.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedguard.clients.data_spend import DataSpend, strictest
from fedguard.clients.private_training import PRIOR_KEY
from fedguard.clients.wire import protocol
from fedguard.privacy.client_budget import STATE_KEY
from fedguard.privacy.ledger import LedgerWriter, entry_to_wire, read_ledger
from fedguard.privacy.ledger_events import BudgetRefusal, LedgerEvent, SampleDpTraining
from fedguard.privacy.signing import client_party, load_or_create_signing_key, public_key_openssh

logger = logging.getLogger(__name__)

PRIVACY_DIR = "privacy"
REPLAY_DIR = "replay"
LEDGER_DIR = "ledger"
LEDGER_KEY_FILE = "ledger.key"
LINEAGE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REPLAY_FORMAT = "fedguard-replay/1"


class SiteStateError(RuntimeError):
    """The site's saved state is unreadable; training must not go on as if nothing was spent."""


class ResendRefused(RuntimeError):
    """A round already released into a secure-aggregation sum is asked for again: resending would
    let the server difference two sums, retraining would spend again, so the site sits it out."""


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identical global models, identical digest."""
    digest = hashlib.sha256()
    for name in sorted(arrays.keys()):
        array = np.ascontiguousarray(arrays[name].numpy())
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedReply:
    server_round: int
    model_digest: str
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, int | float]
    privacy: dict[str, Any] | None


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class SiteStateStore:
    """One lineage's privacy state and replay cache under a site's state directory."""

    def __init__(
        self, root: Path, lineage: str, *, data_fingerprint: str | None = None, site_budget: float | None = None
    ) -> None:
        """``data_fingerprint``: the training set's id (clients/data_spend.py); with it, the spend
        of every lineage on that data counts here, and ``site_budget`` (the site's own
        epsilon-budget) is kept with the data, the strictest ever given winning."""
        if not LINEAGE_PATTERN.match(lineage):
            raise SiteStateError(f"lineage id {lineage!r} is not a plain identifier")
        self.root = root
        self.lineage = lineage
        self.site_budget = site_budget
        self.data = None if data_fingerprint is None else DataSpend(root / PRIVACY_DIR, data_fingerprint)
        self.privacy_path = root / PRIVACY_DIR / f"{lineage}.json"
        self.replay_path = root / REPLAY_DIR / f"{lineage}.pt"
        self.lock_path = root / PRIVACY_DIR / f"{lineage}.lock"
        self.ledger_path = root / LEDGER_DIR / f"{lineage}.jsonl"
        self.ledger_key_path = root / LEDGER_KEY_FILE

    @contextmanager
    def locked(self, state: RecordDict) -> Iterator[RecordDict]:
        """Hold the lineage lock; load the saved accountant state into ``state`` and save it back."""
        self.privacy_path.parent.mkdir(parents=True, exist_ok=True)
        self.replay_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._load_privacy(state)
                yield state
                self.save_privacy(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load_privacy(self, state: RecordDict) -> None:
        if self.data is not None:
            prior, budget = self.data.prior(self.lineage)
            budget = strictest(budget, self.site_budget)
            state[PRIOR_KEY] = ConfigRecord({
                "sigma": [float(e[0]) for e in prior], "rate": [float(e[1]) for e in prior],
                "steps": [int(e[2]) for e in prior], "budget_epsilon": -1.0 if budget is None else budget,
            })
        if not self.privacy_path.exists():
            return
        try:
            saved = json.loads(self.privacy_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SiteStateError(f"cannot read the site's privacy state {self.privacy_path}: {err}") from err
        state[STATE_KEY] = ConfigRecord(saved)

    def save_privacy(self, state: RecordDict) -> None:
        if STATE_KEY not in state:
            return
        saved = dict(state[STATE_KEY])
        text = json.dumps(saved, sort_keys=True).encode()
        _fsync_write(self.privacy_path, lambda handle: handle.write(text))
        if self.data is not None:
            history = list(zip(saved["history_sigma"], saved["history_rate"], saved["history_steps"]))
            self.data.save(self.lineage, [(float(a), float(b), int(c)) for a, b, c in history], self.site_budget)

    def cached_reply(self, server_round: int, model_digest: str) -> CachedReply | None:
        if not self.replay_path.exists():
            return None
        try:
            payload = torch.load(self.replay_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt file
            logger.warning("ignoring unreadable replay cache %s: %s", self.replay_path, err)
            return None
        if payload.get("format") != REPLAY_FORMAT:
            return None
        if payload["round"] != server_round or payload["model_digest"] != model_digest:
            return None
        return CachedReply(
            server_round, model_digest, payload["arrays"], payload["metrics"], payload.get("privacy")
        )

    def remember_reply(self, reply: CachedReply) -> None:
        payload = {
            "format": REPLAY_FORMAT,
            "round": reply.server_round,
            "model_digest": reply.model_digest,
            "arrays": {k: v.detach().cpu() for k, v in reply.arrays.items()},
            "metrics": dict(reply.metrics),
            "privacy": reply.privacy,
        }
        _fsync_write(self.replay_path, lambda handle: torch.save(payload, handle))


    @cached_property
    def _signing_key(self) -> Ed25519PrivateKey:
        """The site's ledger key, read (or created) once per store: signing and the reply both need it."""
        return load_or_create_signing_key(self.ledger_key_path)

    def record_spend(
        self, report: dict[str, Any], *, partition_id: int, server_round: int, max_grad_norm: float,
        committed: dict[str, int | None] | None = None,
    ) -> None:
        """Append this round's training (or refusal) to the site ledger, durably, before the reply leaves.

        ``committed`` (batch size, dataset size, local epochs, max_steps) is signed with the entry
        so the audit recomputes q and the steps from them rather than trusting the stated ones."""
        if report.get("refused"):
            event: SampleDpTraining | BudgetRefusal = BudgetRefusal(
                client=str(partition_id),
                round=server_round,
                planned_steps=int(report.get("planned_steps", 0)),
                epsilon_spent=float(report["epsilon"]),
                epsilon_if_trained=float(report.get("epsilon_if_trained", report["epsilon"])),
                budget_epsilon=float(report["budget_epsilon"]),
                reason=str(report.get("reason", "")),
            )
        else:
            event = SampleDpTraining.from_report(
                report, client=partition_id, server_round=server_round, max_grad_norm=max_grad_norm, committed=committed
            )
        with LedgerWriter(self.ledger_path, self._signing_key, client_party(partition_id), ledger_id=f"{self.lineage}-{partition_id}") as ledger:
            ledger.append(event)

    def record_event(self, event: LedgerEvent, *, partition_id: int) -> None:
        """Append another privacy release of this site (e.g. preprocessing statistics) to its ledger."""
        with LedgerWriter(self.ledger_path, self._signing_key, client_party(partition_id), ledger_id=f"{self.lineage}-{partition_id}") as ledger:
            ledger.append(event)

    def ledger_record(self) -> ConfigRecord:
        """The site's whole chain for this lineage and its public key, for the server to embed what it lacks."""
        entries = read_ledger(self.ledger_path) if self.ledger_path.exists() else []
        public_key = self._signing_key.public_key()
        return ConfigRecord(
            {
                protocol.LEDGER_ENTRIES_FIELD: [entry_to_wire(entry) for entry in entries],
                protocol.LEDGER_PUBLIC_KEY_FIELD: public_key_openssh(public_key),
            }
        )
