"""Build one of Flower's Message-API strategies from ``conf/strategy/<name>.yaml``.

The YAML's ``params`` go straight to the Flower class; sampling parameters come
from ``conf/simulation`` and the record keys from :mod:`clients.protocol`, so those
are reserved and rejected in ``params``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Iterator

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from omegaconf import DictConfig, OmegaConf

from fedguard.clients.wire import protocol
from fedguard.conf.plans import min_clients_per_round

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

# Set by fedguard from other config groups; not user-settable under strategy.params.
RESERVED_STRATEGY_PARAMS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
)


@contextmanager
def _quiet_flower_warnings() -> Iterator[None]:
    """Flower warns that federated evaluation is skipped when fraction_evaluate is 0;
    in fedguard that is the default (the server evaluates centrally), not a surprise."""
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        flower_logger.setLevel(level)


def build_strategy(cfg: DictConfig) -> Strategy:
    evaluate_fraction = float(cfg.evaluate.fraction_clients)
    params = OmegaConf.to_container(cfg.strategy.params, resolve=True)
    with _quiet_flower_warnings():
        return STRATEGY_CLASSES[cfg.strategy.name](
            fraction_train=float(cfg.simulation.fraction_train),
            fraction_evaluate=evaluate_fraction,
            min_train_nodes=min_clients_per_round(cfg),
            min_evaluate_nodes=1 if evaluate_fraction else 0,
            min_available_nodes=min_clients_per_round(cfg),
            weighted_by_key=protocol.NUM_EXAMPLES_KEY,
            arrayrecord_key=protocol.ARRAYS_KEY,
            configrecord_key=protocol.CONFIG_KEY,
            **params,
        )
