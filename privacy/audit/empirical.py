"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023, "Privacy Auditing
with One (1) Training Run").

``m`` canaries (random-pixel inputs with random labels, far from the real data, so a model that
memorises them shows it) are each put into the client's training set with probability 1/2.
The client trains once, with fedguard's own local trainer and the configured privacy
(the harness that trains is ``fedguard.simulations.empirical_audit``; this module is the
statistics, plain numbers only). An
attacker then scores every canary by the loss of its label under the final model and guesses
"in" for the ``k`` lowest losses and "out" for the ``k`` highest. Under epsilon-DP the number
of correct guesses is stochastically dominated by Binomial(2k, e^eps / (1 + e^eps)) (their
Theorem 1 with delta = 0), so the largest epsilon under which the observed count is still
unlikely (p <= 1 - confidence) is an empirical lower bound on the epsilon the training spends.

It can only refute a claim, never confirm one: a bound below the claimed epsilon is expected
(one run, one simple attack); a bound above it means the implementation leaks more than it
claims. The delta term of their Theorem 3 is not modelled; at delta = 1e-5 and a few hundred
canaries it is negligible next to the 5% significance level, but the figure is approximate
where delta is large.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom


DEFAULT_CANARIES = 1000
DEFAULT_GUESS_FRACTION = 0.2  # guesses: this fraction of the canaries, half "in" and half "out"
DEFAULT_CONFIDENCE = 0.95
# epsilon is searched in [0, MAX_EPSILON]; beyond it the bound says "unbounded by this many guesses".
MAX_EPSILON = 50.0
INCLUSION_PROBABILITY = 0.5


@dataclass(frozen=True)
class EmpiricalAudit:
    claimed_epsilon: float | None  # None: a non-private run claims nothing
    delta: float | None
    canaries: int
    guesses: int
    correct: int
    confidence: float
    epsilon_lower_bound: float
    violates_claim: bool
    train_accuracy_on_real_data: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def epsilon_lower_bound(guesses: int, correct: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest epsilon with P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= 1 - confidence."""
    if guesses <= 0 or correct <= 0:
        return 0.0
    alpha = 1.0 - confidence

    def tail_minus_alpha(epsilon: float) -> float:
        p = 1.0 / (1.0 + math.exp(-epsilon))
        return float(binom.sf(correct - 1, guesses, p)) - alpha

    if tail_minus_alpha(0.0) >= 0:
        return 0.0  # no better than guessing at random
    if tail_minus_alpha(MAX_EPSILON) < 0:
        return MAX_EPSILON
    return float(brentq(tail_minus_alpha, 0.0, MAX_EPSILON, xtol=1e-6))


def make_canaries(count: int, input_shape: tuple[int, ...], num_classes: int, low: float, high: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    features = rng.uniform(low, high, size=(count, *input_shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=count).astype(np.int64)
    return features, labels
