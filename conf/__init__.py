"""fedguard's Hydra config tree (YAML files per group), its schema and checks, and the
adapter that turns a config into the plain objects the layers take (:mod:`.plans`)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
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
    (the YAML files ship inside the package; interpolations stay unresolved until read), cached
    per process because each full composition costs ~0.2 s of CPU (tests compose hundreds).

    Hydra composes in two steps: the group choices (``privacy=sample_dp``, ``+preset=...``) pick
    the YAML files merged into the tree, then the value overrides (``train.learning_rate=0.2``)
    are applied to that tree in order (``ConfigLoaderImpl._load_configuration_impl``). The first
    step is the expensive one and depends on the group choices alone, so it is cached on them and
    the second runs here with Hydra's own parser, classifier and override function: the same tree
    and the same errors as one ``compose`` call (tests/test_config.py checks both ways). Anything
    but plain group choices and value overrides (sweeps, group deletions) goes to Hydra whole.
    Callers get a deep copy; checks that read the disk or the environment run on every call, in
    ``compose_config``."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        split = _split_overrides(overrides)
        if split is None:
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
        groups, values = split
        if not values:
            return compose(config_name=CONFIG_NAME, overrides=list(groups))
    cfg = copy.deepcopy(_hydra_composition(groups))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)  # Hydra's own step two
    return cfg


def _split_overrides(overrides: tuple[str, ...]) -> tuple[tuple[str, ...], list[Override]] | None:
    """(group choices as written, parsed value overrides in order), classified as Hydra classifies
    them (``defaults_list.Overrides``: a key that names a config group and a value that is not a
    dict is a group choice); ``None`` where the two-step route would not be exact."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    repository = GlobalHydra.instance().hydra.config_loader.repository  # type: ignore[union-attr]
    groups: list[str] = []
    values: list[Override] = []
    for override in parsed:
        if override.is_sweep_override() or override.is_hydra_override():
            return None
        if repository.group_exists(override.key_or_group) and not isinstance(override.value(), dict):
            if override.is_delete():
                return None
            groups.append(override.input_line)
        else:
            values.append(override)
    return tuple(groups), values


__all__ = ["CONFIG_MODULE", "CONFIG_NAME", "ConfigError", "check_mode_keys", "compose_config", "validate_config"]
