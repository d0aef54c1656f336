"""Everything a crashed server needs to continue a run from its last completed round.

The checkpoint written after each round carries, beside the global model, a ``run_state``:
the run's lineage id (the identity clients key their saved privacy state on, the same
across resumes), the round, the strategy's own state (FedAdam's moments and the like), the
clients no longer sampled and the sampler's RNG state, so the resumed run samples and
aggregates exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

from fedguard.server.checkpoint import CHECKPOINT_DIR, LATEST_NAME, CheckpointError, read_checkpoint

RUN_STATE_KEY = "run_state"


def new_lineage_id() -> str:
    return uuid.uuid4().hex


def strategy_state(strategy: Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The strategy's array-valued state (server optimiser moments, current arrays), as tensors.

    Flower's Message-API strategies keep such state as ``dict[str, ndarray]`` attributes; the
    rest of their attributes are settings the config rebuilds.
    """
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            state[name] = {key: torch.from_numpy(np.array(array, copy=True)) for key, array in value.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, arrays in state.items():
        if not hasattr(strategy, name):
            raise CheckpointError(f"checkpoint holds strategy state {name!r} that {type(strategy).__name__} lacks")
        setattr(strategy, name, {key: tensor.numpy() for key, tensor in arrays.items()})


def _random_state_to_payload(rng_state: tuple) -> dict[str, Any]:
    version, internal, gauss = rng_state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _random_state_from_payload(payload: dict[str, Any]) -> tuple:
    return payload["version"], tuple(int(x) for x in payload["internal"].tolist()), payload["gauss"]


@dataclass
class RunState:
    lineage: str
    completed_round: int = 0
    strategy: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    excluded_clients: dict[int, str] = field(default_factory=dict)
    sampler_rng: tuple | None = None
    # The federation's client-level accountant (privacy.client_dp_accounting.py), when on, and the
    # current clip norm under adaptive clipping (server/client_dp.py ClientDpStrategy.state_payload).
    client_dp: dict[str, Any] | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "lineage": self.lineage,
            "completed_round": self.completed_round,
            "strategy": self.strategy,
            "excluded_clients": {str(k): v for k, v in self.excluded_clients.items()},
            "sampler_rng": None if self.sampler_rng is None else _random_state_to_payload(self.sampler_rng),
            "client_dp": self.client_dp,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> RunState:
        try:
            return cls(
                lineage=str(payload["lineage"]),
                completed_round=int(payload["completed_round"]),
                strategy=dict(payload["strategy"]),
                excluded_clients={int(k): str(v) for k, v in payload["excluded_clients"].items()},
                sampler_rng=None if payload["sampler_rng"] is None else _random_state_from_payload(payload["sampler_rng"]),
                client_dp=payload.get("client_dp"),  # absent in checkpoints from before client-level DP
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint's run state is malformed: {err}") from err


def capture_run_state(
    lineage: str,
    completed_round: int,
    strategy: Strategy,
    excluded: dict[int, str],
    client_dp: dict[str, Any] | None = None,
) -> RunState:
    return RunState(lineage, completed_round, strategy_state(strategy), dict(excluded), random.getstate(), client_dp)


@dataclass(frozen=True)
class ResumePoint:
    model_state: dict[str, torch.Tensor]
    run_state: RunState
    config_yaml: str


def read_resume_point(run_dir: Path) -> ResumePoint:
    """The last completed round of the run in ``run_dir``, as its checkpoint recorded it."""
    path = run_dir / CHECKPOINT_DIR / LATEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume from {run_dir}: {path} does not exist (did the run complete a round?)"
        )
    payload = read_checkpoint(path)
    if RUN_STATE_KEY not in payload:
        raise CheckpointError(f"{path} holds no run state; it was written by a fedguard that could not resume")
    return ResumePoint(payload["model_state"], RunState.from_payload(payload[RUN_STATE_KEY]), payload["config_yaml"])
