"""fedguard's per-round cost against a plain Flower simulation doing the same client work.

Both sides: the same number of simulated clients, the same MLP (same parameter count),
and clients that take one SGD step per round, so the difference is framework overhead
(config carried in messages, run directory, per-round checkpoint, central evaluation).
The first round (actor start-up) is excluded; the figure is the median of the rest.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, count_parameters
from fedguard.conf import compose_config
from fedguard.simulations.simulate import launch, run_simulation

logger = logging.getLogger(__name__)

BATCH_SIZE = 32
LEARNING_RATE = 0.05

plain_client = ClientApp()
plain_server = ServerApp()
_PLAIN_SETTINGS: dict[str, Any] = {}


def _plain_model(context_config: dict[str, Any]) -> nn.Module:
    hidden = int(context_config["hidden"])
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


@plain_client.train()
def _plain_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    model = _plain_model(dict(config))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(int(config["server-round"]))
    features = torch.randn(BATCH_SIZE, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (BATCH_SIZE,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(features), labels).backward()
    optimizer.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": BATCH_SIZE})})
    return Message(reply, reply_to=msg)


@plain_server.main()
def _plain_main(grid: Grid, context: Context) -> None:
    settings = _PLAIN_SETTINGS
    round_ends: list[float] = []

    def mark_round(server_round: int, _arrays: ArrayRecord) -> None:
        round_ends.append(time.perf_counter())

    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=settings["clients"], min_available_nodes=settings["clients"])
    model = _plain_model(settings)

    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=settings["rounds"],
        train_config=ConfigRecord({"hidden": settings["hidden"]}),
        evaluate_fn=mark_round,
    )
    settings["round_seconds"] = list(np.diff(round_ends))


def run_plain_flower(clients: int, rounds: int, hidden: int) -> list[float]:
    _PLAIN_SETTINGS.clear()
    _PLAIN_SETTINGS.update({"clients": clients, "rounds": rounds, "hidden": hidden})
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    launch(plain_server, plain_client, clients, backend, context)
    return _PLAIN_SETTINGS["round_seconds"]


def run_fedguard(
    clients: int, rounds: int, hidden: int, run_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[list[float], int]:
    """fedguard's own apps, one SGD step per client per round; returns round seconds and model size."""
    cfg = compose_config(
        [
            "dataset=digits",
            "model=mlp",
            f"model.hidden_sizes=[{hidden},{hidden}]",
            f"simulation.num_clients={clients}",
            f"simulation.rounds={rounds}",
            "train.max_steps=1",
            f"train.batch_size={BATCH_SIZE}",
            "progress=false",
            *extra,
        ]
    )
    run_simulation(cfg, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()

    bundle = load_dataset(cfg.dataset, cfg.seed)
    params = count_parameters(build_model(cfg.model, bundle.input_shape, bundle.num_classes))
    return [json.loads(line)["round_seconds"] for line in lines], params


def run_overhead_benchmark(clients: int, rounds: int, hidden: int, repeats: int) -> dict[str, Any]:
    """Alternate plain and fedguard simulations ``repeats`` times each, so drift in the
    machine's speed hits both sides alike; medians are over all timed rounds."""
    if rounds < 3:
        raise SystemExit("--rounds must be at least 3 (the first round is warm-up)")
    plain_rounds: list[float] = []
    fedguard_rounds: list[float] = []
    params = 0
    for _ in range(repeats):
        # Index 0 is round 1 on both sides (it includes Ray actor start-up): left out.
        plain_rounds += run_plain_flower(clients, rounds, hidden)[1:]
        with tempfile.TemporaryDirectory() as tmp:
            ours, params = run_fedguard(clients, rounds, hidden, Path(tmp) / "run")
        fedguard_rounds += ours[1:]
    plain_params = count_parameters(_plain_model({"hidden": hidden}))
    if plain_params != params:
        raise RuntimeError(f"model sizes differ: plain {plain_params}, fedguard {params}")
    plain_median = statistics.median(plain_rounds)
    ours_median = statistics.median(fedguard_rounds)
    return {
        "clients": clients,
        "rounds": rounds,
        "repeats": repeats,
        "model_parameters": params,
        "plain_flower_round_seconds_median": plain_median,
        "fedguard_round_seconds_median": ours_median,
        "ratio_fedguard_over_plain": ours_median / plain_median,
        "plain_flower_round_seconds": plain_rounds,
        "fedguard_round_seconds": fedguard_rounds,
    }
