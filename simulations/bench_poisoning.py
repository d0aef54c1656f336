"""``fedguard bench poisoning``: final accuracy of each aggregation strategy under model poisoning.

20 simulated clients on digits; 0, 2 or 5 of them are attackers that send
``old + factor * (new - old)`` instead of their trained model (factor -10: a boosted
sign flip, the scaled attack of Blanchard et al. 2017; factor -1: a plain sign flip).
The attack lives only here, in a benchmark ClientApp that wraps fedguard's real
ClientApp and rewrites the reply of chosen partitions; the product's client has no such
switch. The attacker list reaches the Ray workers (other processes) through the environment.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedguard.clients.wire import protocol
from fedguard.clients.app import app as fedguard_client
from fedguard.conf import compose_config
from fedguard.conf.run_config import config_to_yaml
from fedguard.simulations.simulate import backend_config, launch

logger = logging.getLogger(__name__)

ATTACK_ENV = "FEDGUARD_BENCH_ATTACK"
NUM_CLIENTS = 20
ATTACKER_COUNTS = (0, 2, 5)
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
ROBUST_STRATEGIES = STRATEGIES[1:]
# Strategy parameters sized for the worst case benchmarked (5 of 20 attackers).
STRATEGY_PARAMS = {"krum": ["strategy.params.num_malicious_nodes=5"], "fedtrimmedavg": ["strategy.params.beta=0.3"]}
DP_OVERRIDES = ["privacy=sample_dp", "privacy.target_epsilon=8.0"]

poisoning_client = ClientApp()


def _attack() -> tuple[set[int], float]:
    spec = json.loads(os.environ.get(ATTACK_ENV, "{}") or "{}")
    return set(spec.get("partitions", [])), float(spec.get("factor", 1.0))


@poisoning_client.train()
def _poisoned_train(msg: Message, context: Context) -> Message:
    """The real train handler (mods included), then the attack on the reply of chosen partitions."""
    reply = fedguard_client(msg, context)
    attackers, factor = _attack()
    partition = int(context.node_config[protocol.PARTITION_ID_KEY])
    if partition not in attackers or reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return reply
    old, new = msg.content[protocol.ARRAYS_KEY], reply.content[protocol.ARRAYS_KEY]
    poisoned = {}
    for key in new.keys():
        before, after = old[key].numpy(), new[key].numpy()
        poisoned[key] = Array((before + factor * (after - before)).astype(after.dtype))
    content = RecordDict({name: reply.content[name] for name in reply.content.keys()})
    content[protocol.ARRAYS_KEY] = ArrayRecord(poisoned)
    return Message(content, reply_to=msg)


@poisoning_client.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return fedguard_client(msg, context)


def _run_one(overrides: list[str], attackers: int, factor: float) -> dict[str, Any]:
    from fedguard.server.app import app as server_app

    cfg = compose_config(overrides)
    backend = backend_config(cfg)
    # Ray's local workers inherit the driver's environment (a runtime_env would need Ray's agent).
    os.environ[ATTACK_ENV] = json.dumps({"partitions": list(range(attackers)), "factor": factor})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_config = {protocol.RUN_CONFIG_FEDGUARD: config_to_yaml(cfg), protocol.RUN_CONFIG_RUN_DIR: str(run_dir)}
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        launch(server_app, poisoning_client, NUM_CLIENTS, backend, context)
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "final_accuracy": summary["final"]["accuracy"],
        "accuracy_per_round": [r["test_accuracy"] for r in rounds],
        "rounds_completed": len(rounds),
        "stop_reason": summary["stop_reason"],
        "max_epsilon": summary.get("privacy", {}).get("max_epsilon"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_poisoning_benchmark(rounds: int, factor: float, model: str, local_epochs: int) -> dict[str, Any]:
    base = [
        "dataset=digits", f"model={model}", f"simulation.num_clients={NUM_CLIENTS}", f"simulation.rounds={rounds}",
        f"train.local_epochs={local_epochs}", "progress=false", "device=cpu", "log_level=ERROR",
    ]
    cases = [(s, n, "none") for s in STRATEGIES for n in ATTACKER_COUNTS]
    cases += [(s, max(ATTACKER_COUNTS), "sample_dp") for s in ROBUST_STRATEGIES]
    rows = []
    for strategy, attackers, privacy in cases:
        overrides = [*base, f"strategy={strategy}", *STRATEGY_PARAMS.get(strategy, [])]
        overrides += DP_OVERRIDES if privacy == "sample_dp" else []
        result = _run_one(overrides, attackers, factor)
        rows.append({"strategy": strategy, "attackers": attackers, "privacy": privacy, **result})
        print(f"{strategy:>14} attackers={attackers} privacy={privacy:<9} accuracy={result['final_accuracy']:.3f} "
              f"({result['seconds']:.0f} s)", flush=True)
    _print_table(rows)
    return {
        "config": {
            "dataset": "digits", "model": model, "clients": NUM_CLIENTS, "rounds": rounds, "local_epochs": local_epochs,
            "attack": f"old + {factor} * (new - old) from partitions 0..k-1", "strategy_params": STRATEGY_PARAMS,
            "dp_overrides": DP_OVERRIDES,
        },
        "rows": rows,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'strategy':>14} | {'privacy':<9} | " + " | ".join(f"{n} attackers" for n in ATTACKER_COUNTS))
    for strategy in STRATEGIES:
        for privacy in ("none", "sample_dp"):
            cells = {r["attackers"]: r["final_accuracy"] for r in rows if r["strategy"] == strategy and r["privacy"] == privacy}
            if cells:
                print(f"{strategy:>14} | {privacy:<9} | "
                      + " | ".join(f"{cells[n]:>11.3f}" if n in cells else f"{'-':>11}" for n in ATTACKER_COUNTS))
