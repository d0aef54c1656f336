"""fedguard's Hydra config tree (YAML files per group), its schema and checks, and the
adapter that turns a config into the plain objects the layers take (:mod:`.plans`)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from fedguard.conf.schema import ConfigError, register_schema
from fedguard.conf.validation import check_mode_keys, validate_config

register_schema()

CONFIG_MODULE = "fedguard.conf"
CONFIG_NAME = "config"


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
