"""fedguard's round loop over any Flower Message-API strategy.

Flower's ``Strategy.start`` runs all rounds in one call; fedguard drives the same
public strategy methods (configure/aggregate train and evaluate) itself so that each
round can be recorded, checkpointed and (in later layers) accounted before the
next one starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clients import protocol
from server.run_record import RoundRecord

logger = logging.getLogger(__name__)

CentralEvaluation = Callable[[int, ArrayRecord], tuple[float, float]]
RoundCallback = Callable[[RoundRecord, ArrayRecord], None]


@dataclass(frozen=True)
class FederationResult:
    arrays: ArrayRecord
    rounds_completed: int
    stop_reason: str


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])


def _exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[int, list[Message]]:
    outgoing = list(messages)
    if not outgoing:
        return 0, []
    return len(outgoing), list(grid.send_and_receive(outgoing, timeout=timeout))


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
) -> FederationResult:
    arrays = initial_arrays
    for server_round in range(1, num_rounds + 1):
        started = time.perf_counter()
        sampled, replies = _exchange(
            grid, strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid), round_timeout
        )
        failed = sum(1 for reply in replies if reply.has_error())
        for reply in replies:
            if reply.has_error():
                logger.warning(
                    "round %d: client node %d failed: %s", server_round, reply.metadata.src_node_id, reply.error.reason
                )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            logger.error("round %d: no usable training replies (%d sampled); stopping", server_round, sampled)
            return FederationResult(arrays, server_round - 1, "no usable training replies")
        arrays = new_arrays

        _, eval_replies = _exchange(
            grid,
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid),
            round_timeout,
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies) if eval_replies else None

        test_loss, test_accuracy = central_evaluation(server_round, arrays)
        record = RoundRecord(
            round=server_round,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            train_loss=_metric(train_metrics, protocol.TRAIN_LOSS_KEY),
            round_seconds=time.perf_counter() - started,
            clients_sampled=sampled,
            clients_replied=len(replies) - failed,
            clients_failed=failed + (sampled - len(replies)),
            federated_eval_loss=_metric(eval_metrics, protocol.EVAL_LOSS_KEY),
            federated_eval_accuracy=_metric(eval_metrics, protocol.EVAL_ACCURACY_KEY),
        )
        on_round_end(record, arrays)
    return FederationResult(arrays, num_rounds, "completed all rounds")
