"""A site's own privacy floor: the weakest settings it will train under, whatever a run asks.

The run's config comes from whoever submits the run; a site that trusts its data to the
federation should not have to trust every submitter too. In its node config (the same keys
in simulation and on real sites) it may pin, per mechanism, a minimum noise multiplier and a
maximum epsilon; a run whose config falls below any of them is refused before training, with
a log line naming the run key and the site key.

It may also require secure aggregation (``require-secure-agg: true``). Whether a site's update
or statistics travel masked is otherwise the run config's choice, so a server could switch
SecAgg+ off and read each site's vector; a site with this key set refuses such a run before it
reads anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from fedguard.clients.wire.checks import MalformedMessage
from fedguard.conf.plans import client_dp_plan, client_level_dp, trains_privately
from fedguard.privacy.client_dp_accounting import planned_noise_multiplier

logger = logging.getLogger(__name__)

MIN_NOISE_KEY = "min-noise-multiplier"  # sample level (DP-SGD)
MAX_EPSILON_KEY = "max-epsilon"  # sample level
MIN_CLIENT_NOISE_KEY = "min-client-noise-multiplier"  # client level (DP-FedAvg)
MAX_CLIENT_EPSILON_KEY = "max-client-epsilon"  # client level
FLOOR_KEYS = (MIN_NOISE_KEY, MAX_EPSILON_KEY, MIN_CLIENT_NOISE_KEY, MAX_CLIENT_EPSILON_KEY)  # == site.FLOOR_KEYS
REQUIRE_SECURE_AGG_KEY = "require-secure-agg"  # == site.REQUIRE_SECURE_AGG_KEY


class BelowSiteFloor(MalformedMessage):
    """The run's privacy settings are weaker than this site allows (the ClientApp answers the
    train message with an error, as for any message it will not act on)."""


@dataclass(frozen=True)
class SiteFloor:
    """The node config's floor values; None: no floor on that setting."""

    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    min_client_noise_multiplier: float | None = None
    max_client_epsilon: float | None = None
    require_secure_agg: bool = False


def read_site_floor(node_config: dict[str, Any]) -> SiteFloor:
    values: dict[str, float | None] = {}
    for key in FLOOR_KEYS:
        value = node_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise BelowSiteFloor(f"node config '{key}'={value!r} must be a number >= 0")
        values[key.replace("-", "_")] = None if value is None else float(value)
    required = node_config.get(REQUIRE_SECURE_AGG_KEY, False)
    if not isinstance(required, bool):
        raise BelowSiteFloor(f"node config '{REQUIRE_SECURE_AGG_KEY}'={required!r} must be true or false")
    return SiteFloor(**values, require_secure_agg=required)


def _refuse(run_key: str, run_value: float | None, site_key: str, site_value: float, what: str) -> None:
    message = (f"this site refuses the run: {run_key}={run_value} is {what} its node config "
               f"{site_key}={site_value:g}")
    logger.warning(message)
    raise BelowSiteFloor(message)


def check_site_floor(cfg: DictConfig, floor: SiteFloor) -> None:
    """Raise BelowSiteFloor (after logging the key) where the run is weaker than the site's floor."""
    dp = cfg.privacy
    if floor.require_secure_agg and str(cfg.secure_agg.mode) != "secaggplus":
        message = (f"this site refuses the run: secure_agg.mode={cfg.secure_agg.mode} sends its vector unmasked, "
                   f"and its node config sets {REQUIRE_SECURE_AGG_KEY}=true")
        logger.warning(message)
        raise BelowSiteFloor(message)
    pinned = [(key, value) for key, value in zip(FLOOR_KEYS, (floor.min_noise_multiplier, floor.max_epsilon,
                                                             floor.min_client_noise_multiplier,
                                                             floor.max_client_epsilon), strict=True)
              if value is not None]
    if pinned and not trains_privately(cfg) and not client_level_dp(cfg):
        # Without DP the run's epsilon is unbounded: weaker than any floor the site pinned.
        site_key, site_value = pinned[0]
        _refuse("privacy.mode", dp.mode, site_key, site_value, "without differential privacy, weaker than")
    if trains_privately(cfg):
        cap = dp.max_epsilon if dp.max_epsilon is not None else dp.target_epsilon
        if floor.max_epsilon is not None and (cap is None or cap > floor.max_epsilon):
            key = "privacy.max_epsilon" if dp.max_epsilon is not None else "privacy.target_epsilon"
            _refuse(key, cap, MAX_EPSILON_KEY, floor.max_epsilon, "above (or without)")
        if floor.min_noise_multiplier is not None and dp.noise_multiplier is not None \
                and dp.noise_multiplier < floor.min_noise_multiplier:
            _refuse("privacy.noise_multiplier", dp.noise_multiplier, MIN_NOISE_KEY, floor.min_noise_multiplier, "below")
    if client_level_dp(cfg):
        cap = dp.client_max_epsilon if dp.client_max_epsilon is not None else dp.client_target_epsilon
        if floor.max_client_epsilon is not None and (cap is None or cap > floor.max_client_epsilon):
            key = "privacy.client_max_epsilon" if dp.client_max_epsilon is not None else "privacy.client_target_epsilon"
            _refuse(key, cap, MAX_CLIENT_EPSILON_KEY, floor.max_client_epsilon, "above (or without)")
        if floor.min_client_noise_multiplier is not None:
            sigma = planned_noise_multiplier(client_dp_plan(cfg))  # given or calibrated: what the run adds
            if sigma < floor.min_client_noise_multiplier:
                _refuse("privacy.client_noise_multiplier", round(sigma, 6), MIN_CLIENT_NOISE_KEY,
                        floor.min_client_noise_multiplier, "below")
