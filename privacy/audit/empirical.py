"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023, "Privacy Auditing
with One (1) Training Run").

``m`` canaries (random-pixel inputs with random labels, far from the real data, so a model that
memorises them shows it) are each put into the client's training set with probability 1/2.
The client trains once, with fedguard's own local trainer and the configured privacy. An
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

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from scipy.optimize import brentq
from scipy.stats import binom
from torch import nn

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, resolve_device
from fedguard.clients.private_training import build_trainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import compose_config
from fedguard.conf.schema import trains_privately

logger = logging.getLogger(__name__)

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


def _per_example_loss(model: nn.Module, features: np.ndarray, labels: np.ndarray, device: torch.device) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(features).to(device))
        losses = nn.functional.cross_entropy(logits, torch.from_numpy(labels).to(device), reduction="none")
    return losses.cpu().numpy()


def _accuracy(model: nn.Module, features: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(features).to(device)).argmax(dim=1).cpu().numpy()
    return float((predictions == labels).mean())


def run_empirical_audit(
    overrides: list[str],
    *,
    canaries: int = DEFAULT_CANARIES,
    guess_fraction: float = DEFAULT_GUESS_FRACTION,
    confidence: float = DEFAULT_CONFIDENCE,
) -> EmpiricalAudit:
    """Train one client once on its data plus the included canaries, then attack the canaries."""
    cfg = compose_config(overrides)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    bundle = load_dataset(cfg.dataset, cfg.seed)
    canary_x, canary_y = make_canaries(
        canaries, bundle.input_shape, bundle.num_classes, float(bundle.train_x.min()), float(bundle.train_x.max()), rng
    )
    included = rng.random(canaries) < INCLUSION_PROBABILITY
    train_x = np.concatenate([bundle.train_x, canary_x[included]])
    train_y = np.concatenate([bundle.train_y, canary_y[included]])

    device = resolve_device(cfg.device)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes, private=trains_privately(cfg))
    # The audited DP run draws its batches and noise from OS randomness, as a real client does
    # (the trainer enforces it); only the canaries and their inclusion follow the seed.
    setup = make_training_setup(model, train_x, train_y, cfg.train, None if trains_privately(cfg) else int(cfg.seed))
    result = build_trainer(cfg, None).train(setup, state=RecordDict(), device=device, regularizer=None)
    model = model.to(device)

    scores = -_per_example_loss(model, canary_x, canary_y, device)
    per_side = max(1, int(canaries * guess_fraction) // 2)
    order = np.argsort(scores)  # ascending: most "out"-looking first
    guessed_out, guessed_in = order[:per_side], order[-per_side:]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    guesses = 2 * per_side
    bound = epsilon_lower_bound(guesses, correct, confidence)
    claimed = None if result.privacy is None else float(result.privacy["epsilon"])
    audit = EmpiricalAudit(
        claimed_epsilon=claimed,
        delta=None if result.privacy is None else float(result.privacy["delta"]),
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        confidence=confidence,
        epsilon_lower_bound=bound,
        violates_claim=claimed is not None and bound > claimed,
        train_accuracy_on_real_data=_accuracy(model, bundle.train_x, bundle.train_y, device),
    )
    logger.info("empirical audit: %s", audit)
    return audit
