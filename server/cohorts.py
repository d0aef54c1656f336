"""Client-level DP's cohort samplers: who trains this round, drawn from OS randomness.

Amplification by sampling holds only while nobody can tell who was sampled, so both
samplers draw from ``secrets`` (Flower's own sampler uses the seeded ``random``, whose
seed is in the run's config). Each is what its accountant assumes: Poisson, every node
independently with probability q; fixed-size, a uniform sample without replacement.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from fedguard.privacy.client_dp_accounting import FIXED, POISSON


@dataclass
class PoissonCohort:
    """Every available node independently with probability ``rate``."""

    rate: float
    sampling: str = field(default=POISSON, init=False)
    _random: secrets.SystemRandom = field(default_factory=secrets.SystemRandom, init=False, repr=False)

    def draw(self, population: list[int]) -> set[int]:
        return {node for node in population if self._random.random() < self.rate}

    def sample_rate(self, cohort: int, population: int) -> float:  # noqa: ARG002 - q is fixed
        return self.rate

    def denominator(self, cohort: int, population: int) -> float:  # noqa: ARG002 - never the realised size
        """qN: the expected cohort, so the real size (which depends on who joined) is never divided by."""
        return self.rate * population


@dataclass
class FixedSizeCohort:
    """Flower's cohort size (``rate`` of the available nodes, at least ``min_cohort``), uniformly without replacement."""

    rate: float
    min_cohort: int
    sampling: str = field(default=FIXED, init=False)
    _random: secrets.SystemRandom = field(default_factory=secrets.SystemRandom, init=False, repr=False)

    def draw(self, population: list[int]) -> set[int]:
        size = min(max(int(len(population) * self.rate), self.min_cohort), len(population))
        return set(self._random.sample(population, size))

    def sample_rate(self, cohort: int, population: int) -> float:
        return cohort / population

    def denominator(self, cohort: int, population: int) -> float:  # noqa: ARG002
        return float(cohort)


CohortSampler = PoissonCohort | FixedSizeCohort


def cohort_sampler(sampling: str, rate: float, min_cohort: int) -> CohortSampler:
    """The sampler the accountant's ``sampling`` assumes."""
    if sampling == POISSON:
        return PoissonCohort(rate)
    if sampling == FIXED:
        return FixedSizeCohort(rate, min_cohort)
    raise ValueError(f"cohort sampling {sampling!r}; allowed: {POISSON}, {FIXED}")
