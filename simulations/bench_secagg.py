"""Round wall time with SecAgg+ against the same round without it, fedguard's and Flower's.

Same clients, same model (an MLP sized to the requested parameter count), one SGD step
per client, in one process, per case four runs alternated ``repeats`` times so that
drift in the machine's speed hits every variant alike:

- fedguard plain (``secure_agg=off``) and fedguard SecAgg+ (``secure_agg=secaggplus``,
  neighbours and threshold from ``conf/secure_agg/secaggplus.yaml``);
- Flower's legacy FedAvg without and with its own ``SecAggPlusWorkflow`` at the
  equivalent neighbour count (``simulations/bench_secagg_flower.py`` says how it maps).

Medians over rounds after the first of each run (actor start-up). Beside each wall-clock
median: the CPU seconds per timed round of the run's whole process tree (driver, Ray's
daemons and workers; ``simulations/process_cpu.py``), far less sensitive than wall time
to other jobs on a shared machine.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedguard.conf import compose_config
from fedguard.simulations.bench_overhead import _plain_model, run_fedguard
from fedguard.simulations.bench_secagg_flower import (
    FlowerSecAggSettings,
    forget_last_run,
    rounds_done,
    run_flower_legacy,
)
from fedguard.simulations.process_cpu import TreeCpuSampler
from fedguard.clients.models import count_parameters

DIGITS_INPUTS = 64
DIGITS_CLASSES = 10
MIN_ROUNDS = 2  # the first round of every run is warm-up
FEDGUARD_PLAIN, FEDGUARD_SECAGG = "fedguard_plain", "fedguard_secaggplus"
FLOWER_PLAIN, FLOWER_SECAGG = "flower_legacy_plain", "flower_legacy_secaggplus"


# What both sides share and where they still differ (checked against Flower 1.41's
# SecAggPlusWorkflow source: its ring takes num_shares // 2 sites on each side plus the site itself).
LIKE_FOR_LIKE = (
    "Same cohort (every client, every round: fedguard fraction_train 1.0, Flower fraction_fit 1.0); "
    "same graph degree: 4 other sites per client on both sides (fedguard neighbours=4, 2 on each side of a "
    "ring; Flower num_shares=5 = 2 on each side + the client itself); threshold 3 on both sides (Flower counts "
    "the client's own share among its 5, fedguard counts its 4 neighbours' shares); same rounds (median of "
    "rounds 2..R); one SGD step of batch 32 on the same MLP. Still different: fedguard's client reads its "
    "digits partition and uses the config's momentum 0.9, Flower's draws random digits-shaped data without "
    "momentum; fedguard's round is timed by its server before the checkpoint write, Flower's between its "
    "centralized-evaluation calls; fedguard masks 48-bit values in uint64, Flower 2^22 levels modulo 2^32."
)


def hidden_width_for(parameters: int) -> int:
    """Width h of a 64 -> h -> h -> 10 MLP with about ``parameters`` parameters."""
    # h^2 + (64 + 1 + 1 + 10 + 1) h + 10 ~= parameters
    linear = DIGITS_INPUTS + DIGITS_CLASSES + 3
    return max(1, int((-linear + (linear**2 + 4 * parameters) ** 0.5) / 2))


Runner = Callable[[], tuple[list[float], float | None]]


def _timed_cpu(rounds: int, progress: Callable[[], int], run: Callable[[], list[float]]) -> tuple[list[float], float | None]:
    """The run's round wall seconds, and its process tree's CPU seconds per round after the first."""
    with TreeCpuSampler(os.getpid(), progress) as sampler:
        seconds = run()
    cpu = sampler.cpu_between(1, rounds)
    return seconds, None if cpu is None else cpu / (rounds - 1)


def _metrics_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _flower_runner(clients: int, rounds: int, hidden: int, settings: FlowerSecAggSettings | None) -> Runner:
    def run() -> tuple[list[float], float | None]:
        forget_last_run()
        return _timed_cpu(rounds, rounds_done, lambda: run_flower_legacy(clients, rounds, hidden, settings))

    return run


def _fedguard_runner(clients: int, rounds: int, hidden: int, mode: str) -> Runner:
    def run() -> tuple[list[float], float | None]:
        extra = (f"secure_agg={mode}", f"simulation.min_clients_per_round={min(clients, 3)}")
        if mode == "secaggplus":  # the yaml's k=4, t=3 at every size, for one graph beside Flower's: a cost figure,
            # not a setting to deploy (see bench secagg-risk); the virtual sites, which by default
            # assume ceil(5% of 100) = 5 colluders and refuse k=4, t=3, are told to assume none.
            extra = (*extra, "secure_agg.max_run_exposure=1.0", "simulation.site_collusion_fraction=0")
        sizes: list[int] = []

        def timed(run_dir: Path) -> list[float]:
            seconds, actual = run_fedguard(clients, rounds, hidden, run_dir, extra)
            sizes.append(actual)
            return seconds

        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            seconds, cpu = _timed_cpu(rounds, lambda: _metrics_lines(run_dir), lambda: timed(run_dir))
        expected = count_parameters(_plain_model({"hidden": hidden}))
        if sizes != [expected]:
            raise RuntimeError(f"model sizes differ: fedguard {sizes}, Flower's client {expected}")
        return seconds, cpu

    return run


def run_secagg_benchmark(
    client_counts: list[int], parameter_counts: list[int], rounds: int, repeats: int = 1, flower: bool = True
) -> dict[str, Any]:
    if rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds must be at least {MIN_ROUNDS} (the first round of each run is warm-up)")
    secagg = compose_config(["secure_agg=secaggplus"]).secure_agg
    cases = []
    for clients in client_counts:
        for parameters in parameter_counts:
            hidden = hidden_width_for(parameters)
            flower_settings = FlowerSecAggSettings.from_fedguard(
                int(secagg.neighbours), int(secagg.threshold), float(secagg.stage_timeout), clients
            )
            runners = {
                FEDGUARD_PLAIN: _fedguard_runner(clients, rounds, hidden, "off"),
                FEDGUARD_SECAGG: _fedguard_runner(clients, rounds, hidden, "secaggplus"),
            }
            if flower:
                runners[FLOWER_PLAIN] = _flower_runner(clients, rounds, hidden, None)
                runners[FLOWER_SECAGG] = _flower_runner(clients, rounds, hidden, flower_settings)
            seconds: dict[str, list[float]] = {name: [] for name in runners}
            cpu: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(repeats):
                for name, run in runners.items():
                    walls, cpu_per_round = run()
                    seconds[name] += walls[1:]
                    cpu[name] += [] if cpu_per_round is None else [cpu_per_round]
            median = {name: statistics.median(values) for name, values in seconds.items()}
            median_cpu = {name: statistics.median(values) if values else None for name, values in cpu.items()}
            case: dict[str, Any] = {
                "clients": clients,
                "model_parameters": count_parameters(_plain_model({"hidden": hidden})),
                **{f"{name}_round_seconds": value for name, value in median.items()},
                **{f"{name}_round_cpu_seconds": value for name, value in median_cpu.items()},
                "ratio_fedguard_secaggplus_over_plain": median[FEDGUARD_SECAGG] / median[FEDGUARD_PLAIN],
            }
            if flower:
                case["flower_num_shares"] = flower_settings.num_shares
                case["ratio_flower_secaggplus_over_flower_plain"] = median[FLOWER_SECAGG] / median[FLOWER_PLAIN]
                case["ratio_flower_secaggplus_over_fedguard_plain"] = median[FLOWER_SECAGG] / median[FEDGUARD_PLAIN]
                speedup = median[FLOWER_SECAGG] / median[FEDGUARD_SECAGG]
                case["speedup_fedguard_secaggplus_over_flower_secaggplus"] = speedup
                if median_cpu[FLOWER_SECAGG] and median_cpu[FEDGUARD_SECAGG]:  # same ratio in CPU time
                    case["cpu_speedup_fedguard_secaggplus_over_flower_secaggplus"] = (
                        median_cpu[FLOWER_SECAGG] / median_cpu[FEDGUARD_SECAGG])
            case["timed_round_seconds"] = seconds
            case["cpu_seconds_per_timed_round_by_run"] = cpu
            cases.append(case)
            print({k: v for k, v in case.items() if k not in ("timed_round_seconds", "cpu_seconds_per_timed_round_by_run")},
                  flush=True)
    return {
        "rounds": rounds,
        "repeats": repeats,
        "neighbours": int(secagg.neighbours),
        "threshold": int(secagg.threshold),
        "modulus_bits": int(secagg.modulus_bits),
        "flower_mapping": (
            "Flower num_shares = neighbours + 1 (it counts the client itself), rounded up to odd; "
            "reconstruction_threshold = threshold; Flower's default quantization (2^22 levels, modulus 2^32)"
        ),
        "like_for_like": LIKE_FOR_LIKE,
        "cases": cases,
    }
