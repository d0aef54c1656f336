"""Malformed training replies are rejected before aggregation, with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedguard.server.federation import sort_train_replies

def _record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


GLOBAL = _record({"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)})


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages built outside a running ServerApp need the identity Flower sets there.
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _reply(arrays: dict | None, num_examples=10, node: int = 5) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    metrics = {"train_loss": 0.5} if num_examples is None else {"num-examples": num_examples, "train_loss": 0.5}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = _record(arrays)
    return Message(content, reply_to=instruction)


def _good() -> dict:
    return {"w": np.ones((3, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}


@pytest.mark.parametrize(
    ("arrays", "count", "reason"),
    [
        ({"w": np.full((3, 2), np.nan, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}, 10, "NaN"),
        ({"w": np.full((3, 2), np.inf, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}, 10, "NaN or infinite"),
        ({"w": np.ones((3, 2), dtype=np.float32)}, 10, "keys"),
        ({"w": np.ones((300, 2), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}, 10, "expected"),
        ({"w": np.ones((3, 2), dtype=np.float64), "b": np.ones(2, dtype=np.float32)}, 10, "expected"),
        (_good(), -3, "positive"),
        (_good(), None, "missing"),
        (None, 10, "ArrayRecord"),
    ],
)
def test_malformed_replies_are_rejected_and_the_rest_aggregated(arrays, count, reason, caplog):
    replies = [_reply(_good(), node=1), _reply(arrays, count, node=2)]
    sorted_replies = sort_train_replies(3, replies, GLOBAL)
    assert sorted_replies.usable == [replies[0]]
    assert sorted_replies.rejected == [replies[1]]
    assert reason in caplog.text and "client node 2" in caplog.text


def test_secure_aggregation_replies_need_only_a_count():
    sorted_replies = sort_train_replies(1, [_reply(None, 10), _reply(None, 0)], expected_arrays=None)
    assert len(sorted_replies.usable) == 1 and len(sorted_replies.rejected) == 1
