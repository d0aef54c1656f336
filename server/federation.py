"""fedguard's round loop over any Flower Message-API strategy.

Flower's ``Strategy.start`` runs all rounds in one call; fedguard drives the same
public strategy methods (configure/aggregate train and evaluate) itself so that each
round can be recorded, checkpointed and accounted before the next one starts, and
so that clients refusing for budget leave the sampling pool instead of breaking
aggregation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedguard.clients.wire import protocol
from fedguard.server.client_pool import ExcludingGrid
from fedguard.server.reply_checks import metric_key_outliers, train_reply_problem, usable_evaluate_replies
from fedguard.server.run_record import RoundRecord

logger = logging.getLogger(__name__)

CentralEvaluation = Callable[[int, ArrayRecord], tuple[float, float]]
# Called after each round with the record, the new global model and the clients no longer sampled.
RoundCallback = Callable[[RoundRecord, ArrayRecord, dict[int, str]], None]


@dataclass(frozen=True)
class FederationResult:
    arrays: ArrayRecord
    rounds_completed: int
    stop_reason: str
    excluded_clients: dict[int, str] = field(default_factory=dict)
    # The last reason each client gave for failing a training request (e.g. its own files do not
    # match the data contract): the reason only, which is all a site sends about its refusal.
    client_failures: dict[int, str] = field(default_factory=dict)


@dataclass
class TrainReplies:
    usable: list[Message] = field(default_factory=list)
    refused: list[Message] = field(default_factory=list)
    failed: list[Message] = field(default_factory=list)
    rejected: list[Message] = field(default_factory=list)
    privacy: list[dict[str, Any]] = field(default_factory=list)
    # Replies (usable or refused) carrying a site's signed ledger entries, for the run's ledger.
    ledgers: list[Message] = field(default_factory=list)
    # Clients whose updates are in `usable`; differs from len(usable) when secure
    # aggregation folds them into one aggregate reply.
    contributors: int | None = None

    @property
    def contributed(self) -> int:
        return len(self.usable) if self.contributors is None else self.contributors


class ClientWait(Protocol):
    """Blocks until enough clients are connected; False if they never came (the run stops cleanly)."""

    def __call__(self, grid: Grid, min_clients: int) -> bool: ...


class SpendRecorder(Protocol):
    """Puts the round's privacy spend on record; returns the replies whose record was unacceptable."""

    def __call__(self, server_round: int, replies: list[Message]) -> list[Message]: ...


class TrainExchange(Protocol):
    """Sends a round's train messages and returns what the strategy should aggregate."""

    def train(
        self, grid: Grid, messages: Iterable[Message], global_arrays: ArrayRecord, server_round: int, timeout: float
    ) -> tuple[int, TrainReplies]: ...


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])


def exchange_messages(grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[int, list[Message]]:
    """Send what there is to send (nothing is fine); returns (messages sent, replies)."""
    outgoing = list(messages)
    if not outgoing:
        return 0, []
    replies = list(grid.send_and_receive(outgoing, timeout=timeout))
    if silent := {m.metadata.dst_node_id for m in outgoing} - {r.metadata.src_node_id for r in replies}:
        logger.warning(
            "no reply within %.0f s from %d of %d client(s): nodes %s", timeout, len(silent), len(outgoing), sorted(silent)
        )
    return len(outgoing), replies


def sort_train_replies(
    server_round: int, replies: list[Message], expected_arrays: ArrayRecord | None = None
) -> TrainReplies:
    """Split replies into usable updates, budget refusals, errors and malformed replies.

    ``expected_arrays`` (the global model) is what a usable reply's arrays must match;
    None where replies carry no model (secure aggregation).
    """
    sorted_replies = TrainReplies()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("round %d: client node %d failed: %s", server_round, node, reply.error.reason)
            sorted_replies.failed.append(reply)
            continue
        if (problem := train_reply_problem(reply, expected_arrays)) is not None:
            logger.warning("round %d: rejected the reply of client node %d: %s", server_round, node, problem)
            sorted_replies.rejected.append(reply)
            continue
        report = reply.content.config_records.get(protocol.PRIVACY_KEY)
        if report is not None:
            sorted_replies.privacy.append({"node_id": node, **dict(report)})
        if protocol.LEDGER_KEY in reply.content:
            sorted_replies.ledgers.append(reply)
        if report is not None and bool(report.get("refused", False)):
            sorted_replies.refused.append(reply)
        else:
            sorted_replies.usable.append(reply)
    for reply in metric_key_outliers(sorted_replies.usable):  # Flower's strategies refuse a mix
        logger.warning(
            "round %d: rejected the reply of client node %d: its metric keys differ from the other replies'",
            server_round, reply.metadata.src_node_id,
        )
        sorted_replies.usable.remove(reply)
        sorted_replies.rejected.append(reply)
    return sorted_replies


class PlainTrainExchange:
    """Clients send their trained models in the clear."""

    def train(
        self, grid: Grid, messages: Iterable[Message], global_arrays: ArrayRecord, server_round: int, timeout: float
    ) -> tuple[int, TrainReplies]:
        sampled, replies = exchange_messages(grid, messages, timeout)
        return sampled, sort_train_replies(server_round, replies, global_arrays)


def in_model_dtypes(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast aggregated arrays back to the model's dtypes (FedAdam & co. return float64), so
    the global model keeps one format and replies can be checked against it."""
    if all(arrays[key].dtype == reference[key].dtype for key in reference.keys()):
        return arrays
    return ArrayRecord(
        {key: Array(arrays[key].numpy().astype(reference[key].numpy().dtype)) for key in reference.keys()}
    )


def _reason_to_stop_before(
    server_round: int,
    pool: ExcludingGrid,
    min_clients: int,
    wait_for_clients: ClientWait | None,
    stop_before_round: Callable[[int, Grid], str | None] | None,
) -> str | None:
    """Why round ``server_round`` must not start (too few clients left or connected, or a
    layer's own reason such as a budget it would exceed), or None."""
    available = len(list(pool.get_node_ids()))
    if pool.excluded and available < min_clients:
        return (
            f"too few clients left to sample: {available} < {min_clients} "
            f"({len(pool.excluded)} stopped: {sorted(set(pool.excluded.values()))[0]})"
        )
    if wait_for_clients is not None and not wait_for_clients(pool, min_clients):
        return f"fewer than {min_clients} clients connected within the wait for clients"
    return stop_before_round(server_round, pool) if stop_before_round is not None else None


def _settle_spend_and_refusals(
    server_round: int, sorted_replies: TrainReplies, pool: ExcludingGrid, record_spend: SpendRecorder | None
) -> None:
    """Put the round's spend on the record before anything of it is released (a reply whose
    ledger entries fail is rejected), and stop sampling clients that refused for budget."""
    if record_spend is not None:
        for reply in record_spend(server_round, sorted_replies.ledgers):
            if reply in sorted_replies.usable:
                sorted_replies.usable.remove(reply)
                sorted_replies.rejected.append(reply)
    for refusal in sorted_replies.refused:
        node = refusal.metadata.src_node_id
        reason = str(refusal.content.config_records[protocol.PRIVACY_KEY].get("reason", "refused"))
        pool.exclude(node, reason)
        logger.warning("round %d: client node %d no longer sampled: %s", server_round, node, reason)


def run_federation(
    grid: Grid,
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    *,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    central_evaluation: CentralEvaluation,
    on_round_end: RoundCallback,
    round_timeout: float,
    train_exchange: TrainExchange | None = None,
    start_round: int = 1,
    excluded_clients: dict[int, str] | None = None,
    wait_for_clients: ClientWait | None = None,
    record_spend: SpendRecorder | None = None,
    stop_before_round: Callable[[int, Grid], str | None] | None = None,
) -> FederationResult:
    """Rounds ``start_round``..``num_rounds`` (a resumed run starts after its last completed one)."""
    exchange = train_exchange or PlainTrainExchange()
    pool = ExcludingGrid(grid)
    for node, reason in (excluded_clients or {}).items():
        pool.exclude(node, reason)
    min_clients = int(getattr(strategy, "min_available_nodes", 1))
    arrays = initial_arrays
    failures: dict[int, str] = {}
    for server_round in range(start_round, num_rounds + 1):
        reason = _reason_to_stop_before(server_round, pool, min_clients, wait_for_clients, stop_before_round)
        if reason is not None:
            logger.warning("stopping before round %d: %s", server_round, reason)
            return FederationResult(arrays, server_round - 1, reason, dict(pool.excluded), failures)
        started = time.perf_counter()
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), pool)
        sampled, sorted_replies = exchange.train(pool, messages, arrays, server_round, round_timeout)
        _settle_spend_and_refusals(server_round, sorted_replies, pool, record_spend)
        failures.update({r.metadata.src_node_id: str(r.error.reason) for r in sorted_replies.failed if r.has_error()})

        # Client-level DP releases noise even for an empty Poisson cohort (see server/client_dp.py).
        releases_anyway = sampled == 0 and bool(getattr(strategy, "releases_without_replies", False))
        new_arrays, train_metrics = (
            strategy.aggregate_train(server_round, sorted_replies.usable)
            if sorted_replies.usable or releases_anyway
            else (None, None)
        )
        if new_arrays is not None:
            arrays = in_model_dtypes(new_arrays, initial_arrays)
        elif sorted_replies.refused:
            logger.warning("round %d: no update; every replying client refused for budget", server_round)
        else:
            reason = "no usable training replies"
            logger.warning("round %d: %s (%d sampled); stopping", server_round, reason, sampled)
            return FederationResult(arrays, server_round - 1, reason, dict(pool.excluded), failures)

        _, eval_replies = exchange_messages(
            pool,
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), pool),
            round_timeout,
        )
        eval_replies = usable_evaluate_replies(server_round, eval_replies)
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies) if eval_replies else None

        test_loss, test_accuracy = central_evaluation(server_round, arrays)
        record = RoundRecord(
            round=server_round,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            train_loss=_metric(train_metrics, protocol.TRAIN_LOSS_KEY),
            round_seconds=time.perf_counter() - started,
            clients_sampled=sampled,
            clients_replied=sorted_replies.contributed,
            clients_failed=sampled - sorted_replies.contributed - len(sorted_replies.refused),
            clients_refused=len(sorted_replies.refused),
            clients_rejected=len(sorted_replies.rejected),
            federated_eval_loss=_metric(eval_metrics, protocol.EVAL_LOSS_KEY),
            federated_eval_accuracy=_metric(eval_metrics, protocol.EVAL_ACCURACY_KEY),
            privacy=sorted_replies.privacy,
        )
        on_round_end(record, arrays, dict(pool.excluded))
    return FederationResult(arrays, num_rounds, "completed all rounds", dict(pool.excluded), failures)
