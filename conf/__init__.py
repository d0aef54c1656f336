"""fedguard's Hydra config tree (YAML files per group) and its schema."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from .schema import ConfigError, register_schema, validate_config

register_schema()

CONFIG_MODULE = "fedguard.conf"
CONFIG_NAME = "config"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate the config from Hydra overrides, outside ``@hydra.main``.

    Used where no Hydra job runs (tests, `fedguard run`); the result is the same
    composition `fedguard simulate` gets.
    """
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    validate_config(cfg)
    return cfg


__all__ = ["CONFIG_MODULE", "CONFIG_NAME", "ConfigError", "compose_config", "validate_config"]
