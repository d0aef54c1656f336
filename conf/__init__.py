"""fedguard's Hydra config tree (YAML files per group) and its schema."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from .mode_keys import ChosenModes, keys_from_overrides, unused_key_error
from .schema import ConfigError, register_schema
from .schema import validate_config as validate_values

register_schema()

CONFIG_MODULE = "fedguard.conf"
CONFIG_NAME = "config"


def check_mode_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse keys the user set that the chosen privacy / secure-aggregation mode never reads.

    Why: the schema gives every key a default, so ``privacy.target_epsilon=3`` without
    ``privacy=sample_dp`` would otherwise compose and train with no DP at all, silently.
    """
    modes = ChosenModes(
        privacy=str(cfg.privacy.mode),
        secure_agg=str(cfg.secure_agg.mode),
        client_clipping=str(cfg.privacy.client_clipping),
    )
    if message := unused_key_error(modes, keys_from_overrides(overrides)):
        raise ConfigError(message)


def validate_config(cfg: DictConfig, overrides: Sequence[str] | None = None) -> None:
    """Reject a config before anything trains (ConfigError naming the key).

    ``overrides`` are the command-line overrides the config was composed with; when given,
    keys the chosen modes ignore are refused first (a config read back from a run directory
    has none, and was checked when it was composed).
    """
    if overrides:
        check_mode_keys(cfg, overrides)
    validate_values(cfg)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate the config from Hydra overrides, outside ``@hydra.main``.

    Used where no Hydra job runs (tests, `fedguard run`); the result is the same
    composition `fedguard simulate` gets, with the same checks.
    """
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    validate_config(cfg, overrides)
    return cfg


__all__ = ["CONFIG_MODULE", "CONFIG_NAME", "ConfigError", "check_mode_keys", "compose_config", "validate_config"]
