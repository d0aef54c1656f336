"""CPU time per SecAgg+ stage, in one process: where fedguard's secure-aggregation round spends its work.

Why in-process and in CPU time: the wall-clock round of ``fedguard bench secagg`` mixes
the protocol's work with Ray's transport and the machine's load (other jobs share the
cores here). This runs one round with fedguard's real pieces (the secure-aggregation mod
around a one-step stand-in for training, the ClientApp's stage handler with its request
checks, the server's ``SecureAggregationExchange`` with its reply checks) through a grid
that hands each message straight to the addressed site, and charges each client call's
``time.process_time`` to its stage; the rest is the server's. cProfile names the hot
functions. What it leaves out: Ray's copies of ``Context.state`` and messages, and the
disk's fsync latency (wall time, not CPU).
"""

from __future__ import annotations

import cProfile
import collections
import pstats
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedguard.clients.app import app as client_app
from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model
from fedguard.clients.secagg_identity import provision_rosters
from fedguard.clients.secure_aggregation import secure_aggregation_mod
from fedguard.clients.site import SECAGG_COLLUSION_FRACTION_KEY
from fedguard.clients.wire import protocol
from fedguard.conf import compose_config
from fedguard.conf.run_config import config_to_yaml
from fedguard.server.secure_aggregation import SecureAggregationExchange
from fedguard.simulations.bench_secagg import hidden_width_for

TOP_FUNCTIONS = 15
STEP = 0.001  # the stand-in training's update on every coordinate


def _one_step(msg: Message, context: Context) -> Message:
    arrays = msg.content[protocol.ARRAYS_KEY]
    step = np.float32(STEP * (context.node_id % 7 + 1))
    trained = ArrayRecord({k: Array(arrays[k].numpy() + step) for k in arrays.keys()})
    metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: 30, protocol.TRAIN_LOSS_KEY: 0.5, protocol.TRAIN_STEPS_KEY: 1})
    return Message(RecordDict({protocol.ARRAYS_KEY: trained, protocol.METRICS_KEY: metrics}), reply_to=msg)


class _DirectGrid:
    """Hands each message to its site at once and charges the site's CPU time to the message's stage."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts, self.outbox = contexts, {}
        self.cpu: collections.Counter[str] = collections.Counter()

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            message.metadata.__dict__["_src_node_id"] = 1
            context = self.contexts[message.metadata.dst_node_id]
            train = message.metadata.message_type == "train"
            stage = "train+advertise" if train else str(message.content[protocol.SECAGG_KEY]["stage"])
            started = time.process_time()
            reply = secure_aggregation_mod(message, context, _one_step) if train else client_app(message, context)
            self.cpu[stage] += time.process_time() - started
            self.outbox[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        wanted = set(message_ids)
        return [self.outbox.pop(i) for i in list(self.outbox) if i in wanted]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def _round(clients: int, parameters: int, root: Path) -> dict[str, Any]:
    hidden = hidden_width_for(parameters)
    cfg = compose_config(["dataset=digits", "model=mlp", f"model.hidden_sizes=[{hidden},{hidden}]",
                          f"simulation.num_clients={clients}", "secure_agg=secaggplus", "secure_agg.max_run_exposure=1.0",
                          "progress=false", "device=cpu"])
    bundle = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})
    nodes = list(range(1001, 1001 + clients))
    provision_rosters({f"site-{n}": root / f"site-{n}" for n in nodes})
    # The yaml's k=4, t=3 at every size, as bench secagg times it (sites told to assume no colluders).
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                           node_config={"partition-id": i, "num-partitions": clients, "state-dir": str(root / f"site-{n}"),
                                        SECAGG_COLLUSION_FRACTION_KEY: 0})
                for i, n in enumerate(nodes)}
    config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.SERVER_ROUND_KEY: 1,
                           protocol.LINEAGE_KEY: "profile"})
    messages = [Message(RecordDict({protocol.ARRAYS_KEY: arrays, protocol.CONFIG_KEY: config}), dst_node_id=n,
                        message_type="train") for n in nodes]
    grid, exchange, profile = _DirectGrid(contexts), SecureAggregationExchange(cfg), cProfile.Profile()
    started = time.process_time()
    profile.enable()
    _sampled, replies = exchange.train(grid, messages, arrays, 1, 600.0)
    profile.disable()
    total = time.process_time() - started
    stats = pstats.Stats(profile)
    hot = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:TOP_FUNCTIONS]  # type: ignore[attr-defined]
    return {
        "clients": clients,
        "parameters": sum(int(np.prod(arrays[k].shape)) for k in arrays.keys()),
        "contributors": replies.contributors,
        "cpu_seconds_total": round(total, 3),
        "cpu_seconds_by_client_stage": {stage: round(seconds, 3) for stage, seconds in sorted(grid.cpu.items())},
        "cpu_seconds_server_and_rest": round(total - sum(grid.cpu.values()), 3),
        "hot_functions": [{"function": f"{Path(f).name}:{line}({name})", "calls": row[1], "own_seconds": round(row[2], 3)}
                          for (f, line, name), row in hot],
    }


def run_secagg_profile(client_counts: list[int], parameter_counts: list[int]) -> dict[str, Any]:
    """One profiled round per (clients, parameters) cell; prints the per-stage table."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: getattr(TaskIdentity, name, None) for name in ("_run_id", "_task_id", "_node_id")}
    cells = []
    try:  # messages built outside a running app need the identity Flower sets there
        for name in saved:
            setattr(TaskIdentity, name, 1)
        for clients in client_counts:
            for parameters in parameter_counts:
                with tempfile.TemporaryDirectory() as tmp:
                    cells.append(_round(clients, parameters, Path(tmp)))
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
    for cell in cells:
        print(f"\n{cell['clients']} clients x {cell['parameters']:,} parameters: {cell['cpu_seconds_total']} s CPU "
              f"({cell['contributors']} summed)\n| stage | CPU s |\n| --- | --- |")
        for stage, seconds in cell["cpu_seconds_by_client_stage"].items():
            print(f"| clients: {stage} | {seconds} |")
        print(f"| server and the rest | {cell['cpu_seconds_server_and_rest']} |")
        print("hot: " + ", ".join(f"{h['function']} {h['own_seconds']} s" for h in cell["hot_functions"][:8]))
    return {"cells": cells}

