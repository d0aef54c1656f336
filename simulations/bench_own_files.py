"""``fedguard bench own-files``: three sites' own CSV files (wine, different sizes and label
mixes) federated without DP and with sample-level DP, beside the same rows pooled centrally.

A quarter of the wine rows (stratified, fixed split) is held out before the sites' files are
written; every variant is scored on it: the federations through their final checkpoint, the
pooled baseline directly. Hyperparameters are the config defaults, never tuned on that split.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.clients.local_data import table_examples
from fedguard.clients.models import build_model
from fedguard.clients.training import evaluate_model, make_training_setup, run_epochs
from fedguard.conf import compose_config
from fedguard.conf.contract import contract_of
from fedguard.server.checkpoint import load_global_model
from fedguard.simulations.example_sites import CSV_NAME, wine_table, write_sites

TEST_FRACTION = 0.25


def _federate(sites: list[Path], run_dir: Path, rounds: int, privacy: list[str]) -> dict[str, Any]:
    args = [sys.executable, "-m", "fedguard.simulations.cli", "simulate", "dataset=tabular", "model=mlp",
            "simulation.num_clients=3", f"simulation.rounds={rounds}", "simulation.min_clients_per_round=3",
            f"simulation.site_data=[{','.join(map(str, sites))}]", "progress=false", f"hydra.run.dir={run_dir}",
            *privacy]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"summary": summary, "seconds": time.perf_counter() - started}


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(evaluate_model(model, x, y, 256, torch.device("cpu")).accuracy)


def run_own_files_benchmark(rounds: int, epsilon: float) -> dict[str, Any]:
    from sklearn.model_selection import train_test_split

    cfg = compose_config(["dataset=tabular", "model=mlp"])
    contract = contract_of(cfg.dataset)
    frame = wine_table()
    train, test = train_test_split(frame, test_size=TEST_FRACTION, random_state=0, stratify=frame.cultivar)
    results: dict[str, Any] = {"rounds": rounds, "test_rows": len(test), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        test.to_csv(root / "test.csv", index=False)
        test_x, test_y = table_examples(root / "test.csv", contract)
        sites = write_sites(root / "data", train)
        site_rows = [table_examples(site / CSV_NAME, contract) for site in sites]
        results["site_rows"] = [len(y) for _, y in site_rows]
        variants = {
            "federated, no DP": [],
            f"federated, sample-level DP eps {epsilon:g}": ["privacy=sample_dp", f"privacy.target_epsilon={epsilon}"],
        }
        for name, privacy in variants.items():
            run = _federate(sites, root / name.replace(" ", "_").replace(",", ""), rounds, privacy)
            model = load_global_model(Path(run["summary"]["checkpoint"]))
            clients = run["summary"].get("privacy", {}).get("clients", {})
            results["variants"][name] = {
                "test_accuracy": _accuracy(model, test_x, test_y),
                "wall_seconds": run["seconds"],
                "epsilon_per_site": {pid: entry["epsilon"] for pid, entry in clients.items()},
            }
        # The same rows pooled: one model, the same epochs as a site trains over all rounds.
        pooled_x = np.concatenate([x for x, _ in site_rows])
        pooled_y = np.concatenate([y for _, y in site_rows])
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model, contract.input_shape, contract.num_classes)
        started = time.perf_counter()
        run_epochs(make_training_setup(model, pooled_x, pooled_y, cfg.train, int(cfg.seed)),
                   rounds * int(cfg.train.local_epochs), torch.device("cpu"))
        results["variants"]["pooled centrally, no DP"] = {
            "test_accuracy": _accuracy(model, test_x, test_y), "wall_seconds": time.perf_counter() - started}
    print(f"{'variant':44} {'test accuracy':>13} {'seconds':>8}", file=sys.stderr)
    for name, row in results["variants"].items():
        print(f"{name:44} {row['test_accuracy']:13.3f} {row['wall_seconds']:8.1f}", file=sys.stderr)
    return results
