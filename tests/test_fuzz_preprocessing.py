"""Fuzzing the server's side of ``query.preprocess``: sites' statistics replies (hypothesis;
FEDGUARD_FUZZ_CASES cases, 1,000 in CI).

Property: one mutated reply beside two well-formed ones never raises out of the server's
preprocessing stage; the mutated site is either counted with a usable vector or named in
``failures`` (the good ones never are), and the published statistics are finite, within the
declared ranges, with positive stds and frequencies that sum to 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from fuzz_support import FUZZ_SETTINGS, mutate_content, scaled_examples
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.clients.preprocessing import contract_layout
from fedguard.clients.wire import protocol
from fedguard.conf.contract import declared_contract_of
from fedguard.conf.run_config import config_to_yaml
from fedguard.server.preprocessing import run_preprocessing

pytestmark = pytest.mark.usefixtures("flower_task_identity")
GOOD, BAD = (1, 2), 9
KEYS = {protocol.PREPROCESS_KEY: [protocol.PREPROCESS_SUMS_FIELD, protocol.PREPROCESS_NUMERIC_FIELD,
                                  protocol.PREPROCESS_CATEGORIES_FIELD, protocol.PREPROCESS_NOISE_STD_FIELD,
                                  protocol.PARTITION_ID_KEY]}


@pytest.fixture(scope="module")
def world(compose):
    cfg = compose(["dataset=tabular", "model=mlp", "dataset.preprocessing=federated", "simulation.num_clients=3"])
    contract = declared_contract_of(cfg.dataset)
    layout, _ = contract_layout(contract)
    return cfg, config_to_yaml(cfg), layout, contract


def _sums(layout, rows: int) -> list[float]:
    """A vector clipped data could give: ``rows`` records at u = 0.5 (second moment 0.25), all in category 0."""
    d = layout.numeric
    vector = [float(rows)] + [0.5 * rows] * d + [0.25 * rows] * d
    for size in layout.category_counts:
        vector += [float(rows)] + [0.0] * (size - 1)
    return vector


def _content(layout, rows: int, node: int) -> RecordDict:
    return RecordDict({protocol.PREPROCESS_KEY: ConfigRecord({
        protocol.PREPROCESS_SUMS_FIELD: _sums(layout, rows), protocol.PREPROCESS_NUMERIC_FIELD: layout.numeric,
        protocol.PREPROCESS_CATEGORIES_FIELD: list(layout.category_counts), protocol.PREPROCESS_NOISE_STD_FIELD: 0.0,
        protocol.PARTITION_ID_KEY: node})})


def _scaled_sums(draw, content: RecordDict) -> RecordDict:
    """A near miss the generic mutations rarely hit: finite sums, one coordinate pushed to an extreme."""
    record = dict(content[protocol.PREPROCESS_KEY])
    sums = list(record[protocol.PREPROCESS_SUMS_FIELD])
    sums[draw(st.integers(0, len(sums) - 1))] = draw(st.sampled_from([1e308, -1e308, 1.7e308, 1e200, -5.0, 1e-320]))
    record[protocol.PREPROCESS_SUMS_FIELD] = sums
    return RecordDict({protocol.PREPROCESS_KEY: ConfigRecord(record)})


class FixedGrid:
    """Answers the server's preprocessing request with the replies a case prepared, per node."""

    def __init__(self, contents: dict[int, RecordDict]) -> None:
        self.contents = contents

    def get_node_ids(self):
        return list(self.contents)

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(self.contents[m.metadata.dst_node_id], reply_to=m) for m in messages]


# 300 cases in CI (FEDGUARD_FUZZ_CASES=1000), 30 in the inner loop: one small vector per case.
@settings(FUZZ_SETTINGS, max_examples=scaled_examples(300))
@given(st.data())
def test_fuzz_preprocessing_reply(world, data):
    cfg, text, layout, contract = world
    well_formed = _content(layout, 40, BAD)
    mutated = data.draw(st.sampled_from(["generic", "scaled"]))
    bad = (mutate_content(data.draw, well_formed, KEYS) if mutated == "generic"
           else _scaled_sums(data.draw, well_formed))
    grid = FixedGrid({GOOD[0]: _content(layout, 30, GOOD[0]), GOOD[1]: _content(layout, 50, GOOD[1]), BAD: bad})
    outcome = run_preprocessing(grid, cfg, text, "fuzz-lineage", timeout=1)
    assert not set(outcome.failures) & set(GOOD)
    assert outcome.sites == 3 or (outcome.sites == 2 and set(outcome.failures) == {BAD})
    stats = outcome.statistics
    assert math.isfinite(stats["count"])
    for feature in (f for f in contract.features if f.kind == "numeric"):
        got = stats["features"][feature.name]
        assert feature.low <= got["mean"] <= feature.high and 0 < got["std"] <= (feature.high - feature.low) / 2
    for shares in stats["frequencies"].values():
        assert all(share >= 0 for share in shares.values()) and sum(shares.values()) == pytest.approx(1.0)
    if outcome.sites == 3:  # what it counted was a finite vector of the layout's length
        sums = np.asarray(bad[protocol.PREPROCESS_KEY][protocol.PREPROCESS_SUMS_FIELD], dtype=np.float64)
        assert sums.shape == (layout.length,) and np.all(np.isfinite(sums))
