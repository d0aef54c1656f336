"""One node-config schema for a client site, the same in simulation and on real sites.

Flower's simulation engine sets ``partition-id`` and ``num-partitions`` itself; on a
real site the SuperNode gets them (and the optional keys) from ``--node-config``.
Defining the keys once avoids Flower #4120 (``partition-id`` missing after moving
from simulation to deployment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedguard.privacy.secagg.policy import (
    DEFAULT_COLLUSION_FRACTION,
    DEFAULT_MAX_UNFINISHED_REVEALS,
    PolicyError,
    SitePolicy,
    colluders_for,
    min_cohort_for,
)

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_ROOT_KEY = "data-root"
# The site's own files (dataset=tabular / images): a file or directory checked against the run's
# data contract. With it the site needs no num-partitions; partition-id only names it in ledgers.
DATA_KEY = "data"
# The data contract this site accepts (clients/contract_pin.py): a YAML file, or "first-use" to pin
# the first run's contract in its state dir. A run whose contract differs is refused.
CONTRACT_KEY = "contract"
PIN_FIRST_USE = "first-use"
DEVICE_KEY = "device"
EPSILON_BUDGET_KEY = "epsilon-budget"
# Where the site keeps its privacy state across server restarts (clients/site_state.py).
STATE_DIR_KEY = "state-dir"
# A site without a state dir forgets its spend when the run ends; it must say it accepts that.
EPHEMERAL_PRIVACY_KEY = "ephemeral-privacy-state"
# The site's privacy floor (clients/site_floor.py), named here so every key of the schema is in one list.
FLOOR_KEYS = ("min-noise-multiplier", "max-epsilon", "min-client-noise-multiplier", "max-client-epsilon")
# true: this site answers train and preprocessing requests only under SecAgg+ (clients/site_floor.py).
REQUIRE_SECURE_AGG_KEY = "require-secure-agg"
# The site's own limits on secure aggregation (privacy/secagg/policy.py): the server's
# config cannot lower them. Defaults: threshold >= 2, no cap on neighbours; colluders
# ceil(secagg-collusion-fraction x the sites on the site's own roster) and a minimum cohort
# derived from them (policy.min_cohort_for), never from anything the server sends.
SECAGG_MIN_THRESHOLD_KEY = "secagg-min-threshold"
SECAGG_MAX_NEIGHBOURS_KEY = "secagg-max-neighbours"
SECAGG_COLLUDERS_KEY = "secagg-colluders"
SECAGG_COLLUSION_FRACTION_KEY = "secagg-collusion-fraction"
# The roster of site identity keys, when not at <state-dir>/secagg/roster.json (clients/secagg_identity.py).
SECAGG_ROSTER_KEY = "secagg-roster"
SECAGG_MIN_COHORT_KEY = "secagg-min-cohort"
SECAGG_MAX_UNFINISHED_REVEALS_KEY = "secagg-max-unfinished-reveals"
SECAGG_POLICY_KEYS = (SECAGG_MIN_THRESHOLD_KEY, SECAGG_MAX_NEIGHBOURS_KEY, SECAGG_COLLUDERS_KEY,
                      SECAGG_COLLUSION_FRACTION_KEY, SECAGG_MIN_COHORT_KEY, SECAGG_MAX_UNFINISHED_REVEALS_KEY,
                      SECAGG_ROSTER_KEY)
# model=custom: the "package.module:factory" targets this site agrees to import and call (space- or
# comma-separated). The run's config comes from the server; without this list a server could make
# every site call any importable function with arguments of its choosing.
CUSTOM_MODELS_KEY = "custom-models"
KNOWN_KEYS = (PARTITION_ID_KEY, NUM_PARTITIONS_KEY, DATA_KEY, CONTRACT_KEY, DATA_ROOT_KEY, CUSTOM_MODELS_KEY, DEVICE_KEY, EPSILON_BUDGET_KEY, STATE_DIR_KEY,
              EPHEMERAL_PRIVACY_KEY, *FLOOR_KEYS, REQUIRE_SECURE_AGG_KEY, *SECAGG_POLICY_KEYS)


class SiteConfigError(ValueError):
    """The node config of this site is missing a key or holds a bad value."""


@dataclass(frozen=True)
class SiteSettings:
    partition_id: int
    num_partitions: int
    data_root: str | None
    device: str | None
    # The site's own sample-level epsilon budget; the stricter of it and the run's applies.
    epsilon_budget: float | None = None
    state_dir: str | None = None
    # Train privately without a state dir (spend kept for this run only): only when set explicitly.
    ephemeral_privacy_state: bool = False
    # This site's own data file or directory (DATA_KEY), for a run with a data contract.
    data: str | None = None
    # The contract it accepts (CONTRACT_KEY): a YAML file, PIN_FIRST_USE, or None (any contract).
    contract: str | None = None


def _as_int(node_config: dict[str, Any], key: str) -> int:
    if key not in node_config:
        raise SiteConfigError(
            f"node config has no '{key}'; start the SuperNode with "
            f"--node-config \"{PARTITION_ID_KEY}=0 {NUM_PARTITIONS_KEY}=3\" (keys: {', '.join(KNOWN_KEYS)})"
        )
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise SiteConfigError(f"node config '{key}'={value!r} must be an integer")
    return int(value)


def read_site_settings(node_config: dict[str, Any]) -> SiteSettings:
    data = node_config.get(DATA_KEY) or None
    partition_id = _as_int(node_config, PARTITION_ID_KEY)
    if data is not None and NUM_PARTITIONS_KEY not in node_config:
        num_partitions = partition_id + 1  # no split: the site reads its own files whole
    else:
        num_partitions = _as_int(node_config, NUM_PARTITIONS_KEY)
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise SiteConfigError(
            f"node config needs 0 <= {PARTITION_ID_KEY} < {NUM_PARTITIONS_KEY}; "
            f"got {partition_id} and {num_partitions}"
        )
    data_root = node_config.get(DATA_ROOT_KEY) or None
    device = node_config.get(DEVICE_KEY) or None
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise SiteConfigError(f"node config '{DEVICE_KEY}'={device!r}; allowed: auto, cpu, cuda")
    budget = node_config.get(EPSILON_BUDGET_KEY)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
        raise SiteConfigError(f"node config '{EPSILON_BUDGET_KEY}'={budget!r} must be a number > 0")
    return SiteSettings(
        partition_id, num_partitions, str(data_root) if data_root else None, device,
        None if budget is None else float(budget),
        str(node_config[STATE_DIR_KEY]) if node_config.get(STATE_DIR_KEY) else None,
        node_config.get(EPHEMERAL_PRIVACY_KEY) in (True, 1, "true"),
        str(data) if data is not None else None,
        _contract_setting(node_config),
    )


def _contract_setting(node_config: dict[str, Any]) -> str | None:
    value = node_config.get(CONTRACT_KEY) or None
    if value is None:
        return None
    if not isinstance(value, str):
        raise SiteConfigError(f"node config '{CONTRACT_KEY}'={value!r} must be a YAML file or '{PIN_FIRST_USE}'")
    if value == PIN_FIRST_USE and not node_config.get(STATE_DIR_KEY):
        raise SiteConfigError(f"node config '{CONTRACT_KEY}={PIN_FIRST_USE}' keeps the pin in the site's "
                              f"'{STATE_DIR_KEY}', which is not set")
    return value


def _optional_int(node_config: dict[str, Any], key: str, low: int) -> int | None:
    value = node_config.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < low:
        raise SiteConfigError(f"node config '{key}'={value!r} must be an integer >= {low}")
    return int(value)


def _collusion_fraction(node_config: dict[str, Any]) -> float:
    value = node_config.get(SECAGG_COLLUSION_FRACTION_KEY)
    if value is None or value == "":
        return DEFAULT_COLLUSION_FRACTION
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise SiteConfigError(f"node config '{SECAGG_COLLUSION_FRACTION_KEY}'={value!r} must be a number in [0, 1)")
    return float(value)


def read_secagg_policy(node_config: dict[str, Any], roster_size: int | None = None) -> SitePolicy:
    """This site's pinned limits on SecAgg+ parameters (keys ``secagg-*``), defaults where unset.

    ``roster_size``: the sites on this site's own roster. Unless pinned, the assumed colluders
    are ceil(``secagg-collusion-fraction`` x that) and the minimum cohort follows from them
    (``policy.min_cohort_for``). Without a roster (None) both stay 0: such a site shares with
    no one anyway (it has nothing to check its peers' keys against).
    """
    min_threshold = _optional_int(node_config, SECAGG_MIN_THRESHOLD_KEY, 2)
    max_neighbours = _optional_int(node_config, SECAGG_MAX_NEIGHBOURS_KEY, 2)
    colluders = _optional_int(node_config, SECAGG_COLLUDERS_KEY, 0)
    min_cohort = _optional_int(node_config, SECAGG_MIN_COHORT_KEY, 0)
    max_reveals = _optional_int(node_config, SECAGG_MAX_UNFINISHED_REVEALS_KEY, 0)
    fraction = _collusion_fraction(node_config)
    if colluders is None:
        colluders = 0 if roster_size is None else colluders_for(fraction, roster_size)
    if min_cohort is None:
        min_cohort = 0 if roster_size is None else min_cohort_for(colluders, roster_size)
    try:
        return SitePolicy(
            min_threshold=2 if min_threshold is None else min_threshold,
            max_neighbours=max_neighbours,
            colluders=colluders,
            min_cohort=min_cohort,
            max_unfinished_reveals=DEFAULT_MAX_UNFINISHED_REVEALS if max_reveals is None else max_reveals,
        )
    except PolicyError as err:
        raise SiteConfigError(f"node config: {err}") from err


def check_custom_model_allowed(model_name: str, target: str | None, node_config: dict[str, Any]) -> None:
    """Refuse a run whose model=custom target this site did not list in ``custom-models``."""
    if model_name != "custom":
        return
    allowed = str(node_config.get(CUSTOM_MODELS_KEY) or "").replace(",", " ").split()
    if target not in allowed:
        raise SiteConfigError(
            f"the run asks this site to build model.target={target!r}, which its '{CUSTOM_MODELS_KEY}' setting "
            f"does not list (allowed: {', '.join(allowed) or 'none'}); a site imports and calls only the team "
            "models it named (fedguard client --custom-model TARGET)"
        )
