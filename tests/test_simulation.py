"""End to end through the `fedguard` command: Flower's simulation engine (Ray), real data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedguard.clients.datasets import load_dataset
from fedguard.clients.training import evaluate_model
from fedguard.conf.run_config import config_from_yaml
from fedguard.server.checkpoint import load_global_model
from tests.cli_support import FEDGUARD, fedguard

pytestmark = pytest.mark.simulation

SUMMARY_KEYS = {"rounds", "final", "wall_seconds", "clients", "stop_reason", "checkpoint"}
ROUND_KEYS = {"round", "test_loss", "test_accuracy", "train_loss", "round_seconds", "clients_replied"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    fedguard("simulate", "dataset=digits", "model=mlp", "simulation=tiny", f"hydra.run.dir={run_dir}")
    return run_dir


def test_digits_five_clients_reach_accuracy(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    assert summary["clients"]["total"] == 5
    assert summary["stop_reason"] == "completed all rounds"
    assert summary["final"]["accuracy"] >= 0.85


def test_run_directory_files_and_keys(digits_run):
    cfg = config_from_yaml((digits_run / "config.yaml").read_text())
    assert cfg.dataset.name == "digits"
    summary = json.loads((digits_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert {"accuracy", "loss"} <= summary["final"].keys()
    lines = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, cfg.simulation.rounds + 1))
    for line in lines:
        assert ROUND_KEYS <= line.keys()
        assert line["clients_replied"] == 5 and line["clients_failed"] == 0
        assert 0.0 <= line["test_accuracy"] <= 1.0 and line["round_seconds"] > 0
    assert lines[-1]["test_accuracy"] == summary["final"]["accuracy"]
    assert lines[-1]["test_accuracy"] > lines[0]["test_accuracy"]  # it learned


def test_final_checkpoint_reproduces_the_reported_accuracy(digits_run):
    summary = json.loads((digits_run / "summary.json").read_text())
    model = load_global_model(summary["checkpoint"])
    cfg = config_from_yaml((digits_run / "config.yaml").read_text())
    bundle = load_dataset(cfg.dataset, cfg.seed)
    outcome = evaluate_model(model, bundle.test_x, bundle.test_y, 256, torch.device("cpu"))
    assert outcome.accuracy == pytest.approx(summary["final"]["accuracy"], abs=1e-9)


def test_adaptive_strategy_on_skewed_partitions(tmp_path):
    run_dir = tmp_path / "fedadam"
    fedguard(
        "simulate", "strategy=fedadam", "partition=dirichlet", "partition.alpha=0.5", "simulation.rounds=3",
        "evaluate.fraction_clients=1.0", f"hydra.run.dir={run_dir}",
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert all(line["federated_eval_accuracy"] is not None for line in lines)
    assert json.loads((run_dir / "summary.json").read_text())["strategy"] == "fedadam"


def test_multirun_writes_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    fedguard("simulate", "-m", "strategy=fedavg,fedprox", "simulation.rounds=2", f"hydra.sweep.dir={sweep}")
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["strategy"] for p in summaries} == {"fedavg", "fedprox"}


def test_bad_config_fails_before_training(tmp_path):
    proc = subprocess.run(
        [*FEDGUARD, "simulate", "partition=dirichlet", "partition.alpha=0", f"hydra.run.dir={tmp_path / 'bad'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "partition.alpha" in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_secure_aggregation_matches_plain_accuracy(digits_run, tmp_path):
    run_dir = tmp_path / "secagg"
    fedguard("simulate", "dataset=digits", "model=mlp", "simulation=tiny", "secure_agg=secaggplus",
             f"hydra.run.dir={run_dir}")
    plain = json.loads((digits_run / "summary.json").read_text())
    secure = json.loads((run_dir / "summary.json").read_text())
    assert secure["secure_aggregation"] == "secaggplus" and plain["secure_aggregation"] == "off"
    assert abs(secure["final"]["accuracy"] - plain["final"]["accuracy"]) <= 0.005
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(line["clients_replied"] == 5 and line["clients_failed"] == 0 for line in lines)


def test_secure_aggregation_with_sample_dp(tmp_path):
    run_dir = tmp_path / "secagg-dp"
    fedguard("simulate", "secure_agg=secaggplus", "privacy=sample_dp", "simulation.rounds=2", f"hydra.run.dir={run_dir}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["clients_replied"] for line in lines] == [5, 5]
    assert all(len(line["privacy"]) == 5 for line in lines)
    assert json.loads((run_dir / "summary.json").read_text())["privacy"]["max_epsilon"] > 0
