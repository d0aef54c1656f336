"""Local training throughput and memory: each grad_sample_mode against non-private training.

Same model, same data, same logical batch, in one process, through fedguard's own
trainers (the code clients run). Figures are examples per second over timed steps
after warm-up steps, and each private mode's ratio to the non-private figure.

Peak memory: each mode trains a few steps in a fresh process on an exact batch of
``batch_size`` (no Poisson draw, so every mode sees the same batch) and reports how far
the process's peak resident set (``VmHWM``, reset just before) rose above where it stood before training:
the memory training itself needed, allocator and all (torch's CPU tensors are invisible
to tracemalloc).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import torch
from flwr.app import RecordDict

from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model, count_parameters
from fedguard.clients.private_training import PlainTrainer, SampleDPTrainer
from fedguard.clients.training import make_training_setup
from fedguard.conf import compose_config

MODES = ("hooks", "functorch", "ghost", "bookkeeping")
# The goal's mode and what the goal compares it with, measured in adjacent pairs (see paired_ratios).
PAIRED_MODE = "bookkeeping"
PAIRED_METHOD = (
    "median over adjacent (non-private, book-keeping) pairs run back to back in one process, the order "
    "alternating from pair to pair (odd pairs run book-keeping first), each run a fresh model with its own "
    "warm-up; a pair's ratio is book-keeping's examples/s over non-private's; the spread is the lowest, "
    "quartiles and highest of the pair ratios. Adjacent runs share the machine's load, so a load change "
    "between pairs cancels in the ratio and one lucky or unlucky run moves the median by at most one rank."
)
MEMORY_STEPS = 4
NOISE_MULTIPLIER = 1.0


def _throughput(cfg, features, labels, private: bool, warmup_steps: int, timed_steps: int) -> tuple[float, float]:
    """(examples per wall second, examples per CPU second of this process: less sensitive to other jobs)."""
    device = torch.device("cpu")

    def run(steps: int) -> tuple[float, int]:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, tuple(features.shape[1:]), int(labels.max()) + 1, private=True)
        plain = PlainTrainer(cfg.train)
        plain.max_steps = steps
        trainer = SampleDPTrainer(plain, cfg, None) if private else plain
        setup = make_training_setup(model, features, labels, cfg.train, seed=None if private else 0)
        started, cpu_started = time.perf_counter(), time.process_time()
        outcome = trainer.train(setup, state=RecordDict(), device=device, regularizer=None).outcome
        return time.perf_counter() - started, time.process_time() - cpu_started, outcome.num_examples

    run(warmup_steps)
    seconds, cpu_seconds, examples = run(timed_steps)
    return examples / seconds, examples / cpu_seconds


def _quantile(ordered: list[float], fraction: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default rule)."""
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratios(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Summary of the ratios ``private / non_private`` of adjacent (non_private, private) speed pairs.

    Pure arithmetic on plain numbers: the benchmark's goal is judged on the median, and the
    spread says how far one pair could be from it.
    """
    if not pairs:
        raise ValueError("paired_ratios needs at least one (non_private, private) pair")
    if any(not (non_private > 0 and private > 0) for non_private, private in pairs):
        raise ValueError(f"every speed must be positive: {pairs}")
    ratios = [private / non_private for non_private, private in pairs]
    ordered = sorted(ratios)
    return {
        "pairs": len(ratios),
        "median": _quantile(ordered, 0.5),
        "lower_quartile": _quantile(ordered, 0.25),
        "upper_quartile": _quantile(ordered, 0.75),
        "lowest": ordered[0],
        "highest": ordered[-1],
        "each_pair": ratios,
    }


def _paired_runs(configs: dict, features, labels, pairs: int, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
    """``pairs`` adjacent (non-private, book-keeping) runs, alternating which runs first."""
    wall: list[tuple[float, float]] = []
    cpu: list[tuple[float, float]] = []
    for index in range(pairs):
        order = ("non_private", PAIRED_MODE) if index % 2 == 0 else (PAIRED_MODE, "non_private")
        speeds = {name: _throughput(configs[name], features, labels, name != "non_private", warmup_steps, timed_steps)
                  for name in order}
        wall.append((speeds["non_private"][0], speeds[PAIRED_MODE][0]))
        cpu.append((speeds["non_private"][1], speeds[PAIRED_MODE][1]))
    return {
        "method": PAIRED_METHOD,
        "mode": PAIRED_MODE,
        "examples_per_second_each_pair": [list(p) for p in wall],
        "examples_per_cpu_second_each_pair": [list(p) for p in cpu],
        "wall_ratio": paired_ratios(wall),
        "cpu_ratio": paired_ratios(cpu),
    }


def _peak_training_memory_mib(overrides: list[str], input_shape: tuple[int, ...], classes: int, batch: int) -> float:
    """In this (fresh) process: rise of peak RSS over MEMORY_STEPS steps on exact batches of ``batch``."""
    cfg = compose_config(overrides)
    generator = np.random.default_rng(0)
    features = generator.standard_normal((batch * MEMORY_STEPS, *input_shape), dtype=np.float32)
    labels = generator.integers(0, classes, batch * MEMORY_STEPS)
    model = build_model(cfg.model, input_shape, classes, private=True)
    plain = PlainTrainer(cfg.train)
    plain.max_steps = MEMORY_STEPS
    trainer = SampleDPTrainer(plain, cfg, None) if cfg.privacy.mode == "sample_dp" else plain
    setup = make_training_setup(model, features, labels, cfg.train, seed=None if cfg.privacy.mode != "none" else 0)
    # Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so imports and set-up do not count.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    trainer.train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _memory_in_fresh_process(overrides: list[str], input_shape: tuple[int, ...], classes: int, batch: int) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_training_memory_mib, (overrides, input_shape, classes, batch))


def run_dp_benchmark(
    dataset: str, model: str, batch_size: int, warmup_steps: int, timed_steps: int, repeats: int = 1,
    pairs: int = 0,
) -> dict[str, Any]:
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
        # Other jobs on the machine slow wall-clock figures: the 1/5/15-minute load says how many.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    configs = {"non_private": cfg}
    for mode in MODES:
        configs[mode] = compose_config(
            [*base, "privacy=sample_dp", "privacy.target_epsilon=null",
             f"privacy.noise_multiplier={NOISE_MULTIPLIER}", f"privacy.grad_sample_mode={mode}"]
        )
    # Modes alternate, `repeats` times: on a machine shared with other jobs a load spike then
    # hits every mode alike rather than one; the best of the repeats is the least disturbed.
    samples: dict[str, list[float]] = {name: [] for name in configs}
    cpu_samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, mode_cfg in configs.items():
            wall, cpu = _throughput(mode_cfg, features, labels, name != "non_private", warmup_steps, timed_steps)
            samples[name].append(wall)
            cpu_samples[name].append(cpu)
    results["repeats"] = repeats
    non_private, non_private_cpu = max(samples["non_private"]), max(cpu_samples["non_private"])
    for name, speeds in samples.items():
        results[f"{name}_examples_per_second"] = max(speeds)
        results[f"{name}_examples_per_second_each_repeat"] = speeds
        results[f"{name}_examples_per_cpu_second"] = max(cpu_samples[name])
        if name != "non_private":
            results[f"{name}_ratio_to_non_private"] = max(speeds) / non_private
            results[f"{name}_cpu_ratio_to_non_private"] = max(cpu_samples[name]) / non_private_cpu
    if pairs > 0:
        paired = _paired_runs(configs, features, labels, pairs, warmup_steps, timed_steps)
        results[f"{PAIRED_MODE}_paired"] = paired
        results[f"{PAIRED_MODE}_paired_median_ratio_to_non_private"] = paired["wall_ratio"]["median"]
        results[f"{PAIRED_MODE}_paired_median_cpu_ratio_to_non_private"] = paired["cpu_ratio"]["median"]
    # privacy.secure_noise: the same ghost clipping, noise from the ChaCha20 CSPRNG (four draws summed).
    secure_cfg = compose_config(
        [*base, "privacy=sample_dp", "privacy.target_epsilon=null", f"privacy.noise_multiplier={NOISE_MULTIPLIER}",
         "privacy.grad_sample_mode=ghost", "privacy.secure_noise=true"]
    )
    speed, _ = _throughput(secure_cfg, features, labels, True, warmup_steps, timed_steps)
    results["ghost_secure_noise_examples_per_second"] = speed
    results["ghost_secure_noise_ratio_to_non_private"] = speed / non_private
    # Memory at an exact batch: noise 0 with shuffled batches (a debugging config, never a claim).
    exact = [*base, "privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=0",
             "privacy.allow_zero_noise=true", "privacy.poisson_sampling=false"]
    shape, classes = tuple(features.shape[1:]), int(labels.max()) + 1
    results["load_average_after_throughput"] = [round(x, 2) for x in os.getloadavg()]
    results["memory_method"] = "peak RSS (VmHWM, reset before training) over RSS before, 4 training steps at an exact batch, fresh process per mode (MiB)"
    results["non_private_peak_memory_mib"] = _memory_in_fresh_process(base, shape, classes, batch_size)
    for mode in MODES:
        results[f"{mode}_peak_memory_mib"] = _memory_in_fresh_process(
            [*exact, f"privacy.grad_sample_mode={mode}"], shape, classes, batch_size
        )
    return results


def dp_table(runs: list[dict[str, Any]]) -> str:
    """The benchmark as a text table: one row per model and mode."""
    lines = [f"{'model':6} {'mode':12} {'examples/s':>11} {'x non-private':>14} {'ex/CPU-s':>9} {'x':>6} {'peak MiB':>9}"]
    for run in runs:
        for mode in ("non_private", *MODES):
            speed, cpu = run[f"{mode}_examples_per_second"], run[f"{mode}_examples_per_cpu_second"]
            ratio = speed / run["non_private_examples_per_second"]
            cpu_ratio = cpu / run["non_private_examples_per_cpu_second"]
            lines.append(f"{run['model']:6} {mode:12} {speed:11.0f} {ratio:14.2f} {cpu:9.0f} {cpu_ratio:6.2f} "
                         f"{run[f'{mode}_peak_memory_mib']:9.1f}")
        paired = run.get(f"{PAIRED_MODE}_paired")
        if paired:
            for kind in ("wall_ratio", "cpu_ratio"):
                r = paired[kind]
                lines.append(f"{run['model']:6} {PAIRED_MODE} / non-private, {kind.replace('_', ' ')}, median of "
                             f"{r['pairs']} adjacent pairs: {r['median']:.2f} (quartiles {r['lower_quartile']:.2f}-"
                             f"{r['upper_quartile']:.2f}, range {r['lowest']:.2f}-{r['highest']:.2f})")
    return "\n".join(lines)
