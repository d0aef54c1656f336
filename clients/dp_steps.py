"""The steps of DP-SGD that fedguard takes itself, around Opacus's DPOptimizer.

Each function exists because the analysed mechanism (the Poisson-subsampled Gaussian
mechanism the accountant counts) and what a plain training loop does with Opacus differ:

- an empty Poisson batch is a step of the mechanism: the released gradient is noise
  alone. A loop that skips it releases one noise draw fewer than the accountant counts,
  and the model then shows which steps drew nobody (:func:`noise_only_step`);
- Opacus's Poisson sampler uses whatever generator the caller's loader carried, which in
  a federated client is easily derived from the run's recorded seed (:func:`use_os_sampler`);
- a loss term that does not depend on the data (FedProx's proximal term) is dropped by the
  DP optimizer, which replaces ``p.grad`` with the clipped, noised per-sample sum; its
  gradient is added after the noise instead, as post-processing (:func:`add_after_noise`);
- with ``privacy.secure_noise`` the noise comes from a CSPRNG (:func:`use_secure_noise`);
- Opacus's ghost-clipping optimizer (which book-keeping clipping also uses) copies each
  clipped sum with ``copy.deepcopy`` and builds each noise tensor on a zero tensor it throws
  away: Python and allocation overhead on every step that does not change one number
  (:func:`use_lean_steps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedguard.privacy.randomness import os_generator
from fedguard.privacy.secure_noise import SecureGaussian

logger = logging.getLogger(__name__)


def noise_only_step(optimizer: DPOptimizer) -> None:
    """One DP-SGD step on an empty batch: zero gradient sum plus N(0, sigma^2 C^2), scaled and
    applied, and counted by the accountant's step hook, exactly as Opacus's own empty-batch
    path does (its per-sample clipping of a zero-length batch gives a zero sum).

    Per-sample gradients of length 0 feed the hooks-style optimizers; a zero ``p.grad`` feeds
    ghost clipping's, which accumulates ``p.grad``. The optimizer's skip queue (physical batch
    splitting) is consumed by ``step()`` as for any other batch.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad = torch.zeros_like(p)
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    logger.debug("empty Poisson batch: took a noise-only step")


def use_os_sampler(loader: Any) -> None:
    """Give an Opacus Poisson loader a fresh, OS-seeded generator for its batch masks.

    Raises TypeError for anything but Opacus's DPDataLoader with its uniform sampler: a loader
    this cannot reach must not be trained on as if it were Poisson-sampled.
    """
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(loader, DPDataLoader) or not isinstance(sampler, UniformWithReplacementSampler):
        raise TypeError(f"expected Opacus's Poisson DPDataLoader, got {type(loader).__name__}")
    sampler.generator = os_generator("cpu")  # the sampler draws its masks with torch.rand on the CPU


def add_after_noise(optimizer: DPOptimizer, regularizer: Callable[[torch.nn.Module], torch.Tensor]) -> None:
    """After each noised, scaled step gradient, add a data-independent term's gradient.

    ``regularizer`` must expose ``add_gradient(params)`` (clients.training.ProximalTerm):
    a term whose gradient depends only on the weights costs no privacy when added after the
    noise. Anything else is refused (TypeError): fedguard cannot tell it is data-independent.
    """
    add_gradient = getattr(regularizer, "add_gradient", None)
    if add_gradient is None:
        raise TypeError(
            f"{type(regularizer).__name__} is not a data-independent term with add_gradient(); "
            "under sample-level DP a loss term must be added after the noise"
        )
    scale_grad = optimizer.scale_grad
    params = list(optimizer.params)

    def scale_then_add() -> None:
        scale_grad()
        add_gradient(params)

    # scale_grad runs once per real (non-skipped) step, after add_noise: the noised gradient is final.
    optimizer.scale_grad = scale_then_add


def use_secure_noise(optimizer: DPOptimizer, source: SecureGaussian) -> None:
    """Draw the optimizer's noise from ``source`` (a CSPRNG) instead of a torch generator.

    Replaces ``add_noise`` on this optimizer only, keeping Opacus's contract: p.grad becomes
    summed_grad + N(0, (sigma * C)^2), each summed gradient used once. The same for the hooks
    and ghost optimizers (both keep the clipped sum in ``p.summed_grad``).
    """

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + source.gaussian(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def use_lean_steps(optimizer: DPOptimizer) -> None:
    """Replace Opacus's ghost-clipping ``accumulate`` and ``add_noise`` on this optimizer with
    versions that compute the same numbers with less overhead.

    - ``accumulate``: the first physical batch's clipped sum is cloned (Opacus deep-copies it,
      ~0.3 ms of Python per parameter); later ones are added in place, as in Opacus.
    - ``add_noise``: the same ``torch.normal`` draws, same standard deviation (the adaptive
      clipping multiplier included), same generator, same parameter order, added in place to
      the fresh noise tensor instead of to a second allocation; Opacus also allocates and
      zero-fills a tensor per parameter that it only returns when the standard deviation is 0.
      The processed-flag check (a clipped sum is noised once) is kept.

    Only for Opacus's ``DPOptimizerFastGradientClipping`` without ``secure_mode`` (whose noise
    is a sum of four draws): anything else is left untouched. ``use_secure_noise`` applied
    afterwards still replaces ``add_noise``; applied before, it is kept: an ``add_noise``
    already installed on this optimizer (the CSPRNG's) is never replaced by torch-generator draws,
    whatever order the two are called in.
    """
    if type(optimizer) is not DPOptimizerFastGradientClipping or optimizer.secure_mode:
        return
    params = list(optimizer.params)

    def accumulate() -> None:
        for p in params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.detach())
            else:
                p.summed_grad = p.grad.detach().clone()

    def add_noise() -> None:
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = multiplier * optimizer.max_grad_norm
        for p in params:
            summed = p.summed_grad
            _check_processed_flag(summed)
            if std == 0:
                noised = summed.clone()
            else:
                noised = torch.normal(mean=0, std=std, size=summed.shape, device=summed.device,
                                      generator=optimizer.generator, dtype=summed.dtype).add_(summed)
            p.grad = noised.view_as(p)
            _mark_as_processed(summed)

    optimizer.accumulate = accumulate
    if "add_noise" not in vars(optimizer):  # not already replaced on this optimizer (secure noise)
        optimizer.add_noise = add_noise
