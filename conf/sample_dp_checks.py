"""Validation of the sample-level DP (DP-SGD) keys of ``privacy`` that decide what a claim covers.

Kept apart from :mod:`fedguard.conf.validation` (which calls it), like :mod:`fedguard.conf.client_dp_checks`.
Each rule refuses a run whose printed epsilon would not hold for what the run does.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedguard.conf.schema import ConfigError


def is_zero_noise_debug(dp: DictConfig) -> bool:
    """noise_multiplier=0 with allow_zero_noise: a debugging mode that claims no privacy (epsilon is infinite)."""
    return dp.noise_multiplier is not None and float(dp.noise_multiplier) == 0.0 and bool(dp.allow_zero_noise)


def validate_sample_dp(cfg: DictConfig) -> None:
    """Raise ConfigError, naming the key, for sample-level DP settings no accountant here covers."""
    dp = cfg.privacy
    if not dp.poisson_sampling and not is_zero_noise_debug(dp):
        raise ConfigError(
            "privacy.poisson_sampling=false: shuffled fixed-size batches are not what the accountant "
            "analyses (Poisson subsampling), and fedguard has no sound accountant for them; keep "
            "privacy.poisson_sampling=true (it is only allowed with privacy.noise_multiplier=0 and "
            "privacy.allow_zero_noise=true, which claims no privacy)"
        )
    if cfg.evaluate.fraction_clients > 0 and not dp.release_unaccounted_metrics:
        raise ConfigError(
            f"evaluate.fraction_clients={cfg.evaluate.fraction_clients}: under sample-level DP a site's "
            "local-validation loss and accuracy are computed from its private records without noise and "
            "no epsilon covers them; set evaluate.fraction_clients=0, or privacy.release_unaccounted_metrics=true "
            "to send them anyway (reported as unaccounted)"
        )
