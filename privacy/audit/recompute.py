"""Recompute every reported epsilon with Google's ``dp_accounting``, independent of Opacus.

Two figures per history:

* **same method** - RDP (``RdpAccountant`` semantics, Opacus's order grid) when the run
  reported RDP; PLD when it reported PRV (both are numerical, near-tight methods). A
  reported epsilon below this figure by more than the tolerance is a *mismatch*.
* **PLD** - the tight reference (pessimistic discretisation), informational.

RDP composes additively per order, so the per-step RDP vector of each (sigma, q) is
computed once and cumulative histories cost one vector sum; PLD results are cached per
identical (history, delta), with the one-step PLD built once per (sigma, q). That keeps 1,000 clients x 50 rounds to seconds for RDP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting import pld
from dp_accounting.rdp import rdp_privacy_accountant

logger = logging.getLogger(__name__)

# Opacus's default RDP orders (1.1..10.9 by 0.1, then 12..63), so the same-method check
# compares two implementations of one bound, not two order grids.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# PLD grid: 1e-3 is within ~0.1% of 1e-4 on our calibration grid and ~10x faster; the
# discretisation is pessimistic, so the figure stays an upper bound.
PLD_VALUE_DISCRETIZATION = 1e-3
# Relative tolerance for "recomputed exceeds reported"; see tests/test_audit.py calibration
# (measured max |Opacus RDP - dp_accounting RDP| / Opacus RDP on a grid: well below this).
# 0.5% (was 2%): a site may understate its epsilon by no more than this before it is caught.
DEFAULT_TOLERANCE = 0.005
# Absolute slack so that epsilons near zero do not trip on float round-off.
ABSOLUTE_SLACK = 1e-9

History = tuple[tuple[float, float, int], ...]  # ((noise_multiplier, sample_rate, steps), ...)


class _QuietConvergenceWarnings(logging.Filter):
    """dp_accounting logs one warning per RDP order it drops as non-convergent; it then
    leaves that order out, which can only raise epsilon (a safe direction). Keep it once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to converge" not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


logging.getLogger("absl").addFilter(_QuietConvergenceWarnings())


def merge(history: Sequence[tuple[float, float, int]]) -> History:
    """Drop empty segments and join consecutive ones with equal (sigma, q): same privacy."""
    merged: list[tuple[float, float, int]] = []
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return tuple(merged)


@lru_cache(maxsize=None)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at every order in ``RDP_ORDERS``.

    Uses dp_accounting's own per-event formula (the one ``RdpAccountant.compose`` calls);
    tests check the result against the public ``RdpAccountant`` path.
    """
    if noise_multiplier == 0:
        return np.full(len(RDP_ORDERS), np.inf)
    vector = np.asarray(
        rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(  # noqa: SLF001
            q=sample_rate, noise_multiplier=noise_multiplier, orders=RDP_ORDERS
        ),
        dtype=np.float64,
    )
    vector.setflags(write=False)
    return vector


def rdp_vector(history: History) -> np.ndarray:
    total = np.zeros(len(RDP_ORDERS))
    for sigma, rate, steps in history:
        total = total + steps * rdp_per_step(sigma, rate)
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    if not np.any(rdp > 0):
        return 0.0
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)
    return float(epsilon)


@lru_cache(maxsize=None)
def rdp_epsilon(history: History, delta: float) -> float:
    """Poisson-subsampled Gaussian, add/remove-one neighbours, via RDP."""
    return epsilon_from_rdp(rdp_vector(history), delta)


@lru_cache(maxsize=None)
def pld_per_step(noise_multiplier: float, sample_rate: float) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of one Poisson-subsampled Gaussian step, built once per (sigma, q).

    The same construction ``PLDAccountant`` uses for ``PoissonSampledDpEvent(GaussianDpEvent)``;
    building it is the expensive part, self-composition per history is cheap.
    """
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION,
        sampling_prob=sample_rate,
    )


@lru_cache(maxsize=None)
def pld_epsilon(history: History, delta: float) -> float:
    """Poisson-subsampled Gaussian via privacy loss distributions (tight reference)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    composed = None
    for sigma, rate, steps in history:
        segment = pld_per_step(sigma, rate).self_compose(steps)
        composed = segment if composed is None else composed.compose(segment)
    return float(composed.get_epsilon_for_delta(delta))


# Replace-one sensitivity of a sum of updates clipped to C, in units of C.
REPLACE_ONE_SENSITIVITY = 2.0


@lru_cache(maxsize=None)
def fixed_size_rdp_epsilon(
    rounds: tuple[tuple[float, int, int], ...], delta: float
) -> float:
    """Fixed-size cohorts (``cohort`` of ``population`` without replacement), via RDP.

    dp_accounting supports this sampling only for replace-one neighbours, the relation
    under which its amplification is proven; the figure is therefore replace-one epsilon.
    Its Gaussian noise multiplier is relative to the replace-one sensitivity of the clipped
    sum, 2C (one client's update swapped for another's), so the recorded sigma (relative
    to C) is halved.
    """
    if not rounds:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant(
        orders=RDP_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    for sigma, population, cohort in rounds:
        if sigma == 0:
            return math.inf
        accountant.compose(
            dp_accounting.SampledWithoutReplacementDpEvent(
                population, cohort, dp_accounting.GaussianDpEvent(sigma / REPLACE_ONE_SENSITIVITY)
            )
        )
    return float(accountant.get_epsilon(delta))


def exceeds(recomputed: float, reported: float, tolerance: float) -> bool:
    """Does the recomputation exceed the report by more than the relative tolerance?"""
    return recomputed > reported * (1.0 + tolerance) + ABSOLUTE_SLACK


def clear_caches() -> None:
    for cached in (rdp_per_step, rdp_epsilon, pld_per_step, pld_epsilon, fixed_size_rdp_epsilon):
        cached.cache_clear()
