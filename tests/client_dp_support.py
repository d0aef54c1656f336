"""Helpers the client-level DP tests share: a stand-in grid, hand-built updates and replies,
the strategy wrapper built as the ServerApp builds it, and a chi-square variance check."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig
from scipy import stats

from fedguard.clients.wire import protocol
from fedguard.conf.plans import adaptive_clip_rule, client_dp_plan, uses_adaptive_clipping
from fedguard.privacy.adaptive_clipping import AdaptiveClipState
from fedguard.privacy.client_dp_accounting import FederationAccountant
from fedguard.server.client_dp import ClientDpStrategy

# Two-sided significance of the variance tests: a correct mechanism fails them once in 10^6 runs.
ALPHA = 1e-6
SHAPES = {"w": (64, 50), "b": (50,)}
DIMENSION = sum(math.prod(s) for s in SHAPES.values())


def random_arrays(rng: np.random.Generator, scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord({k: Array((rng.standard_normal(s) * scale).astype(np.float32)) for k, s in SHAPES.items()})


def shifted(base: ArrayRecord, update: np.ndarray) -> ArrayRecord:
    """base + update (flat, in base's key order), as float32 arrays."""
    out, offset = {}, 0
    for key in base.keys():
        values = base[key].numpy()
        out[key] = Array((values.astype(np.float64) + update[offset : offset + values.size].reshape(values.shape)).astype(np.float32))
        offset += values.size
    return ArrayRecord(out)


def variance_in_chi2_range(samples: np.ndarray, std: float) -> tuple[float, float, float]:
    """(statistic, low, high): (n-1)s²/σ² must lie in the chi-square(n-1) central interval."""
    n = samples.size
    statistic = (n - 1) * float(np.var(samples, ddof=1)) / std**2
    return statistic, float(stats.chi2.ppf(ALPHA / 2, n - 1)), float(stats.chi2.ppf(1 - ALPHA / 2, n - 1))


class StandInGrid:
    """Only what cohort sampling reads from a grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def client_dp_wrapper(
    cfg: DictConfig, sigma: float, releases: list | None = None, *, secure: bool = False
) -> ClientDpStrategy:
    """The DP-FedAvg wrapper around a plain FedAvg, with the run's layers chosen from ``cfg``
    as ``wrap_for_client_dp`` chooses them, but a given σ (no calibration)."""
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                   min_available_nodes=1, weighted_by_key=protocol.NUM_EXAMPLES_KEY)
    accountant = FederationAccountant(cfg.privacy.client_sampling, float(cfg.privacy.delta), sigma)
    adaptive = AdaptiveClipState.start(adaptive_clip_rule(cfg)) if uses_adaptive_clipping(cfg) else None
    return ClientDpStrategy(
        inner, client_dp_plan(cfg), accountant, distributed_noise=cfg.privacy.noise == "distributed",
        secure_aggregation=secure, max_epsilon=cfg.privacy.client_max_epsilon, adaptive=adaptive,
        on_release=None if releases is None else releases.append,
    )


def train_reply(instruction: Message, arrays: ArrayRecord, indicator: float | None = None) -> Message:
    """A client's plain train reply: its arrays, weight 1, and (adaptive clipping) its clip indicator."""
    content = RecordDict({protocol.ARRAYS_KEY: arrays, protocol.METRICS_KEY: MetricRecord(
        {protocol.NUM_EXAMPLES_KEY: 1, protocol.TRAIN_LOSS_KEY: 1.0})})
    if indicator is not None:
        content[protocol.CLIP_INDICATOR_KEY] = ConfigRecord({protocol.CLIP_INDICATOR_FIELD: indicator})
    return Message(content, reply_to=instruction)
