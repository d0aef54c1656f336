"""Local trainers: the plain one, and the sample-level DP layer (Opacus DP-SGD) that wraps it.

The DP layer is a wrapper, not a branch in the loop: it turns the plain trainer's
(model, optimizer, loader) into Opacus's private versions, checks the client's
budget before training, and records the spend in the client's persistent state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, RecordDict
from omegaconf import DictConfig
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager

from fedguard.clients.bookkeeping import use_bookkeeping
from fedguard.clients.bookkeeping_layers import unsupported_layers
from fedguard.clients.dp_steps import (
    add_after_noise,
    noise_only_step,
    use_lean_steps,
    use_os_sampler,
    use_secure_noise,
)
from fedguard.clients.planned_privacy import expected_participation, plan_site, round_steps
from fedguard.clients.training import LossRegularizer, TrainingSetup, TrainOutcome, run_epochs
from fedguard.conf.plans import trains_privately
from fedguard.conf.sample_dp_checks import is_zero_noise_debug
from fedguard.privacy.accounting import merge_history
from fedguard.privacy.client_budget import STATE_KEY, ClientPrivacyState
from fedguard.privacy.randomness import os_generator
from fedguard.privacy.secure_noise import SecureGaussian

logger = logging.getLogger(__name__)

# `auto` picks book-keeping clipping (fedguard.clients.bookkeeping: one backward pass) where
# every trainable layer has a book-keeping rule, and Opacus's ghost clipping otherwise; both
# give the same clipped gradients as hooks (tests/test_bookkeeping.py, tests/test_privacy.py)
# and book-keeping ran fastest on this project's CNN and MLP (`fedguard bench dp`, README).
# FedProx adds a term to the loss that the one-pass/two-pass per-sample losses cannot carry,
# so it falls back to hooks there.
AUTO_GRAD_SAMPLE_MODE = "bookkeeping"
AUTO_FALLBACK_GRAD_SAMPLE_MODE = "ghost"
AUTO_GRAD_SAMPLE_MODE_WITH_REGULARIZER = "hooks"

# Opacus warns on every PrivacyEngine that its noise comes from torch's PRNG rather than a
# CSPRNG (secure_mode needs torchcsprng, unavailable for this torch); the README's privacy
# model states it once instead. Torch's warning about backward hooks on inputs without
# gradients is expected for the first layer under per-sample gradient hooks.
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class TrainResult:
    outcome: TrainOutcome
    privacy: dict[str, Any] | None


class BudgetExhausted(Exception):
    """The planned round would exceed this client's budget; carries the report for the server."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report["reason"])
        self.report = report


class LocalTrainer(Protocol):
    def planned_steps(self, batches_per_epoch: int) -> int: ...

    def train(
        self, setup: TrainingSetup, *, state: RecordDict, device: torch.device, regularizer: LossRegularizer | None
    ) -> TrainResult: ...


class PlainTrainer:
    """Non-private local training: ``local_epochs`` passes, optionally capped at ``max_steps``."""

    def __init__(self, train_cfg: DictConfig) -> None:
        self.epochs = int(train_cfg.local_epochs)
        self.max_steps = None if train_cfg.max_steps is None else int(train_cfg.max_steps)

    def planned_steps(self, batches_per_epoch: int) -> int:
        return round_steps(self.epochs, self.max_steps, batches_per_epoch)

    def train(
        self, setup: TrainingSetup, *, state: RecordDict, device: torch.device, regularizer: LossRegularizer | None
    ) -> TrainResult:
        return TrainResult(run_epochs(setup, self.epochs, device, regularizer, self.max_steps), None)


class _MemoryManagedLoader:
    """Re-enters Opacus's BatchMemoryManager each epoch so the training loop stays unchanged."""

    def __init__(self, loader: Any, max_physical_batch_size: int, optimizer: Any) -> None:
        self.loader, self.max_physical, self.optimizer = loader, max_physical_batch_size, optimizer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        with BatchMemoryManager(
            data_loader=self.loader, max_physical_batch_size=self.max_physical, optimizer=self.optimizer
        ) as physical:
            yield from physical


class SampleDPTrainer:
    """DP-SGD around another trainer, with cumulative accounting and budget enforcement."""

    def __init__(self, inner: PlainTrainer, cfg: DictConfig, site_budget: float | None) -> None:
        self.inner = inner
        self.cfg = cfg
        self.dp = cfg.privacy
        self.expected_rounds = expected_participation(cfg)
        budgets = [b for b in (self.dp.max_epsilon or self.dp.target_epsilon, site_budget) if b is not None]
        self.budget = min(budgets) if budgets else None
        self.grad_sample_mode = str(self.dp.grad_sample_mode)
        if self.grad_sample_mode == "auto":
            self.grad_sample_mode = (
                AUTO_GRAD_SAMPLE_MODE_WITH_REGULARIZER if cfg.strategy.name == "fedprox" else AUTO_GRAD_SAMPLE_MODE
            )
        if not self.dp.poisson_sampling and not is_zero_noise_debug(self.dp):
            # conf.sample_dp_checks refuses this config; a client never trains on one that slipped past.
            raise ValueError("privacy.poisson_sampling=false is refused under sample-level DP (no sound accountant)")
        if self.dp.release_unaccounted_metrics:
            logger.warning(
                "privacy.release_unaccounted_metrics=true: this site sends its raw training loss and local-validation "
                "metrics, which no epsilon covers"
            )

    def planned_steps(self, batches_per_epoch: int) -> int:
        return self.inner.planned_steps(batches_per_epoch)

    def engine_mode(self, model: torch.nn.Module) -> str:
        """The per-sample gradient engine for this model: book-keeping (asked for, or ``auto``) only
        where every trainable layer has a book-keeping rule, else ghost clipping, saying which layer."""
        if self.grad_sample_mode != "bookkeeping":
            return self.grad_sample_mode
        problems = unsupported_layers(model)
        if not problems:
            return "bookkeeping"
        logger.info(
            "book-keeping clipping falls back to Opacus's %s clipping: %s", AUTO_FALLBACK_GRAD_SAMPLE_MODE,
            "; ".join(f"layer {name!r}: {why}" for name, why in problems.items()),
        )
        return AUTO_FALLBACK_GRAD_SAMPLE_MODE

    def _state(self, state: RecordDict, batches_per_epoch: int) -> ClientPrivacyState:
        if STATE_KEY in state:
            return ClientPrivacyState.from_dict(state[STATE_KEY])
        plan = plan_site(self.cfg, batches_per_epoch)  # the same plan fedguard simulate prints before round 1
        fresh = ClientPrivacyState(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            delta=float(self.dp.delta),
            accountant=str(self.dp.accountant),
            budget_epsilon=self.budget,
        )
        logger.info(
            "sample-level DP: sigma=%.4f q=%.4g, planned %d steps over %d rounds -> epsilon %.3f (delta %g), budget %s",
            plan.noise_multiplier, plan.sample_rate, plan.steps, self.expected_rounds, plan.epsilon, fresh.delta,
            self.budget,
        )
        return fresh

    def _privatize(
        self, setup: TrainingSetup, engine: PrivacyEngine, priv: ClientPrivacyState, device: torch.device
    ) -> TrainingSetup:
        mode = self.engine_mode(setup.model)
        made = engine.make_private(
            module=setup.model,
            optimizer=setup.optimizer,
            criterion=setup.criterion,
            data_loader=setup.loader,
            noise_multiplier=priv.noise_multiplier,
            max_grad_norm=float(self.dp.max_grad_norm),
            poisson_sampling=bool(self.dp.poisson_sampling),
            # Book-keeping clipping uses ghost clipping's optimizer (noise, scaling, accounting) as is.
            grad_sample_mode="ghost" if mode == "bookkeeping" else mode,
            # Noise from OS randomness, fresh each round: never the global torch RNG, which
            # anything in the process (a torch.manual_seed(cfg.seed)) could have seeded.
            noise_generator=os_generator(device),
        )
        if mode == "bookkeeping":
            module, optimizer, _, loader = made
            module.remove_hooks()  # ghost clipping's norm hooks: book-keeping's own replace them
            _, criterion = use_bookkeeping(module._module, optimizer, setup.criterion, float(self.dp.max_grad_norm))
        elif mode == "ghost":
            module, optimizer, criterion, loader = made
        else:
            (module, optimizer, loader), criterion = made, setup.criterion
        use_lean_steps(optimizer)  # ghost and book-keeping: same numbers, less per-step overhead
        if self.dp.secure_noise:
            use_secure_noise(optimizer, SecureGaussian())
        if self.dp.poisson_sampling:
            # Opacus takes the caller's loader generator for its Poisson sampler (secure_mode off);
            # that one may be seeded from the run's config. Replace it, whatever the caller passed.
            use_os_sampler(loader)
        if self.dp.max_physical_batch_size is not None:
            loader = _MemoryManagedLoader(loader, int(self.dp.max_physical_batch_size), optimizer)
        steps_before = priv.total_steps

        def steps_taken() -> int:
            return sum(steps for _, _, steps in engine.accountant.history) - steps_before

        return TrainingSetup(
            module, optimizer, loader, criterion, on_empty_batch=lambda: noise_only_step(optimizer), steps_taken=steps_taken
        )

    def train(
        self, setup: TrainingSetup, *, state: RecordDict, device: torch.device, regularizer: LossRegularizer | None
    ) -> TrainResult:
        batches_per_epoch = len(setup.loader)
        priv = self._state(state, batches_per_epoch)
        prior_budget = attach_prior_spend(priv, state)
        priv.tighten(self.budget, prior_budget)  # a stored budget never outlives a stricter one given later
        planned = self.planned_steps(batches_per_epoch)
        fits, epsilon_after = priv.fits_budget(planned)
        if not fits:
            state[STATE_KEY] = ConfigRecord(priv.to_dict())
            reason = (
                f"budget exhausted: {planned} more steps would reach epsilon {epsilon_after:.3f} "
                f"> budget {priv.budget_epsilon:.3f}"
            )
            logger.warning("refusing this round: %s", reason)
            report = priv.report(steps_this_round=0, refused=True, reason=reason)
            raise BudgetExhausted({**report, "planned_steps": planned, "epsilon_if_trained": epsilon_after})

        engine = PrivacyEngine(accountant=priv.accountant)
        engine.accountant.history = list(priv.history)
        steps_before = priv.total_steps
        private_setup = self._privatize(setup, engine, priv, device)
        if regularizer is not None:
            add_after_noise(private_setup.optimizer, regularizer)
        outcome = self.inner.train(private_setup, state=state, device=device, regularizer=None).outcome
        priv.history = merge_history(engine.accountant.history)
        if priv.total_steps - steps_before != planned or outcome.steps != planned:
            # The budget was checked for `planned` steps: anything else on the ledger would be a wrong claim.
            raise RuntimeError(
                f"sample-level DP took {outcome.steps} steps and accounted {priv.total_steps - steps_before}, "
                f"but the budget was checked for {planned}"
            )
        priv.rounds_participated += 1
        state[STATE_KEY] = ConfigRecord(priv.to_dict())
        return TrainResult(outcome, priv.report(steps_this_round=priv.total_steps - steps_before, refused=False))


def build_trainer(cfg: DictConfig, site_budget: float | None) -> LocalTrainer:
    """The plain trainer, wrapped in the privacy layer the config asks for."""
    trainer = PlainTrainer(cfg.train)
    if trains_privately(cfg):
        return SampleDPTrainer(trainer, cfg, site_budget)
    return trainer


def training_commitments(cfg: DictConfig, dataset_size: int) -> dict[str, int | None]:
    """What the site signs with each DP-SGD entry so the audit can rebuild q = 1/ceil(N/B)
    (Opacus's DPDataLoader rate) and the round's steps itself instead of trusting them."""
    train = cfg.train
    return {
        "batch_size": int(train.batch_size),
        "dataset_size": int(dataset_size),
        "local_epochs": int(train.local_epochs),
        "max_steps": None if train.max_steps is None else int(train.max_steps),
    }


# The site's spend on the same data under other lineages, put into the state by clients/site_state.py.
PRIOR_KEY = "fedguard.sample-dp.prior"


def attach_prior_spend(priv: ClientPrivacyState, state: RecordDict) -> float | None:
    """Give ``priv`` the other lineages' history on this data; returns the strictest budget the
    site ever gave for it (None: none, or no record)."""
    if PRIOR_KEY not in state:
        return None
    prior = state[PRIOR_KEY]
    priv.prior_history = [(float(s), float(q), int(n)) for s, q, n in zip(prior["sigma"], prior["rate"], prior["steps"])]
    budget = float(prior["budget_epsilon"])
    return None if budget < 0 else budget
