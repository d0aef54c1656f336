"""fedguard's Hydra config tree (YAML files per group), its schema and checks, and the
adapter that turns a config into the plain objects the layers take (:mod:`.plans`)."""

from __future__ import annotations

import copy
import functools
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
    cfg = copy.deepcopy(_hydra_composition(tuple(overrides)))
    validate_config(cfg, overrides)
    return cfg


@functools.lru_cache(maxsize=256)
def _hydra_composition(overrides: tuple[str, ...]) -> DictConfig:
    """Hydra's composition of the packaged config tree: a pure function of the overrides
    (the YAML files ship inside the package; interpolations stay unresolved until read), and
    ~0.3 s of CPU per call, so a process that composes the same overrides again (tests, the
    benchmarks, `fedguard run` checking then submitting) reuses it. Callers get a deep copy;
    checks that read the disk or the environment run on every call, in ``compose_config``."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


__all__ = ["CONFIG_MODULE", "CONFIG_NAME", "ConfigError", "check_mode_keys", "compose_config", "validate_config"]
