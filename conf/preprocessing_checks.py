"""Checks of ``dataset.preprocessing``: federated statistics need declared ranges, a privacy mode
whose accountant can pay for them, and an epsilon that leaves room for training.

Why each rule: without a declared range a column's sums have no sensitivity, so no noise
could be calibrated; client-level DP has no per-record accountant on the sites that could
pay for a per-record release. With SecAgg+ on, the statistics travel masked like the model
updates (the server sees only their sum), so exact sums under privacy.mode=none are as
protected as exact updates are; under DP each site still noises and accounts its own release,
and no privacy figure relies on the masking.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedguard.conf.contract import PREPROCESSING_MODES, TabularContract, declared_contract_of
from fedguard.conf.schema import ConfigError

# Privacy modes under which the sites can release (and account) standardization statistics.
FEDERATED_PREPROCESSING_PRIVACY = ("none", "sample_dp")


def federated_preprocessing(cfg: DictConfig) -> bool:
    """Whether this run computes its standardization statistics across sites before round 1."""
    return str(cfg.dataset.get("preprocessing", "declared")) == "federated"


def check_preprocessing(cfg: DictConfig) -> None:
    mode = str(cfg.dataset.get("preprocessing", "declared"))
    if mode not in PREPROCESSING_MODES:
        raise ConfigError(f"dataset.preprocessing={mode!r}; allowed: {', '.join(PREPROCESSING_MODES)}")
    if mode != "federated":
        return
    contract = declared_contract_of(cfg.dataset)
    if isinstance(contract, TabularContract):
        for i, feature in enumerate(contract.features):
            if feature.kind == "numeric" and feature.low is None:
                raise ConfigError(f"dataset.contract.features[{i}] ({feature.name!r}) needs low and high (its declared "
                                  "range) for dataset.preprocessing=federated: clipping to them bounds each record's "
                                  "effect on the released sums")
    if cfg.privacy.mode not in FEDERATED_PREPROCESSING_PRIVACY:
        raise ConfigError(f"dataset.preprocessing=federated with privacy.mode={cfg.privacy.mode}; allowed: "
                          f"{', '.join(FEDERATED_PREPROCESSING_PRIVACY)} (only a site's sample-level accountant can pay "
                          "for a release about its records)")
    epsilon = cfg.dataset.get("preprocessing_epsilon", 0.5)
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0 < float(epsilon) < 1e3:
        raise ConfigError(f"dataset.preprocessing_epsilon={epsilon!r} must be a number in (0, 1000)")
    target = cfg.privacy.get("target_epsilon")
    if cfg.privacy.mode == "sample_dp" and target is not None and float(epsilon) >= float(target):
        raise ConfigError(f"dataset.preprocessing_epsilon={epsilon} must be below privacy.target_epsilon={target}: "
                          "training is calibrated to what the statistics leave")
