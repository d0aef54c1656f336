"""The model card's privacy section, read from the run's records and checked by the audit.

Figures come from summary.json (what the run reported) only after ``run_audit`` has verified
the ledger and recomputed every epsilon independently; the section carries the verdict, the
ledger's head hash and the key ids it was checked with, so a reader can re-run the audit and
see that it speaks about the same ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedguard.conf.plans import client_level_dp, trains_privately
from fedguard.privacy.audit.runner import AuditSetupError, run_audit
from fedguard.privacy.ledger import LEDGER_FILE, LedgerError, iter_raw_lines
from fedguard.privacy.signing import KeyFileError, KeyRegistry
from fedguard.privacy.client_dp_accounting import MODEL_USERS_AND_OTHER_SITES
from fedguard.server.run_record import OBSERVER_WORDS
from fedguard.server.model_card import CLIENT_OBSERVER, SAMPLE_OBSERVER, AuditSection, Guarantee, PrivacySection

logger = logging.getLogger(__name__)

SAMPLE_ADJACENCY = {True: "add/remove one record (Poisson-sampled batches from OS randomness)",
                    False: "replace one record (fixed-size batches; no amplification by sampling claimed)"}
CLIENT_ADJACENCY = {"poisson": "add/remove one site (Poisson cohorts from OS randomness)",
                    "fixed": "replace one site (fixed-size cohorts sampled without replacement)"}


def ledger_head_sha256(ledger: Path) -> str | None:
    """SHA-256 of the last line: what the next entry's ``prev`` would be (privacy.ledger.entry_hash)."""
    last: bytes | None = None
    try:
        for _, raw in iter_raw_lines(ledger):
            last = raw
    except (OSError, LedgerError) as err:
        logger.warning("cannot read %s to the end: %s", ledger, err)
        return None
    return None if last is None else hashlib.sha256(last).hexdigest()


def _key_ids(keys_source: str) -> dict[str, str]:
    try:
        return KeyRegistry.load(Path(keys_source)).parties()
    except KeyFileError:
        return {}


def _audit(run_dir: Path) -> AuditSection:
    ledger = run_dir / LEDGER_FILE
    try:
        result = run_audit(run_dir)
    except AuditSetupError as err:  # a private run without its ledger or keys cannot be trusted either
        return AuditSection(verdict=f"FAIL: the audit cannot run: {err}", passed=False, exit_code=1,
                            ledger_id=None, ledger_head_sha256=ledger_head_sha256(ledger) if ledger.is_file() else None,
                            entries_verified=0, key_ids={}, keys_source="", keys_from_run_dir=False)
    problem = result.verification.problem
    verdict = result.verdict + (f" ({problem.describe()})" if problem is not None else "")
    return AuditSection(
        verdict=verdict, passed=int(result.exit_code) == 0, exit_code=int(result.exit_code),
        ledger_id=result.verification.ledger_id, ledger_head_sha256=ledger_head_sha256(result.ledger_path),
        entries_verified=result.verification.entries_verified, key_ids=_key_ids(result.keys_source),
        keys_source=result.keys_source, keys_from_run_dir=result.keys_from_run_dir,
    )


def guarantees_from_summary(cfg: DictConfig, privacy: dict[str, Any]) -> list[Guarantee]:
    guarantees = []
    clients = privacy.get("clients") or {}
    if trains_privately(cfg) and clients:
        rows = list(clients.values())
        guarantees.append(Guarantee(
            level="sample", epsilon=float(privacy["max_epsilon"]), epsilon_mean=float(privacy["mean_epsilon"]),
            delta=float(rows[0]["delta"]), observer=SAMPLE_OBSERVER + "; max over sites",
            accountant=", ".join(sorted({str(r["accountant"]) for r in rows})),
            adjacency=SAMPLE_ADJACENCY[bool(cfg.privacy.poisson_sampling)],
        ))
    federation = privacy.get("federation")
    if client_level_dp(cfg) and federation:
        adjacency = CLIENT_ADJACENCY.get(str(federation.get("sampling")), str(federation.get("sampling")))
        by_observer = {k: v for k, v in (federation.get("epsilon_by_observer") or {}).items()
                       if k != MODEL_USERS_AND_OTHER_SITES}
        # Parties that know the cohorts get no amplification: their own, larger figure, or none at all.
        unprotected = [OBSERVER_WORDS.get(k, k) for k, v in by_observer.items() if v is None]
        observer = CLIENT_OBSERVER + "".join(f"; {w}: none holds (it sees the updates before the noise)" for w in unprotected)
        guarantees.append(Guarantee(
            level="client", epsilon=float(federation["epsilon"]), epsilon_mean=None, delta=float(federation["delta"]),
            observer=observer, accountant=str(federation["accountant"]), adjacency=adjacency,
        ))
        for key, epsilon in by_observer.items():
            if epsilon is not None:
                guarantees.append(Guarantee(
                    level="client", epsilon=float(epsilon), epsilon_mean=None, delta=float(federation["delta"]),
                    accountant=str(federation["accountant"]), adjacency=adjacency,
                    observer=OBSERVER_WORDS.get(key, key) + "; no amplification by client sampling: it knows who took part",
                ))
    return guarantees


def privacy_section(run_dir: Path, cfg: DictConfig) -> PrivacySection:
    """The section for the card; audits the run's ledger when the run was private."""
    mode = str(cfg.privacy.mode)
    secure = str(cfg.secure_agg.mode) != "off"
    if mode == "none":
        return PrivacySection(mode=mode, statement="no differential privacy: nothing accounted, audit not applicable",
                              guarantees=(), secure_aggregation=secure, audit=None)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    guarantees = guarantees_from_summary(cfg, summary.get("privacy", {}))
    statement = ("differential privacy: " + "; ".join(f"{g.level}-level epsilon {g.epsilon:.4g} at delta {g.delta:g}, "
                                                       f"{g.observer}" for g in guarantees)) if guarantees else \
        "differential privacy was configured but summary.json reports no spend"
    return PrivacySection(mode=mode, statement=statement, guarantees=tuple(guarantees), secure_aggregation=secure,
                          audit=_audit(run_dir))
