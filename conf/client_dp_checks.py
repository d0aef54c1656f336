"""Validation of the client-level DP (DP-FedAvg) keys of ``privacy``.

Kept apart from :mod:`fedguard.conf.validation` (which calls it); every rule rejects a combination whose privacy claim could not hold, naming
the key and what is allowed.
"""

from __future__ import annotations

from fedguard.conf.checks import check_noise_setting, choice, in_range
from fedguard.conf.plans import client_dp_plan
from fedguard.conf.schema import CLIENT_DP_MODES, ConfigError
from fedguard.privacy.accounting import PrivacyConfigError
from fedguard.privacy.client_dp_accounting import CLIP_COUNT_SENSITIVITY, planned_noise_multiplier
from fedguard.privacy.client_dp_noise import DISTRIBUTED_TAIL_STDS, clamp_headroom, count_noise_std, count_share_std
from omegaconf import DictConfig

CLIENT_SAMPLING_METHODS = ("poisson", "fixed")
CLIENT_CLIPPING_MODES = ("fixed", "adaptive")
NOISE_PLACEMENTS = ("central", "distributed")
# Client-level DP bounds the *sum* of clipped updates; these strategies average (then
# optionally apply a server optimiser to) that sum, so the released model is post-processing.
SUM_BASED_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
# Our accountant for client-level DP; PRV is not wired for the federation accountant yet.
CLIENT_ACCOUNTANTS = ("rdp",)
def validate_client_clipping(cfg: DictConfig) -> None:
    """``privacy.client_clipping`` is a known mode, and adaptive only where client-level DP is on."""
    dp = cfg.privacy
    choice("privacy.client_clipping", dp.client_clipping, CLIENT_CLIPPING_MODES)
    if dp.client_clipping == "adaptive" and dp.mode not in CLIENT_DP_MODES:
        raise ConfigError(
            f"privacy.client_clipping=adaptive adapts client-level DP's clip norm, which privacy.mode={dp.mode} "
            f"does not use; choose privacy=client_dp or sample_and_client_dp, or privacy.client_clipping=fixed"
        )


def validate_client_dp(cfg: DictConfig) -> None:
    """Reject client-level DP settings that cannot work or whose epsilon would be wrong."""
    dp = cfg.privacy
    choice("privacy.client_sampling", dp.client_sampling, CLIENT_SAMPLING_METHODS)
    choice("privacy.noise", dp.noise, NOISE_PLACEMENTS)
    choice("privacy.accountant", dp.accountant, CLIENT_ACCOUNTANTS)
    in_range("privacy.client_clip_norm", dp.client_clip_norm, 0.0, None, low_open=True)
    in_range("privacy.delta", dp.delta, 0.0, 1.0, low_open=True)
    if dp.delta >= 1.0:
        raise ConfigError(f"privacy.delta={dp.delta} must be < 1")
    check_noise_setting(dp, "client_target_epsilon", "client_noise_multiplier", "client_max_epsilon")
    if cfg.strategy.name not in SUM_BASED_STRATEGIES:
        raise ConfigError(
            f"strategy={cfg.strategy.name} does not aggregate a sum of updates, so client-level DP's sensitivity "
            f"bound does not hold; with privacy.mode={dp.mode} use one of: {', '.join(SUM_BASED_STRATEGIES)}"
        )
    _validate_sampling(cfg)
    if dp.client_clipping == "adaptive":
        _validate_adaptive(cfg)
    if dp.noise == "distributed":
        _validate_distributed(cfg)


def _validate_adaptive(cfg: DictConfig) -> None:
    """Adaptive clipping is accounted as one Gaussian of the run's σ split between update and
    count (σ⁻² = σ_Δ⁻² + (2σ_b)⁻²); refuse settings where that split does not exist."""
    dp, ac = cfg.privacy, cfg.privacy.adaptive_clipping
    in_range("privacy.adaptive_clipping.target_quantile", ac.target_quantile, 0.0, 1.0)
    in_range("privacy.adaptive_clipping.learning_rate", ac.learning_rate, 0.0, None, low_open=True)
    if ac.clipped_count_stddev is not None:
        in_range("privacy.adaptive_clipping.clipped_count_stddev", ac.clipped_count_stddev, 0.0, None)
    try:
        sigma = planned_noise_multiplier(client_dp_plan(cfg))
    except PrivacyConfigError as err:
        raise ConfigError(f"privacy.client_target_epsilon={dp.client_target_epsilon}: {err}") from None
    count_std = count_noise_std(client_dp_plan(cfg))
    if sigma > 0 and count_std / CLIP_COUNT_SENSITIVITY <= sigma:
        given = "null (expected cohort / 20)" if ac.clipped_count_stddev is None else ac.clipped_count_stddev
        raise ConfigError(
            f"privacy.adaptive_clipping.clipped_count_stddev={given} (sigma_b = {count_std:.4g}) is "
            f"too small for the run's noise multiplier sigma = {sigma:.4g}: adaptive clipping splits sigma between the "
            f"update (sigma_delta) and the clip count as sigma^-2 = sigma_delta^-2 + (2 sigma_b)^-2, which needs "
            f"2 sigma_b > sigma; set it above {sigma * CLIP_COUNT_SENSITIVITY:.4g}, or use privacy.client_clipping=fixed"
        )
    if cfg.secure_agg.mode != "off":  # the indicator rides in the masked vector, clamped to clip_range
        tail = DISTRIBUTED_TAIL_STDS * count_share_std(client_dp_plan(cfg)) if dp.noise == "distributed" else 0.0
        if cfg.secure_agg.clip_range < CLIP_COUNT_SENSITIVITY + tail:
            raise ConfigError(
                f"secure_agg.clip_range={cfg.secure_agg.clip_range} would clamp the clients' clip indicators "
                f"(+-{CLIP_COUNT_SENSITIVITY} + {DISTRIBUTED_TAIL_STDS} x their noise share std under distributed "
                f"noise); it must be >= {CLIP_COUNT_SENSITIVITY + tail:.4g} with privacy.client_clipping=adaptive"
            )


def _validate_distributed(cfg: DictConfig) -> None:
    """Distributed noise is private only as a sum the server never sees the parts of, and
    only while SecAgg+'s per-coordinate clamp leaves the noise Gaussian."""
    dp, sa = cfg.privacy, cfg.secure_agg
    if sa.mode != "secaggplus":
        raise ConfigError(
            f"privacy.noise=distributed needs secure_agg=secaggplus (got secure_agg={sa.mode}): each client's "
            f"noise share alone is too small to protect it; use privacy.noise=central without secure aggregation"
        )
    if dp.client_sampling != "fixed":
        raise ConfigError(
            f"privacy.noise=distributed needs privacy.client_sampling=fixed (got {dp.client_sampling}): each "
            f"client adds a share of the noise, so under Poisson sampling the released noise would grow with "
            f"whether a client took part, which the subsampled Gaussian analysis does not cover; a fixed-size "
            f"cohort keeps the number of shares independent of any one client"
        )
    needed = dp.client_clip_norm * clamp_headroom(client_dp_plan(cfg))
    if sa.clip_range < needed:
        adaptive = " (the initial clip norm; the server never raises C beyond what clip_range allows)"
        raise ConfigError(
            f"secure_agg.clip_range={sa.clip_range} would clamp clients' noised updates (clip norm "
            f"{dp.client_clip_norm}{adaptive if dp.client_clipping == 'adaptive' else ''} + {DISTRIBUTED_TAIL_STDS} x "
            f"noise share std); it must be >= {needed:.4g}"
        )


def _validate_sampling(cfg: DictConfig) -> None:
    """The cohort the sampler draws must be one the accountant can describe."""
    sim, dp = cfg.simulation, cfg.privacy
    if dp.client_sampling == "poisson":
        expected = sim.num_clients * sim.fraction_train
        if expected < sim.min_clients_per_round:
            raise ConfigError(
                f"privacy.client_sampling=poisson expects simulation.num_clients x simulation.fraction_train = "
                f"{expected:g} clients per round, fewer than simulation.min_clients_per_round="
                f"{sim.min_clients_per_round}; a Poisson cohort cannot be topped up without breaking its "
                f"accounting: raise simulation.fraction_train or use privacy.client_sampling=fixed"
            )
        if cfg.secure_agg.mode != "off" and expected < cfg.secure_agg.threshold:
            raise ConfigError(
                f"privacy.client_sampling=poisson expects {expected:g} clients per round, fewer than "
                f"secure_agg.threshold={cfg.secure_agg.threshold}; raise simulation.fraction_train"
            )
