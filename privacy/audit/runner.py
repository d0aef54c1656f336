"""One audit of one run: locate the ledger and keys, verify, recompute, cross-check, decide.

This is the Python API behind ``fedguard audit``; ``run_audit`` never prints.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from fedguard.privacy.audit.recompute import DEFAULT_TOLERANCE
from fedguard.privacy.audit.spend import SpendResult, audit_spend
from fedguard.privacy.audit.verify import VerificationResult, verify_ledger
from fedguard.privacy.ledger import LEDGER_FILE
from fedguard.privacy.ledger_events import RunFinished
from fedguard.privacy.signing import KeyFileError, KeyRegistry

logger = logging.getLogger(__name__)

KEYS_DIR = "keys"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
AUDIT_DIR = "audit"


class ExitCode(IntEnum):
    """``fedguard audit`` exit status. When several apply, the lowest non-zero here wins
    except that INTEGRITY outranks all: an untrustworthy record makes the rest moot."""

    OK = 0
    ERROR = 1  # the audit itself could not run (no such path, unreadable keys)
    USAGE = 2  # bad command line (argparse)
    INTEGRITY = 3  # tampering: unparsable/truncated line, hash or seq break, bad/unknown/missing signature
    BUDGET_EXCEEDED = 4  # a client's or the federation's spend is over its budget
    MISMATCH = 5  # a reported epsilon is below the independent recomputation (or inconsistent)
    EMPIRICAL_VIOLATION = 6  # --empirical: a private run leaked more than the epsilon it claims


class AuditSetupError(ValueError):
    """The audit cannot start: no ledger at the path, no usable key registry."""


@dataclass
class AuditResult:
    ledger_path: Path
    run_dir: Path | None
    keys_source: str
    keys_from_run_dir: bool
    tolerance: float
    verification: VerificationResult
    spend: SpendResult
    run_findings: list[str] = field(default_factory=list)  # cross-checks against summary.json
    accuracy_by_round: dict[int, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """A hash chain cannot show that its tail was cut off; a closing entry can."""
        return any(event.kind == RunFinished.kind for event in self.verification.events)

    @property
    def mismatch(self) -> bool:
        audits = [*self.spend.clients.values(), *([self.spend.federation] if self.spend.federation else [])]
        return bool(self.run_findings) or any(audit.mismatches for audit in audits)

    @property
    def budget_exceeded(self) -> bool:
        audits = [*self.spend.clients.values(), *([self.spend.federation] if self.spend.federation else [])]
        return any(audit.budget_exceeded for audit in audits)

    @property
    def exit_code(self) -> ExitCode:
        if not self.verification.ok:
            return ExitCode.INTEGRITY
        if self.mismatch:
            return ExitCode.MISMATCH
        if self.budget_exceeded:
            return ExitCode.BUDGET_EXCEEDED
        return ExitCode.OK

    @property
    def verdict(self) -> str:
        return {
            ExitCode.OK: "PASS: ledger intact, every epsilon confirmed, every budget respected",
            ExitCode.INTEGRITY: "FAIL: the ledger is not intact; its figures cannot be trusted",
            ExitCode.MISMATCH: "FAIL: reported epsilons are lower than the independent recomputation",
            ExitCode.BUDGET_EXCEEDED: "FAIL: a privacy budget was exceeded",
        }[self.exit_code]

    def as_dict(self) -> dict[str, Any]:
        problem = self.verification.problem
        return {
            "ledger": str(self.ledger_path),
            "ledger_id": self.verification.ledger_id,
            "keys": self.keys_source,
            "keys_from_run_dir": self.keys_from_run_dir,
            "tolerance": self.tolerance,
            "exit_code": int(self.exit_code),
            "verdict": self.verdict,
            "integrity": {
                "ok": self.verification.ok,
                "entries_total": self.verification.entries_total,
                "entries_verified": self.verification.entries_verified,
                "embedded_client_entries": self.verification.embedded_entries,
                "signatures_by_party": len(self.verification.signers),
                "first_problem": None if problem is None else vars(problem) | {"description": problem.describe()},
            },
            "run": self.spend.run,
            "run_finished_recorded": self.finished,
            "run_findings": self.run_findings,
            "clients": {name: audit.as_dict() for name, audit in self.spend.clients.items()},
            "federation": None if self.spend.federation is None else self.spend.federation.as_dict(),
        }


def locate(path: Path, keys: Path | None) -> tuple[Path, Path | None, Path, bool]:
    """(ledger file, run dir or None, key registry, whether the keys came from the run dir)."""
    path = Path(path)
    if path.is_dir():
        ledger, run_dir = path / LEDGER_FILE, path
        if not ledger.is_file():
            raise AuditSetupError(f"{path} has no {LEDGER_FILE}")
    elif path.is_file():
        ledger = path
        run_dir = path.parent if (path.parent / SUMMARY_FILE).exists() or (path.parent / METRICS_FILE).exists() else None
    else:
        raise AuditSetupError(f"{path} does not exist")
    if keys is not None:
        return ledger, run_dir, Path(keys), False
    fallback = (run_dir or ledger.parent) / KEYS_DIR
    if not fallback.exists():
        raise AuditSetupError(f"no --keys given and no {fallback}: cannot verify signatures without public keys")
    logger.warning("using keys from %s: they come with the ledger, so they only prove internal consistency", fallback)
    return ledger, run_dir, fallback, True


def _summary_findings(run_dir: Path, spend: SpendResult, tolerance: float) -> list[str]:
    """summary.json must not claim less than the ledger, nor spend the ledger never recorded."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return []
    try:
        clients = json.loads(path.read_text(encoding="utf-8")).get("privacy", {}).get("clients", {})
    except (OSError, ValueError) as err:
        return [f"{SUMMARY_FILE} unreadable: {err}"]
    findings = []
    for pid, row in clients.items():
        claimed = row.get("epsilon")
        if not isinstance(claimed, (int, float)) or not math.isfinite(claimed):
            continue
        audit = spend.clients.get(str(pid))
        if audit is None:
            if claimed > 0:
                findings.append(f"client {pid}: {SUMMARY_FILE} reports epsilon {claimed:.6g} but the ledger has no event")
        elif audit.epsilon_reported > claimed * (1 + tolerance) + 1e-12:
            findings.append(
                f"client {pid}: {SUMMARY_FILE} reports epsilon {claimed:.6g}, ledger {audit.epsilon_reported:.6g}"
            )
    return findings


def _accuracy(run_dir: Path | None) -> dict[int, float]:
    if run_dir is None or not (run_dir / METRICS_FILE).is_file():
        return {}
    accuracy: dict[int, float] = {}
    for line in (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            if isinstance(row.get("test_accuracy"), (int, float)):
                accuracy[int(row["round"])] = float(row["test_accuracy"])
        except (ValueError, KeyError, TypeError):
            logger.warning("skipping unreadable line in %s", METRICS_FILE)
    return accuracy


def run_audit(
    path: Path | str, keys: Path | str | None = None, tolerance: float = DEFAULT_TOLERANCE, with_pld: bool = True
) -> AuditResult:
    """Audit a run directory (holding ``ledger.jsonl``) or a ledger file."""
    if not tolerance >= 0:
        raise AuditSetupError(f"tolerance={tolerance} must be >= 0")
    ledger, run_dir, keys_path, from_run_dir = locate(Path(path), Path(keys) if keys is not None else None)
    try:
        registry = KeyRegistry.load(keys_path)
    except KeyFileError as err:
        raise AuditSetupError(str(err)) from err
    verification = verify_ledger(ledger, registry)
    spend = audit_spend(verification.events, tolerance, with_pld)
    findings = _summary_findings(run_dir, spend, tolerance) if run_dir is not None and verification.ok else []
    return AuditResult(
        ledger_path=ledger,
        run_dir=run_dir,
        keys_source=str(keys_path),
        keys_from_run_dir=from_run_dir,
        tolerance=tolerance,
        verification=verification,
        spend=spend,
        run_findings=findings,
        accuracy_by_round=_accuracy(run_dir),
    )
