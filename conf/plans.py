"""The adapter at the config's edge: a validated config in, the plain objects the layers take out.

privacy/ works on frozen dataclasses of plain numbers (a ``ClientDpPlan``, an
``AdaptiveClipRule``), never on the Hydra config; this module is the one place that reads
the config's keys to build them, and answers the derived questions every layer asks
(does this run train privately? how many clients does a round take?).
"""

from __future__ import annotations

import math

from fedguard.conf.schema import CLIENT_DP_MODES, SAMPLE_DP_MODES
from fedguard.privacy.adaptive_clipping import AdaptiveClipRule
from fedguard.privacy.client_dp_accounting import ClientDpPlan, CohortPlan
from fedguard.privacy.client_dp_noise import clamp_headroom
from fedguard.privacy.secagg.risk import listed_risk
from omegaconf import DictConfig


def min_clients_per_round(cfg: DictConfig) -> int:
    """The fewest clients a round may sample: never below what secure aggregation can unmask."""
    floor = cfg.simulation.min_clients_per_round
    if cfg.secure_agg.mode != "off":
        floor = max(floor, cfg.secure_agg.threshold)
    return int(floor)


def trains_privately(cfg: DictConfig) -> bool:
    """Whether clients run DP-SGD, so the model must be Opacus-compatible on both sides."""
    return cfg.privacy.mode in SAMPLE_DP_MODES


def client_level_dp(cfg: DictConfig) -> bool:
    """Whether updates are clipped and noised for client-level DP (DP-FedAvg)."""
    return cfg.privacy.mode in CLIENT_DP_MODES


def uses_adaptive_clipping(cfg: DictConfig) -> bool:
    """Whether client-level DP adapts its clip norm each round (Andrew et al. 2021)."""
    return client_level_dp(cfg) and cfg.privacy.client_clipping == "adaptive"


def clients_per_round(cfg: DictConfig) -> int:
    """How many clients the server samples each round while all are available."""
    return max(min_clients_per_round(cfg), int(cfg.simulation.num_clients * cfg.simulation.fraction_train))




def cohort_plan(cfg: DictConfig) -> CohortPlan:
    """How the server draws client-level DP's cohorts, as its accountant must know it."""
    return CohortPlan(
        sampling=str(cfg.privacy.client_sampling),
        population=int(cfg.simulation.num_clients),
        rate=float(cfg.simulation.fraction_train),
        cohort_size=clients_per_round(cfg),
    )


def client_dp_plan(cfg: DictConfig) -> ClientDpPlan:
    """Client-level DP's noise and accounting parameters, as plain numbers."""
    dp = cfg.privacy
    return ClientDpPlan(
        cohort=cohort_plan(cfg),
        rounds=int(cfg.simulation.rounds),
        delta=float(dp.delta),
        clip_norm=float(dp.client_clip_norm),
        noise_multiplier=None if dp.client_noise_multiplier is None else float(dp.client_noise_multiplier),
        target_epsilon=None if dp.client_target_epsilon is None else float(dp.client_target_epsilon),
        adaptive=uses_adaptive_clipping(cfg),
        count_stddev=(
            None if dp.adaptive_clipping.clipped_count_stddev is None else float(dp.adaptive_clipping.clipped_count_stddev)
        ),
        # Distributed noise: a sum SecAgg+ unmasks holds at least `threshold` clients' shares.
        min_survivors=int(cfg.secure_agg.threshold) if dp.noise == "distributed" else None,
    )


def adaptive_clip_rule(cfg: DictConfig) -> AdaptiveClipRule:
    """Adaptive clipping's rule; under distributed noise capped where SecAgg+'s clamp would cut the noise."""
    ac = cfg.privacy.adaptive_clipping
    ceiling = math.inf
    if cfg.privacy.noise == "distributed":
        ceiling = float(cfg.secure_agg.clip_range) / clamp_headroom(client_dp_plan(cfg))
    return AdaptiveClipRule(
        initial=float(cfg.privacy.client_clip_norm),
        target_quantile=float(ac.target_quantile),
        learning_rate=float(ac.learning_rate),
        ceiling=ceiling,
    )


def secagg_risk_line(cfg: DictConfig) -> str | None:
    """The planned run's SecAgg+ exposure figures (privacy/secagg/risk.py), or None without SecAgg+."""
    if cfg.secure_agg.mode == "off":
        return None
    sa = cfg.secure_agg
    risk = listed_risk(int(sa.neighbours), int(sa.threshold), clients_per_round(cfg), int(cfg.simulation.num_clients),
                       int(cfg.simulation.rounds), float(sa.assumed_collusion), float(sa.assumed_dropout))
    return (f"{risk.line()} (assuming {sa.assumed_collusion:.0%} of sites collude with the server, which lists all "
            f"of them in every cohort, and {sa.assumed_dropout:.0%} drop out; refused above {sa.max_run_exposure:g} "
            f"over the run)")
