"""Fuzzing every message type the server and the client accept (hypothesis; FEDGUARD_FUZZ_CASES cases each, 1,000 in CI).

Property: a malformed message never raises out of the entry point the run uses; it ends
in a typed rejection (a reply-check reason on the server, an error reply on the client)
and leaves the state it must not touch (the global model, Context.state) unchanged.
Valid-looking survivors must then aggregate or decode without error.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from fuzz_support import FUZZ_SETTINGS, CONFIG_VALUES, mutate_content, snapshot
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import DictConfig

from fedguard.clients.wire import protocol
from fedguard.clients.app import app as client_app
from fedguard.clients.app import decode_request
from fedguard.clients.datasets import load_dataset
from fedguard.clients.wire.checks import MalformedMessage
from fedguard.clients.models import build_model
from fedguard.conf import run_config
from fedguard.conf.run_config import config_to_yaml
from fedguard.server.federation import sort_train_replies
from fedguard.server.reply_checks import PRIVACY_REPORT_KEYS, usable_evaluate_replies
from fedguard.server.run_record import _json_safe
from fedguard.server.strategies import STRATEGY_CLASSES

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.usefixtures("flower_task_identity"),
]
NODE_CONFIG = {"partition-id": 0, "num-partitions": 4, "ephemeral-privacy-state": True}
ROBUST = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")


@pytest.fixture(scope="module", autouse=True)
def _parse_failing_config_once():
    """Each case parses its config twice, in the oracle (``decode_request``) and in the handler.

    A valid text is parsed once (``cached_config_from_yaml`` keeps it), but a failing one
    is not kept, and parsing and validating a config costs ~0.1 s: the larger part of a
    request case. The last failing text's error is kept for the very next parse of the
    same text; the parse is pure, so the handler sees exactly the error it would compute.
    """
    real = run_config.config_from_yaml
    last_failure: dict[str, Exception] = {}

    def parse(text: str) -> DictConfig:
        if text in last_failure:
            raise last_failure[text]
        try:
            return real(text)
        except Exception as err:  # noqa: BLE001 - re-raised unchanged; any parse error is kept
            last_failure.clear()
            last_failure[text] = err
            raise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_config, "config_from_yaml", parse)
        yield


@pytest.fixture(scope="module")
def world(compose):
    cfg = compose(["model=logreg", "simulation.num_clients=4", "train.max_steps=1", "progress=false", "device=cpu"])
    bundle = load_dataset(cfg.dataset, cfg.seed)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    return World(cfg=cfg, yaml=config_to_yaml(cfg), arrays=ArrayRecord(model.state_dict()))


# The updates the well-formed train replies carry (two clients moving the model apart).
DELTAS = (0.01, -0.01)


class World(dict):
    """The run's config and global model; a short repr keeps hypothesis' failure reports readable.

    The well-formed trained models are built once here, not per case: every case's replies
    are new RecordDicts around them, and nothing under test changes an ArrayRecord it reads
    (the strategies, which do, get deep copies in ``_aggregate_all``).
    """

    def __init__(self, cfg, yaml: str, arrays: ArrayRecord) -> None:
        super().__init__(cfg=cfg, yaml=yaml)
        self["global"] = arrays
        self["trained"] = {delta: _trained(arrays, delta) for delta in DELTAS}

    def __repr__(self) -> str:
        return "World(digits, logreg)"


def _instruction(node: int, message_type: str = "train") -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=message_type)


def _reply(content: RecordDict, node: int, message_type: str = "train") -> Message:
    return Message(content, reply_to=_instruction(node, message_type))


def _trained(global_arrays: ArrayRecord, delta: float) -> ArrayRecord:
    return ArrayRecord({k: Array(global_arrays[k].numpy() + np.float32(delta)) for k in global_arrays.keys()})


def _train_content(world, delta: float = DELTAS[0]) -> RecordDict:
    metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: 40, protocol.TRAIN_LOSS_KEY: 0.7, protocol.TRAIN_STEPS_KEY: 2})
    return RecordDict({protocol.ARRAYS_KEY: world["trained"][delta], protocol.METRICS_KEY: metrics})


def _privacy_report(refused: bool) -> ConfigRecord:
    report = {key: 0.5 for key in PRIVACY_REPORT_KEYS}
    report.update({"steps_round": 0, "steps_total": 10, "rounds_participated": 3, "partition-id": 2,
                   "accountant": "rdp", "reason": "budget spent" if refused else "", "refused": refused})
    return ConfigRecord(report)


TRAIN_KEYS = {
    protocol.METRICS_KEY: [protocol.NUM_EXAMPLES_KEY, protocol.TRAIN_LOSS_KEY, protocol.TRAIN_STEPS_KEY],
    protocol.ARRAYS_KEY: [],
    protocol.PRIVACY_KEY: sorted(PRIVACY_REPORT_KEYS),
}


def _check_sorted(world, replies: list[Message]):
    """Run the server's sorting; every reply lands in exactly one class and the model is untouched."""
    models = RecordDict({"g": world["global"], **{f"trained {delta}": world["trained"][delta] for delta in DELTAS}})
    before = snapshot(models)
    result = sort_train_replies(3, replies, world["global"])
    classes = [result.usable, result.refused, result.failed, result.rejected]
    assert sorted(id(r) for group in classes for r in group) == sorted(id(r) for r in replies)
    for report in result.privacy:  # what the run record writes must serialize and index
        json.dumps(_json_safe(report))
        assert int(report["partition-id"]) >= 0 and f"{report['epsilon']:.3f}"
    assert snapshot(models) == before  # the shared well-formed models too: the next case reuses them
    return result


def _aggregate_all(world, usable: list[Message]) -> None:
    for name in ROBUST:
        params = {"num_malicious_nodes": 0} if name == "krum" else {}
        strategy = STRATEGY_CLASSES[name](weighted_by_key=protocol.NUM_EXAMPLES_KEY, **params)
        # Fresh copies: Flower's FedTrimmedAvg pops the arrays out of the replies it aggregates.
        copies = [_reply(copy.deepcopy(r.content), r.metadata.src_node_id) for r in usable]
        arrays, _metrics = strategy.aggregate_train(3, copies)
        for key in world["global"].keys():
            assert np.all(np.isfinite(arrays[key].numpy())), (name, key)


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_train_reply(world, data):
    mutated = mutate_content(data.draw, _train_content(world), TRAIN_KEYS)
    good = [_reply(_train_content(world, delta), node) for node, delta in zip((1, 2), DELTAS)]
    bad = _reply(mutated, 9)
    result = _check_sorted(world, [*good, bad])
    assert all(g in result.usable for g in good)
    if bad in result.usable:  # it passed every check: every robust strategy must digest it
        _aggregate_all(world, result.usable)


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_budget_refusal(world, data):
    mutated = mutate_content(data.draw, RecordDict({protocol.PRIVACY_KEY: _privacy_report(True)}), TRAIN_KEYS)
    good = _reply(_train_content(world), 1)
    result = _check_sorted(world, [good, _reply(mutated, 9)])
    assert result.usable == [good] or (len(result.usable) == 2 and result.usable[0] is good)
    for refusal in result.refused:  # what run_federation reads from a refusal
        assert isinstance(str(refusal.content.config_records[protocol.PRIVACY_KEY].get("reason", "refused")), str)
    _aggregate_all(world, result.usable)


EVAL_KEYS = {protocol.METRICS_KEY: [protocol.NUM_EXAMPLES_KEY, protocol.EVAL_LOSS_KEY, protocol.EVAL_ACCURACY_KEY]}


def _eval_content(accuracy: float = 0.8) -> RecordDict:
    return RecordDict({protocol.METRICS_KEY: MetricRecord(
        {protocol.NUM_EXAMPLES_KEY: 12, protocol.EVAL_LOSS_KEY: 0.4, protocol.EVAL_ACCURACY_KEY: accuracy})})


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_evaluate_reply(data):
    good = _reply(_eval_content(), 1, "evaluate")
    replies = [good, _reply(mutate_content(data.draw, _eval_content(0.5), EVAL_KEYS), 9, "evaluate")]
    usable = usable_evaluate_replies(3, replies)
    assert good in usable
    metrics = STRATEGY_CLASSES["fedavg"](weighted_by_key=protocol.NUM_EXAMPLES_KEY).aggregate_evaluate(3, usable)
    assert all(math.isfinite(float(v)) for v in metrics.values())


# ---- the client: train and evaluate requests ----

REQUEST_KEYS = {
    protocol.CONFIG_KEY: [protocol.FEDGUARD_CONFIG_KEY, protocol.SERVER_ROUND_KEY, protocol.PROXIMAL_MU_KEY],
    protocol.ARRAYS_KEY: [],
}


def _mutated_yaml(draw, text: str) -> str:
    lines = text.splitlines()
    kind = draw(st.sampled_from(["value", "drop", "junk", "keep"]))
    index = draw(st.integers(0, len(lines) - 1))
    if kind == "value" and ":" in lines[index]:
        lines[index] = lines[index].split(":")[0] + ": " + repr(draw(CONFIG_VALUES))[:30]
    elif kind == "drop":
        del lines[index]
    elif kind == "junk":
        return draw(st.text(max_size=60))
    return "\n".join(lines)


def _request(draw, world, message_type: str) -> Message:
    config = {protocol.FEDGUARD_CONFIG_KEY: world["yaml"], protocol.SERVER_ROUND_KEY: 2}
    content = RecordDict({protocol.ARRAYS_KEY: world["global"], protocol.CONFIG_KEY: ConfigRecord(config)})
    if draw(st.booleans()):
        config = {**config, protocol.FEDGUARD_CONFIG_KEY: _mutated_yaml(draw, world["yaml"])}
        content = RecordDict({protocol.ARRAYS_KEY: world["global"], protocol.CONFIG_KEY: ConfigRecord(config)})
    if draw(st.booleans()) or config[protocol.FEDGUARD_CONFIG_KEY] == world["yaml"]:
        content = mutate_content(draw, content, REQUEST_KEYS)
    message = Message(content, dst_node_id=7, message_type=message_type)
    message.metadata.__dict__["_src_node_id"] = 1
    return message


def _client_property(world, data, message_type: str) -> None:
    message = _request(data.draw, world, message_type)
    context = Context(run_id=1, node_id=7, node_config=dict(NODE_CONFIG), state=RecordDict(), run_config={})
    context.state["keep"] = ConfigRecord({"spent": 1.5})
    before = snapshot(context.state)
    try:
        decode_request(message, context)
        malformed = None
    except MalformedMessage as err:
        malformed = err
    reply = client_app(message, context)  # the real handler, mods included
    assert isinstance(reply, Message)
    if malformed is not None:
        assert reply.has_error() and "MalformedMessage" in reply.error.reason
        assert snapshot(context.state) == before


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_train_request(world, data):
    _client_property(world, data, "train")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_evaluate_request(world, data):
    _client_property(world, data, "evaluate")
