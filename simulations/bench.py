"""``fedguard bench <name>``: benchmarks that print figures and write JSON.

Benchmarks measure; tests check correctness. Each benchmark writes
``<out>/<name>.json`` with the machine it ran on and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = "bench-results"


def machine_description() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(out_dir: Path, name: str, result: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine_description(), **result}, indent=2) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    """Every benchmark's options in one place, so `fedguard bench --help` lists them all."""
    parser = argparse.ArgumentParser(prog="fedguard bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True)
    overhead = sub.add_parser("overhead", help="per-round wall time: fedguard vs a plain Flower simulation")
    overhead.add_argument("--clients", type=int, default=10)
    overhead.add_argument("--rounds", type=int, default=12)
    overhead.add_argument("--hidden", type=int, default=1024, help="MLP width; two hidden layers (~1.1M parameters)")
    overhead.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    overhead.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    dp = sub.add_parser("dp", help="local training throughput and peak memory: each grad_sample_mode vs non-private")
    dp.add_argument("--dataset", default="fashion_mnist")
    dp.add_argument("--model", nargs="+", default=["cnn", "mlp"])
    dp.add_argument("--batch-size", type=int, default=64)
    dp.add_argument("--warmup-steps", type=int, default=5)
    dp.add_argument("--steps", type=int, default=40)
    dp.add_argument("--repeats", type=int, default=3, help="alternating runs of every mode; the best is reported")
    dp.add_argument("--pairs", type=int, default=10,
                    help="adjacent (non-private, book-keeping) pairs, order alternating; the goal's ratio is their "
                    "median, with the spread (0: skip)")
    dp.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    secagg = sub.add_parser("secagg", help="round wall time with SecAgg+ vs without, fedguard's and Flower's")
    secagg.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    secagg.add_argument("--parameters", type=int, nargs="+", default=[100_000, 1_000_000])
    secagg.add_argument("--rounds", type=int, default=4)
    secagg.add_argument("--repeats", type=int, default=1, help="alternating runs of each variant")
    secagg.add_argument(
        "--flower", action=argparse.BooleanOptionalAction, default=True, help="also time Flower's legacy SecAgg+"
    )
    secagg.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    profile = sub.add_parser("secagg-profile", help="CPU time per SecAgg+ stage in one process, and the hot functions")
    profile.add_argument("--clients", type=int, nargs="+", default=[20])
    profile.add_argument("--parameters", type=int, nargs="+", default=[1_000_000])
    profile.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    risk = sub.add_parser("secagg-risk", help="SecAgg+ exposure and dropout failure vs cohort, collusion, dropouts")
    risk.add_argument("--cohorts", type=int, nargs="+", default=[10, 33, 100, 1000])
    risk.add_argument("--collusions", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    risk.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    risk.add_argument("--rounds", type=int, default=50)
    risk.add_argument("--bound", type=float, default=None, help="run-wide exposure bound (default: the config's)")
    risk.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    attacks = sub.add_parser("secagg-attacks", help="fedguard's hostile-server attacks run against Flower's secaggplus_mod")
    attacks.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    poisoning = sub.add_parser("poisoning", help="final accuracy per strategy with 0/2/5 of 20 clients poisoning")
    poisoning.add_argument("--rounds", type=int, default=5)
    poisoning.add_argument("--factor", type=float, default=-10.0, help="attackers send old + factor * update")
    poisoning.add_argument("--model", default="mlp")
    poisoning.add_argument("--local-epochs", type=int, default=2)
    poisoning.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    deployment = sub.add_parser("deployment", help="separate sites on loopback vs simulation: round time, startup")
    deployment.add_argument("--sites", type=int, default=3)
    deployment.add_argument("--rounds", type=int, default=5)
    deployment.add_argument("--dataset", default="digits")
    deployment.add_argument("--model", default="mlp")
    deployment.add_argument("--configs", nargs="+", default=["plain", "secagg_sample_dp"],
                            choices=["plain", "secagg_sample_dp"], help="plain and/or SecAgg+ with sample-level DP")
    deployment.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    deployment.add_argument("--keep", type=Path, default=None,
                            help="leave each config's site, server and run logs under KEEP/<config> (profiling)")
    deployment.add_argument("--no-simulation", action="store_true",
                            help="time the deployed rounds only (no simulated run, no ratio)")
    deployment.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                            help="a Hydra override added to every config, deployed and simulated alike (repeatable)")
    deployment.add_argument("--idle-cpu", type=float, default=0.0, metavar="SECONDS",
                            help="before each run, measure the federation's CPU per process kind over SECONDS "
                                 "with nothing to do (the cost of its polling)")
    client_dp = sub.add_parser("client-dp", help="accuracy vs client-level epsilon at 1,000 clients; wall time, memory")
    client_dp.add_argument("--clients", type=int, default=1000)
    client_dp.add_argument("--rounds", type=int, default=20)
    client_dp.add_argument("--sample-rate", type=float, default=0.1, help="Poisson rate q per round")
    client_dp.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    client_dp.add_argument("--clip-norm", type=float, default=1.0)
    client_dp.add_argument("--dataset", default="fashion_mnist")
    client_dp.add_argument("--model", default="logreg")
    client_dp.add_argument("--local-epochs", type=int, default=1)
    client_dp.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    scale = sub.add_parser("scale", help="time per round and peak memory at 100 / 1,000 / 10,000 virtual clients")
    scale.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    scale.add_argument("--per-round", type=int, default=100, help="expected clients a round at every population")
    scale.add_argument("--rounds", type=int, default=5)
    scale.add_argument("--privacy", nargs="+", default=["sample_dp", "client_dp"], choices=["sample_dp", "client_dp", "none"])
    scale.add_argument("--ray-address", default=None, help="run every cell on this Ray cluster (simulation.ray_address)")
    scale.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    serve = sub.add_parser("serve", help="requests/s and p50/p99 latency of `fedguard serve` on loopback")
    serve.add_argument("model_dirs", type=Path, nargs="+", help="directories written by `fedguard export --out`")
    serve.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    serve.add_argument("--requests", type=int, default=500, help="requests per cell (after 20 warm-up)")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[1], help="concurrent clients per cell")
    serve.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    own_files = sub.add_parser("own-files", help="3 sites' own CSV files: federated with/without DP vs pooled")
    own_files.add_argument("--rounds", type=int, default=10)
    own_files.add_argument("--epsilon", type=float, default=3.0, help="sample-level DP target epsilon per site")
    own_files.add_argument("--kind", choices=("csv", "images"), default="csv",
                           help="csv: three wine CSV sites; images: three Fashion-MNIST image folders (PNG)")
    own_files.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    accuracy = sub.add_parser("accuracy", help="Fashion-MNIST, 10 IID clients: test accuracy at each epsilon and "
                              "without DP (hyperparameters tuned on validation splits with --tune)")
    accuracy.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    accuracy.add_argument("--rounds", type=int, default=20)
    accuracy.add_argument("--preset", default="dp_images", help="conf/preset/<name>.yaml")
    accuracy.add_argument("--tune", action="store_true", help="choose among the candidates on validation splits "
                          "first (else the preset's settings)")
    accuracy.add_argument("--tune-epsilon", type=float, default=3.0)
    accuracy.add_argument("--nonprivate-lr", type=float, default=0.1,
                          help="step size of the non-private run (no clipping bounds its gradients)")
    accuracy.add_argument("--tune-one-site", action="store_true",
                          help="only the cheap tuning: candidates trained on one site, scored on the validation rows")
    accuracy.add_argument("--from-runs", type=Path, default=None,
                          help="collect finished tune-*/eps-* run directories under this folder instead of running")
    accuracy.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    return parser


def run_benchmark(args: argparse.Namespace) -> dict | None:
    """Run the chosen benchmark; its modules are imported only here (each pulls in Ray, torch or Flower)."""
    if args.name == "overhead":
        from fedguard.simulations.bench_overhead import run_overhead_benchmark

        result = run_overhead_benchmark(args.clients, args.rounds, args.hidden, args.repeats)
    elif args.name == "dp":
        from fedguard.simulations.bench_dp import dp_table, run_dp_benchmark

        runs = [run_dp_benchmark(args.dataset, m, args.batch_size, args.warmup_steps, args.steps, args.repeats,
                                 args.pairs)
                for m in args.model]
        result = {"runs": runs}
        print(dp_table(runs))
    elif args.name == "secagg":
        from fedguard.simulations.bench_secagg import run_secagg_benchmark

        result = run_secagg_benchmark(args.clients, args.parameters, args.rounds, args.repeats, args.flower)
    elif args.name == "secagg-profile":
        from fedguard.simulations.bench_secagg_profile import run_secagg_profile

        result = run_secagg_profile(args.clients, args.parameters)
    elif args.name == "secagg-risk":
        from fedguard.privacy.secagg.risk import DEFAULT_MAX_RUN_EXPOSURE
        from fedguard.simulations.bench_secagg_risk import run_secagg_risk_benchmark

        bound = DEFAULT_MAX_RUN_EXPOSURE if args.bound is None else args.bound
        result = run_secagg_risk_benchmark(args.cohorts, args.collusions, args.dropouts, args.rounds, bound)
    elif args.name == "secagg-attacks":
        from fedguard.simulations.bench_secagg_attacks_flower import run_secagg_attack_table

        result = run_secagg_attack_table()
    elif args.name == "poisoning":
        from fedguard.simulations.bench_poisoning import run_poisoning_benchmark

        result = run_poisoning_benchmark(args.rounds, args.factor, args.model, args.local_epochs)
    elif args.name == "deployment":
        from fedguard.simulations.bench_deployment import run_deployment_benchmark

        result = run_deployment_benchmark(args.sites, args.rounds, args.dataset, args.model, args.configs,
                                          keep=args.keep, simulate=not args.no_simulation,
                                          extra=args.override, idle_seconds=args.idle_cpu)
    elif args.name == "client-dp":
        from fedguard.simulations.bench_client_dp import run_client_dp_benchmark

        result = run_client_dp_benchmark(
            args.clients, args.rounds, args.sample_rate, args.epsilons, args.clip_norm, args.dataset, args.model,
            args.local_epochs,
        )
    elif args.name == "scale":
        from fedguard.simulations.bench_scale import run_scale_benchmark

        result = run_scale_benchmark(args.clients, args.per_round, args.rounds, args.privacy, args.ray_address)
    elif args.name == "serve":
        from fedguard.simulations.bench_serve import run_serve_benchmark

        result = {"models": [
            run_serve_benchmark(model_dir, args.batch_sizes, args.requests, tuple(args.concurrency))
            for model_dir in args.model_dirs
        ]}
    elif args.name == "own-files":
        from fedguard.simulations.bench_own_files import run_own_files_benchmark, run_own_images_benchmark

        if args.kind == "images":
            result = run_own_images_benchmark(args.rounds, args.epsilon)
        else:
            result = run_own_files_benchmark(args.rounds, args.epsilon)
    elif args.name == "accuracy":
        from fedguard.simulations.bench_accuracy import (
            accuracy_table,
            collect_runs,
            run_accuracy_benchmark,
            tune_on_one_site,
        )

        if args.tune_one_site:
            args.name = "accuracy-tuning"
        result = (tune_on_one_site(args.tune_epsilon, args.rounds, args.preset) if args.tune_one_site else
                  collect_runs(args.from_runs, args.tune_epsilon) if args.from_runs else
                  run_accuracy_benchmark(args.epsilons, args.rounds, args.preset, args.tune, args.tune_epsilon,
                                         args.nonprivate_lr))
        if not args.tune_one_site:
            print(accuracy_table(result))
    else:
        return None
    return result


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from fedguard.simulations.simulate import configure_logging

    configure_logging("WARNING")
    result = run_benchmark(args)
    if result is None:
        return 2
    name = f"{args.name}-images" if getattr(args, "kind", None) == "images" else args.name
    path = write_result(args.out, name, result)  # own-files-images.json beside own-files.json
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0
