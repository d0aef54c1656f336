"""``fedguard bench own-files``: three sites' own CSV files (wine, different sizes and label
mixes) federated without DP and with sample-level DP, beside the same rows pooled centrally;
``--kind images``: three Fashion-MNIST image folders the same way. Both federations run as the
issue's walkthrough does: federated preprocessing (its statistics masked by SecAgg+), then
training under SecAgg+; the time the preprocessing stage took is reported per variant.

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

from fedguard.clients.local_data import encode_records, table_examples, table_records
from fedguard.clients.models import build_model
from fedguard.clients.training import evaluate_model, make_training_setup, run_epochs
from fedguard.conf import compose_config
from fedguard.conf.contract import contract_of, with_statistics
from fedguard.server.checkpoint import load_global_model
from fedguard.simulations.example_sites import CSV_NAME, wine_table, write_sites

TEST_FRACTION = 0.25
# Every federated variant: statistics computed across the sites, updates and statistics masked.
# Threshold 2 of 3 is what three sites' own SecAgg+ policy accepts (tests/test_deployment_own_files.py).
FEDERATION = ("dataset.preprocessing=federated", "secure_agg=secaggplus", "secure_agg.threshold=2")


def _federate(sites: list[Path], run_dir: Path, rounds: int, privacy: list[str],
              task: tuple[str, ...] = ("dataset=tabular", "model=mlp")) -> dict[str, Any]:
    args = [sys.executable, "-m", "fedguard.simulations.cli", "simulate", *task,
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
        _, test_y = table_examples(root / "test.csv", contract)
        sites = write_sites(root / "data", train)
        site_rows = [table_examples(site / CSV_NAME, contract) for site in sites]
        results["site_rows"] = [len(y) for _, y in site_rows]
        variants = {
            "federated, no DP, SecAgg+, federated preprocessing": [*FEDERATION],
            f"federated, sample-level DP eps {epsilon:g}, SecAgg+, federated preprocessing": [
                *FEDERATION, "privacy=sample_dp", f"privacy.target_epsilon={epsilon}"],
        }
        for name, privacy in variants.items():
            run = _federate(sites, root / f"run{len(results['variants'])}", rounds, privacy)
            # Scored under the run's own contract: scaled by the federated statistics it saved.
            model, run_contract = _checkpoint_model(run["summary"])
            run_test_x, _ = table_examples(root / "test.csv", run_contract)
            results["variants"][name] = _federated_row(run, _accuracy(model, run_test_x, test_y))
        # The same rows pooled: one model, the same epochs as a site trains over all rounds,
        # standardised by the pooled rows' own mean and std (clipped to the declared range, as
        # the sites' federated statistics are).
        records = [table_records(site / CSV_NAME, contract) for site in sites]
        pooled_numeric = np.concatenate([r.numeric for r in records])
        numeric_features = [f for f in contract.features if f.kind == "numeric"]
        clipped = np.clip(pooled_numeric, [-np.inf if f.low is None else f.low for f in numeric_features],
                          [np.inf if f.high is None else f.high for f in numeric_features])
        pooled_contract = with_statistics(contract, {"features": {
            f.name: {"mean": float(clipped[:, i].mean()), "std": float(clipped[:, i].std())}
            for i, f in enumerate(numeric_features)}})
        pooled_x = np.concatenate([encode_records(r, pooled_contract) for r in records])
        pooled_y = np.concatenate([r.labels for r in records])
        pooled_test_x, _ = table_examples(root / "test.csv", pooled_contract)
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model, contract.input_shape, contract.num_classes)
        started = time.perf_counter()
        run_epochs(make_training_setup(model, pooled_x, pooled_y, cfg.train, int(cfg.seed)),
                   rounds * int(cfg.train.local_epochs), torch.device("cpu"))
        results["variants"]["pooled centrally, no DP"] = {
            "test_accuracy": _accuracy(model, pooled_test_x, test_y), "wall_seconds": time.perf_counter() - started}
    _print_table(results)
    return results


def _federated_row(run: dict[str, Any], accuracy: float) -> dict[str, Any]:
    """One federated variant's figures: accuracy, wall time, the preprocessing stage's time and
    statistics, and each site's spent epsilon (from the run summary)."""
    clients = run["summary"].get("privacy", {}).get("clients", {})
    pre = run["summary"]["preprocessing"]
    return {
        "test_accuracy": accuracy,
        "wall_seconds": run["seconds"],
        "preprocessing_seconds": pre["seconds"],
        "statistics": pre["statistics"],
        "epsilon_per_site": {pid: entry["epsilon"] for pid, entry in clients.items()},
    }


def _print_table(results: dict[str, Any]) -> None:
    print(f"{'variant':72} {'test accuracy':>13} {'seconds':>8} {'preprocessing s':>15}", file=sys.stderr)
    for name, row in results["variants"].items():
        print(f"{name:72} {row['test_accuracy']:13.3f} {row['wall_seconds']:8.1f} "
              f"{row.get('preprocessing_seconds', float('nan')):15.1f}", file=sys.stderr)


def _checkpoint_model(summary: dict[str, Any]):
    """The run's final model and the contract it was trained under (its federated statistics)."""
    from fedguard.conf.run_config import config_from_yaml
    from fedguard.server.checkpoint import read_checkpoint

    path = Path(summary["checkpoint"])
    return load_global_model(path), contract_of(config_from_yaml(read_checkpoint(path)["config_yaml"]).dataset)


def run_own_images_benchmark(rounds: int, epsilon: float, sizes: tuple[int, ...] = (300, 200, 150),
                             test_images: int = 2000) -> dict[str, Any]:
    """Three image-folder sites (federated preprocessing, with and without DP) beside the same
    images pooled centrally (standardised by their own pooled mean/std); scored on the first
    ``test_images`` of Fashion-MNIST's test split, which no site holds."""
    from dataclasses import replace

    from fedguard.clients.datasets import _find_idx_file, read_idx
    from fedguard.clients.local_data import ImageRecords, image_records
    from fedguard.simulations.example_sites import FASHION_MNIST_DIR, write_image_sites

    cfg = compose_config(["dataset=images", "model=cnn"])
    declared = contract_of(cfg.dataset)
    pixels = read_idx(_find_idx_file(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte"))[:test_images, None]
    labels = read_idx(_find_idx_file(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte"))[:test_images].astype(np.int64)
    test = ImageRecords(pixels, labels)
    results: dict[str, Any] = {"rounds": rounds, "site_images": list(sizes), "test_images": test_images, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = write_image_sites(root / "data", sizes)
        variants = {
            "federated, no DP, SecAgg+, federated preprocessing": [*FEDERATION],
            f"federated, sample-level DP eps {epsilon:g}, SecAgg+, federated preprocessing": [
                *FEDERATION, "privacy=sample_dp", f"privacy.target_epsilon={epsilon}"],
        }
        for name, extra in variants.items():
            run = _federate(sites, root / f"run{len(results['variants'])}", rounds, extra, ("dataset=images", "model=cnn"))
            model, contract = _checkpoint_model(run["summary"])
            results["variants"][name] = _federated_row(run, _accuracy(model, encode_records(test, contract), labels))
        records = [image_records(site, declared) for site in sites]
        pooled_pixels = np.concatenate([r.pixels for r in records])
        pooled_y = np.concatenate([r.labels for r in records])
        scaled = pooled_pixels.astype(np.float64) / 255.0
        pooled_contract = replace(declared, mean=float(scaled.mean()), std=float(scaled.std()))
        torch.manual_seed(int(cfg.seed))
        model = build_model(cfg.model, declared.input_shape, declared.num_classes)
        started = time.perf_counter()
        pooled = ImageRecords(pooled_pixels, pooled_y)
        run_epochs(make_training_setup(model, encode_records(pooled, pooled_contract), pooled_y, cfg.train, int(cfg.seed)),
                   rounds * int(cfg.train.local_epochs), torch.device("cpu"))
        results["variants"]["pooled centrally, no DP"] = {
            "test_accuracy": _accuracy(model, encode_records(test, pooled_contract), labels),
            "wall_seconds": time.perf_counter() - started,
            "statistics": {"pixels": {"mean": pooled_contract.mean, "std": pooled_contract.std}}}
    _print_table(results)
    return results
