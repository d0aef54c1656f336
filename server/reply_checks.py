"""Checks a client's training reply must pass before it may reach aggregation.

A federation spans sites nobody fully controls: a reply with NaN/Inf, the wrong arrays,
shapes or dtypes, or a missing or non-positive example count is rejected with a reason,
so the global model and the accounting never see it.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from clients import protocol


def _example_count_problem(metrics: object) -> str | None:
    if not isinstance(metrics, MetricRecord):
        return f"no MetricRecord '{protocol.METRICS_KEY}'"
    count = metrics.get(protocol.NUM_EXAMPLES_KEY)
    if isinstance(count, bool) or not isinstance(count, int | float):
        return f"'{protocol.NUM_EXAMPLES_KEY}' is missing or not a number"
    if not math.isfinite(count) or count <= 0:
        return f"'{protocol.NUM_EXAMPLES_KEY}'={count} is not a positive count"
    return None


def _arrays_problem(arrays: object, expected: ArrayRecord) -> str | None:
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord '{protocol.ARRAYS_KEY}'"
    if list(arrays.keys()) != list(expected.keys()):
        return f"{len(arrays)} arrays with keys unlike the global model's {len(expected)}"
    for key in expected.keys():
        got, want = arrays[key], expected[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return f"array '{key}' is {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"
        values = got.numpy()
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            return f"array '{key}' holds NaN or infinite values"
    return None


def train_reply_problem(reply: Message, expected_arrays: ArrayRecord | None) -> str | None:
    """Why this reply must not be aggregated, or None when it may.

    ``expected_arrays`` is None where the reply carries no model (secure aggregation).
    """
    content = reply.content
    problem = _example_count_problem(content.get(protocol.METRICS_KEY))
    if problem is None and expected_arrays is not None:
        problem = _arrays_problem(content.get(protocol.ARRAYS_KEY), expected_arrays)
    return problem
