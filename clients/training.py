"""Local training and evaluation on one client.

Training is split into building a :class:`TrainingSetup` (model, optimizer, loader)
and running epochs over it, so privacy layers can wrap the setup (Opacus replaces
all three) without touching the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedguard.clients.scattering import warm_model
from fedguard.privacy.randomness import os_generator

logger = logging.getLogger(__name__)

# Adds a term to the loss given the current model (FedProx's proximal term, for instance).
LossRegularizer = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainingSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Iterable
    criterion: nn.Module
    # Called for each empty batch (Poisson sampling can draw one): under DP-SGD an empty draw
    # is still a step of the analysed mechanism (noise only), so the DP layer takes it here.
    on_empty_batch: Callable[[], None] | None = None
    # Steps taken so far as the privacy layer counts them (one per Poisson draw, empty or not);
    # None: count non-empty batches here. ``max_steps`` caps this count.
    steps_taken: Callable[[], int] | None = None


@dataclass(frozen=True)
class TrainOutcome:
    mean_loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvaluationOutcome:
    loss: float
    accuracy: float
    num_examples: int


def make_training_setup(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, train_cfg: DictConfig, seed: int | None
) -> TrainingSetup:
    """Model, SGD and a shuffling loader. ``seed=None`` draws the shuffle from OS randomness:
    what a DP client must use (the DP layer also replaces the sampler's generator itself)."""
    generator = os_generator() if seed is None else torch.Generator().manual_seed(seed)
    warm_model(model, features)  # a fixed front end (scattering) runs once per image, not per batch
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = DataLoader(dataset, batch_size=train_cfg.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=train_cfg.learning_rate,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay,
    )
    return TrainingSetup(model=model, optimizer=optimizer, loader=loader, criterion=nn.CrossEntropyLoss())


class ProximalTerm:
    """FedProx: (mu / 2) * ||w - w_global||^2, pulling local models towards the global one.

    Called on a model it is the loss term (plain training). Its gradient mu * (w - w_global)
    depends on the weights only, never on a record, so under DP-SGD it is added after the
    clipped, noised gradient (:meth:`add_gradient`): post-processing, no privacy cost. Added
    to the loss instead, Opacus would drop it (its per-sample gradients hold data terms only).
    """

    def __init__(self, global_model: nn.Module, mu: float) -> None:
        self.mu = float(mu)
        self.anchors = [p.detach().clone() for p in global_model.parameters()]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        squared = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchors, strict=True))
        return 0.5 * self.mu * squared

    @torch.no_grad()
    def add_gradient(self, params: Iterable[nn.Parameter]) -> None:
        """p.grad += mu * (p - anchor) for the model's parameters, in the model's order."""
        for p, anchor in zip(params, self.anchors, strict=True):
            if p.grad is not None:
                p.grad.add_(p - anchor.to(p.device), alpha=self.mu)


def proximal_regularizer(global_model: nn.Module, mu: float) -> ProximalTerm:
    """FedProx's proximal term around ``global_model`` (see :class:`ProximalTerm`)."""
    return ProximalTerm(global_model, mu)


def run_epochs(
    setup: TrainingSetup,
    epochs: int,
    device: torch.device,
    regularizer: LossRegularizer | None = None,
    max_steps: int | None = None,
) -> TrainOutcome:
    """Train for ``epochs`` passes (or ``max_steps`` steps, whichever ends first).

    An empty batch (Poisson sampling draws them) goes to ``setup.on_empty_batch`` (the DP
    layer's noise-only step), or is skipped without one. With ``setup.steps_taken`` the
    step count, and so ``max_steps``, is the privacy layer's: every draw, empty or not.
    """
    model, optimizer = setup.model, setup.optimizer
    model.to(device)
    model.train()
    total_loss, total_examples, steps = 0.0, 0, 0

    def taken() -> int:
        return steps if setup.steps_taken is None else setup.steps_taken()

    def done() -> bool:
        return max_steps is not None and taken() >= max_steps

    for epoch in range(epochs):
        if done():
            break  # not one more epoch: each would draw (and discard) a batch, up to epochs of them
        for features, labels in setup.loader:
            if done():
                break
            if len(labels) == 0:
                if setup.on_empty_batch is not None:
                    setup.on_empty_batch()
                continue
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = setup.criterion(model(features), labels)
            if regularizer is not None:
                loss = loss + regularizer(model)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(labels)
            total_examples += len(labels)
            steps += 1
        logger.debug("local epoch %d/%d done after %d steps", epoch + 1, epochs, steps)
    mean_loss = total_loss / total_examples if total_examples else float("nan")
    return TrainOutcome(mean_loss=mean_loss, num_examples=total_examples, steps=taken())


@torch.no_grad()
def evaluate_model(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device
) -> EvaluationOutcome:
    """Mean cross-entropy and accuracy over a whole split."""
    if len(labels) == 0:
        return EvaluationOutcome(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    warm_model(model, features)
    model.to(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = torch.from_numpy(features[start : start + batch_size]).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        logits = model(x)
        total_loss += float(criterion(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
    return EvaluationOutcome(loss=total_loss / len(labels), accuracy=correct / len(labels), num_examples=len(labels))
