"""A site's sample-level spend tied to its data, not to the run that spent it.

Lineage ids come from the server: keyed by them alone, a new run would start the same
records at epsilon 0, and a budget stored with an old run would outlive a stricter one the
site gives later. So the site also keeps, per fingerprint of its training set (SHA-256 over
the training arrays' dtypes, shapes and bytes, computed on the site),
``privacy/data/<fingerprint>.json``: every lineage's (σ, q, steps) history on that data and
the strictest budget ever given for it. Before training in any lineage the accountant sees
the other lineages' spend as prior history (its epsilon covers every run on the data) and
the strictest budget wins.

Migration: the first time a fingerprint is seen, per-lineage state files that no data
record claims yet are counted against it (spend is never reset; over-counting is the safe
side when a site's old state cannot say which data it came from).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.privacy.accounting import HistoryEntry

logger = logging.getLogger(__name__)

DATA_DIR = "data"
FORMAT = "fedguard-data-spend/1"


def data_fingerprint(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes: the same training set, the same id."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def strictest(*budgets: float | None) -> float | None:
    """The smallest budget given (None: no budget)."""
    given = [float(b) for b in budgets if b is not None and float(b) >= 0]
    return min(given) if given else None


def _history(record: dict[str, Any]) -> list[HistoryEntry]:
    return [(float(s), float(q), int(n)) for s, q, n in zip(record["sigma"], record["rate"], record["steps"])]


def _columns(history: list[HistoryEntry]) -> dict[str, list]:
    return {"sigma": [s for s, _, _ in history], "rate": [q for _, q, _ in history], "steps": [n for _, _, n in history]}


class DataSpend:
    """The spend on one training set across every lineage under a site's ``privacy/`` dir."""

    def __init__(self, privacy_dir: Path, fingerprint: str) -> None:
        self.privacy_dir = privacy_dir
        self.fingerprint = fingerprint
        self.path = privacy_dir / DATA_DIR / f"{fingerprint}.json"
        self.lock_path = self.path.with_suffix(".lock")

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return self._migrated()
        return json.loads(self.path.read_text(encoding="utf-8"))

    def _claimed(self) -> set[str]:
        claimed: set[str] = set()
        for other in (self.privacy_dir / DATA_DIR).glob("*.json"):
            claimed |= set(json.loads(other.read_text(encoding="utf-8")).get("lineages", {}))
        return claimed

    def _migrated(self) -> dict[str, Any]:
        """A new record, charged with every lineage state file no data record claims yet."""
        record: dict[str, Any] = {"format": FORMAT, "lineages": {}, "budget_epsilon": None}
        claimed = self._claimed() if (self.privacy_dir / DATA_DIR).exists() else set()
        for state_file in sorted(self.privacy_dir.glob("*.json")):
            lineage = state_file.stem
            if lineage in claimed:
                continue
            saved = json.loads(state_file.read_text(encoding="utf-8"))
            history = list(zip(saved["history_sigma"], saved["history_rate"], saved["history_steps"]))
            record["lineages"][lineage] = _columns([(float(s), float(q), int(n)) for s, q, n in history])
            budget = float(saved.get("budget_epsilon", -1.0))
            record["budget_epsilon"] = strictest(record["budget_epsilon"], None if budget < 0 else budget)
            logger.warning("privacy state of lineage %s counted against this site's data %s (migration)",
                           lineage, self.fingerprint[:12])
        return record

    def prior(self, lineage: str) -> tuple[list[HistoryEntry], float | None]:
        """Every other lineage's history on this data, and the strictest budget recorded for it."""
        with self._locked():
            record = self._read()
        prior = [entry for name, rec in sorted(record["lineages"].items()) if name != lineage for entry in _history(rec)]
        return prior, record["budget_epsilon"]

    def lineages(self) -> set[str]:
        """Every lineage (or release, e.g. ``<lineage>:preprocessing``) recorded on this data."""
        with self._locked():
            return set(self._read()["lineages"])

    def save(self, lineage: str, history: list[HistoryEntry], budget: float | None) -> None:
        """Record this lineage's whole history on the data and keep the strictest budget (fsync'ed)."""
        with self._locked():
            record = self._read()
            record["lineages"][lineage] = _columns(list(history))
            record["budget_epsilon"] = strictest(record["budget_epsilon"], budget)
            text = json.dumps(record, sort_keys=True).encode()
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return _FileLock(self.lock_path)


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
