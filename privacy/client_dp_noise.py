"""Client-level DP's noise: how the run's sigma splits between the update and the clip
count, how much of it survives dropouts, the share each client adds under distributed
noise, and whether that noise swamps the update. Plain numbers over a ``ClientDpPlan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedguard.privacy.accounting import PrivacyConfigError
from fedguard.privacy.client_dp_accounting import (
    CLIP_COUNT_SENSITIVITY,
    DEFAULT_COUNT_STDDEV_PER_CLIENT,
    ClientDpPlan,
    planned_noise_multiplier,
)


def combined_noise_multiplier(update_sigma: float, count_std: float | None) -> float:
    """σ of the one Gaussian mechanism that releasing the update sum at σ_Δ and the clip count
    at σ_b amounts to: σ⁻² = σ_Δ⁻² + (2σ_b)⁻² (σ_Δ itself when no count is released)."""
    if count_std is None:
        return float(update_sigma)
    if update_sigma <= 0 or count_std <= 0:
        return 0.0  # a noiseless part reveals its sum exactly
    return float((update_sigma**-2 + (count_std / CLIP_COUNT_SENSITIVITY) ** -2) ** -0.5)


def update_noise_multiplier(sigma: float, count_std: float | None) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2): what is left of the run's σ for the update once the
    count took its share. PrivacyConfigError where 2σ_b ≤ σ (σ_Δ would be imaginary)."""
    if count_std is None or sigma == 0:
        return float(sigma)
    count_sigma = count_std / CLIP_COUNT_SENSITIVITY
    if count_sigma <= sigma:
        raise PrivacyConfigError(
            f"adaptive clipping needs 2 x clipped_count_stddev > noise multiplier: 2 x {count_std:.4g} <= {sigma:.4g}"
        )
    return float((sigma**-2 - count_sigma**-2) ** -0.5)


@dataclass(frozen=True)
class NoiseSplit:
    """One round's noise: σ (combined; what the accountant records), σ_Δ (update sum's noise
    std over C) and σ_b (clip count's noise std; None under fixed clipping)."""

    sigma: float
    update_sigma: float
    count_std: float | None

    @classmethod
    def of(cls, sigma: float, count_std: float | None) -> NoiseSplit:
        return cls(float(sigma), update_noise_multiplier(sigma, count_std), count_std)

    def surviving(self, fraction: float) -> NoiseSplit:
        """Distributed noise after dropouts: s of n shares are in the sums, so each part keeps
        √(s/n) of its std, and σ is recombined from what really survived."""
        if fraction == 1.0:
            return self
        scale = math.sqrt(fraction)
        update = self.update_sigma * scale
        count = None if self.count_std is None else self.count_std * scale
        return NoiseSplit(combined_noise_multiplier(update, count), update, count)


def worst_case_surviving_fraction(plan: ClientDpPlan, population: int | None = None) -> float:
    """The smallest share s/n of the planned noise a released sum can hold: 1 under central
    noise; under distributed noise s = ``min_survivors`` (SecAgg+'s threshold) of the expected
    cohort n. A budget stop must use this: dropouts are not known before the round, and with
    fewer survivors the same round spends more (issue #14: a stop at the planned σ overshot
    client_max_epsilon=5 by up to 0.41)."""
    if plan.min_survivors is None:
        return 1.0
    expected = plan.cohort.expected_size(population)
    if expected <= 0:
        return 1.0
    return min(1.0, plan.min_survivors / expected)


def count_noise_std(plan: ClientDpPlan) -> float | None:
    """σ_b of the run: configured, or expected cohort / 20; None under fixed clipping."""
    if not plan.adaptive:
        return None
    if plan.count_stddev is not None:
        return float(plan.count_stddev)
    return plan.cohort.expected_size() * DEFAULT_COUNT_STDDEV_PER_CLIENT


def noise_split(plan: ClientDpPlan) -> NoiseSplit:
    """The run's planned (σ, σ_Δ, σ_b), a pure function of the plan (clients derive it too)."""
    return NoiseSplit.of(planned_noise_multiplier(plan), count_noise_std(plan))


def noise_share_std(plan: ClientDpPlan, clip_norm: float | None = None) -> float:
    """Std of the Gaussian each client adds to its update under distributed noise: σ_Δ·C/√n,
    so that n shares sum to the central mechanism's N(0, (σ_Δ·C)²). C: the round's clip norm
    (adaptive clipping), else the plan's."""
    clip_norm = plan.clip_norm if clip_norm is None else clip_norm
    return noise_split(plan).update_sigma * clip_norm / math.sqrt(plan.cohort.expected_size())


def count_share_std(plan: ClientDpPlan) -> float:
    """Std each client adds to its clip indicator under distributed noise: σ_b/√n."""
    count_std = count_noise_std(plan)
    return 0.0 if count_std is None else count_std / math.sqrt(plan.cohort.expected_size())


# SecAgg+ clamps each coordinate to its clip range; under distributed noise that range must
# sit this many noise-share stds beyond the clip norm (a clamp then has probability < 1.3e-15
# per coordinate, which the accounting does not add to delta).
DISTRIBUTED_TAIL_STDS = 8


def clamp_headroom(plan: ClientDpPlan) -> float:
    """Under distributed noise, SecAgg+'s clip range must be at least C times this: the
    update plus DISTRIBUTED_TAIL_STDS noise-share stds, per unit of C. One rule for the
    config check and for the largest C adaptive clipping may reach."""
    return 1.0 + DISTRIBUTED_TAIL_STDS * noise_share_std(plan, clip_norm=1.0)


SWAMPED_NOISE_TO_SIGNAL = 1.0


@dataclass(frozen=True)
class UpdateSignal:
    """How the noise on a round's released mean compares with the mean clipped update.

    The mean of n clipped updates has norm at most C; the noise on it is Gaussian with std
    σ_Δ·C/n per coordinate, so over d parameters its norm is about σ_Δ·C·√d/n. Their ratio,
    σ_Δ·√d/n, does not depend on C (adaptive clipping included): above 1 the noise is longer
    than any update the clients can send, and training stays near chance.
    """

    update_sigma: float  # σ_Δ: the noise multiplier on the update sum
    expected_cohort: float  # n: what the sum is divided by
    parameters: int  # d

    @property
    def noise_to_signal(self) -> float:
        return self.update_sigma * math.sqrt(self.parameters) / self.expected_cohort

    @property
    def swamped(self) -> bool:
        return self.noise_to_signal > SWAMPED_NOISE_TO_SIGNAL


def update_signal(plan: ClientDpPlan, parameters: int) -> UpdateSignal:
    """The planned run's noise-to-signal (σ calibrated or fixed, as the server will use it)."""
    return UpdateSignal(noise_split(plan).update_sigma, plan.cohort.expected_size(), int(parameters))


def cohort_for_signal(plan: ClientDpPlan, parameters: int, max_cohort: int = 10**7) -> int | None:
    """Fewest expected clients per round for which the noise stops swamping the update, at the
    plan's sampling rate and target (the population grown to cohort / rate); None beyond max_cohort.

    Why no recalibration per candidate: σ for a target epsilon depends on the sampling rate,
    the rounds and δ, never on the population, so at the same rate a larger federation keeps
    the plan's σ (and a fixed σ is fixed anyway). Only the update's share σ_Δ can move with
    the cohort, under adaptive clipping whose default count noise is n/20; σ_Δ ≥ σ never
    grows with n, so the walk starts at ⌈σ·√d⌉ and stops at the first n that fits.
    """
    sigma = planned_noise_multiplier(plan)
    root_d = math.sqrt(parameters)
    if sigma * root_d <= SWAMPED_NOISE_TO_SIGNAL:
        return 1
    cohort = math.ceil(sigma * root_d / SWAMPED_NOISE_TO_SIGNAL)
    while cohort <= max_cohort:
        count_std = None
        if plan.adaptive:
            count_std = plan.count_stddev if plan.count_stddev is not None else cohort * DEFAULT_COUNT_STDDEV_PER_CLIENT
        try:
            update_sigma = update_noise_multiplier(sigma, count_std)
        except PrivacyConfigError:  # the count would take all of σ at this cohort: a larger one may not
            update_sigma = math.inf
        if update_sigma * root_d / cohort <= SWAMPED_NOISE_TO_SIGNAL:
            return cohort
        if plan.adaptive and plan.count_stddev is not None and math.isfinite(update_sigma):
            cohort = max(cohort + 1, math.ceil(update_sigma * root_d / SWAMPED_NOISE_TO_SIGNAL))  # σ_Δ is fixed
        else:
            cohort += 1
    return None
