"""Validation of the client-level DP (DP-FedAvg) keys of ``privacy``.

Kept apart from :mod:`conf.schema` (which calls it) so that the schema module stays
readable; every rule rejects a combination whose privacy claim could not hold, naming
the key and what is allowed.
"""

from __future__ import annotations

from omegaconf import DictConfig

from conf.schema import ConfigError, _choice, _range, check_noise_setting

CLIENT_SAMPLING_METHODS = ("poisson", "fixed")
NOISE_PLACEMENTS = ("central", "distributed")
# Client-level DP bounds the *sum* of clipped updates; these strategies average (then
# optionally apply a server optimiser to) that sum, so the released model is post-processing.
SUM_BASED_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
# Our accountant for client-level DP; PRV is not wired for the federation accountant yet.
CLIENT_ACCOUNTANTS = ("rdp",)
# SecAgg+ clamps each coordinate to secure_agg.clip_range; with distributed noise it must sit
# this many noise-share stds beyond the clip norm (a clamp then has probability < 1.3e-15 per
# coordinate, which the accounting does not add to delta).
DISTRIBUTED_TAIL_STDS = 8


def validate_client_dp(cfg: DictConfig) -> None:
    """Reject client-level DP settings that cannot work or whose epsilon would be wrong."""
    dp = cfg.privacy
    _choice("privacy.client_sampling", dp.client_sampling, CLIENT_SAMPLING_METHODS)
    _choice("privacy.noise", dp.noise, NOISE_PLACEMENTS)
    _choice("privacy.accountant", dp.accountant, CLIENT_ACCOUNTANTS)
    _range("privacy.client_clip_norm", dp.client_clip_norm, 0.0, None, low_open=True)
    _range("privacy.delta", dp.delta, 0.0, 1.0, low_open=True)
    if dp.delta >= 1.0:
        raise ConfigError(f"privacy.delta={dp.delta} must be < 1")
    check_noise_setting(dp, "client_target_epsilon", "client_noise_multiplier", "client_max_epsilon")
    if cfg.strategy.name not in SUM_BASED_STRATEGIES:
        raise ConfigError(
            f"strategy={cfg.strategy.name} does not aggregate a sum of updates, so client-level DP's sensitivity "
            f"bound does not hold; with privacy.mode={dp.mode} use one of: {', '.join(SUM_BASED_STRATEGIES)}"
        )
    _validate_sampling(cfg)
    if dp.noise == "distributed":
        _validate_distributed(cfg)


def _validate_distributed(cfg: DictConfig) -> None:
    """Distributed noise is private only as a sum the server never sees the parts of, and
    only while SecAgg+'s per-coordinate clamp leaves the noise Gaussian."""
    dp, sa = cfg.privacy, cfg.secure_agg
    if sa.mode != "secaggplus":
        raise ConfigError(
            f"privacy.noise=distributed needs secure_agg=secaggplus (got secure_agg={sa.mode}): each client's "
            f"noise share alone is too small to protect it; use privacy.noise=central without secure aggregation"
        )
    from privacy.client_dp_accounting import noise_share_std  # imports conf.schema

    needed = dp.client_clip_norm + DISTRIBUTED_TAIL_STDS * noise_share_std(cfg)
    if sa.clip_range < needed:
        raise ConfigError(
            f"secure_agg.clip_range={sa.clip_range} would clamp clients' noised updates (clip norm "
            f"{dp.client_clip_norm} + {DISTRIBUTED_TAIL_STDS} x noise share std); it must be >= {needed:.4g}"
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
