"""The training harness of the empirical audit (``fedguard audit --empirical``).

Trains one client once, with fedguard's own local trainer and the configured privacy, on
its data plus the canaries drawn for inclusion, then attacks the canaries; the statistics
(the canaries, the epsilon lower bound) live in :mod:`fedguard.privacy.audit.empirical`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, resolve_device
from fedguard.clients.private_training import build_trainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import compose_config
from fedguard.conf.plans import trains_privately
from fedguard.privacy.audit.empirical import (
    DEFAULT_CANARIES,
    DEFAULT_CONFIDENCE,
    DEFAULT_GUESS_FRACTION,
    INCLUSION_PROBABILITY,
    EmpiricalAudit,
    epsilon_lower_bound,
    make_canaries,
)

logger = logging.getLogger(__name__)


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
