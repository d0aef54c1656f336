"""One node-config schema for a client site, the same in simulation and on real sites.

Flower's simulation engine sets ``partition-id`` and ``num-partitions`` itself; on a
real site the SuperNode gets them (and the optional keys) from ``--node-config``.
Defining the keys once avoids Flower #4120 (``partition-id`` missing after moving
from simulation to deployment).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
DATA_ROOT_KEY = "data-root"
DEVICE_KEY = "device"
EPSILON_BUDGET_KEY = "epsilon-budget"
# Where the site keeps its privacy state across server restarts (clients/site_state.py).
STATE_DIR_KEY = "state-dir"
# A site without a state dir forgets its spend when the run ends; it must say it accepts that.
EPHEMERAL_PRIVACY_KEY = "ephemeral-privacy-state"
# The site's privacy floor (clients/site_floor.py), named here so every key of the schema is in one list.
FLOOR_KEYS = ("min-noise-multiplier", "max-epsilon", "min-client-noise-multiplier", "max-client-epsilon")
KNOWN_KEYS = (PARTITION_ID_KEY, NUM_PARTITIONS_KEY, DATA_ROOT_KEY, DEVICE_KEY, EPSILON_BUDGET_KEY, STATE_DIR_KEY,
              EPHEMERAL_PRIVACY_KEY, *FLOOR_KEYS)


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
    partition_id = _as_int(node_config, PARTITION_ID_KEY)
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
    )
