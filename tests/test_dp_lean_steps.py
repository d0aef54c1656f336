"""use_lean_steps: Opacus's ghost-clipping accumulate and add_noise without the deep copies and
throw-away zero tensors, giving bit-for-bit the numbers Opacus's own methods give.

The reference is an identical optimizer left as Opacus made it, fed the same clipped sums and
a generator in the same state: any change to the draws, their scale (adaptive clipping's
adjusted multiplier included), the order of parameters or the accumulation shows as a
mismatch. Seeded generators are a test device here only: training draws from the OS.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn

from fedguard.clients.dp_steps import noise_only_step, use_lean_steps


def _pair(noise_multiplier: float, secure_mode: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    twin = copy.deepcopy(model)
    optimizers = []
    for m in (model, twin):
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9),
                                              noise_multiplier=noise_multiplier, max_grad_norm=0.7,
                                              expected_batch_size=5, secure_mode=secure_mode,
                                              generator=torch.Generator().manual_seed(11))
        optimizers.append(opt)
    use_lean_steps(optimizers[0])
    return (model, optimizers[0]), (twin, optimizers[1])


def _set_grads(opt, scale: float) -> None:
    for index, p in enumerate(opt.params):
        p.grad = torch.linspace(-scale, scale, p.numel()).reshape(p.shape) * (index + 1)


@pytest.mark.parametrize("noise_multiplier", [1.3, 0.0])
def test_lean_steps_give_opacus_numbers_bit_for_bit(noise_multiplier):
    (model, lean), (twin, stock) = _pair(noise_multiplier)
    assert lean.add_noise != stock.add_noise  # really replaced
    for step in range(3):
        for opt in (lean, stock):
            opt.zero_grad(set_to_none=True)
            _set_grads(opt, 0.1 * (step + 1))
            opt.step()
        for mine, theirs in zip(model.parameters(), twin.parameters()):
            assert torch.equal(mine, theirs)
    # an empty Poisson batch: noise only, through the same path
    noise_only_step(lean)
    noise_only_step(stock)
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(mine, theirs)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()) or noise_multiplier == 0


def test_lean_noise_follows_the_adaptive_clipping_multiplier():
    (model, lean), (twin, stock) = _pair(1.0)
    for opt in (lean, stock):
        opt._adjusted_noise_multiplier = 2.5
        _set_grads(opt, 0.2)
        opt.step()
    for mine, theirs in zip(model.parameters(), twin.parameters()):
        assert torch.equal(mine, theirs)


def test_lean_noise_has_the_configured_scale():
    """Against a wrong std or a dropped draw the bit-for-bit test fails; this one says the draws
    themselves are N(0, (sigma C)^2): zero clipped sums, so p.grad is the noise alone."""
    lean = DPOptimizerFastGradientClipping(torch.optim.SGD(nn.Linear(100, 100).parameters(), lr=0.1),
                                           noise_multiplier=1.3, max_grad_norm=0.7, expected_batch_size=5,
                                           generator=torch.Generator().manual_seed(5))
    use_lean_steps(lean)
    for p in lean.params:
        p.summed_grad = torch.zeros_like(p)
    lean.add_noise()
    noise = torch.cat([p.grad.flatten() for p in lean.params])  # 10,100 draws: std within ~0.7% (1 s.e.)
    assert abs(float(noise.std()) - 1.3 * 0.7) < 0.03
    assert abs(float(noise.mean())) < 0.03
    with pytest.raises(ValueError):
        lean.add_noise()  # a clipped sum is noised once (Opacus's processed flag is kept)


def test_physical_batches_accumulate_into_a_copy_not_the_gradient():
    (_, lean), _ = _pair(1.0)
    _set_grads(lean, 0.3)
    first = [p.grad.clone() for p in lean.params]
    lean.accumulate()
    for p in lean.params:
        p.grad.mul_(10)  # the caller's later writes must not reach the stored sum
    lean.accumulate()
    for p, g in zip(lean.params, first):
        assert torch.allclose(p.summed_grad, g * 11)


def test_other_optimizers_and_secure_mode_are_left_alone():
    (_, _), (_, stock) = _pair(1.0, secure_mode=True)
    before = stock.add_noise
    use_lean_steps(stock)
    assert stock.add_noise == before
    hooks_optimizer = DPOptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), noise_multiplier=1.0,
                                  max_grad_norm=1.0, expected_batch_size=2)
    before = hooks_optimizer.add_noise
    use_lean_steps(hooks_optimizer)
    assert hooks_optimizer.add_noise == before


@pytest.mark.parametrize("lean_first", [True, False])
def test_secure_noise_survives_lean_steps_in_either_order(lean_first):
    """privacy.secure_noise installs a CSPRNG add_noise; use_lean_steps must never swap it back
    for torch-generator draws, whichever of the two is installed first."""
    from fedguard.clients.dp_steps import use_secure_noise
    from fedguard.privacy.secure_noise import SecureGaussian

    class CountingSource(SecureGaussian):
        """The real CSPRNG source, counting the draws the optimizer asks it for."""

        draws = 0

        def gaussian(self, std: float, reference: torch.Tensor) -> torch.Tensor:
            self.draws += 1
            return super().gaussian(std, reference)

    model = nn.Sequential(nn.Linear(3, 2))
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                          max_grad_norm=1.0, expected_batch_size=4)
    source = CountingSource()
    if lean_first:
        use_lean_steps(opt)
        use_secure_noise(opt, source)
    else:
        use_secure_noise(opt, source)
        use_lean_steps(opt)
    opt.zero_grad(set_to_none=True)
    _set_grads(opt, 0.1)
    opt.step()
    assert source.draws == len(list(model.parameters()))

