"""fedguard's ServerApp (Flower Message API).

The same app runs under ``fedguard simulate`` (Flower's simulation engine) and
``flwr run`` on real sites; either way the resolved config arrives in the run
config under ``fedguard-config`` and results go to ``run-dir``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from clients import protocol
from clients.datasets import load_dataset
from clients.models import build_model, count_parameters, resolve_device
from clients.training import evaluate_model
from conf.schema import clients_per_round, config_from_yaml, config_to_yaml, trains_privately
from server.checkpoint import CHECKPOINT_DIR, FINAL_NAME, LATEST_NAME, BackgroundCheckpointWriter, save_checkpoint
from server.federation import run_federation
from server.run_record import RoundRecord, RunRecorder
from server.secure_aggregation import SecureAggregationExchange
from server.strategies import build_strategy

logger = logging.getLogger(__name__)

app = ServerApp()


def _run_dir(context: Context) -> Path:
    configured = str(context.run_config.get(protocol.RUN_CONFIG_RUN_DIR, "") or "")
    return Path(configured) if configured else Path("outputs") / f"run-{context.run_id}"


def run_server(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Everything the ServerApp does, callable without a Flower Context (tests, benchmarks)."""
    random.seed(cfg.seed)  # Flower's node sampling draws from `random`
    torch.manual_seed(cfg.seed)
    config_yaml = config_to_yaml(cfg)
    bundle = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes, private=trains_privately(cfg))
    device = resolve_device(cfg.device)
    checkpoint_dir = run_dir / CHECKPOINT_DIR

    def central_evaluation(_server_round: int, arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        outcome = evaluate_model(model, bundle.test_x, bundle.test_y, cfg.evaluate.batch_size, device)
        return outcome.loss, outcome.accuracy

    recorder = RunRecorder(run_dir, config_yaml, cfg.simulation.rounds, show_progress=cfg.progress)
    checkpoints = BackgroundCheckpointWriter()

    def on_round_end(record: RoundRecord, arrays: ArrayRecord) -> None:
        recorder.record_round(record)
        checkpoints.submit(
            checkpoint_dir / LATEST_NAME,
            model_state=arrays.to_torch_state_dict(),
            server_round=record.round,
            config_yaml=config_yaml,
            input_shape=bundle.input_shape,
            num_classes=bundle.num_classes,
            metrics={"test_accuracy": record.test_accuracy, "test_loss": record.test_loss},
        )

    shared_config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_yaml})
    try:
        result = run_federation(
            grid,
            build_strategy(cfg),
            ArrayRecord(model.state_dict()),
            num_rounds=cfg.simulation.rounds,
            train_config=shared_config,
            evaluate_config=shared_config,
            central_evaluation=central_evaluation,
            on_round_end=on_round_end,
            round_timeout=cfg.simulation.round_timeout,
            train_exchange=SecureAggregationExchange(cfg) if cfg.secure_agg.mode == "secaggplus" else None,
        )
    finally:
        recorder.close()
        checkpoints.close()
    final_path = checkpoint_dir / FINAL_NAME
    save_checkpoint(
        final_path,
        model_state=result.arrays.to_torch_state_dict(),
        server_round=result.rounds_completed,
        config_yaml=config_yaml,
        input_shape=bundle.input_shape,
        num_classes=bundle.num_classes,
        metrics={},
    )
    return recorder.finish(
        {
            "stop_reason": result.stop_reason,
            "clients_no_longer_sampled": {str(node): why for node, why in result.excluded_clients.items()},
            "clients": {"total": cfg.simulation.num_clients, "per_round": clients_per_round(cfg)},
            "dataset": cfg.dataset.name,
            "model": cfg.model.name,
            "model_parameters": count_parameters(model),
            "strategy": cfg.strategy.name,
            "secure_aggregation": cfg.secure_agg.mode,
            "partition": cfg.partition.name,
            "seed": cfg.seed,
            "device": str(device),
            "checkpoint": str(final_path),
        }
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_yaml(str(context.run_config.get(protocol.RUN_CONFIG_FEDGUARD, "")))
    run_server(grid, cfg, _run_dir(context))
