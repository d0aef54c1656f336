"""``fedguard bench deployment``: separate-sites round time vs simulation, same config.

The deployment side is a real federation on loopback (simulations/local_federation.py):
`fedguard server` (TLS, SuperNode authentication, nginx), registered sites from `fedguard
client` (signed app), `fedguard run`. Reported per config: time from starting the server to
the first round, the mean round wall time beside the same config in Flower's simulation
engine, and where a deployed round's time goes.

The breakdown comes from the timing line each ClientApp task writes on its site's log
(clients/deployment/verified_clientapp.py). Per round and per message stage, the site that
answered last sets the stage's critical path; what is left of the round's wall time is spent
waiting: the SuperNode's poll for new messages, the launcher's poll for tasks, the server's own
work and transport. Components are means over sites, summed over a round's stages.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedguard.clients.deployment.verified_clientapp import TIMING_PREFIX
from fedguard.clients.deployment.app_gate import WARM_LOG_LINE
from fedguard.simulations.idle_cpu import idle_cores, wait_for_lines
from fedguard.simulations.local_federation import Federation, stop_process

POLL_SECONDS = 0.2
RUN_TIMEOUT = 1800.0
# How long the task launchers may take to import their warm modules before --idle-cpu measures.
WARM_TIMEOUT = 600.0
# The configs the issue names: plain, and SecAgg+ with sample-level DP (a fixed noise multiplier,
# so no calibration search is timed; the settings of the deployment test).
CONFIGS: dict[str, list[str]] = {
    "plain": [],
    "secagg_sample_dp": ["train.learning_rate=0.2", "privacy=sample_dp", "privacy.target_epsilon=null",
                         "privacy.noise_multiplier=1.0", "secure_agg=secaggplus", "secure_agg.threshold=2"],
}
TIMING_LINE = re.compile(re.escape(TIMING_PREFIX) + r" (\{.*\})")
# The proxy's access log (server/proxy.py's log_format): a site's request, its answer's size, its
# time and when it ended. A 2-byte pull-object answer is "found, not uploaded yet" (object_found
# set, no content): the puller backs off before asking again.
PROXY_LINE = re.compile(r'^\S+ (?P<peer>\S+) "POST (?P<path>\S+) [^"]*" (?P<status>\d+) (?P<bytes>\d+) '
                        r'upstream=\S+ (?P<seconds>[\d.]+) msec=(?P<end>[\d.]+)')
NOT_YET_BYTES = 2


def _round_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def task_timings(log_text: str) -> list[dict[str, Any]]:
    return [json.loads(match.group(1)) for match in TIMING_LINE.finditer(log_text)]


def round_breakdown(round_seconds: list[float], sites: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Mean seconds per round: process start and app load, training, secure-aggregation stages,
    evaluation, runtime-API transfers, and the rest (waiting). ``sites`` holds each site's timing
    lines; a line's ``round`` is the round number Flower puts in the message's group id."""
    totals: dict[str, float] = defaultdict(float)
    for number, seconds in enumerate(round_seconds, start=1):
        per_site = [[t for t in lines if str(t.get("round")) == str(number)] for lines in sites]
        stages = max((len(lines) for lines in per_site), default=0)
        critical = 0.0
        for stage in range(stages):
            tasks = [lines[stage] for lines in per_site if len(lines) > stage]
            critical += max(_task_total(t) for t in tasks)
            for t in tasks:
                share = 1.0 / len(tasks)
                totals["process_start_s"] += share * (t.get("start_s", 0.0) + t.get("load_s", 0.0))
                totals["transfer_s"] += share * (t.get("pull_s", 0.0) + t.get("push_s", 0.0))
                kind = {"train": "training_s", "train.secagg": "secagg_stages_s"}.get(t.get("type"), "evaluation_s")
                totals[kind] += share * t.get("app_s", 0.0)
        totals["messages_per_site"] += stages
        totals["waiting_s"] += seconds - critical
    rounds = max(len(round_seconds), 1)
    return {key: round(value / rounds, 3) for key, value in sorted(totals.items())}


def object_pull_retries(access_log: str) -> dict[str, float]:
    """How often sites asked the server for an object not uploaded yet, and how long each then
    waited (median) before that connection's next object pull started (Flower's own backoff: 1 s, 2 s, ...;
    fedguard's: 50 ms up to 0.5 s, clients/deployment/supernode_poll.py)."""
    pulls: dict[str, list[tuple[float, float, bool]]] = defaultdict(list)
    for line in access_log.splitlines():
        match = PROXY_LINE.match(line)
        if match and match["path"].endswith("/pull-object"):
            end = float(match["end"])
            pulls[match["peer"]].append((end - float(match["seconds"]), end, int(match["bytes"]) == NOT_YET_BYTES))
    not_yet, gaps = 0, []
    for requests in pulls.values():
        requests.sort()
        for (_, end, missing), (next_start, _, _) in zip(requests, requests[1:] + [(None, None, None)]):
            if missing:
                not_yet += 1
                if next_start is not None:
                    gaps.append(max(next_start - end, 0.0))
    # The median: a connection's next object pull may belong to a later message (the retry itself
    # can go out on another of the site's kept-alive connections), which a mean would count.
    return {"not_yet_answers": not_yet, "median_wait_after_s": round(statistics.median(gaps), 3) if gaps else 0.0}


def _task_total(timing: dict[str, Any]) -> float:
    return sum(timing.get(key, 0.0) for key in ("start_s", "pull_s", "load_s", "app_s", "push_s"))


def _deployment(root: Path, sites: int, overrides: list[str], idle_seconds: float = 0.0) -> dict[str, Any]:
    fed = Federation(root)
    try:
        fed.make_certs()
        fed.make_publisher()
        started = time.monotonic()
        fed.start_server()
        for site in range(sites):
            key = fed.make_site_keys(site)
            if fed.register(key.with_suffix(".pub")).returncode != 0:
                raise RuntimeError(f"could not register site {site}")
        for site in range(sites):
            fed.start_client(site, sites)
        idle = None
        if idle_seconds > 0:  # before the run: the federation's own cost with nothing to do (idle_cpu.py)
            fed.wait_for_nodes(sites)
            wait_for_lines([root / f"client{site}.log" for site in range(sites)], WARM_LOG_LINE, WARM_TIMEOUT)
            idle = idle_cores([fed.server.pid, *(proc.pid for proc in fed.clients.values())], idle_seconds)
        run = fed.submit(*overrides)
        first_round_started = None
        deadline = time.monotonic() + RUN_TIMEOUT
        while run.poll() is None and time.monotonic() < deadline:
            if first_round_started is None and fed.run_dirs():
                lines = _round_lines(fed.run_dirs()[-1])
                if lines:
                    first_round_started = time.monotonic() - lines[0]["round_seconds"] - started
            time.sleep(POLL_SECONDS)
        stop_process(run)
        if run.returncode != 0:
            raise RuntimeError(f"fedguard run failed; see {root}/run.log")
        rounds = _round_lines(fed.run_dirs()[-1])
        round_seconds = [r["round_seconds"] for r in rounds]
        timings = [task_timings((root / f"client{site}.log").read_text(errors="replace")) for site in range(sites)]
        access_log = fed.server_dir / "proxy" / "access.log"
        return {
            "server_start_to_first_round_s": first_round_started,
            "round_seconds": round_seconds,
            "final_accuracy": rounds[-1]["test_accuracy"],
            "breakdown_per_round": round_breakdown(round_seconds, timings),
            # Round 1 carries the cold start (first data load, first imports); rounds 2.. are the steady state.
            "breakdown_per_round_after_first": round_breakdown(
                round_seconds[1:], [[{**t, "round": int(t["round"]) - 1} for t in lines if str(t.get("round")) != "1"
                                     and str(t.get("round", "")).isdigit()] for lines in timings]),
            # The whole run, the first round's downloads of the app included.
            "object_pull_retries": object_pull_retries(access_log.read_text(errors="replace") if access_log.exists() else ""),
            **({"idle_cores_by_process_kind": idle, "idle_seconds": idle_seconds} if idle is not None else {}),
        }
    finally:
        fed.close()


def _simulation(root: Path, overrides: list[str]) -> dict[str, Any]:
    run_dir = root / "simulation"
    subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "simulate", *overrides, f"hydra.run.dir={run_dir}"],
        check=True, capture_output=True, timeout=RUN_TIMEOUT,
    )
    rounds = _round_lines(run_dir)
    return {"round_seconds": [r["round_seconds"] for r in rounds], "final_accuracy": rounds[-1]["test_accuracy"]}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_deployment_benchmark(sites: int, rounds: int, dataset: str, model: str, configs: list[str] | None = None,
                             keep: Path | None = None, simulate: bool = True,
                             extra: list[str] | None = None, idle_seconds: float = 0.0) -> dict[str, Any]:
    """``keep``: leave each config's federation (site logs with their task timing lines, server
    and run logs, run directories) under ``keep/<config>`` instead of a deleted temporary folder.
    ``simulate=False`` times the deployment only (the ratio is then left out). ``extra``: Hydra
    overrides added to every config, on both sides (e.g. a poll interval under study).
    ``idle_seconds`` > 0: before each run, the started federation's cores per process kind over
    that many seconds with nothing to do, i.e. the cost of its polling (simulations/idle_cpu.py)."""
    base = [f"dataset={dataset}", f"model={model}", f"simulation.num_clients={sites}",
            f"simulation.rounds={rounds}", "progress=false"]
    result: dict[str, Any] = {"config": {"sites": sites, "rounds": rounds, "dataset": dataset, "model": model},
                              "runs": {}}
    for name in configs or list(CONFIGS):
        overrides = [*base, *CONFIGS[name], *(extra or [])]
        with tempfile.TemporaryDirectory(prefix="fedguard-bench-deployment-") as tmp:
            root = Path(tmp) if keep is None else keep / name
            root.mkdir(parents=True, exist_ok=True)
            deployment = _deployment(root, sites, overrides, idle_seconds)
            simulation = _simulation(root, overrides) if simulate else None
        run: dict[str, Any] = {"overrides": [*CONFIGS[name], *(extra or [])], "deployment": deployment, "simulation": simulation,
                               "mean_round_seconds": {"deployment": _mean(deployment["round_seconds"])}}
        if simulation is not None:
            run["mean_round_seconds"]["simulation"] = _mean(simulation["round_seconds"])
            run["deployed_over_simulated"] = round(run["mean_round_seconds"]["deployment"]
                                                   / run["mean_round_seconds"]["simulation"], 2)
        result["runs"][name] = run
    print(deployment_table(result), file=sys.stderr)
    return result


def deployment_table(result: dict[str, Any]) -> str:
    keys = ("process_start_s", "transfer_s", "training_s", "secagg_stages_s", "evaluation_s", "waiting_s")
    rows = ["| config | simulated s/round | deployed s/round | x | messages/site/round | "
            + " | ".join(keys) + " |", "|" + " --- |" * (5 + len(keys))]
    for name, run in result["runs"].items():
        parts = run["deployment"]["breakdown_per_round"]
        means = run["mean_round_seconds"]
        simulated = f"{means['simulation']:.2f}" if "simulation" in means else "-"
        ratio = f"{run['deployed_over_simulated']:.1f}" if "deployed_over_simulated" in run else "-"
        rows.append(f"| {name} | {simulated} | {means['deployment']:.2f} "
                    f"| {ratio} | {parts.get('messages_per_site', 0):.0f} | "
                    + " | ".join(f"{parts.get(key, 0.0):.2f}" for key in keys) + " |")
    return "\n".join(rows)
