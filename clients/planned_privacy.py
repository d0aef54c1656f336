"""What sample-level DP will spend, known before round 1: per site, from its data's size.

A site calibrates (or takes) its noise multiplier when it first trains, from the batches
one epoch of its data makes; the same arithmetic, run on the driver for a simulation's
virtual sites, lets ``fedguard simulate`` print the planned epsilon before the engine
starts. On real sites only the site knows its size, so only it can print its figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from fedguard.conf.plans import clients_per_round
from fedguard.conf.preprocessing_checks import federated_preprocessing
from fedguard.privacy.accounting import calibrate_noise_multiplier, compute_epsilon


def expected_participation(cfg: DictConfig) -> int:
    """Rounds a client is expected to join under uniform sampling (all of them at fraction 1)."""
    return max(1, math.ceil(cfg.simulation.rounds * clients_per_round(cfg) / cfg.simulation.num_clients))


def round_steps(local_epochs: int, max_steps: int | None, batches_per_epoch: int) -> int:
    """Optimizer steps of one round: ``local_epochs`` passes, capped at ``max_steps``."""
    steps = local_epochs * batches_per_epoch
    return steps if max_steps is None else min(steps, max_steps)


def planned_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    """DP-SGD steps of one round under this config."""
    max_steps = None if cfg.train.max_steps is None else int(cfg.train.max_steps)
    return round_steps(int(cfg.train.local_epochs), max_steps, batches_per_epoch)


@dataclass(frozen=True)
class SitePlan:
    """A site's planned sample-level DP: sigma, Poisson rate, steps over its expected rounds, epsilon."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float


def plan_site(cfg: DictConfig, batches_per_epoch: int) -> SitePlan:
    """The noise a site with ``batches_per_epoch`` batches uses and the epsilon its planned
    participation spends (calibrated to ``privacy.target_epsilon``, or at the fixed sigma).

    With federated preprocessing the statistics release spends ``dataset.preprocessing_epsilon``
    first, so training is calibrated to what is left; the budget check before every round
    composes both exactly (RDP), which is at most their sum."""
    dp = cfg.privacy
    sample_rate = 1.0 / batches_per_epoch  # Opacus's own definition for its DPDataLoader
    steps = expected_participation(cfg) * planned_steps(cfg, batches_per_epoch)
    if dp.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            target_epsilon=float(dp.target_epsilon) - preprocessing_epsilon(cfg), delta=float(dp.delta), sample_rate=sample_rate,
            steps=steps, accountant=str(dp.accountant),
        )
    else:
        sigma = float(dp.noise_multiplier)
    epsilon = compute_epsilon([(sigma, sample_rate, steps)], float(dp.delta), str(dp.accountant)).epsilon
    return SitePlan(sigma, sample_rate, steps, epsilon)


def preprocessing_epsilon(cfg: DictConfig) -> float:
    """What the federated statistics release takes from a site's sample-level budget (0 if none)."""
    if not federated_preprocessing(cfg) or cfg.privacy.mode != "sample_dp":
        return 0.0
    return float(cfg.dataset.preprocessing_epsilon)


def batches_per_epoch(train_examples: int, batch_size: int) -> int:
    """Batches one epoch of ``train_examples`` makes (the DataLoader's length)."""
    return max(1, math.ceil(train_examples / batch_size))
