"""Driving fedguard's real ClientApp (all mods) with train messages, outside a Flower run."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedguard.clients.wire import protocol
from fedguard.clients.app import app as client_app
from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model
from fedguard.conf.plans import trains_privately
from fedguard.conf.run_config import config_to_yaml

LINEAGE = "lineage-test"


def global_arrays(cfg) -> ArrayRecord:
    bundle = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes, private=trains_privately(cfg))
    return ArrayRecord(model.state_dict())


def train_message(cfg, server_round: int, arrays: ArrayRecord | None = None, node: int = 7) -> Message:
    config = {
        protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg),
        protocol.SERVER_ROUND_KEY: server_round,
        protocol.LINEAGE_KEY: LINEAGE,
    }
    if cfg.secure_agg.mode != "off":  # the server opens a fresh SecAgg+ session with every train request
        config[protocol.SECAGG_SESSION_KEY] = os.urandom(protocol.SECAGG_SESSION_BYTES)
    content = RecordDict({protocol.ARRAYS_KEY: arrays or global_arrays(cfg), protocol.CONFIG_KEY: ConfigRecord(config)})
    message = Message(content, dst_node_id=node, message_type="train")
    message.metadata.__dict__["_src_node_id"] = 1
    return message


def run_train(message: Message, state_dir: Path | None, partition: int = 0, num_partitions: int = 5) -> Message:
    """One train request in a fresh Context (a new Flower run: what a resumed server starts)."""
    node_config = {"partition-id": partition, "num-partitions": num_partitions, "ephemeral-privacy-state": True}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    context = Context(run_id=1, node_id=message.metadata.dst_node_id, node_config=node_config, state=RecordDict(), run_config={})
    return client_app(message, context)
