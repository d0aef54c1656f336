"""Adaptive clipping for client-level DP (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021).

Instead of a fixed clip norm C, the server tracks the γ-quantile of the clients' update
norms: each client of the cohort says whether its update was within the round's C (b = 1)
or had to be clipped (b = 0), the server releases the noised count and moves C
geometrically towards the quantile, C ← C·exp(−η(b̄ − γ)), as TensorFlow Privacy's
``QuantileEstimatorQuery`` (geometric update) does.

Why centred indicators: a client sends b − ½ ∈ {−½, +½}, so adding or removing one client
moves the count by at most ½; noise σ_b on it is then a Gaussian of multiplier 2σ_b, the
figure Theorem 1 combines with the update's σ_Δ (privacy/client_dp_accounting.py). The
server unshifts: b̄ = noisy Σ(b − ½) / n + ½, clamped to [0, 1], with n the expected cohort
the update mean divides by (TF Privacy does the same).

C is post-processing of released values, so it costs nothing beyond the count. The server
sends it with every train message; clients check it is one the rule can have produced
(:func:`round_clip_norm_problem`) before they train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# b - 1/2: what a client sends instead of its bit b (see the module docstring).
INDICATOR_OFFSET = 0.5
# Float slack on the clients' check that the server's C is one the rule can reach.
REACHABLE_RTOL = 1e-9


def clip_indicator(norm: float, clip_norm: float) -> float:
    """b − ½: +½ when the update (before clipping) was within ``clip_norm``, −½ when it was clipped."""
    return (1.0 if norm <= clip_norm else 0.0) - INDICATOR_OFFSET


def unclipped_fraction(noisy_centred_sum: float, denominator: float) -> float:
    """b̄: the noisy fraction of the expected cohort whose updates were within C, in [0, 1]."""
    return min(1.0, max(0.0, noisy_centred_sum / denominator + INDICATOR_OFFSET))


def next_clip_norm(clip_norm: float, fraction: float, target_quantile: float, learning_rate: float) -> float:
    """The geometric update C·exp(−η(b̄ − γ)): C grows while fewer than γ are within it."""
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))


def reachable_clip_norms(initial: float, target_quantile: float, learning_rate: float, updates: int) -> tuple[float, float]:
    """Lowest and highest C that ``updates`` steps of the rule can produce from ``initial``
    (b̄ ∈ [0, 1] bounds each step's factor to [exp(−η(1−γ)), exp(ηγ)])."""
    steps = max(0, updates)
    return (
        initial * math.exp(-learning_rate * (1.0 - target_quantile) * steps),
        initial * math.exp(learning_rate * target_quantile * steps),
    )


@dataclass(frozen=True)
class AdaptiveClipRule:
    """The rule both sides apply: C starts at ``initial`` and moves by the geometric update
    towards the ``target_quantile``; ``ceiling`` is the largest C the run may use (under
    distributed noise, the C whose noised update SecAgg+'s per-coordinate clamp still cannot
    cut; unbounded otherwise, since clamping a clipped update only shrinks it)."""

    initial: float
    target_quantile: float
    learning_rate: float
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError(f"initial clip norm {self.initial!r} must be finite and > 0")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target quantile {self.target_quantile} must be in [0, 1]")
        if not self.learning_rate > 0 or not self.ceiling > 0:
            raise ValueError(f"learning rate {self.learning_rate} and ceiling {self.ceiling} must be > 0")


def round_clip_norm_problem(rule: AdaptiveClipRule, value: float, server_round: int) -> str | None:
    """Why a client must not clip to the server's ``value`` in ``server_round``, or None.

    Besides finite and > 0: no larger than the rule's ceiling (a larger C would let the
    clamp cut the distributed noise), and reachable by round − 1 steps of the rule from the
    initial C (a server cannot jump C to a value of its choosing).
    """
    if not math.isfinite(value) or value <= 0:
        return f"the server's clip norm {value!r} must be finite and > 0"
    if value > rule.ceiling * (1 + REACHABLE_RTOL):
        return (
            f"the server's clip norm {value:.6g} exceeds {rule.ceiling:.6g}, beyond which secure_agg.clip_range "
            f"would clamp the noise"
        )
    low, high = reachable_clip_norms(rule.initial, rule.target_quantile, rule.learning_rate, server_round - 1)
    if not low * (1 - REACHABLE_RTOL) <= value <= high * (1 + REACHABLE_RTOL):
        return (
            f"the server's clip norm {value:.6g} cannot be reached by round {server_round} from "
            f"privacy.client_clip_norm={rule.initial} (possible: {low:.6g} .. {high:.6g})"
        )
    return None


@dataclass
class AdaptiveClipState:
    """The server's current C and the rule that moves it; C rides in the checkpoint."""

    clip_norm: float
    target_quantile: float
    learning_rate: float
    ceiling: float = math.inf

    @classmethod
    def start(cls, rule: AdaptiveClipRule, clip_norm: float | None = None) -> AdaptiveClipState:
        """Start from the rule's initial C, or continue from a checkpointed ``clip_norm``."""
        current = rule.initial if clip_norm is None else float(clip_norm)
        return cls(current, rule.target_quantile, rule.learning_rate, rule.ceiling)

    def update(self, noisy_centred_sum: float, denominator: float) -> float:
        """Move C by the round's noisy count; returns b̄. Capped at the ceiling (post-processing)."""
        fraction = unclipped_fraction(noisy_centred_sum, denominator)
        self.clip_norm = min(self.ceiling, next_clip_norm(self.clip_norm, fraction, self.target_quantile, self.learning_rate))
        return fraction
