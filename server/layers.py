"""The server's optional layers, chosen once at setup from the run's config.

Client-level DP wraps the strategy, the privacy ledger records every release, SecAgg+
replaces the plain train exchange. Each is on or off for the whole run, so the decision
is taken here, once; the round loop and the run's bookkeeping then call the chosen
layers' hooks without asking which are on (as Flower installs mods only when wanted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fedguard.conf.plans import client_level_dp, trains_privately
from fedguard.server.client_dp import ClientDpStrategy, wrap_for_client_dp
from fedguard.server.federation import SpendRecorder, TrainExchange
from fedguard.server.privacy_ledger import FederationLedger
from fedguard.server.run_record import RoundRecord
from fedguard.server.run_state import RunState
from fedguard.server.secure_aggregation import SecureAggregationExchange

StopCheck = Callable[[int, Grid], str | None]


def _no_stop(_server_round: int, _grid: Grid) -> None:
    return None


def _nothing_to_record(_server_round: int, replies: list[Message]) -> list[Message]:
    return replies


@dataclass
class ServerLayers:
    """What the round loop runs with: the outermost strategy, the train exchange, and the
    hooks of whichever layers this run has (empty hooks where a layer is off)."""

    strategy: Strategy
    train_exchange: TrainExchange | None = None
    client_dp: ClientDpStrategy | None = None
    ledger: FederationLedger | None = None
    stop_before_round: StopCheck = _no_stop
    record_spend: SpendRecorder = _nothing_to_record
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def annotate(self, record: RoundRecord) -> RoundRecord:
        """The round's metrics line, with client-level DP's release when that layer is on."""
        return replace(record, client_dp=self.client_dp.last_release) if self.client_dp else record

    def accounting_state(self) -> dict[str, Any] | None:
        """What the checkpoint carries for the layers' accountants (None: nothing to carry)."""
        return self.client_dp.state_payload() if self.client_dp else None

    def summary(self) -> dict[str, Any]:
        """summary.json's entries from the layers."""
        return {"privacy": {"federation": self.client_dp.federation_summary()}} if self.client_dp else {}

    def finish(self, rounds_completed: int, stop_reason: str) -> None:
        if self.ledger:
            self.ledger.finish(rounds_completed, stop_reason)

    def close(self) -> None:
        for close in self._closers:
            close()


def build_layers(
    cfg: DictConfig, strategy: Strategy, run_state: RunState, run_dir: Path, config_yaml: str, resumed_after: int | None
) -> ServerLayers:
    """Choose this run's layers from its config, once; ``strategy`` stays the inner one
    (whose state checkpoints carry)."""
    client_dp = wrap_for_client_dp(cfg, strategy, run_state.client_dp) if client_level_dp(cfg) else None
    layers = ServerLayers(
        strategy=client_dp or strategy,
        train_exchange=SecureAggregationExchange(cfg) if cfg.secure_agg.mode == "secaggplus" else None,
        client_dp=client_dp,
    )
    if client_dp is not None:
        layers.stop_before_round = client_dp.stop_reason
    if trains_privately(cfg) or client_dp is not None:
        ledger = FederationLedger(
            run_dir, run_state.lineage, config_yaml, resumed_after=resumed_after,
            federation_budget=cfg.privacy.client_max_epsilon if client_dp else None,
            federation_delta=float(cfg.privacy.delta) if client_dp else None,
        )
        layers.ledger, layers.record_spend = ledger, ledger.record_replies
        layers._closers.append(ledger.close)
        if client_dp is not None:
            client_dp.on_release = ledger.record_release  # on the record before a release leaves
            if resumed_after is not None:
                client_dp.account_recorded(ledger.client_dp_releases_after(resumed_after))
    return layers
