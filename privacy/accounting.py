"""Sample-level privacy accounting on top of Opacus's accountants (RDP and PRV).

A client's spend is its whole history of (noise multiplier, sample rate, steps)
triples over every round it trained in; epsilon is always recomputed from that
history, never summed per round.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opacus.accountants import IAccountant


logger = logging.getLogger(__name__)

# Raised by Opacus's RDP analysis when the best order is the largest one tried: the bound is
# then looser (larger epsilon) than it could be, never smaller, so the figure stays safe.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

ACCOUNTANTS = ("rdp", "prv")
# Opacus #604: the PRV accountant breaks down for large epsilon; above this we use RDP and say so.
PRV_RELIABLE_EPSILON = 10.0
# After Opacus's sigma search, step sigma up by this factor until the whole plan fits (Opacus #346).
CALIBRATION_STEP_UP = 1.01
CALIBRATION_MAX_STEP_UPS = 500

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be honoured (e.g. a target epsilon no noise level reaches)."""


@dataclass(frozen=True)
class EpsilonReport:
    epsilon: float
    accountant: str  # the accountant that produced the figure (may differ from the one asked for)


def merge_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Collapse consecutive entries with the same (sigma, q), as Opacus does step by step."""
    merged: list[HistoryEntry] = []
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled-Gaussian step at Opacus's default orders.

    A pure function of two numbers, and the costly part of RDP accounting (~0.5 s at
    q = 0.2 on this machine): a server recomputes its whole history every round, and the
    history repeats the same (sigma, q), so the vector is computed once per pair.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def _rdp_epsilon(merged: Sequence[HistoryEntry], delta: float) -> float:
    """Opacus's ``RDPAccountant.get_epsilon`` on ``merged``, term for term (compute_rdp is
    linear in steps: ``rdp * steps``), with the per-step vector cached."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(np.array(_rdp_of_one_step(sigma, rate)) * steps for sigma, rate, steps in merged)
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


def _accountant_with(name: str, history: Sequence[HistoryEntry]) -> IAccountant:
    from opacus.accountants import create_accountant  # on first use: Opacus pulls in torch.distributed (~1.5 s)

    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"privacy.accountant={name!r}; allowed: {', '.join(ACCOUNTANTS)}")
    accountant = create_accountant(mechanism=name)
    accountant.history = merge_history(history)
    return accountant


def compute_epsilon(history: Sequence[HistoryEntry], delta: float, accountant: str) -> EpsilonReport:
    """Epsilon of the whole history.

    PRV is only asked where it is reliable (Opacus #604): RDP is computed first (cheap,
    and never below PRV's figure); when it exceeds ``PRV_RELIABLE_EPSILON`` the RDP
    figure is reported instead, with a warning. Far outside that range PRV's grid can
    also exhaust memory, so it is not even tried there.
    """
    merged = merge_history(history)
    if not merged:
        return EpsilonReport(0.0, accountant)
    rdp_epsilon = _rdp_epsilon(merged, delta)
    if accountant == "rdp":
        return EpsilonReport(rdp_epsilon, "rdp")
    if rdp_epsilon > PRV_RELIABLE_EPSILON:
        logger.warning(
            "epsilon %.3g is beyond the PRV accountant's reliable range (<= %s, Opacus #604); reporting RDP",
            rdp_epsilon,
            PRV_RELIABLE_EPSILON,
        )
        return EpsilonReport(rdp_epsilon, "rdp")
    try:
        prv_epsilon = float(_accountant_with(accountant, merged).get_epsilon(delta=delta))
    except (ValueError, RuntimeError, FloatingPointError, OverflowError) as err:
        logger.warning("PRV accountant failed (%s); reporting RDP", err)
        return EpsilonReport(rdp_epsilon, "rdp")
    if not math.isfinite(prv_epsilon):
        logger.warning("PRV accountant returned %s; reporting RDP", prv_epsilon)
        return EpsilonReport(rdp_epsilon, "rdp")
    return EpsilonReport(prv_epsilon, accountant)


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest sigma (to within 1%) whose whole planned run stays within ``target_epsilon``.

    Opacus's binary search can land slightly over the target (Opacus #346); the result
    is re-checked on the full plan and raised until it fits. A pure function of five numbers
    costing seconds at large sample rates (each probe is a full RDP vector), and a simulation
    worker plans many virtual sites with the same numbers: cached per process.
    """
    if target_epsilon <= 0:
        raise PrivacyConfigError(f"privacy.target_epsilon={target_epsilon} must be > 0")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise PrivacyConfigError(
            f"no noise level reaches privacy.target_epsilon={target_epsilon} at delta={delta} "
            f"for {steps} steps at sample rate {sample_rate:.4g}: {err}"
        ) from err
    for _ in range(CALIBRATION_MAX_STEP_UPS):
        if compute_epsilon([(sigma, sample_rate, steps)], delta, accountant).epsilon <= target_epsilon:
            return sigma
        sigma *= CALIBRATION_STEP_UP
    raise PrivacyConfigError(f"could not calibrate sigma under privacy.target_epsilon={target_epsilon}")
