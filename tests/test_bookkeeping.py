"""Book-keeping clipping (privacy.grad_sample_mode=bookkeeping) against Opacus's hooks mode.

The reference is Opacus itself: per-sample gradients from GradSampleModule (hooks) and
the clipped sum from DPOptimizer.clip_and_accumulate. The clip norm is set to the median
per-sample norm, so about half the samples are clipped and half are not: a wrong norm or a
wrong clip factor on either side shows.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedguard.clients.bookkeeping import BookkeepingHooks, BookkeepingUnsupported, clipped_gradient_sum, use_bookkeeping
from fedguard.clients.bookkeeping_layers import group_norm, unsupported_layers
from fedguard.clients.dp_steps import noise_only_step
from fedguard.clients.models import build_model
from fedguard.clients.private_training import SampleDPTrainer, build_trainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import ConfigError, compose_config
from fedguard.privacy.client_budget import ClientPrivacyState

REL_TOL = 1e-5


class _PerSampleLoss(nn.Module):
    """A loss for any output shape: each sample's 0.5 * sum of (output - target)^2."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = 0.5 * (output - target).pow(2).reshape(len(output), -1).sum(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def _hooks_reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: nn.Module):
    """Opacus hooks mode: (clipped sums per parameter, max_grad_norm used)."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                      expected_batch_size=max(len(x), 1), loss_reduction="sum")
    loss = copy.copy(criterion)
    loss.reduction = "sum"
    loss(gsm(x), target).backward()
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in opt.params]).norm(dim=0)
    opt.max_grad_norm = float(norms.median())
    opt.clip_and_accumulate()
    sums = [p.summed_grad.clone() for p in opt.params]
    gsm._close()
    return sums, opt.max_grad_norm


def _bookkeeping(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: nn.Module, max_grad_norm: float):
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=max_grad_norm, expected_batch_size=max(len(x), 1))
    hooks, loss = use_bookkeeping(model, opt, criterion, max_grad_norm)
    try:
        loss(model(x), target).backward()
    finally:
        hooks.remove()
    return [p.grad.clone() for p in opt.params]


def _assert_matches_hooks(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: nn.Module) -> None:
    reference, max_grad_norm = _hooks_reference(copy.deepcopy(model), x, target, criterion)
    ours = _bookkeeping(copy.deepcopy(model), x, target, criterion, max_grad_norm)
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape
        assert (mine - theirs).norm() <= REL_TOL * theirs.norm() + 1e-7, ((mine - theirs).norm(), theirs.norm())
    assert any(t.norm() > 0 for t in reference)


def _mse_case(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    with torch.no_grad():
        out_shape = model(x).shape
    return model, x, torch.randn(out_shape), _PerSampleLoss()


def _layer_cases(batch: int):
    torch.manual_seed(batch)
    yield "linear", _mse_case(nn.Linear(7, 5), torch.randn(batch, 7))
    # sequence inputs: T=3 takes the ghost-norm branch, T=40 the materialized one
    yield "linear-seq-ghost", _mse_case(nn.Linear(16, 12), torch.randn(batch, 3, 16))
    yield "linear-seq-materialized", _mse_case(nn.Linear(4, 3, bias=False), torch.randn(batch, 40, 4))
    yield "conv2d", _mse_case(nn.Conv2d(3, 4, 3, padding=1), torch.randn(batch, 3, 6, 6))
    yield "conv2d-strided", _mse_case(nn.Conv2d(2, 3, 2, stride=2, dilation=1, padding=1), torch.randn(batch, 2, 5, 7))
    yield "conv2d-dilated", _mse_case(nn.Conv2d(2, 3, 3, dilation=2, padding=2), torch.randn(batch, 2, 7, 9))
    yield "conv2d-rectangular", _mse_case(nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                                          torch.randn(batch, 2, 6, 8))
    yield "conv2d-ghost", _mse_case(nn.Conv2d(16, 16, 3, padding=0), torch.randn(batch, 16, 4, 4))
    # ghost route whose clipped sum is a weight-gradient convolution: stride with a row and column
    # the kernel never reaches (6x6, stride 2), and a dilated kernel without bias
    yield "conv2d-ghost-strided", _mse_case(nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.randn(batch, 16, 6, 6))
    yield "conv2d-ghost-dilated", _mse_case(nn.Conv2d(16, 16, 3, dilation=2, bias=False),
                                            torch.randn(batch, 16, 6, 6))
    yield "groupnorm", _mse_case(nn.GroupNorm(2, 4), torch.randn(batch, 4, 3, 3))
    # activations far from zero mean: the forward-statistics route subtracts mean * sum(g) from sum(g * a)
    yield "groupnorm-offset", _mse_case(nn.GroupNorm(3, 6), torch.randn(batch, 6, 5, 5) * 0.5 + 4)
    yield "layernorm", _mse_case(nn.LayerNorm(6), torch.randn(batch, 5, 6))
    tokens = torch.randint(0, 9, (batch, 6))
    tokens[:, 0] = tokens[:, 1]  # repeated ids inside every sample
    yield "embedding", _mse_case(nn.Embedding(9, 4), tokens)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_every_supported_layer_matches_opacus_hooks(batch):
    for name, (model, x, target, criterion) in _layer_cases(batch):
        try:
            _assert_matches_hooks(model, x, target, criterion)
        except AssertionError as error:
            raise AssertionError(f"{name}, batch {batch}: {error}") from error


def test_embedding_padding_row_gets_no_gradient_as_in_torch():
    """Torch gives the padding_idx row no gradient (Opacus's hooks sampler does not honour it), so
    the reference here is plain autograd, one sample at a time, clipped by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=2), nn.Linear(3, 2))
    tokens = torch.tensor([[2, 1, 1, 4], [2, 2, 5, 0], [3, 2, 1, 1]])
    target = torch.randn(3, 4, 2)
    per_sample = []
    for i in range(3):
        model.zero_grad()
        _PerSampleLoss("sum")(model(tokens[i:i + 1]), target[i:i + 1]).backward()
        per_sample.append([p.grad.clone() for p in model.parameters()])
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_sample])
    max_grad_norm = float(norms.median())
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[k] for f, grads in zip(factors, per_sample)) for k in range(3)]
    ours = _bookkeeping(copy.deepcopy(model), tokens, target, _PerSampleLoss(), max_grad_norm)
    assert torch.equal(ours[0][2], torch.zeros(3))
    for mine, theirs in zip(ours, expected):
        assert torch.allclose(mine, theirs, rtol=REL_TOL, atol=1e-7)


@functools.cache
def _model_config(model_name: str):
    return compose_config([f"model={model_name}", "dataset=digits"])


@pytest.mark.parametrize("model_name", ["cnn", "mlp", "logreg", "scatter_linear"])
@pytest.mark.parametrize("batch", [1, 11])
def test_fedguard_models_match_opacus_hooks(model_name, batch):
    cfg = _model_config(model_name)
    torch.manual_seed(batch)
    model = build_model(cfg.model, (1, 8, 8), 10, private=True)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    _assert_matches_hooks(model, x, y, nn.CrossEntropyLoss())


@pytest.mark.simulation  # over a second on the shared 2-core machine (8 random models, each against Opacus)
@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 6), channels=st.integers(1, 5), out=st.integers(1, 6), size=st.integers(3, 7),
    kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), hidden=st.integers(1, 9),
)
def test_random_conv_groupnorm_linear_stacks_match_opacus_hooks(batch, channels, out, size, kernel, stride, padding,
                                                                hidden):
    torch.manual_seed(batch * 1000 + size)
    conv = nn.Conv2d(channels, out * 2, kernel, stride=stride, padding=padding)
    side = (size + 2 * padding - kernel) // stride + 1
    model = nn.Sequential(conv, nn.GroupNorm(2, out * 2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(out * 2 * side * side, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    _assert_matches_hooks(model, torch.randn(batch, channels, size, size), torch.randint(0, 3, (batch,)),
                          nn.CrossEntropyLoss())


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 5), steps=st.integers(1, 12), width=st.integers(1, 10), vocab=st.integers(2, 8))
def test_random_embedding_layernorm_linear_sequences_match_opacus_hooks(batch, steps, width, vocab):
    torch.manual_seed(batch * 100 + steps)
    model = nn.Sequential(nn.Embedding(vocab, width), nn.LayerNorm(width), nn.Linear(width, 2))
    tokens = torch.randint(0, vocab, (batch, steps))
    _assert_matches_hooks(model, tokens, torch.randn(batch, steps, 2), _PerSampleLoss())


def test_empty_batch_gives_a_zero_clipped_sum_and_a_noise_only_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                                          max_grad_norm=0.5, expected_batch_size=2,
                                          generator=torch.Generator().manual_seed(1))
    hooks, loss = use_bookkeeping(model, opt, nn.CrossEntropyLoss(), 0.5)
    norms = clipped_gradient_sum(hooks, torch.zeros(0), list(opt.params), 0.5)
    assert norms.shape == (0,)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in opt.params)
    before = [p.detach().clone() for p in model.parameters()]
    noise_only_step(opt)
    # noise N(0, (1.0 * 0.5)^2) / expected batch 2, applied with lr 1: every weight moved
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert (moved != 0).all()
    assert 0.1 < float(moved.std()) < 0.5


def _one_private_step(mode: str, x: torch.Tensor, y: torch.Tensor):
    cfg = compose_config(["privacy=sample_dp", "model=cnn", "dataset=digits", "privacy.target_epsilon=null",
                          "privacy.noise_multiplier=1.3", "privacy.max_grad_norm=0.2", "train.momentum=0",
                          f"privacy.grad_sample_mode={mode}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8), 10, private=True)
    setup = make_training_setup(model, np.zeros((64, 1, 8, 8), np.float32), np.zeros(64, np.int64), cfg.train, None)
    trainer = build_trainer(cfg, None)
    assert isinstance(trainer, SampleDPTrainer)
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    priv = ClientPrivacyState(noise_multiplier=1.3, sample_rate=0.5, delta=1e-5, accountant="rdp", budget_epsilon=None)
    private = trainer._privatize(setup, engine, priv, torch.device("cpu"))
    private.optimizer.generator = torch.Generator().manual_seed(42)  # test only: the same draws in both modes
    before = [p.detach().clone() for p in model.parameters()]
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()
    private.on_empty_batch()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    opt = private.optimizer
    return update, (opt.noise_multiplier, opt.max_grad_norm, opt.expected_batch_size), engine.accountant.history


@pytest.mark.simulation  # over a second on the shared 2-core machine: a local training run
def test_a_bookkeeping_step_draws_noise_and_accounts_exactly_like_ghost():
    torch.manual_seed(3)
    x, y = torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,))
    ghost, ghost_noise, ghost_history = _one_private_step("ghost", x, y)
    ours, our_noise, our_history = _one_private_step("bookkeeping", x, y)
    assert our_noise == ghost_noise == (1.3, 0.2, 32)
    assert our_history == ghost_history and len(our_history) > 0
    assert sum(steps for _, _, steps in our_history) == 2  # one data step, one noise-only step
    assert torch.allclose(ours, ghost, rtol=1e-4, atol=1e-6)
    assert ours.norm() > 0


def test_unsupported_layer_falls_back_to_ghost_naming_it(caplog):
    cfg = compose_config(["privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
                          "privacy.grad_sample_mode=bookkeeping"])
    trainer = SampleDPTrainer(build_trainer(compose_config(), None), cfg, None)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(3, 2))
    with caplog.at_level(logging.INFO, logger="fedguard.clients.private_training"):
        assert trainer.engine_mode(model) == "ghost"
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(lines) == 1 and "'0'" in lines[0] and "Conv1d" in lines[0]
    assert trainer.engine_mode(nn.Sequential(nn.Linear(3, 2))) == "bookkeeping"
    assert set(unsupported_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(2, 2)))) == {"0"}


def test_reused_layer_and_inplace_output_are_refused():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=1.0, expected_batch_size=2)
    hooks, _ = use_bookkeeping(model, opt, _PerSampleLoss(), 1.0)
    with pytest.raises(BookkeepingUnsupported, match="ran twice"):
        model(torch.randn(2, 3))
    hooks.remove()
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=1.0, expected_batch_size=2)
    _, loss = use_bookkeeping(model, opt, _PerSampleLoss(), 1.0)
    with pytest.raises(BookkeepingUnsupported, match="in place"):
        loss(model(torch.randn(2, 3)), torch.randn(2, 3)).backward()


def test_attaching_again_replaces_the_earlier_hooks():
    model = nn.Sequential(nn.Linear(3, 2))
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                                          max_grad_norm=1.0, expected_batch_size=2)
    first, _ = use_bookkeeping(model, opt, _PerSampleLoss(), 1.0)
    second, loss = use_bookkeeping(model, opt, _PerSampleLoss(), 1.0)
    assert first.handles == []
    loss(model(torch.randn(2, 3)), torch.randn(2, 2)).backward()  # one record per layer: no "ran twice"
    assert model[0].weight.grad.norm() > 0
    second.remove()
    assert not hasattr(model, "_fedguard_bookkeeping_hooks")


@pytest.mark.simulation  # three Hydra compositions: over a second on the shared machine
def test_config_names_bookkeeping_among_the_allowed_modes():
    with pytest.raises(ConfigError, match="bookkeeping"):
        compose_config(["privacy=sample_dp", "privacy.grad_sample_mode=fastest"])
    with pytest.raises(ConfigError, match="fedprox"):
        compose_config(["privacy=sample_dp", "privacy.grad_sample_mode=bookkeeping", "strategy=fedprox"])
    assert compose_config(["privacy=sample_dp", "privacy.grad_sample_mode=bookkeeping"]).privacy.grad_sample_mode \
        == "bookkeeping"


@pytest.mark.simulation  # over a second on the shared 2-core machine: a local training run
def test_training_round_in_bookkeeping_mode_matches_hooks_without_noise():
    overrides = ["privacy=sample_dp", "model=cnn", "dataset=digits", "privacy.target_epsilon=null",
                 "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true", "privacy.poisson_sampling=false",
                 "privacy.max_grad_norm=0.1", "train.max_steps=2", "train.momentum=0"]
    updates = {}
    torch.manual_seed(5)
    features = torch.randn(96, 1, 8, 8).numpy()
    labels = torch.randint(0, 10, (96,)).numpy()
    variants = {"hooks": ["privacy.grad_sample_mode=hooks"], "bookkeeping": ["privacy.grad_sample_mode=bookkeeping"],
                # physical batches of 5: the clipped sums of the pieces add up to the logical batch's
                "split": ["privacy.grad_sample_mode=bookkeeping", "privacy.max_physical_batch_size=5"]}
    for mode, extra in variants.items():
        cfg = compose_config([*overrides, *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model, (1, 8, 8), 10, private=True)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        setup = make_training_setup(model, features, labels, cfg.train, 3)
        build_trainer(cfg, None).train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
        updates[mode] = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert updates["hooks"].norm() > 0
    assert torch.allclose(updates["bookkeeping"], updates["hooks"], atol=1e-6, rtol=1e-4)
    assert torch.allclose(updates["split"], updates["hooks"], atol=1e-6, rtol=1e-4)


def test_a_layer_the_forward_pass_skipped_gets_a_zero_sum_and_every_other_its_clipped_one():
    """Every parameter handed in ends with a gradient: the clipped sum where a recorded layer
    reached it, zero where none did (a branch this batch did not take), never a stale one."""
    from fedguard.clients.bookkeeping import BookkeepingHooks

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.skipped = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model, x, y = Branchy(), torch.randn(5, 3), torch.randint(0, 2, (5,))
    reference = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # stale gradients from an earlier step must not survive
    hooks = BookkeepingHooks(model)
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    clipped_gradient_sum(hooks, losses, list(model.parameters()), max_grad_norm=1e9)  # nothing clipped
    nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    assert torch.equal(model.skipped.weight.grad, torch.zeros(2, 3))
    assert torch.equal(model.skipped.bias.grad, torch.zeros(2))
    assert torch.allclose(model.used.weight.grad, reference.used.weight.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.used.bias.grad, reference.used.bias.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("groups, channels, offset", [(1, 3, 0.0), (4, 8, 5.0), (8, 32, -2.0)])
def test_groupnorm_rule_from_the_forward_statistics_equals_renormalising(groups, channels, offset):
    """The hook reads GroupNorm's mean and 1/std from the forward pass (no second normalisation);
    that route and the recomputing one give the same norms and clipped sums."""
    torch.manual_seed(groups)
    layer = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    hooks = BookkeepingHooks(layer)
    try:
        x = torch.randn(7, channels, 6, 5) * 0.7 + offset
        layer(x)
        (record,) = hooks.records
        assert set(record.extras) == {"mean", "rstd"}  # the fast route is the one training takes
    finally:
        hooks.remove()
    g = torch.randn(7, channels, 6, 5)
    fast, slow = group_norm(layer, x, g, **record.extras), group_norm(layer, x, g)
    assert torch.allclose(fast.squared_norms, slow.squared_norms, rtol=REL_TOL, atol=1e-6)
    factors = torch.rand(7)
    for name, total in slow.clipped_sum(factors).items():
        assert torch.allclose(fast.clipped_sum(factors)[name], total, rtol=REL_TOL, atol=1e-5), name
