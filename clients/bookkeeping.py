"""Book-keeping (BK) clipping: DP-SGD's clipped per-sample gradient sum from one backward pass.

Opacus's ghost clipping runs two backward passes: one for the per-sample gradient norms,
one for the loss reweighted by the clip factors. Book-keeping clipping (Bu, Wang, Zha,
Karypis 2023) keeps what the first pass already touched: forward hooks keep each layer's
input activations, one ``torch.autograd.grad`` of the summed per-sample loss gives each
layer's output gradient (and skips the weight gradients autograd would otherwise compute),
the norms come from those, and the clipped sum for every weight is one contraction
(:mod:`fedguard.clients.bookkeeping_layers`).

The result is written to ``p.grad`` exactly as ghost clipping's second pass leaves it, so
Opacus's ``DPOptimizerFastGradientClipping`` (ghost clipping's optimizer) adds the noise,
scales and counts the step unchanged: same noise, same accounting, same empty-batch path.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from fedguard.clients.bookkeeping_layers import FORWARD_EXTRAS, LAYERS, trainable_params, unsupported_layers

logger = logging.getLogger(__name__)

# Opacus's clip factor, min(1, C / (norm + 1e-6)), kept identical so every mode clips alike.
NORM_EPSILON = 1e-6
# The model attribute naming the hooks attached to it.
ATTACHED = "_fedguard_bookkeeping_hooks"


class BookkeepingUnsupported(ValueError):
    """The model has a trainable layer (or a use of one) book-keeping clipping cannot handle."""


@dataclass
class _Record:
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor
    output_version: int
    extras: dict[str, torch.Tensor]


class BookkeepingHooks:
    """Forward hooks on every trainable layer of ``model``; refuses models with unsupported layers."""

    def __init__(self, model: nn.Module) -> None:
        problems = unsupported_layers(model)
        if problems:
            raise BookkeepingUnsupported(
                "book-keeping clipping cannot handle: " + "; ".join(f"{k}: {v}" for k, v in problems.items())
            )
        previous = getattr(model, ATTACHED, None)
        if previous is not None:
            previous.remove()  # a model privatized again (a new round) must not record each layer twice
        setattr(model, ATTACHED, self)
        self.model = model
        self.layers = [m for m in model.modules() if trainable_params(m)]
        self.records: list[_Record] = []
        self.handles = [model.register_forward_pre_hook(self._start)]
        self.handles += [m.register_forward_hook(self._capture) for m in self.layers]

    def _start(self, _module: nn.Module, _inputs: tuple) -> None:
        self.records = []  # a forward pass whose loss never went backward leaves nothing behind

    def _capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if any(r.module is module for r in self.records):
            raise BookkeepingUnsupported(
                f"{type(module).__name__} ran twice in one forward pass (a reused layer); book-keeping clipping "
                "needs one call per layer: use privacy.grad_sample_mode=hooks"
            )
        extras = FORWARD_EXTRAS.get(type(module))
        self.records.append(_Record(module, inputs[0].detach(), output, output._version,
                                    extras(output) if extras is not None else {}))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.records = [], []
        if getattr(self.model, ATTACHED, None) is self:
            delattr(self.model, ATTACHED)


def clip_factors(squared_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-sample factors min(1, C / (||g_i|| + 1e-6)), as Opacus computes them."""
    return (max_grad_norm / (squared_norms.sqrt() + NORM_EPSILON)).clamp(max=1.0)


def clipped_gradient_sum(
    hooks: BookkeepingHooks, loss_per_sample: torch.Tensor, params: list[nn.Parameter], max_grad_norm: float
) -> torch.Tensor:
    """Set ``p.grad = sum_i c_i * grad_i(p)`` for every parameter in ``params`` from one backward
    pass over the recorded forward; returns the per-sample gradient norms (before clipping)."""
    records, hooks.records = hooks.records, []
    batch = loss_per_sample.shape[0]
    for record in records:
        if record.output._version != record.output_version:
            raise BookkeepingUnsupported(
                f"the output of {type(record.module).__name__} was modified in place (an inplace activation?): "
                "book-keeping clipping needs the layer's own output gradient"
            )
    if batch == 0 or not records:
        for p in params:
            p.grad = torch.zeros_like(p)
        return loss_per_sample.new_zeros(batch)
    output_grads = list(torch.autograd.grad(loss_per_sample.sum(), [r.output for r in records], allow_unused=True))
    # The graph is freed; drop the outputs too, and each output gradient once its layer has used it,
    # so the peak stays at what ghost clipping's backward pass holds.
    inputs = [(r.module, r.activation, r.extras) for r in records]
    del records
    layers = []
    squared = loss_per_sample.new_zeros(batch).detach()
    for index, (module, activation, extras) in enumerate(inputs):
        grad, output_grads[index] = output_grads[index], None
        if grad is None:
            continue  # the loss does not depend on this layer's output: its gradient is zero
        layer = LAYERS[type(module)](module, activation, grad.detach(), **extras)
        del grad
        squared = squared + layer.squared_norms
        layers.append((module, layer))
    del inputs
    factors = clip_factors(squared, max_grad_norm)
    unset = {id(p): p for p in params}
    for module, layer in layers:
        own = trainable_params(module)
        for name, total in layer.clipped_sum(factors).items():
            if unset.pop(id(own[name]), None) is not None:
                own[name].grad = total.to(own[name].dtype)
    for p in unset.values():  # no recorded layer reached it: a zero clipped sum, written once
        p.grad = torch.zeros_like(p)
    return squared.sqrt()


class BookkeepingLoss:
    """Wraps a criterion: calling it gives a :class:`BookkeepingTensor` whose ``backward()`` runs
    book-keeping clipping; the loss value itself is the usual reduced loss."""

    def __init__(self, hooks: BookkeepingHooks, optimizer: DPOptimizerFastGradientClipping, criterion: nn.Module,
                 max_grad_norm: float) -> None:
        if not isinstance(optimizer, DPOptimizerFastGradientClipping):
            raise TypeError("book-keeping clipping needs Opacus's DPOptimizerFastGradientClipping (ghost optimizer)")
        if optimizer.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={optimizer.loss_reduction!r}; only mean and sum are supported")
        self.hooks = hooks
        self.optimizer = optimizer
        self.criterion = copy.copy(criterion)
        self.criterion.reduction = "none"
        self.max_grad_norm = float(max_grad_norm)

    def __call__(self, *args, **kwargs) -> BookkeepingTensor:
        per_sample = self.criterion(*args, **kwargs)
        if per_sample.dim() > 1:
            per_sample = per_sample.reshape(per_sample.shape[0], -1).sum(1)
        return BookkeepingTensor(self, per_sample)


class BookkeepingTensor:
    """The per-sample losses of one batch; behaves like the reduced loss for logging."""

    def __init__(self, loss: BookkeepingLoss, per_sample: torch.Tensor) -> None:
        self.loss, self.per_sample = loss, per_sample

    def detach(self) -> torch.Tensor:
        reduced = self.per_sample.detach()
        return reduced.mean() if self.loss.optimizer.loss_reduction == "mean" else reduced.sum()

    def item(self) -> float:
        return float(self.detach())

    def backward(self) -> None:
        """Leave the clipped per-sample gradient sum in ``p.grad`` (the ghost optimizer's input)."""
        clipped_gradient_sum(self.loss.hooks, self.per_sample, list(self.loss.optimizer.params),
                             self.loss.max_grad_norm)


def use_bookkeeping(
    model: nn.Module, optimizer: DPOptimizerFastGradientClipping, criterion: nn.Module, max_grad_norm: float
) -> tuple[BookkeepingHooks, BookkeepingLoss]:
    """Attach book-keeping hooks to ``model`` and wrap ``criterion`` for ``optimizer``."""
    hooks = BookkeepingHooks(model)
    return hooks, BookkeepingLoss(hooks, optimizer, criterion, max_grad_norm)
