"""A config as it travels and is kept: YAML in Flower's run config and in run
directories, and what a resumed run may change."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedguard.conf.schema import ConfigError, FedguardConfig
from fedguard.conf.validation import validate_config


# Keys a resumed run may change: where and how it reports, not what it computes.
RESUME_MAY_DIFFER = ("resume", "deployment", "progress", "log_level")


def resume_mismatches(original: DictConfig, resumed: DictConfig) -> list[str]:
    """Dotted keys whose values differ between a run and its resumption (ignoring RESUME_MAY_DIFFER)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if not prefix and key in RESUME_MAY_DIFFER:
                    continue
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix.rstrip("."): node}

    a = flat(OmegaConf.to_container(original, resolve=True))
    b = flat(OmegaConf.to_container(resumed, resolve=True))
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def config_to_yaml(cfg: DictConfig) -> str:
    """Serialize a resolved config, for carrying it in Flower's run config."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_from_yaml(text: str) -> DictConfig:
    """Parse and validate a config carried in a run config or read from a run directory."""
    if not text:
        raise ConfigError(
            "the run config has no fedguard-config; start runs with `fedguard simulate` or `fedguard run`"
        )
    schema = OmegaConf.structured(FedguardConfig)
    cfg = OmegaConf.merge(schema, OmegaConf.create(text))
    validate_config(cfg)
    return cfg


@lru_cache(maxsize=8)
def cached_config_from_yaml(text: str) -> DictConfig:
    """`config_from_yaml` once per distinct text: clients get the same config with every message."""
    return config_from_yaml(text)
