"""The epsilon a simulation's sample-level DP will spend, printed before the engine starts.

With a fixed noise multiplier each virtual site's epsilon depends on its partition's size
(its Poisson rate is one over its batches per epoch), and before this was computed only
inside the workers, after start-up. The driver knows every partition of a simulation, so
it runs the sites' own arithmetic (:func:`fedguard.clients.planned_privacy.plan_site`).
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedguard.clients.datasets import load_dataset
from fedguard.clients.partition import partition_indices, split_train_validation
from fedguard.clients.planned_privacy import batches_per_epoch, expected_participation, plan_site
from fedguard.conf.plans import trains_privately
from fedguard.conf.schema import CONTRACT_DATASETS

OBSERVERS = (
    "per training record (add or remove one record), against anyone who sees the site's updates or the models "
    "trained on them: the server operator, other sites, users of the final model"
)


def planned_sample_dp_line(cfg: DictConfig) -> str | None:
    """One line for the console: every virtual site's planned epsilon, or None without sample-level DP."""
    if not trains_privately(cfg):
        return None
    rounds = expected_participation(cfg)
    if cfg.privacy.target_epsilon is not None:
        return (
            f"sample-level DP: each site calibrates its noise so its planned {rounds} round(s) spend epsilon "
            f"<= {float(cfg.privacy.target_epsilon):g} at delta {float(cfg.privacy.delta):g}, {OBSERVERS}"
        )
    if cfg.dataset.name in CONTRACT_DATASETS:  # sizes of sites' own files are known only at the sites
        return (
            f"sample-level DP: noise multiplier {float(cfg.privacy.noise_multiplier):g}; each site's epsilon for the "
            f"planned {rounds} round(s) depends on its own data size and is computed and enforced there, {OBSERVERS}"
        )
    bundle = load_dataset(cfg.dataset, cfg.seed)
    parts = partition_indices(bundle.train_y, cfg.partition, int(cfg.simulation.num_clients), cfg.seed)
    sizes = {
        len(split_train_validation(part, cfg.dataset.validation_fraction, cfg.seed + pid).train_indices)
        for pid, part in enumerate(parts)
    }
    plans = [plan_site(cfg, batches_per_epoch(size, int(cfg.train.batch_size))) for size in sizes if size > 0]
    if not plans:
        return None
    low, high = min(p.epsilon for p in plans), max(p.epsilon for p in plans)
    spread = f"{high:.3f}" if high - low < 5e-4 else f"{low:.3f} to {high:.3f}"
    return (
        f"sample-level DP: noise multiplier {float(cfg.privacy.noise_multiplier):g}; the planned {rounds} round(s) "
        f"spend epsilon {spread} per site at delta {float(cfg.privacy.delta):g}, {OBSERVERS}"
    )
