"""The federation's client-level (DP-FedAvg) accountant: one Gaussian release per round.

Each round releases the sum of clipped updates (sensitivity C) plus N(0, (σ_eff·C)²),
where σ_eff is the noise that really went into the released sum. Epsilon is always
recomputed from the whole history, which is what a checkpoint carries.

* ``poisson`` cohorts: Opacus RDP over [(σ_eff, q, 1) per round] (subsampled Gaussian,
  add/remove-one client), the analysis Poisson sampling is proven for.
* ``fixed`` cohorts (m of N without replacement): Opacus has no analysis for them, so
  dp_accounting's RDP for sampling without replacement is used. That analysis is for
  replace-one neighbours, under which the clipped sum's sensitivity is 2C, not C: the
  Gaussian event is therefore given noise multiplier σ_eff / 2.

Adaptive clipping (Andrew et al. 2021, Theorem 1) releases two sums per round: the
clipped updates with noise σ_Δ·C and the clients' centred clip indicators b − ½ (one
client moves that sum by at most ½) with noise σ_b. Together they are one Gaussian
mechanism of noise multiplier σ, σ⁻² = σ_Δ⁻² + (2σ_b)⁻², in both neighbour relations (under
replace-one both sensitivities double). The accountant records σ; the run's σ (given or
calibrated) is that combined σ, and the update gets σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from fedguard.privacy.accounting import PrivacyConfigError, calibrate_noise_multiplier, compute_epsilon

POISSON, FIXED = "poisson", "fixed"
# Replace-one neighbours change one clipped update for another: the sum moves by up to 2C.
REPLACE_ONE_SENSITIVITY_FACTOR = 2.0
# Fixed-size calibration: bracket growth limit, and the relative precision of sigma (the
# result is the upper end of the final bracket, so it always fits the target).
MAX_SIGMA = 1e6
CALIBRATION_RTOL = 1e-3
# Opacus's default RDP orders (RDPAccountant.DEFAULT_ALPHAS, checked equal in tests), so Poisson
# and fixed-size figures use one grid; written out so importing this module stays cheap.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Adaptive clipping: one client moves the sum of centred clip indicators (b - 1/2) by at most this.
CLIP_COUNT_SENSITIVITY = 0.5
# Andrew et al.'s recommended noise on the clip count when none is configured: expected cohort / 20.
DEFAULT_COUNT_STDDEV_PER_CLIENT = 1 / 20


@dataclass(frozen=True)
class Release:
    """What one round released, as the accountant needs it."""

    noise_multiplier: float  # σ_eff: noise std of the released sum / C
    sample_rate: float  # q (Poisson) or cohort / population (fixed)
    population: int
    cohort: int

    def to_payload(self) -> list[float]:
        return [self.noise_multiplier, self.sample_rate, float(self.population), float(self.cohort)]

    @classmethod
    def from_payload(cls, values: list[float]) -> Release:
        sigma, rate, population, cohort = values
        return cls(float(sigma), float(rate), int(population), int(cohort))


@lru_cache(maxsize=None)
def _fixed_rdp_per_round(noise_multiplier: float, population: int, cohort: int) -> np.ndarray:
    """RDP of one round (``cohort`` of ``population`` without replacement) at every order.

    The per-event formula dp_accounting's ``RdpAccountant.compose`` applies to a
    ``SampledWithoutReplacementDpEvent`` (replace-one), computed once per distinct round:
    it costs about half a second, and a run's history repeats the same round.
    tests/test_client_dp.py checks it against the public accountant.
    """
    from dp_accounting.rdp import rdp_privacy_accountant  # on first use: ~0.5 s to import

    gaussian_sigma = noise_multiplier / REPLACE_ONE_SENSITIVITY_FACTOR
    vector = np.asarray(
        rdp_privacy_accountant._compute_rdp_sample_wor_gaussian(  # noqa: SLF001
            q=cohort / population, noise_multiplier=gaussian_sigma, orders=RDP_ORDERS
        ),
        dtype=np.float64,
    )
    vector.setflags(write=False)
    return vector


def _fixed_epsilon(releases: list[Release], delta: float) -> float:
    if any(release.noise_multiplier == 0 for release in releases):
        return math.inf
    from dp_accounting.rdp import rdp_privacy_accountant

    rdp = sum(_fixed_rdp_per_round(r.noise_multiplier, r.population, r.cohort) for r in releases)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)
    return float(epsilon)


def epsilon_of(releases: list[Release], sampling: str, delta: float) -> float:
    """Client-level epsilon of a whole history of releases."""
    if not releases:
        return 0.0
    if sampling == POISSON:
        if any(r.noise_multiplier == 0 for r in releases):
            return math.inf
        return compute_epsilon([(r.noise_multiplier, r.sample_rate, 1) for r in releases], delta, "rdp").epsilon
    if sampling == FIXED:
        return _fixed_epsilon(releases, delta)
    raise PrivacyConfigError(f"privacy.client_sampling={sampling!r}; allowed: {POISSON}, {FIXED}")


def calibrate_sigma(*, target_epsilon: float, delta: float, sampling: str, plan: Release, rounds: int) -> float:
    """Smallest σ (to bisection precision, rounded up) whose ``rounds`` planned releases stay within the target."""
    if sampling == POISSON:
        return calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=plan.sample_rate, steps=rounds, accountant="rdp"
        )

    def fits(sigma: float) -> bool:
        planned = Release(sigma, plan.sample_rate, plan.population, plan.cohort)
        return epsilon_of([planned] * rounds, sampling, delta) <= target_epsilon

    high = 1.0
    while not fits(high):
        high *= 2
        if high > MAX_SIGMA:
            raise PrivacyConfigError(f"no noise level reaches privacy.client_target_epsilon={target_epsilon}")
    low = high / 2
    while high / low > 1 + CALIBRATION_RTOL:  # geometric bisection: each step costs one new RDP vector
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


@dataclass
class FederationAccountant:
    """History of the federation's releases; what the checkpoint's run state carries."""

    sampling: str
    delta: float
    noise_multiplier: float  # the planned σ (before dropouts), fixed for the run
    releases: list[Release] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.releases, self.sampling, self.delta)

    def epsilon_if(self, release: Release) -> float:
        """Epsilon after one more release like ``release`` (for stopping before it)."""
        return epsilon_of([*self.releases, release], self.sampling, self.delta)

    def record(self, release: Release) -> float:
        self.releases.append(release)
        return self.epsilon

    def to_payload(self) -> dict[str, Any]:
        return {
            "sampling": self.sampling,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "releases": [r.to_payload() for r in self.releases],
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> FederationAccountant:
        return cls(
            sampling=str(payload["sampling"]),
            delta=float(payload["delta"]),
            noise_multiplier=float(payload["noise_multiplier"]),
            releases=[Release.from_payload(list(values)) for values in payload["releases"]],
        )


@dataclass(frozen=True)
class CohortPlan:
    """How the server draws each round's cohort, as the accountant must know it.

    ``poisson``: each of ``population`` clients joins independently with probability ``rate``;
    ``fixed``: exactly ``cohort_size`` of ``population``, without replacement.
    """

    sampling: str
    population: int
    rate: float
    cohort_size: int

    def __post_init__(self) -> None:
        if self.sampling not in (POISSON, FIXED):
            raise PrivacyConfigError(f"cohort sampling {self.sampling!r}; allowed: {POISSON}, {FIXED}")
        if self.population < 1 or self.cohort_size < 1:
            raise PrivacyConfigError(f"population {self.population} and cohort size {self.cohort_size} must be >= 1")
        if not 0 < self.rate <= 1:
            raise PrivacyConfigError(f"sample rate {self.rate} must be in (0, 1]")

    def expected_size(self, population: int | None = None) -> float:
        """The cohort size the mean divides by and distributed noise shares are sized for:
        q·N for Poisson (never the realised size, which depends on who joined), m for fixed."""
        population = self.population if population is None else population
        if self.sampling == POISSON:
            return self.rate * population
        return float(min(population, self.cohort_size))

    def release(self, sigma: float, population: int | None = None) -> Release:
        """A round's release at noise ``sigma`` if nobody drops out."""
        population = self.population if population is None else population
        if self.sampling == POISSON:
            return Release(sigma, self.rate, population, max(1, round(self.rate * population)))
        cohort = min(population, self.cohort_size)
        return Release(sigma, cohort / population, population, cohort)


@dataclass(frozen=True)
class ClientDpPlan:
    """Everything client-level DP's noise and accounting depend on, as plain numbers.

    Exactly one of ``noise_multiplier`` (σ fixed) and ``target_epsilon`` (σ calibrated for
    ``rounds``) is set. ``adaptive``: the clip count is released too, with noise
    ``count_stddev`` (None: Andrew et al.'s expected cohort / 20). ``min_survivors``: under
    distributed noise, the fewest clients whose noise shares a released sum can hold (SecAgg+'s
    threshold: below it nothing is unmasked); None under central noise, whose std never shrinks.
    """

    cohort: CohortPlan
    rounds: int
    delta: float
    clip_norm: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    adaptive: bool = False
    count_stddev: float | None = None
    min_survivors: int | None = None

    def __post_init__(self) -> None:
        if self.min_survivors is not None and int(self.min_survivors) < 1:
            raise PrivacyConfigError(f"min_survivors {self.min_survivors} must be >= 1")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError("set exactly one of a noise multiplier and a target epsilon")
        if self.rounds < 1 or not 0 < self.delta < 1 or not self.clip_norm > 0:
            raise PrivacyConfigError(
                f"rounds {self.rounds} must be >= 1, delta {self.delta} in (0, 1), clip norm {self.clip_norm} > 0"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise PrivacyConfigError(f"noise multiplier {self.noise_multiplier} must be >= 0")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise PrivacyConfigError(f"target epsilon {self.target_epsilon} must be > 0")


def planned_epsilon(plan: ClientDpPlan, sigma: float) -> float:
    """Epsilon the whole planned run spends at ``sigma`` if nobody drops out (printed before round 1)."""
    return epsilon_of([plan.cohort.release(sigma)] * plan.rounds, plan.cohort.sampling, plan.delta)


@lru_cache(maxsize=8)
def planned_noise_multiplier(plan: ClientDpPlan) -> float:
    """σ of the run: fixed, or calibrated for the planned rounds. A pure function of the
    plan, so clients adding distributed noise derive it themselves (not trusting a number
    the server sends) and get exactly the server's figure. Cached: calibration costs
    seconds and clients ask every round."""
    if plan.noise_multiplier is not None:
        return float(plan.noise_multiplier)
    assert plan.target_epsilon is not None  # checked by ClientDpPlan
    return calibrate_sigma(
        target_epsilon=plan.target_epsilon, delta=plan.delta, sampling=plan.cohort.sampling,
        plan=plan.cohort.release(1.0), rounds=plan.rounds,
    )


# Observers of client-level DP (summary.json's privacy.federation.epsilon_by_observer).
SERVER_OPERATOR, COHORT_KNOWERS, MODEL_USERS_AND_OTHER_SITES = (
    "server_operator", "knows_cohorts", "model_users_and_other_sites"
)


def epsilon_without_amplification(releases: list[Release], sampling: str, delta: float) -> float:
    """Epsilon against an observer who knows every cohort: each release at sample rate 1.

    Amplification by sampling rests on the observer not knowing who was sampled; the server
    operator draws the cohorts (and metrics.jsonl and the ledger record who took part), so
    against it every round is a plain Gaussian on the cohort's sum. Fixed-size cohorts keep
    their replace-one relation (the whole population as the "cohort": no amplification)."""
    plain = [Release(r.noise_multiplier, 1.0, r.population, r.population) for r in releases]
    return epsilon_of(plain, sampling, delta)


def epsilon_by_observer(accountant: FederationAccountant, *, distributed_noise: bool) -> dict[str, float | None]:
    """Client-level epsilon per observer; None where no epsilon holds.

    The server operator sees, with central noise, each update (or, under SecAgg+, the sum)
    before its noise: no client-level guarantee against it at all. With distributed noise it
    sees only noised sums, but knows the cohorts: no amplification. Other sites and users of
    the released models see noised models and not the cohorts: the amplified figure. Whoever
    sees only noised models but knows the cohorts (a holder of the run directory: metrics.jsonl
    and the ledger name them) gets the unamplified figure."""
    unamplified = epsilon_without_amplification(accountant.releases, accountant.sampling, accountant.delta)
    return {
        SERVER_OPERATOR: unamplified if distributed_noise else None,
        COHORT_KNOWERS: unamplified,
        MODEL_USERS_AND_OTHER_SITES: accountant.epsilon,
    }


def build_accountant(plan: ClientDpPlan) -> FederationAccountant:
    """The run's accountant, σ fixed or calibrated before round 1."""
    return FederationAccountant(
        sampling=plan.cohort.sampling, delta=plan.delta, noise_multiplier=planned_noise_multiplier(plan)
    )


# Noise-to-signal of the released mean above which the noise swamps the update.
