"""Shared by the own-files tests: tiny image folders (one sub-folder per class, one grey PNG per
image) and the train request a server sends a site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from PIL import Image

from fedguard.clients.datasets import expected_layout
from fedguard.clients.models import build_model
from fedguard.clients.wire import protocol
from fedguard.conf.run_config import config_to_yaml


def tiny_image_folder(root: Path, size: tuple[int, int] = (8, 8), classes: tuple[str, ...] = ("cat", "dog"),
                      per_class: int = 3, prefix: str = "") -> Path:
    """Image ``i`` of class ``label`` is a flat ``size`` (width, height) image of value 40 * label + i,
    saved as ``<root>/<class>/<prefix><i>.png``; returns ``root``."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full(size[::-1], 40 * label + i, dtype=np.uint8)).save(root / name / f"{prefix}{i}.png")
    return root


def train_request(cfg) -> Message:
    """Round 1's train request for ``cfg`` (a fresh model of the config's shape), from node 1 to node 3."""
    shape, classes = expected_layout(cfg.dataset)
    config = {protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.SERVER_ROUND_KEY: 1, protocol.LINEAGE_KEY: "t"}
    content = RecordDict({protocol.ARRAYS_KEY: ArrayRecord(build_model(cfg.model, shape, classes).state_dict()),
                          protocol.CONFIG_KEY: ConfigRecord(config)})
    message = Message(content, dst_node_id=3, message_type="train")
    message.metadata.__dict__["_src_node_id"] = 1
    return message
