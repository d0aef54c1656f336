"""Flower's own SecAgg+ (legacy path), for ``fedguard bench secagg`` only.

Flower 1.41 runs SecAgg+ only on its legacy path: ``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` over a ``LegacyContext`` and a legacy strategy on the server, and
``secaggplus_mod`` around a ``NumPyClient`` on the clients. fedguard does not use it
(see issue #4: legacy-only, masks from a 32-bit-seeded RandomState, even share counts
crash clients); it is measured here so fedguard's SecAgg+ can be compared with it.

Both sides of the comparison run in the same simulation engine (Ray, same client
resources) with the same clients, the same 64 -> h -> h -> 10 MLP and one SGD step per
client per round (the client of ``bench_overhead``'s plain Flower run). The legacy run
is timed twice: with ``SecAggPlusWorkflow`` and with Flower's default fit workflow, so
Flower's SecAgg+ overhead is read against Flower's own plain legacy round as well as
against fedguard's plain round.

Neighbour counts: Flower's ``num_shares`` counts the client itself (each client keeps
one share of its own secrets and sends one to each of ``num_shares - 1`` neighbours),
and must be odd (even counts crash its clients). fedguard's ``neighbours`` = k maps to
``num_shares = k + 1``, rounded up to the next odd number when k is odd (k = 4, the
default, gives exactly 5 = 4 neighbours + self). ``reconstruction_threshold`` is
fedguard's ``threshold``. Quantization stays at Flower's defaults (2^22 levels, modulus
2^32, its maximum); the round time does not depend on the values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.clientapp.typing import ClientAppCallable
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from torch import nn

from fedguard.simulations.bench_overhead import BATCH_SIZE, LEARNING_RATE, _plain_model
from fedguard.simulations.simulate import launch

logger = logging.getLogger(__name__)

FLOWER_LOGGER = "flwr"
HIDDEN_KEY = "hidden"
ROUND_KEY = "server-round"


@dataclass(frozen=True)
class FlowerSecAggSettings:
    """Flower's SecAgg+ parameters equivalent to fedguard's (see the module docstring)."""

    num_shares: int
    reconstruction_threshold: int
    timeout: float

    @classmethod
    def from_fedguard(cls, neighbours: int, threshold: int, stage_timeout: float, clients: int) -> FlowerSecAggSettings:
        degree = min(neighbours, clients - 1)
        num_shares = degree + 1
        if num_shares < clients and num_shares % 2 == 0:
            num_shares += 1  # Flower needs an odd count unless every client shares with all others
        if not 2 <= threshold < num_shares:
            raise ValueError(f"threshold {threshold} must be in [2, num_shares={num_shares})")
        return cls(num_shares=num_shares, reconstruction_threshold=threshold, timeout=stage_timeout)


class OneStepClient(NumPyClient):
    """One SGD step on random digits-shaped data per round, like ``bench_overhead``'s plain client."""

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        model = _plain_model({"hidden": int(config[HIDDEN_KEY])})
        state = model.state_dict()
        model.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in zip(state, parameters)})
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        generator = torch.Generator().manual_seed(int(config[ROUND_KEY]))
        features = torch.randn(BATCH_SIZE, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (BATCH_SIZE,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
        return [value.detach().numpy() for value in model.state_dict().values()], BATCH_SIZE, {}


def _client_fn(context: Context):
    return OneStepClient().to_client()


def _quiet_flower_logs(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """secaggplus_mod logs every stage of every client at DEBUG, which Ray ships to the
    driver's console; fedguard's clients log nothing per stage, so silence it alike."""
    logging.getLogger(FLOWER_LOGGER).setLevel(logging.WARNING)
    return call_next(msg, context)


secaggplus_client = ClientApp(client_fn=_client_fn, mods=[_quiet_flower_logs, secaggplus_mod])
_plain_legacy_client = ClientApp(client_fn=_client_fn, mods=[_quiet_flower_logs])
legacy_server = ServerApp()
# Read by the ServerApp, which runs in this process (only the ClientApp runs in Ray actors).
_SETTINGS: dict[str, Any] = {}


@legacy_server.main()
def _legacy_main(grid: Grid, context: Context) -> None:
    settings = _SETTINGS
    clients, hidden = int(settings["clients"]), int(settings["hidden"])
    marks: list[float] = settings["marks"]

    def mark_round(server_round: int, _parameters: NDArrays, _config: dict[str, Scalar]) -> None:
        marks.append(time.perf_counter())

    model = _plain_model({"hidden": hidden})
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters([v.detach().numpy() for v in model.state_dict().values()]),
        on_fit_config_fn=lambda server_round: {HIDDEN_KEY: hidden, ROUND_KEY: server_round},
        evaluate_fn=mark_round,
    )
    secagg: FlowerSecAggSettings | None = settings["secagg"]
    fit_workflow = (
        SecAggPlusWorkflow(
            num_shares=secagg.num_shares,
            reconstruction_threshold=secagg.reconstruction_threshold,
            timeout=secagg.timeout,
        )
        if secagg is not None
        else None
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(settings["rounds"])), strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    # marks[0] is the centralized evaluation of the initial model, before round 1.
    settings["round_seconds"] = [float(seconds) for seconds in np.diff(marks)]


def rounds_done() -> int:
    """Rounds the running legacy run has completed (for bench secagg's CPU sampler)."""
    return max(len(_SETTINGS.get("marks", ())) - 1, 0)


def forget_last_run() -> None:
    """Before sampling a new run: the last run's marks would read as rounds already done."""
    _SETTINGS.clear()


def run_flower_legacy(clients: int, rounds: int, hidden: int, secagg: FlowerSecAggSettings | None) -> list[float]:
    """Per-round wall seconds of Flower's legacy FedAvg, with its SecAgg+ workflow or without."""
    _SETTINGS.clear()
    _SETTINGS.update({"clients": clients, "rounds": rounds, "hidden": hidden, "secagg": secagg, "marks": []})
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    client_app = secaggplus_client if secagg is not None else _plain_legacy_client
    launch(legacy_server, client_app, clients, backend, context)
    seconds = _SETTINGS.get("round_seconds", [])
    if len(seconds) != rounds:
        raise RuntimeError(f"Flower's legacy run completed {len(seconds)} of {rounds} rounds; see its log")
    return seconds

