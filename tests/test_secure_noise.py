"""privacy.secure_noise: DP-SGD noise from a CSPRNG (ChaCha20 keyed from the OS), hardened by summing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from scipy import stats

from fedguard.clients.private_training import PlainTrainer, SampleDPTrainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import compose_config
from fedguard.privacy.secure_noise import SecureGaussian


def test_secure_gaussians_are_standard_normal_and_never_repeat():
    source = SecureGaussian()
    values = source.standard_normal(200_000)
    assert stats.kstest(values, "norm").pvalue > 1e-3
    noise = source.gaussian(1.5, torch.zeros(100_000, dtype=torch.float32))
    assert noise.dtype == torch.float32 and noise.std().item() == pytest.approx(1.5, rel=0.02)
    assert stats.kstest(noise.double().numpy() / 1.5, "norm").pvalue > 1e-3
    # Fresh key per source, independent of torch's global RNG.
    torch.manual_seed(0)
    a = SecureGaussian().standard_normal(8)
    torch.manual_seed(0)
    assert not np.array_equal(a, SecureGaussian().standard_normal(8))
    assert np.all(source.uniform(100_000) > 0)  # Box-Muller's log never sees 0


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_sgd_noise_comes_from_the_csprng_when_asked(mode, monkeypatch):
    drawn = []
    real = SecureGaussian.gaussian
    monkeypatch.setattr(SecureGaussian, "gaussian", lambda self, std, ref: (drawn.append(std), real(self, std, ref))[1])
    cfg = compose_config(
        ["privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=2.0", "privacy.max_grad_norm=0.5",
         "privacy.secure_noise=true", f"privacy.grad_sample_mode={mode}", "train.batch_size=1", "train.momentum=0",
         "train.learning_rate=1.0", "train.max_steps=50"]
    )
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(200, 8)).astype(np.float32), rng.integers(0, 3, 200).astype(np.int64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    setup = make_training_setup(model, features, labels, cfg.train, seed=None)
    SampleDPTrainer(PlainTrainer(cfg.train), cfg, None).train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
    assert len(drawn) == 50 * 2 and set(drawn) == {1.0}  # weight and bias, every step: sigma * C = 1
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert moved.abs().max() > 1.0  # noise of std 1 per step really reached the model
