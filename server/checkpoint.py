"""Global-model checkpoints: written atomically after every round, loadable with one call.

    from fedguard.server.checkpoint import load_global_model
    model = load_global_model("outputs/2026-11-23/12-00-00/checkpoints/final.pt")
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedguard.clients.models import build_model
from fedguard.conf.plans import trains_privately
from fedguard.conf.run_config import config_from_yaml

CHECKPOINT_FORMAT = "fedguard-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest.pt"
FINAL_NAME = "final.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not fedguard's."""


def save_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    server_round: int,
    config_yaml: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    metrics: dict[str, Any],
    run_state: dict[str, Any] | None = None,
) -> None:
    """Write to a temporary file, fsync, then rename, so a crash never leaves half a checkpoint.

    ``run_state`` (server/run_state.py) is what a resumed run needs beyond the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": server_round,
        "model_state": {k: v.detach().cpu() for k, v in model_state.items()},
        "config_yaml": config_yaml,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "metrics": metrics,
    }
    if run_state is not None:
        payload["run_state"] = run_state
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class BackgroundCheckpointWriter:
    """Writes checkpoints on one background thread so the next round need not wait for the disk.

    At most one write is pending: submitting waits for the previous one, so checkpoints land
    in round order and a failure surfaces at the next submit (or at ``close``).
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedguard-checkpoint")
        self._pending: Future | None = None
        self._lock = threading.Lock()

    def submit(self, path: Path, **checkpoint: Any) -> None:
        with self._lock:
            self._wait()
            model_state = {k: v.detach().cpu().clone() for k, v in checkpoint.pop("model_state").items()}
            self._pending = self._executor.submit(save_checkpoint, path, model_state=model_state, **checkpoint)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        with self._lock:
            try:
                self._wait()
            finally:
                self._executor.shutdown(wait=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    return payload


def load_global_model(path: str | Path) -> nn.Module:
    """Rebuild the model a run trained, with its final (or latest) global weights, in eval mode."""
    payload = read_checkpoint(path)
    cfg = config_from_yaml(payload["config_yaml"])
    model = build_model(
        cfg.model, tuple(payload["input_shape"]), int(payload["num_classes"]), private=trains_privately(cfg)
    )
    model.load_state_dict(payload["model_state"])
    return model.eval()
