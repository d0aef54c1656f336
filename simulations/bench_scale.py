"""``fedguard bench scale``: how a round's cost grows with the number of virtual clients.

The same run at each population (default 100, 1,000, 10,000 clients) with the same
number of clients a round (default 100) and the same work per client (a fixed number
of local steps on a fixed synthetic data set), under sample-level DP and under
client-level DP. What should stay flat is the time per round; what may grow with N is
only what N itself costs (Flower's registered nodes and their contexts, the population
the cohort is drawn from). Each run is a real ``fedguard simulate`` in its own process;
memory is the peak of its whole process tree (simulations/process_memory.py).

Optionally (``--ray-address``) each run also goes to a Ray cluster the user started,
for the one-node vs cluster comparison.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from fedguard.simulations.bench_client_dp import _run

# One data set for every population, so per-client work and central evaluation do not move with N.
SYNTHETIC_SAMPLES = 250_000
# Local steps per client per round, and a batch that fits the smallest partition (25 rows at 10,000 clients).
LOCAL_STEPS = 2
BATCH_SIZE = 8
PRIVACY_OVERRIDES = {
    "sample_dp": ["privacy=sample_dp", "privacy.target_epsilon=8"],
    "client_dp": ["privacy=client_dp", "privacy.client_target_epsilon=8", "privacy.client_clip_norm=0.5"],
    "none": ["privacy=none"],
}


def scale_overrides(clients: int, per_round: int, rounds: int, privacy: str) -> list[str]:
    """The simulate overrides of one cell: ``per_round`` of ``clients`` expected each round."""
    if privacy not in PRIVACY_OVERRIDES:
        raise ValueError(f"privacy {privacy!r}; allowed: {', '.join(PRIVACY_OVERRIDES)}")
    if not 0 < per_round <= clients:
        raise ValueError(f"clients per round {per_round} must be between 1 and the population {clients}")
    return [
        "dataset=synthetic", f"dataset.num_samples={SYNTHETIC_SAMPLES}", "model=logreg",
        f"simulation.num_clients={clients}", f"simulation.fraction_train={per_round / clients}",
        "simulation.min_clients_per_round=2", f"simulation.rounds={rounds}",
        f"train.max_steps={LOCAL_STEPS}", f"train.batch_size={BATCH_SIZE}",
        "progress=false", "log_level=WARNING", *PRIVACY_OVERRIDES[privacy],
    ]


def run_scale_benchmark(
    populations: list[int], per_round: int, rounds: int, privacy_modes: list[str], ray_address: str | None = None,
) -> dict[str, Any]:
    cells = []
    with tempfile.TemporaryDirectory(prefix="fedguard-bench-scale-") as tmp:
        for privacy in privacy_modes:
            for clients in populations:
                overrides = scale_overrides(clients, per_round, rounds, privacy)
                if ray_address:
                    overrides.append(f"simulation.ray_address={ray_address}")
                outcome = _run(overrides, Path(tmp) / f"{privacy}-{clients}")
                cell = {"privacy": privacy, "clients": clients, "per_round": per_round, **outcome}
                cells.append(cell)
                print(
                    f"{privacy:>9} {clients:>6} clients: {outcome['mean_round_seconds']:.2f} s/round, "
                    f"wall {outcome['wall_seconds']:.0f} s, peak PSS {outcome['peak_tree_pss_gib']:.2f} GiB "
                    f"({outcome['peak_processes']} processes), stop: {outcome['stop_reason']}",
                    file=sys.stderr, flush=True,
                )
    return {
        "config": {
            "populations": populations, "per_round": per_round, "rounds": rounds, "privacy": privacy_modes,
            "dataset": f"synthetic, {SYNTHETIC_SAMPLES} rows", "model": "logreg", "local_steps": LOCAL_STEPS,
            "batch_size": BATCH_SIZE, "ray_address": ray_address,
        },
        "runs": cells,
    }
