"""Synthetic signed run directories, for tests and for timing the audit at scale.

Reported epsilons come from the run's own accountant (``privacy.accounting.compute_epsilon``,
Opacus), so an audit of a synthetic run compares two independent implementations, as it
would on a real run. Client entries are chained in memory (no fsync per line): the
files are identical to what ``LedgerWriter`` writes, only faster to produce.

Timing: ``python -m fedguard.privacy.audit.synthetic --clients 1000 --rounds 50 --participation 0.1``
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedguard.privacy.accounting import compute_epsilon
from fedguard.privacy.ledger import (
    CLIENT_ENTRY_KIND,
    LEDGER_FILE,
    LINE_END,
    entry_hash,
    entry_line,
    genesis_hash,
    sign_entry,
    utc_now,
)
from fedguard.privacy.ledger_events import ClientDpRelease, LedgerEvent, RunFinished, RunStarted, SampleDpTraining
from fedguard.privacy.signing import SERVER_PARTY, KeyRegistry, client_party, generate_signing_key

# Dataset sizes cycled over clients: a few distinct sample rates, as in a real federation.
DEFAULT_DATASET_SIZES = (400, 600, 800, 1200)
DEFAULT_BATCH_SIZE = 32
DEFAULT_DELTA = 1e-5
DEFAULT_NOISE_MULTIPLIER = 1.1
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_CLIP_NORM = 1.0
DEFAULT_SEED = 7
SYNTHETIC_CONFIG = "synthetic: true\n"


@lru_cache(maxsize=None)
def opacus_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """The run's own figure (Opacus), cached per identical history."""
    return compute_epsilon(list(history), delta, accountant).epsilon


@dataclass
class MemoryChain:
    """A ledger chain built in memory with the same entry format as ``LedgerWriter``."""

    key: Ed25519PrivateKey
    party: str
    ledger_id: str
    entries: list[dict[str, Any]] = field(default_factory=list)

    def append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        prev = entry_hash(self.entries[-1]) if self.entries else genesis_hash(self.ledger_id)
        unsigned = {"seq": len(self.entries), "prev": prev, "time": utc_now(), "ledger": self.ledger_id,
                    "kind": kind, "party": self.party, "body": body}
        entry = sign_entry(unsigned, self.key)
        self.entries.append(entry)
        return entry

    def event(self, event: LedgerEvent) -> dict[str, Any]:
        return self.append(event.kind, event.body())

    def write(self, path: Path) -> None:
        path.write_bytes(b"".join(entry_line(entry) + LINE_END for entry in self.entries))


# (client name, round, reported epsilon) -> epsilon to write; lets tests understate a figure.
ReportHook = Callable[[str, int, float], float]
# A site's event before it signs it: lets tests play a site that lies in its own signed entries.
EntryHook = Callable[[SampleDpTraining], SampleDpTraining]


def build_synthetic_run(
    run_dir: Path,
    *,
    clients: int = 3,
    rounds: int = 3,
    participation: float = 1.0,
    accountant: str = "rdp",
    client_budget: float | None = None,
    epochs_per_round: int = 1,
    client_dp_release: bool = False,
    federation_budget: float | None = None,
    report_hook: ReportHook | None = None,
    entry_hook: EntryHook | None = None,
    seed: int = DEFAULT_SEED,
) -> KeyRegistry:
    """Write ``run_dir/ledger.jsonl`` and ``run_dir/keys/``; returns the key registry."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    registry = KeyRegistry()
    server = MemoryChain(generate_signing_key(), SERVER_PARTY, f"server-{seed}")
    registry.add(SERVER_PARTY, server.key.public_key())
    sites: dict[str, MemoryChain] = {}
    for index in range(clients):
        name = str(index)
        sites[name] = MemoryChain(generate_signing_key(), client_party(name), f"site-{name}-{seed}")
        registry.add(client_party(name), sites[name].key.public_key())
    registry.save_dir(run_dir / "keys")
    server.event(RunStarted("synthetic", "0" * 64, federation_budget, DEFAULT_DELTA if client_dp_release else None))
    histories: dict[str, list[tuple[float, float, int]]] = {name: [] for name in sites}
    release_history: list[tuple[float, float, int]] = []
    for server_round in range(1, rounds + 1):
        for name, site in sites.items():
            if rng.random() >= participation:
                continue
            size = DEFAULT_DATASET_SIZES[int(name) % len(DEFAULT_DATASET_SIZES)]
            batches = -(-size // DEFAULT_BATCH_SIZE)  # ceil: Opacus's DPDataLoader has len ceil(N/B), q = 1/len
            rate = 1.0 / batches
            steps = epochs_per_round * batches
            histories[name].append((DEFAULT_NOISE_MULTIPLIER, rate, steps))
            merged = ((DEFAULT_NOISE_MULTIPLIER, rate, sum(s for _, _, s in histories[name])),)
            epsilon = opacus_epsilon(merged, DEFAULT_DELTA, accountant)
            if report_hook is not None:
                epsilon = report_hook(name, server_round, epsilon)
            event = SampleDpTraining(name, server_round, DEFAULT_NOISE_MULTIPLIER, rate, steps,
                                     DEFAULT_MAX_GRAD_NORM, DEFAULT_DELTA, accountant, epsilon, client_budget,
                                     batch_size=DEFAULT_BATCH_SIZE, dataset_size=size, local_epochs=epochs_per_round)
            if entry_hook is not None:
                event = entry_hook(event)
            server.append(CLIENT_ENTRY_KIND, {"entry": site.event(event)})
        if client_dp_release:
            rate = min(1.0, max(participation, 1.0 / clients))
            release_history.append((DEFAULT_NOISE_MULTIPLIER, rate, server_round))
            epsilon = opacus_epsilon(((DEFAULT_NOISE_MULTIPLIER, rate, server_round),), DEFAULT_DELTA, accountant)
            if report_hook is not None:
                epsilon = report_hook("federation", server_round, epsilon)
            cohort = max(1, round(rate * clients))
            server.event(ClientDpRelease(server_round, DEFAULT_CLIP_NORM, DEFAULT_NOISE_MULTIPLIER * DEFAULT_CLIP_NORM,
                                         DEFAULT_NOISE_MULTIPLIER, "poisson", rate, cohort, cohort, DEFAULT_DELTA,
                                         accountant, epsilon, clients))
    server.event(RunFinished("synthetic", rounds, "done"))
    server.write(run_dir / LEDGER_FILE)
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time the audit of a synthetic signed ledger.")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--participation", type=float, default=0.1)
    parser.add_argument("--no-pld", action="store_true")
    args = parser.parse_args(argv)
    from fedguard.privacy.audit.runner import run_audit

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build_synthetic_run(Path(tmp), clients=args.clients, rounds=args.rounds, participation=args.participation)
        built = time.perf_counter()
        result = run_audit(Path(tmp), with_pld=not args.no_pld)
        audited = time.perf_counter()
        print(f"{args.clients} clients x {args.rounds} rounds, participation {args.participation}: "
              f"{result.verification.entries_total} entries ({result.verification.embedded_entries} client-signed); "
              f"build {built - started:.1f} s, audit {audited - built:.1f} s, exit code {int(result.exit_code)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
