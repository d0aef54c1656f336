"""``fedguard bench accuracy``: the 10-IID-client, 20-round Fashion-MNIST federation at several
sample-level epsilons and without DP, through ``fedguard simulate`` (what users get).

Hyperparameters are never chosen on the test split. ``--tune`` runs a handful of candidates at
the tuning epsilon and scores each by the federated evaluation on the sites' own validation
splits (``dataset.validation_fraction`` of each site's rows, never trained on); the test
accuracy of those runs is not read. That validation score leaves the sites outside any epsilon
(``privacy.release_unaccounted_metrics=true``, printed by the run): tuning on private data has
a privacy cost (Papernot & Steinke 2022) that this benchmark states rather than accounts.
The final runs then use the chosen candidate, send nothing unaccounted, and report the
central test accuracy of the last round with every site's epsilon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Candidates around Tramèr & Boneh's ScatterNet settings (large batches, small clip norm, a
# large step), scaled to a site's ~5,400 training rows. Keys are config overrides. Three, because
# each is a full 20-round federation on a shared 2-core machine.
CANDIDATES: dict[str, dict[str, Any]] = {
    "b1024-lr4-c0.1-e1": {"train.batch_size": 1024, "train.learning_rate": 4.0, "privacy.max_grad_norm": 0.1,
                          "train.local_epochs": 1},
    "b1024-lr2-c0.1-e1": {"train.batch_size": 1024, "train.learning_rate": 2.0, "privacy.max_grad_norm": 0.1,
                          "train.local_epochs": 1},
    "b512-lr2-c0.1-e1": {"train.batch_size": 512, "train.learning_rate": 2.0, "privacy.max_grad_norm": 0.1,
                         "train.local_epochs": 1},
    # Three local epochs: 3x the clipped steps per round at the same epsilon (sigma rises to pay).
    "b1024-lr4-c0.1-e3": {"train.batch_size": 1024, "train.learning_rate": 4.0, "privacy.max_grad_norm": 0.1,
                          "train.local_epochs": 3},
    # The same with server momentum (FedAvgM): post-processing of the mean update, free in privacy.
    "b1024-lr4-c0.1-e3-m0.5": {"train.batch_size": 1024, "train.learning_rate": 4.0, "privacy.max_grad_norm": 0.1,
                               "train.local_epochs": 3, "strategy": "fedavgm",
                               "strategy.params.server_momentum": 0.5},
}
BASE = ["dataset=fashion_mnist", "simulation=small", "progress=false"]


def _simulate(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``fedguard simulate`` in a fresh process; its summary, last metrics line, wall time, load."""
    args = [sys.executable, "-m", "fedguard.simulations.cli", "simulate", *BASE, *overrides,
            f"hydra.run.dir={run_dir}"]
    load_before, started = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    seconds, load_after = time.perf_counter() - started, os.getloadavg()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return {**read_run(run_dir), "wall_seconds": round(seconds, 1),
            "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)]}


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run directory's summary and last metrics line (its wall time from the summary)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"summary": summary, "last": last, "wall_seconds": round(summary["wall_seconds"], 1),
            "load_average_1min": None}


def _overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in settings.items()]


def _privacy(summary: dict[str, Any]) -> dict[str, Any]:
    clients = summary.get("privacy", {}).get("clients", {}) or {}
    if not clients:
        return {}
    return {"max_client_epsilon": max(c["epsilon"] for c in clients.values()),
            "noise_multiplier": sorted({c["noise_multiplier"] for c in clients.values()}),
            "steps_per_client": sorted({c["steps_total"] for c in clients.values()}),
            "sample_rate": sorted({c["sample_rate"] for c in clients.values()})}


def tuning_overrides(settings: dict[str, Any], epsilon: float, rounds: int, preset: str) -> list[str]:
    return [f"+preset={preset}", "privacy=sample_dp", f"privacy.target_epsilon={epsilon}", f"simulation.rounds={rounds}",
            "evaluate.fraction_clients=1.0", "privacy.release_unaccounted_metrics=true", *_overrides(settings)]


def final_overrides(epsilon: float | None, rounds: int, preset: str, settings: dict[str, Any],
                    nonprivate_lr: float) -> list[str]:
    if epsilon is None:  # same model and schedule; no clipping, so the step size is the non-private one
        return [f"simulation.rounds={rounds}", f"+preset={preset}", "privacy=none",
                *_overrides({k: v for k, v in settings.items() if not k.startswith("privacy.")}),
                f"train.learning_rate={nonprivate_lr}"]
    return [f"simulation.rounds={rounds}", f"+preset={preset}", "privacy=sample_dp",
            f"privacy.target_epsilon={epsilon}", *_overrides(settings)]


def _tuning_score(name: str, run: dict[str, Any]) -> dict[str, Any]:
    return {"settings": CANDIDATES.get(name), "validation_accuracy": run["last"]["federated_eval_accuracy"],
            "rounds": run["summary"]["rounds"], "wall_seconds": run["wall_seconds"],
            "load_average_1min": run["load_average_1min"], **_privacy(run["summary"])}


def _final_row(epsilon: float | None, run: dict[str, Any]) -> dict[str, Any]:
    # A site whose round failed (e.g. a worker killed for memory on a busy machine) is named, not hidden.
    return {"target_epsilon": epsilon, "test_accuracy": run["last"]["test_accuracy"],
            "rounds": run["summary"]["rounds"], "wall_seconds": run["wall_seconds"],
            "clients_failed_last_round": run["last"].get("clients_failed", 0),
            "client_failures": [f[:300] for f in sorted(set(run["summary"].get("client_failures", {}).values()))[:3]],
            "load_average_1min": run["load_average_1min"], **_privacy(run["summary"])}


def _chosen(scores: dict[str, Any], epsilon: float) -> dict[str, Any]:
    best = max(scores, key=lambda name: scores[name]["validation_accuracy"])
    return {"epsilon": epsilon, "scored_on": "federated evaluation on the sites' validation splits "
            "(10% of each site's rows, not trained on), last round (stopped runs: the last round all reached); "
            "test accuracy not read",
            "candidates": scores, "chosen": best}


def tune(root: Path, epsilon: float, rounds: int, preset: str) -> dict[str, Any]:
    """Score every candidate by its last round's federated validation accuracy; return all and the best."""
    scores: dict[str, Any] = {}
    for name, settings in CANDIDATES.items():
        run = _simulate(root / f"tune-{name}", tuning_overrides(settings, epsilon, rounds, preset))
        scores[name] = _tuning_score(name, run)
        print(f"tuning {name}: validation accuracy {scores[name]['validation_accuracy']:.4f}", file=sys.stderr)
    return _chosen(scores, epsilon)


def final_runs(root: Path, epsilons: list[float], rounds: int, preset: str, settings: dict[str, Any],
               nonprivate_lr: float) -> list[dict[str, Any]]:
    rows = []
    for epsilon in [*epsilons, None]:
        extra = final_overrides(epsilon, rounds, preset, settings, nonprivate_lr)
        row = {**_final_row(epsilon, _simulate(root / f"eps-{epsilon}", extra)), "overrides": extra}
        print(f"epsilon {epsilon}: test accuracy {row['test_accuracy']:.4f}", file=sys.stderr)
        rows.append(row)
    return rows


def run_accuracy_benchmark(epsilons: list[float], rounds: int, preset: str, do_tune: bool, tune_epsilon: float,
                           nonprivate_lr: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedguard-accuracy-") as tmp:
        root = Path(tmp)
        tuning = tune(root, tune_epsilon, rounds, preset) if do_tune else None
        settings = CANDIDATES[tuning["chosen"]] if tuning else {}
        rows = final_runs(root, epsilons, rounds, preset, settings, nonprivate_lr)
    return {"setup": "Fashion-MNIST, 10 IID clients, all sampled every round, delta 1e-5, RDP",
            "preset": preset, "rounds": rounds, "tuning": tuning, "runs": rows}


def accuracy_table(result: dict[str, Any]) -> str:
    lines = ["| target epsilon | test accuracy | max client epsilon | sigma | wall s | load (1 min) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["runs"]:
        eps = "non-private" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
        if row.get("incomplete"):
            eps += f" (stopped after round {row['rounds']})"
        max_eps = f"{row['max_client_epsilon']:.3f}" if "max_client_epsilon" in row else "-"
        sigma = ", ".join(f"{s:.3f}" for s in row.get("noise_multiplier", [])) or "-"
        lines.append(f"| {eps} | {row['test_accuracy']:.4f} | {max_eps} | {sigma} | {row['wall_seconds']:.0f} | "
                     f"{'-'.join(map(str, row['load_average_1min'] or ['see JSON']))} |")
    return "\n".join(lines)


def _partial_row(epsilon: float | None, run_dir: Path) -> dict[str, Any]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    clients = last.get("privacy") or []
    row = {"target_epsilon": epsilon, "incomplete": True, "rounds": last["round"],
           "test_accuracy": last["test_accuracy"], "wall_seconds": round(sum(m["round_seconds"] for m in lines), 1),
           "load_average_1min": None}
    if clients:
        row.update({"max_client_epsilon": max(c["epsilon"] for c in clients),
                    "noise_multiplier": sorted({c["noise_multiplier"] for c in clients}),
                    "steps_per_client": sorted({c["steps_total"] for c in clients}),
                    "sample_rate": sorted({c["sample_rate"] for c in clients})})
    return row


def _validation_curve(run_dir: Path) -> list[float]:
    return [json.loads(line)["federated_eval_accuracy"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stopped_tuning(dirs: list[Path]) -> dict[str, Any]:
    """Tuning runs stopped before their last round (to free a busy machine for the final runs):
    each is scored at the last round *every* such candidate reached, so none gains from running
    longer; the whole validation curve is kept. Test accuracy is not read."""
    curves = {d.name.removeprefix("tune-"): _validation_curve(d) for d in dirs}
    common = min(len(curve) for curve in curves.values())
    return {name: {"settings": CANDIDATES.get(name), "incomplete": True, "rounds": len(curve),
                   "scored_at_round": common, "validation_accuracy": curve[common - 1],
                   "validation_accuracy_each_round": curve} for name, curve in curves.items()}


def collect_runs(root: Path, tune_epsilon: float) -> dict[str, Any]:
    """The same figures from run directories made by the same commands run by hand (``tune-<candidate>``
    and ``eps-<epsilon>`` / ``eps-None`` under ``root``), e.g. two at a time on a busy machine."""
    tuning_dirs = [d for d in sorted(root.glob("tune-*")) if d.is_dir() and (d / "metrics.jsonl").is_file()]
    finished = [d for d in tuning_dirs if (d / "summary.json").is_file()]
    if len(finished) < len(tuning_dirs):  # any stopped: compare all at the round they all reached
        scores = _stopped_tuning(tuning_dirs)
    else:
        scores = {d.name.removeprefix("tune-"): _tuning_score(d.name.removeprefix("tune-"), read_run(d))
                  for d in finished}
    rows = []
    for d in sorted(p for p in root.glob("eps-*") if p.is_dir()):
        label = d.name.removeprefix("eps-")
        epsilon = None if label == "None" else float(label)
        config = (d / "config.yaml").read_text()
        if (d / "summary.json").is_file():
            rows.append({**_final_row(epsilon, read_run(d)), "config": config})
        elif (d / "metrics.jsonl").is_file():  # stopped before its last round: say so, with what it reached
            rows.append({**_partial_row(epsilon, d), "config": config})
    rows.sort(key=lambda row: float("inf") if row["target_epsilon"] is None else row["target_epsilon"])
    return {"setup": "Fashion-MNIST, 10 IID clients, all sampled every round, delta 1e-5, RDP",
            "tuning": _chosen(scores, tune_epsilon) if scores else None, "runs": rows}


def tune_on_one_site(epsilon: float, rounds: int, preset: str) -> dict[str, Any]:
    """The cheap tuning: site 0 of the same federation (same partition and split) trains alone with
    DP-SGD for the steps it takes over all rounds (rounds x local epochs, one planned round, so the
    same q, steps and sigma as in the federation), and each candidate is scored on the validation
    rows of all ten sites (held out in the federation, never trained on). No averaging across sites,
    so it ranks per-site DP-SGD settings, not the federation's accuracy. The test split is not loaded."""
    import numpy as np
    import torch
    from flwr.app import RecordDict

    from fedguard.clients.datasets import load_dataset
    from fedguard.clients.models import build_model
    from fedguard.clients.partition import partition_of, split_train_validation
    from fedguard.clients.private_training import build_trainer
    from fedguard.clients.training import evaluate_model, make_training_setup
    from fedguard.conf import compose_config

    scores: dict[str, Any] = {}
    for name, settings in CANDIDATES.items():
        epochs = int(settings["train.local_epochs"]) * rounds
        cfg = compose_config([*BASE, f"+preset={preset}", "privacy=sample_dp", f"privacy.target_epsilon={epsilon}",
                              "simulation.num_clients=1", "simulation.rounds=1", "simulation.min_clients_per_round=1",
                              *_overrides({**settings, "train.local_epochs": epochs})])
        bundle = load_dataset(cfg.dataset, cfg.seed)
        splits = [split_train_validation(partition_of(bundle.train_y, cfg.partition, 10, cfg.seed, pid),
                                         cfg.dataset.validation_fraction, cfg.seed + pid) for pid in range(10)]
        train = splits[0].train_indices
        validation = np.concatenate([s.validation_indices for s in splits])
        model = build_model(cfg.model, bundle.input_shape, bundle.num_classes, private=True)
        setup = make_training_setup(model, bundle.train_x[train], bundle.train_y[train], cfg.train, None)
        started = time.perf_counter()
        result = build_trainer(cfg, None).train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
        accuracy = evaluate_model(model, bundle.train_x[validation], bundle.train_y[validation], 1024,
                                  torch.device("cpu")).accuracy
        scores[name] = {"settings": settings, "validation_accuracy": accuracy, "training_rows": len(train),
                        "validation_rows": len(validation), "epsilon": result.privacy["epsilon"],
                        "seconds": round(time.perf_counter() - started, 1), "load_average_1min": os.getloadavg()[0]}
        print(f"one-site tuning {name}: validation accuracy {accuracy:.4f}", file=sys.stderr)
    return {**_chosen(scores, epsilon), "how": tune_on_one_site.__doc__}
