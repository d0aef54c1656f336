"""Round wall time with SecAgg+ against the same round without it.

Same clients, same model (an MLP sized to the requested parameter count), one SGD step
per client, in one process; medians over rounds after the first (actor start-up).
Flower's legacy SecAgg+ workflow is not measured here yet.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from simulations.bench_overhead import run_fedguard

DIGITS_INPUTS = 64
DIGITS_CLASSES = 10


def hidden_width_for(parameters: int) -> int:
    """Width h of a 64 -> h -> h -> 10 MLP with about ``parameters`` parameters."""
    # h^2 + (64 + 1 + 1 + 10 + 1) h + 10 ~= parameters
    linear = DIGITS_INPUTS + DIGITS_CLASSES + 3
    return max(1, int((-linear + (linear**2 + 4 * parameters) ** 0.5) / 2))


def run_secagg_benchmark(client_counts: list[int], parameter_counts: list[int], rounds: int) -> dict[str, Any]:
    cases = []
    for clients in client_counts:
        for parameters in parameter_counts:
            hidden = hidden_width_for(parameters)
            timings = {}
            for mode in ("off", "secaggplus"):
                extra = (f"secure_agg={mode}", f"simulation.min_clients_per_round={min(clients, 3)}")
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, actual = run_fedguard(clients, rounds, hidden, Path(tmp) / "run", extra)
                timings[mode] = statistics.median(seconds[1:])
            cases.append(
                {
                    "clients": clients,
                    "model_parameters": actual,
                    "plain_round_seconds": timings["off"],
                    "secaggplus_round_seconds": timings["secaggplus"],
                    "ratio": timings["secaggplus"] / timings["off"],
                }
            )
            print(cases[-1], flush=True)
    return {"rounds": rounds, "neighbours_and_threshold": "conf/secure_agg/secaggplus.yaml defaults", "cases": cases}
