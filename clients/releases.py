"""What a client sends besides its (noised) update, decided in one place.

Under sample-level DP everything that leaves a site about its records is either accounted
or not sent (privacy/sample_dp_claim.py lists it); under secure aggregation an update is
never put into a second sum.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedguard.conf.plans import trains_privately


def sends_local_metrics(cfg: DictConfig) -> bool:
    """Raw training loss and local-validation metrics: not under sample-level DP, unless opted in."""
    return not trains_privately(cfg) or bool(cfg.privacy.release_unaccounted_metrics)


def released_train_loss(cfg: DictConfig, mean_loss: float) -> float:
    """The training loss a reply carries: under sample-level DP NaN (the raw mean loss over the
    site's records is not covered by any epsilon; NaN keeps the reply's form, which the server
    already accepts for a round without a non-empty batch), unless the run opted in with
    ``privacy.release_unaccounted_metrics``."""
    if not sends_local_metrics(cfg):
        return float("nan")
    return mean_loss


def resend_enters_a_new_sum(cfg: DictConfig) -> bool:
    """Whether a resent update would be masked into a fresh SecAgg+ session (a second, different
    sum; distributed DP noise needs SecAgg+, so it is covered too) rather than seen as before."""
    return cfg.secure_agg.mode != "off"
