"""Local training throughput: each Opacus grad_sample_mode against non-private training.

Same model, same data, same logical batch, in one process, through fedguard's own
trainers (the code clients run). Figures are examples per second over timed steps
after warm-up steps, and each private mode's ratio to the non-private figure.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import RecordDict

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, count_parameters
from fedguard.clients.private_training import PlainTrainer, SampleDPTrainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import compose_config

MODES = ("hooks", "functorch", "ghost")
NOISE_MULTIPLIER = 1.0


def _throughput(cfg, features, labels, private: bool, warmup_steps: int, timed_steps: int) -> float:
    device = torch.device("cpu")

    def run(steps: int) -> tuple[float, int]:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, tuple(features.shape[1:]), int(labels.max()) + 1, private=True)
        plain = PlainTrainer(cfg.train)
        plain.max_steps = steps
        trainer = SampleDPTrainer(plain, cfg, None) if private else plain
        setup = make_training_setup(model, features, labels, cfg.train, seed=None if private else 0)
        started = time.perf_counter()
        outcome = trainer.train(setup, state=RecordDict(), device=device, regularizer=None).outcome
        return time.perf_counter() - started, outcome.num_examples

    run(warmup_steps)
    seconds, examples = run(timed_steps)
    return examples / seconds


def run_dp_benchmark(dataset: str, model: str, batch_size: int, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
    base = [f"dataset={dataset}", f"model={model}", f"train.batch_size={batch_size}", "train.local_epochs=100"]
    cfg = compose_config(base)
    bundle = load_dataset(cfg.dataset, cfg.seed)
    features, labels = bundle.train_x, bundle.train_y
    results: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "model_parameters": count_parameters(build_model(cfg.model, bundle.input_shape, bundle.num_classes)),
        "batch_size": batch_size,
        "timed_steps": timed_steps,
        "torch_threads": torch.get_num_threads(),
    }
    non_private = _throughput(cfg, features, labels, False, warmup_steps, timed_steps)
    results["non_private_examples_per_second"] = non_private
    for mode in MODES:
        private_cfg = compose_config(
            [*base, "privacy=sample_dp", "privacy.target_epsilon=null",
             f"privacy.noise_multiplier={NOISE_MULTIPLIER}", f"privacy.grad_sample_mode={mode}"]
        )
        speed = _throughput(private_cfg, features, labels, True, warmup_steps, timed_steps)
        results[f"{mode}_examples_per_second"] = speed
        results[f"{mode}_ratio_to_non_private"] = speed / non_private
    # privacy.secure_noise: the same ghost clipping, noise from the ChaCha20 CSPRNG (four draws summed).
    secure_cfg = compose_config(
        [*base, "privacy=sample_dp", "privacy.target_epsilon=null", f"privacy.noise_multiplier={NOISE_MULTIPLIER}",
         "privacy.grad_sample_mode=ghost", "privacy.secure_noise=true"]
    )
    speed = _throughput(secure_cfg, features, labels, True, warmup_steps, timed_steps)
    results["ghost_secure_noise_examples_per_second"] = speed
    results["ghost_secure_noise_ratio_to_non_private"] = speed / non_private
    return results
