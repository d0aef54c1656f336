"""Fuzzing SecAgg+ messages end to end: the server's stage-answer handling and the client's stage requests.

Four clients (the real ClientApp stage handler, the real secure-aggregation mod around
a stand-in for local training) and the real ``SecureAggregationExchange`` talk through an
in-process grid. In each case one message of one stage, either a client's answer or the
server's request to a client, is replaced by a mutated copy of the honest one.

Properties: nothing raises out of the exchange; the global model is untouched; the
outcome is an aggregate of the right shape with finite values, or a clean "no usable
update"; an answer the form checks reject counts as a dropout, so the round still
completes with the other clients; a client refusing a malformed request replies with an
error and leaves its Context.state as it was (or, for a protocol refusal, wipes its round secrets).

Speed: a whole protocol round per case (key generation, Shamir sharing, sealing, masking
for four clients) made the 7,000 cases take minutes. Every case starts from the same
snapshot instead: the honest round is run once, the honest clients' answers and states
are kept per request history (``HonestClients``), and a case recomputes only what its
mutated message changes. The server side still runs every stage in every case (Shamir
reconstruction is memoized per distinct set of shares, see ``_recombine_once``).
"""

from __future__ import annotations

import copy
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from fuzz_support import FUZZ_SETTINGS, mutate_content, scaled_examples, snapshot
from secagg_attack_support import NO_COLLUDERS
from hypothesis import given, settings
from hypothesis import strategies as st

from fedguard.clients.wire import protocol
from fedguard.clients.app import app as client_app
from fedguard.clients.datasets import load_dataset
from fedguard.clients.models import build_model
from fedguard.clients.secagg_identity import provision_rosters
from fedguard.clients.secure_aggregation import SESSION_STATE_KEY, secure_aggregation_mod
from fedguard.conf.run_config import config_to_yaml
from fedguard.privacy.secagg import server_session as secagg_server_session
from fedguard.privacy.secagg.shamir import combine_shares
from fedguard.server.reply_checks import stage_reply_problem, train_reply_problem
from fedguard.server.secure_aggregation import SecureAggregationExchange

pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.usefixtures("flower_task_identity"),
]
NODES = (11, 22, 33, 44)
TARGET = 22
STAGE_KEYS = {
    "advertise": {protocol.METRICS_KEY: [protocol.NUM_EXAMPLES_KEY, protocol.TRAIN_LOSS_KEY],
                  protocol.SECAGG_KEY: ["stage", "envelope_key", "mask_key", "identity_key", "signature",
                                          "seed_commitment", "nonce_commitment"]},
    "cohort": {protocol.SECAGG_KEY: ["nonce", "cohort_signature"]},
    "share": {protocol.SECAGG_KEY: ["to", "ciphertexts"]},
    "mask": {protocol.SECAGG_KEY: [], protocol.SECAGG_REJECTED_KEY: [protocol.SECAGG_REJECTED_FIELD]},
    "consistency": {protocol.SECAGG_KEY: ["signature"]},
    "unmask": {protocol.SECAGG_KEY: ["for", "kinds", "shares"]},
}
REQUEST_KEYS = {
    "cohort": {protocol.SECAGG_KEY: ["stage", "round", "session", "peers", "envelope_keys", "mask_keys", "identity_keys",
                                      "signatures", "seed_commitments", "nonce_commitments"]},
    "share": {protocol.SECAGG_KEY: ["stage", "round", "session", "peers", "envelope_keys", "mask_keys", "identity_keys", "signatures",
                                     "seed_commitments", "nonce_commitments", "nonces", "cohort_signatures"]},
    "mask": {protocol.SECAGG_KEY: ["stage", "round", "session", "from", "ciphertexts"]},
    "consistency": {protocol.SECAGG_KEY: ["stage", "round", "session", "survivors"]},
    "unmask": {protocol.SECAGG_KEY: ["stage", "round", "session", "survivors", "dropped", "signers", "signatures"]},
}
# The stand-in training's update: STEP_UNIT x (node id mod STEP_SPREAD + 1), over EXAMPLES examples each.
STEP_UNIT, STEP_SPREAD, EXAMPLES = 0.001, 7, 30
# The honest aggregate must equal the mean update up to float32 rounding of the model's
# values (|w| < 1) and SecAgg+'s quantization (48 bits: far below this).
FLOAT32_TOLERANCE = 1e-6
# Seconds the exchange may wait for train replies; the in-process grid answers at once.
TRAIN_TIMEOUT = 5.0
# The sites' state dirs: their identity keys and the roster they pinned (the stand-in for out-of-band distribution).
SITES_ROOT = Path(tempfile.mkdtemp(prefix="fedguard-fuzz-secagg-"))


@pytest.fixture(scope="module", autouse=True)
def _recombine_once():
    """Rebuild each distinct Shamir secret once per module.

    Reconstruction is a pure function of the shares (tested on its own in
    test_secagg_primitives) and costs Lagrange interpolation in pure-Python GF(2^128):
    half of a case's time when every case recombined the same honest shares. Shares a
    case has not seen before, and shares that fail, still go through the real function.
    """
    rebuilt: dict[tuple[tuple[bytes, ...], int], bytes] = {}

    def recombine(shares: list[bytes], threshold: int) -> bytes:
        key = (tuple(shares), threshold)
        if key not in rebuilt:
            rebuilt[key] = combine_shares(shares, threshold)
        return rebuilt[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(secagg_server_session, "combine_shares", recombine)
        yield


class Setup:
    """Config, global model and the honest clients for 4 clients with threshold 2 (short repr for hypothesis)."""

    def __init__(self, compose) -> None:
        self.cfg = compose([
            "model=logreg", "simulation.num_clients=4", "secure_agg=secaggplus", "secure_agg.neighbours=3",
            "secure_agg.threshold=2", "progress=false", "device=cpu",
        ])
        bundle = load_dataset(self.cfg.dataset, self.cfg.seed)
        self.arrays = ArrayRecord(build_model(self.cfg.model, bundle.input_shape, bundle.num_classes).state_dict())
        self.yaml = config_to_yaml(self.cfg)
        self.clients = HonestClients()
        self.exchange = SecureAggregationExchange(self.cfg)  # holds no round state; built once
        # One session id for every case: the snapshot replays one session's answers (a fresh id
        # per case would make every train request new to the honest clients).
        self.exchange.new_session_id = lambda: b"fuzz-session-id!"
        provision_rosters({f"site-{node}": SITES_ROOT / f"site-{node}" for node in NODES})

    def __repr__(self) -> str:
        return "Setup(secaggplus, 4 clients)"


@pytest.fixture(scope="module")
def setup(compose):
    """The snapshot every case starts from: one honest round, run once, its answers kept."""
    made = Setup(compose)
    _sampled, result = _exchange(made, FuzzGrid(made.clients, "none", None, on_answer=True))
    assert result.contributed == len(NODES)
    return made


def _local_training(msg: Message, context: Context) -> Message:
    """Stand-in for local training: a small deterministic update, as the real handler would reply."""
    arrays = msg.content[protocol.ARRAYS_KEY]
    trained = ArrayRecord({key: Array(arrays[key].numpy() + _step(context.node_id)) for key in arrays.keys()})
    metrics = MetricRecord(
        {protocol.NUM_EXAMPLES_KEY: EXAMPLES, protocol.TRAIN_LOSS_KEY: 0.5, protocol.TRAIN_STEPS_KEY: 1}
    )
    return Message(RecordDict({protocol.ARRAYS_KEY: trained, protocol.METRICS_KEY: metrics}), reply_to=msg)


def _step(node: int) -> np.float32:
    """Each client's (distinct) update, so an aggregate that mixes them up cannot pass for the mean."""
    return np.float32(STEP_UNIT * (node % STEP_SPREAD + 1))


def _stage_of(message: Message) -> str:
    if message.metadata.message_type == "train":
        return "advertise"
    return str(message.content[protocol.SECAGG_KEY]["stage"])


def _handle(message: Message, context: Context) -> Message:
    """What a client runs for ``message``: the secure-aggregation mod around training, or the real stage handler."""
    if message.metadata.message_type == "train":
        return secure_aggregation_mod(message, context, _local_training)
    return client_app(message, context)  # the real stage handler, validation included


def _typed(value) -> tuple:
    """A value with its type: 1, 1.0 and True are equal in Python but not to the client."""
    if isinstance(value, list):
        return (list, tuple(_typed(item) for item in value))
    return (type(value), value)


def _fingerprint(message: Message) -> tuple:
    """The request as the client sees it (type and content), as a hashable key.

    Array bytes are hashed as they are (Python caches a bytes object's hash), not repr'd:
    the train request carries the whole model.
    """
    records = []
    for name in message.content.keys():
        record = message.content[name]
        if isinstance(record, ArrayRecord):
            items = tuple(
                (k, record[k].dtype, tuple(record[k].shape), record[k].stype, record[k].data) for k in record.keys()
            )
        else:
            items = tuple((k, _typed(v)) for k, v in record.items())
        records.append((name, type(record), items))
    return (message.metadata.message_type, tuple(records))


def _context(node: int, state: RecordDict) -> Context:
    node_config = {"partition-id": NODES.index(node), "num-partitions": len(NODES),
                   "state-dir": str(SITES_ROOT / f"site-{node}"),
                   **NO_COLLUDERS}
    return Context(run_id=1, node_id=node, node_config=node_config, state=state, run_config={})


class HonestClients:
    """The honest clients' work, done once per distinct request and then replayed.

    An honest client's answer is a function of its Context.state and the request (up to
    fresh randomness, of which any one draw is as valid as another), and its state is a
    function of the requests it has answered since the round began. So each answer and the
    state after it are kept under (node, the requests so far): every case starts from the
    same snapshot (a new round, empty states), the stages before the fuzzed one cost a
    lookup, and whatever the fuzzed message changes downstream (a dropped client, a
    different survivor set, a share that fails authentication) is computed for real the
    first time it occurs. A client's state is deep-copied whenever it is handed out, so no
    case sees another case's changes.
    """

    def __init__(self) -> None:
        self._answers: dict[tuple[int, tuple[tuple, ...]], tuple[Message, RecordDict]] = {}
        self.computed = 0

    def state(self, node: int, history: tuple[tuple, ...]) -> RecordDict:
        """A fresh copy of ``node``'s state after answering ``history``."""
        return copy.deepcopy(self._answers[(node, history)][1]) if history else RecordDict()

    def answer(self, message: Message, history: tuple[tuple, ...]) -> tuple[Message, tuple[tuple, ...]]:
        """The reply of the honest client ``message`` is for, and its history after answering it."""
        node = message.metadata.dst_node_id
        key = (node, (*history, _fingerprint(message)))
        if key not in self._answers:
            context = _context(node, self.state(node, history))
            self._answers[key] = (_handle(message, context), context.state)
            self.computed += 1
        kept = self._answers[key][0]
        if kept.has_error():
            return Message(kept.error, reply_to=message), key[1]
        # A new RecordDict per delivery: the server may regroup a reply's records, never the cached one's.
        return Message(RecordDict({name: kept.content[name] for name in kept.content.keys()}), reply_to=message), key[1]


class FuzzGrid:
    """Delivers messages to the clients; replaces one answer or one request with ``mutate``'s.

    Honest clients answer through ``HonestClients``; the client a mutated request is for
    handles it for real, from a fresh copy of its state, and keeps its own Context from
    then on (what it does after an accepted mutated request is not an honest client's).
    """

    def __init__(self, clients: HonestClients, stage: str, mutate, on_answer: bool) -> None:
        self.clients = clients
        self.history: dict[int, tuple[tuple, ...]] = {node: () for node in NODES}
        self.live: dict[int, Context] = {}
        self.stage, self.mutate, self.on_answer = stage, mutate, on_answer
        self.replaced: Message | None = None
        self.client_reply: Message | None = None
        self.state_before = self.state_after = None
        self.outbox: dict[str, Message] = {}

    def push_messages(self, messages) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.outbox[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        """Replies in the order they were answered (the server passes a set of ids; its order would
        reorder the next stage's requests, and every new order is a new request for the honest clients)."""
        wanted = set(message_ids)
        return [self.outbox.pop(i) for i in list(self.outbox) if i in wanted]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        target = node == TARGET and _stage_of(message) == self.stage
        if target and not self.on_answer:
            message_id = message.metadata.message_id
            message = Message(self.mutate(message.content), dst_node_id=node, message_type=message.metadata.message_type)
            message.metadata.__dict__["_message_id"] = message_id
            context = self.live[node] = _context(node, self.clients.state(node, self.history[node]))
            self.state_before = snapshot(context.state)
            self.client_reply = _handle(message, context)
            self.state_after = snapshot(context.state)
            return self.client_reply
        if node in self.live:
            return _handle(message, self.live[node])
        reply, self.history[node] = self.clients.answer(message, self.history[node])
        if target:  # on_answer: the honest answer, altered in transit
            reply = Message(self.mutate(reply.content), reply_to=message)
            self.replaced = reply
        return reply


def _train_messages(setup: Setup) -> list[Message]:
    config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: setup.yaml, protocol.SERVER_ROUND_KEY: 1})
    return [Message(RecordDict({protocol.ARRAYS_KEY: setup.arrays, protocol.CONFIG_KEY: config}),
                    dst_node_id=node, message_type="train") for node in NODES]


def _flip_bytes(draw, content: RecordDict) -> RecordDict:
    """A subtle mutation: one byte of one byte string inside a ConfigRecord list or value."""
    out = {name: content[name] for name in content.keys()}
    for name, record in out.items():
        if not isinstance(record, ConfigRecord):
            continue
        fields = [k for k, v in record.items() if isinstance(v, bytes) or (isinstance(v, list) and v and isinstance(v[0], bytes))]
        if not fields:
            continue
        field = draw(st.sampled_from(fields))
        values = record[field] if isinstance(record[field], list) else [record[field]]
        index = draw(st.integers(0, len(values) - 1))
        data = bytearray(values[index])
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        values = [*values[:index], bytes(data), *values[index + 1:]]
        out[name] = ConfigRecord({**record, field: values if isinstance(record[field], list) else values[0]})
    return RecordDict(out)


def _exchange(setup: Setup, grid: FuzzGrid):
    return setup.exchange.train(grid, _train_messages(setup), setup.arrays, 1, TRAIN_TIMEOUT)


def _run(setup: Setup, data, stage: str, on_answer: bool) -> tuple[FuzzGrid, object]:
    keys = (STAGE_KEYS if on_answer else REQUEST_KEYS)[stage]
    subtle = data.draw(st.booleans())

    def mutate(content: RecordDict) -> RecordDict:
        return _flip_bytes(data.draw, content) if subtle else mutate_content(data.draw, content, keys)

    grid = FuzzGrid(setup.clients, stage, mutate, on_answer)
    before = snapshot(RecordDict({"g": setup.arrays}))
    _sampled, result = _exchange(setup, grid)
    assert snapshot(RecordDict({"g": setup.arrays})) == before
    assert len(result.usable) in (0, 1)
    if result.usable:
        aggregate = result.usable[0].content[protocol.ARRAYS_KEY]
        for key in setup.arrays.keys():
            values = aggregate[key].numpy()
            assert values.shape == tuple(setup.arrays[key].shape) and np.all(np.isfinite(values))
    return grid, result


def _answer_property(setup: Setup, data, stage: str) -> None:
    grid, result = _run(setup, data, stage, on_answer=True)
    reply = grid.replaced
    assert reply is not None, f"no {stage} answer of node {TARGET} was fuzzed"
    problem = (train_reply_problem(reply, None) if stage == "advertise" else
               stage_reply_problem(stage, reply, 1 + sum(int(np.prod(setup.arrays[k].shape)) for k in setup.arrays.keys())))
    if stage == "cohort":  # the graph needs every listed site's nonce: a bad one fails the round, never a part of it
        assert result.contributed in (0, len(NODES))
        if problem is not None:
            assert result.contributed == 0, problem
        return
    if problem is not None:  # a dropout the protocol tolerates: the other three complete the round
        assert result.contributed >= len(NODES) - 1, problem
    if stage == "share":  # forged, re-addressed or missing shares cost the round at most the sender's input
        assert result.contributed >= len(NODES) - 1


def _request_property(setup: Setup, data, stage: str) -> None:
    grid, _result = _run(setup, data, stage, on_answer=False)
    assert grid.client_reply is not None, f"no {stage} request reached node {TARGET}"
    if grid.client_reply.has_error():
        # A malformed request leaves the state as it was; a protocol refusal (too few shares, a
        # survivor list without the client, ...) aborts the round and wipes its secrets.
        wiped = SESSION_STATE_KEY not in grid.live[TARGET].state
        assert grid.state_after == grid.state_before or wiped, grid.client_reply.error.reason


def test_replayed_round_is_the_honest_round(setup):
    """The snapshot is sound: a case with nothing mutated replays the honest answers and aggregates their mean."""
    computed = setup.clients.computed
    _sampled, result = _exchange(setup, FuzzGrid(setup.clients, "none", None, on_answer=True))
    assert setup.clients.computed == computed  # every answer came from the snapshot
    assert result.contributed == len(NODES)
    mean_step = float(np.mean([_step(node) for node in NODES]))
    aggregate = result.usable[0].content[protocol.ARRAYS_KEY]
    for key in setup.arrays.keys():
        expected = setup.arrays[key].numpy() + np.float32(mean_step)
        np.testing.assert_allclose(aggregate[key].numpy(), expected, atol=FLOAT32_TOLERANCE)


def test_a_client_forging_every_share_loses_only_its_own_input(setup):
    """Node TARGET flips a byte in each share it sends: its neighbours leave it out, the rest is the exact mean."""

    def forge(content: RecordDict) -> RecordDict:
        record = content[protocol.SECAGG_KEY]
        forged = [c[:-1] + bytes([c[-1] ^ 1]) for c in record["ciphertexts"]]
        return RecordDict({protocol.SECAGG_KEY: ConfigRecord({**record, "ciphertexts": forged})})

    _sampled, result = _exchange(setup, FuzzGrid(setup.clients, "share", forge, on_answer=True))
    assert result.contributed == len(NODES) - 1
    mean_step = float(np.mean([_step(node) for node in NODES if node != TARGET]))
    aggregate = result.usable[0].content[protocol.ARRAYS_KEY]
    for key in setup.arrays.keys():
        expected = setup.arrays[key].numpy() + np.float32(mean_step)
        np.testing.assert_allclose(aggregate[key].numpy(), expected, atol=FLOAT32_TOLERANCE)


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_server_advertise_answer(setup, data):
    _answer_property(setup, data, "advertise")


# The cohort stage's request and answer: 100 cases each in CI (the other stages keep 1,000), to keep
# the new stage's share of the suite small; its fields are the share request's, fuzzed there in full.
COHORT_FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=scaled_examples(100))


@COHORT_FUZZ_SETTINGS
@given(st.data())
def test_fuzz_server_cohort_answer(setup, data):
    _answer_property(setup, data, "cohort")


@COHORT_FUZZ_SETTINGS
@given(st.data())
def test_fuzz_client_cohort_request(setup, data):
    _request_property(setup, data, "cohort")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_server_share_answer(setup, data):
    _answer_property(setup, data, "share")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_server_mask_answer(setup, data):
    _answer_property(setup, data, "mask")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_server_unmask_answer(setup, data):
    _answer_property(setup, data, "unmask")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_client_share_request(setup, data):
    _request_property(setup, data, "share")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_client_mask_request(setup, data):
    _request_property(setup, data, "mask")


@FUZZ_SETTINGS
@given(st.data())
def test_fuzz_client_unmask_request(setup, data):
    _request_property(setup, data, "unmask")
