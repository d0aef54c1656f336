"""fedguard's ServerApp (Flower Message API).

The same app runs under ``fedguard simulate`` (Flower's simulation engine) and
``flwr run`` on real sites; either way the resolved config arrives in the run
config under ``fedguard-config`` and results go to ``run-dir``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid
from omegaconf import DictConfig, OmegaConf, open_dict

from fedguard.clients.wire import protocol
from fedguard.clients.datasets import expected_layout, load_dataset
from fedguard.clients.models import build_model, count_parameters, resolve_device
from fedguard.clients.training import evaluate_model
from fedguard.conf.plans import clients_per_round, trains_privately
from fedguard.conf.preprocessing_checks import federated_preprocessing
from fedguard.conf.run_config import config_from_yaml, config_to_yaml, resume_mismatches
from fedguard.conf.schema import CONTRACT_DATASETS, ConfigError
from fedguard.server.checkpoint import CHECKPOINT_DIR, FINAL_NAME, LATEST_NAME, BackgroundCheckpointWriter, save_checkpoint
from fedguard.server.federation import run_federation
from fedguard.server.launch import RUNS_DIR
from fedguard.server.layers import build_layers
from fedguard.server.preprocessing import STATISTICS_FILE, run_preprocessing
from fedguard.server.reply_wait import PromptGrid
from fedguard.clients.deployment.supernode_poll import SERVERAPP_PULL_MODULE, install_short_object_pull
from fedguard.server.run_record import RoundRecord, RunRecorder
from fedguard.server.server_test import describe as describe_server_test
from fedguard.server.server_test import read_server_test, server_test_examples
from fedguard.server.run_state import (
    ResumePoint,
    RunState,
    capture_run_state,
    new_lineage_id,
    read_resume_point,
    restore_strategy_state,
)
from fedguard.server.strategies import build_strategy

logger = logging.getLogger(__name__)

app = ServerApp()

# How often the server looks for newly connected sites while it waits for them.
CLIENT_POLL_SECONDS = 1.0


def _run_dir(context: Context) -> Path:
    configured = str(context.run_config.get(protocol.RUN_CONFIG_RUN_DIR, "") or "")
    return Path(configured) if configured else Path(RUNS_DIR) / f"run-{context.run_id}"


def load_resume_point(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """The checkpoint to continue from, if ``resume`` is set; ConfigError/CheckpointError if it cannot be."""
    if not cfg.resume:
        return None
    point = read_resume_point(Path(cfg.resume))
    if Path(cfg.resume).resolve() != run_dir.resolve():
        raise ConfigError(f"resume={cfg.resume} but results would go to {run_dir}; a resumed run continues in its own directory")
    # overwrite is about the directory, not the computation (and older runs lack the key).
    # dataset.statistics: written by the original run's federated preprocessing, reused as it was.
    mismatches = resume_mismatches(config_from_yaml(point.config_yaml), cfg)
    if differ := [key for key in mismatches if key != "overwrite" and not key.startswith("dataset.statistics")]:
        raise ConfigError(f"resume={cfg.resume} needs the original run's config; these keys differ: {', '.join(differ)}")
    logger.warning("resuming run %s after round %d", point.run_state.lineage, point.run_state.completed_round)
    return point


class ClientWaiter:
    """Waits for sites to connect: all of them before the first round, the minimum before later ones."""

    def __init__(self, expected: int, timeout: float, poll_seconds: float = CLIENT_POLL_SECONDS) -> None:
        self.expected, self.timeout, self.poll_seconds = expected, timeout, poll_seconds
        self.first = True

    def __call__(self, grid: Grid, min_clients: int) -> bool:
        wanted = self.expected if self.first else min_clients
        self.first = False
        deadline = time.monotonic() + self.timeout
        while (connected := len(list(grid.get_node_ids()))) < wanted and time.monotonic() < deadline:
            logger.info("waiting for clients: %d of %d connected", connected, wanted)
            time.sleep(self.poll_seconds)
        if connected < wanted:
            logger.warning("only %d of %d clients connected after %.0f s", connected, wanted, self.timeout)
        return connected >= min_clients


def run_server(grid: Grid, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Everything the ServerApp does, callable without a Flower Context (tests, benchmarks)."""
    # Every wait for replies (preprocessing, training, evaluation) at the config's interval, not
    # the grid's own fixed sleep (3 s in Flower's deployment grid; server/reply_wait.py).
    if isinstance(grid, HttpGrid):  # a deployed run: replies' objects retried after 50 ms, not 1 s (supernode_poll.py)
        install_short_object_pull(SERVERAPP_PULL_MODULE)
    grid = PromptGrid(grid, float(cfg.simulation.reply_poll_interval))
    resume = load_resume_point(cfg, run_dir)
    run_state = resume.run_state if resume else RunState(lineage=new_lineage_id())
    random.seed(cfg.seed)  # Flower's node sampling draws from `random`
    if run_state.sampler_rng is not None:
        random.setstate(run_state.sampler_rng)
    torch.manual_seed(cfg.seed)
    config_yaml = config_to_yaml(cfg)
    # Sites' own files (a data contract): the server holds no test set unless it names its own
    # file (dataset.server_test, checked here, before any site spends); otherwise quality comes
    # from federated evaluation on the sites' held-out splits, where the privacy mode allows it.
    bundle = None if cfg.dataset.name in CONTRACT_DATASETS else load_dataset(cfg.dataset, cfg.seed)
    server_test = read_server_test(cfg.dataset) if bundle is None else None
    input_shape, num_classes = expected_layout(cfg.dataset)
    model = build_model(cfg.model, input_shape, num_classes, private=trains_privately(cfg))
    if resume:
        model.load_state_dict(resume.model_state)
    device = resolve_device(cfg.device)
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    strategy = build_strategy(cfg)
    restore_strategy_state(strategy, run_state.strategy)
    resumed_after = resume.run_state.completed_round if resume else None
    layers = build_layers(cfg, strategy, run_state, run_dir, config_yaml, resumed_after)

    def central_evaluation(_server_round: int, arrays: ArrayRecord) -> tuple[float, float]:
        if bundle is None and server_test is None:
            return float("nan"), float("nan")
        test_x, test_y = (bundle.test_x, bundle.test_y) if bundle is not None else server_test_examples(
            server_test, cfg.dataset)
        model.load_state_dict(arrays.to_torch_state_dict())
        outcome = evaluate_model(model, test_x, test_y, cfg.evaluate.batch_size, device)
        return outcome.loss, outcome.accuracy

    recorder = RunRecorder(run_dir, config_yaml, cfg.simulation.rounds, show_progress=cfg.progress)
    if resume:
        recorder.resume_after(run_state.completed_round)
    checkpoints = BackgroundCheckpointWriter()

    def on_round_end(record: RoundRecord, arrays: ArrayRecord, excluded: dict[int, str]) -> None:
        record = layers.annotate(record)
        recorder.record_round(record)
        state = capture_run_state(run_state.lineage, record.round, strategy, excluded, layers.accounting_state())
        checkpoints.submit(
            checkpoint_dir / LATEST_NAME, model_state=arrays.to_torch_state_dict(), server_round=record.round,
            config_yaml=config_yaml, input_shape=input_shape, num_classes=num_classes,
            metrics={"test_accuracy": record.test_accuracy, "test_loss": record.test_loss}, run_state=state.to_payload(),
        )

    waiter = ClientWaiter(int(cfg.simulation.num_clients), float(cfg.deployment.wait_for_clients))
    preprocessing: dict[str, Any] = {}
    try:
        if federated_preprocessing(cfg):
            config_yaml, preprocessing = _federated_statistics(grid, cfg, config_yaml, run_state, resume, layers, waiter,
                                                               run_dir)
    except BaseException:
        recorder.close()
        checkpoints.close()
        layers.close()
        raise
    shared_config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_yaml, protocol.LINEAGE_KEY: run_state.lineage})
    try:
        result = run_federation(
            grid,
            layers.strategy,
            ArrayRecord(model.state_dict()),
            num_rounds=cfg.simulation.rounds,
            train_config=shared_config,
            evaluate_config=shared_config,
            central_evaluation=central_evaluation,
            on_round_end=on_round_end,
            round_timeout=cfg.simulation.round_timeout,
            train_exchange=layers.train_exchange,
            start_round=run_state.completed_round + 1,
            excluded_clients=run_state.excluded_clients,
            wait_for_clients=waiter,
            record_spend=layers.record_spend,
            stop_before_round=layers.stop_before_round,
        )
        layers.finish(result.rounds_completed, result.stop_reason)
    finally:
        recorder.close()
        checkpoints.close()
        layers.close()
    final_path = checkpoint_dir / FINAL_NAME
    save_checkpoint(
        final_path, model_state=result.arrays.to_torch_state_dict(), server_round=result.rounds_completed,
        config_yaml=config_yaml, input_shape=input_shape, num_classes=num_classes, metrics={},
    )
    return recorder.finish(
        {
            "stop_reason": result.stop_reason,
            "lineage": run_state.lineage,
            "resumed_after_round": resumed_after,
            "clients_no_longer_sampled": {str(node): why for node, why in result.excluded_clients.items()},
            "client_failures": {str(node): why for node, why in result.client_failures.items()},
            "central_evaluation": describe_server_test(cfg.dataset) if bundle is None
            else f"the test split of {cfg.dataset.name}",
            **_run_facts(cfg),
            "model_parameters": count_parameters(model),
            "device": str(device),
            "checkpoint": str(final_path),
            **layers.summary(),
            **({"preprocessing": preprocessing} if preprocessing else {}),
        }
    )


def _federated_statistics(grid: Grid, cfg: DictConfig, config_yaml: str, run_state: RunState,
                          resume: ResumePoint | None, layers, waiter: ClientWaiter, run_dir: Path) -> tuple[str, dict]:
    """Run federated preprocessing (or, on resume, reuse the original run's statistics) and
    return the run config every site trains with from now on, carrying them."""
    if resume is not None:
        statistics = config_from_yaml(resume.config_yaml).dataset.statistics
        summary = {"mode": "federated", "reused_from": "the original run (resume)"}
    else:
        waiter(grid, int(cfg.simulation.num_clients))
        outcome = run_preprocessing(grid, cfg, config_yaml, run_state.lineage, float(cfg.simulation.round_timeout),
                                    layers.record_spend if layers.ledger else None)
        statistics, summary = outcome.statistics, outcome.summary()
        (run_dir / STATISTICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    with open_dict(cfg):
        cfg.dataset.statistics = OmegaConf.to_container(statistics) if isinstance(statistics, DictConfig) else statistics
    return config_to_yaml(cfg), summary


def _run_facts(cfg: DictConfig) -> dict[str, Any]:
    """summary.json's description of what ran, from the config."""
    return {
        "clients": {"total": cfg.simulation.num_clients, "per_round": clients_per_round(cfg)},
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "secure_aggregation": cfg.secure_agg.mode,
        "privacy_mode": cfg.privacy.mode,
        "partition": cfg.partition.name,
        "seed": cfg.seed,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_yaml(str(context.run_config.get(protocol.RUN_CONFIG_FEDGUARD, "")))
    run_server(grid, cfg, _run_dir(context))
