"""``fedguard bench deployment``: separate-sites round time vs simulation, same config.

The deployment side is a real federation on loopback (simulations/local_federation.py):
`fedguard server` (TLS, SuperNode authentication), registered sites from `fedguard client`,
`fedguard run`. Reported: time from starting the server to the first round starting,
and the mean round wall time, beside the same config in Flower's simulation engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedguard.simulations.local_federation import Federation, stop_process

POLL_SECONDS = 0.2
RUN_TIMEOUT = 1800.0


def _round_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _deployment(root: Path, sites: int, overrides: list[str]) -> dict[str, Any]:
    fed = Federation(root)
    try:
        fed.make_certs()
        fed.make_publisher()
        started = time.monotonic()
        fed.start_server()
        for site in range(sites):
            key = fed.make_site_keys(site)
            if fed.register(key.with_suffix(".pub")).returncode != 0:
                raise RuntimeError(f"could not register site {site}")
            fed.start_client(site, sites)
        run = fed.submit(*overrides)
        first_round_started = None
        deadline = time.monotonic() + RUN_TIMEOUT
        while run.poll() is None and time.monotonic() < deadline:
            if first_round_started is None and fed.run_dirs():
                lines = _round_lines(fed.run_dirs()[-1])
                if lines:
                    first_round_started = time.monotonic() - lines[0]["round_seconds"] - started
            time.sleep(POLL_SECONDS)
        stop_process(run)
        if run.returncode != 0:
            raise RuntimeError(f"fedguard run failed; see {root}/run.log")
        rounds = _round_lines(fed.run_dirs()[-1])
        return {
            "server_start_to_first_round_s": first_round_started,
            "round_seconds": [r["round_seconds"] for r in rounds],
            "final_accuracy": rounds[-1]["test_accuracy"],
        }
    finally:
        fed.close()


def _simulation(root: Path, overrides: list[str]) -> dict[str, Any]:
    run_dir = root / "simulation"
    subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
        check=True, capture_output=True, timeout=RUN_TIMEOUT,
    )
    rounds = _round_lines(run_dir)
    return {"round_seconds": [r["round_seconds"] for r in rounds], "final_accuracy": rounds[-1]["test_accuracy"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_deployment_benchmark(sites: int, rounds: int, dataset: str, model: str) -> dict[str, Any]:
    overrides = [f"dataset={dataset}", f"model={model}", f"simulation.num_clients={sites}",
                 f"simulation.rounds={rounds}", "progress=false"]
    with tempfile.TemporaryDirectory(prefix="fedguard-bench-deployment-") as tmp:
        deployment = _deployment(Path(tmp), sites, overrides)
        simulation = _simulation(Path(tmp), overrides)
    result = {
        "config": {"sites": sites, "rounds": rounds, "dataset": dataset, "model": model},
        "deployment": deployment,
        "simulation": simulation,
        "mean_round_seconds": {
            "deployment": _mean(deployment["round_seconds"]),
            "simulation": _mean(simulation["round_seconds"]),
        },
    }
    print(
        f"{sites} sites, {dataset}/{model}, {rounds} rounds: server start -> first round "
        f"{deployment['server_start_to_first_round_s']:.1f} s; mean round {result['mean_round_seconds']['deployment']:.2f} s "
        f"(deployment) vs {result['mean_round_seconds']['simulation']:.2f} s (simulation)",
        file=sys.stderr,
    )
    return result
