"""A site enters one secure-aggregation session per round and never reuses a session id.

Attack: the server asks a site that trains without DP (so no replay cache on disk stops
it) for the same round twice, each time in a new session. The site retrains (or masks the
same update afresh), and two sums that differ in its input give that input away. Or it
replays a session id across rounds, so signed adverts, survivor sets and partner lists of
one round's session fit another's. The site refuses both before it trains.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from secagg_attack_support import NO_COLLUDERS, HostileServer

from fedguard.clients.secure_aggregation import secure_aggregation_mod
from fedguard.clients.wire import protocol
from fedguard.conf.run_config import config_to_yaml
from fedguard.privacy.secagg.errors import SecAggError

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = (11, 22, 33, 44)
TARGET = 22


class CountingTraining:
    """Local training that counts how often it ran and gives a different update each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, msg: Message, context) -> Message:
        self.calls += 1
        arrays = msg.content[protocol.ARRAYS_KEY]
        trained = ArrayRecord({k: Array(arrays[k].numpy() + np.float32(0.01 * self.calls)) for k in arrays.keys()})
        metrics = MetricRecord({protocol.NUM_EXAMPLES_KEY: 30, protocol.TRAIN_LOSS_KEY: 0.5, protocol.TRAIN_STEPS_KEY: 1})
        return Message(RecordDict({protocol.ARRAYS_KEY: trained, protocol.METRICS_KEY: metrics}), reply_to=msg)


LINEAGE = "federation-1"


def _train(server: HostileServer, training: CountingTraining, server_round: int, session_id: bytes) -> Message:
    config = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(server.cfg), protocol.SERVER_ROUND_KEY: server_round,
                           protocol.SECAGG_SESSION_KEY: session_id, protocol.LINEAGE_KEY: LINEAGE})
    message = Message(RecordDict({protocol.ARRAYS_KEY: server.arrays, protocol.CONFIG_KEY: config}),
                      dst_node_id=TARGET, message_type="train")
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    try:
        return secure_aggregation_mod(message, server.contexts[TARGET], training)
    except SecAggError as err:  # the ClientApp turns a mod's exception into an error reply
        return _Refused(str(err))


class _Refused:
    """The refusal the mod raised (what the ClientApp would send back as the reply's error)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def has_error(self) -> bool:
        return True


@pytest.fixture()
def server(compose, tmp_path):
    cfg = compose(["model=logreg", "simulation.num_clients=4", "secure_agg=secaggplus", "secure_agg.neighbours=3",
                   "secure_agg.threshold=2", "progress=false", "device=cpu"])
    return HostileServer(cfg, NODES, tmp_path, site_settings=NO_COLLUDERS)


def test_a_site_without_dp_asked_twice_for_one_round_does_not_retrain_into_a_new_session(server):
    training = CountingTraining()
    first = _train(server, training, 3, b"A" * 16)
    assert not first.has_error() and protocol.SECAGG_KEY in first.content
    again = _train(server, training, 3, b"B" * 16)
    assert again.has_error() and "round 3 already entered" in again.reason
    assert training.calls == 1  # refused before training: no second update exists
    later = _train(server, training, 4, b"C" * 16)
    assert not later.has_error() and training.calls == 2


def test_a_session_id_reused_in_a_later_round_is_refused(server):
    training = CountingTraining()
    assert not _train(server, training, 1, b"S" * 16).has_error()
    reused = _train(server, training, 2, b"S" * 16)
    assert reused.has_error() and "already used" in reused.reason and training.calls == 1
    missing = _train(server, training, 2, b"")
    assert missing.has_error() and "no secure-aggregation session id" in missing.reason


def _new_run(server: HostileServer, run_id: int) -> None:
    """A new ``flwr run`` (or a restarted SuperNode): every site gets a fresh, empty Context."""
    for node, old in server.contexts.items():
        server.contexts[node] = Context(run_id=run_id, node_id=node, node_config=old.node_config, state=RecordDict(),
                                        run_config={})


def test_the_record_outlives_the_run_a_resumed_lineage_cannot_replay_a_round_or_a_session(server):
    """Run 1 enters round 3 (session A). A new run of the same lineage over the same state dir asks
    for round 3 again (session B), then reuses session A: both refused before training."""
    training = CountingTraining()
    assert not _train(server, training, 3, b"A" * 16).has_error()
    _new_run(server, run_id=2)
    again = _train(server, training, 3, b"B" * 16)
    assert again.has_error() and "round 3 already entered" in again.reason
    reused = _train(server, training, 4, b"A" * 16)
    assert reused.has_error() and "already used" in reused.reason
    assert training.calls == 1
    assert not _train(server, training, 4, b"C" * 16).has_error() and training.calls == 2


def test_a_corrupt_record_is_a_refusal_never_a_fresh_start(server):
    training = CountingTraining()
    assert not _train(server, training, 1, b"A" * 16).has_error()
    path = server.state_dirs[TARGET] / "secagg" / "sessions.json"
    truncated = path.read_text()[:-7]  # as a full disk might leave it
    path.write_text(truncated)
    _new_run(server, run_id=2)
    refused = _train(server, training, 2, b"B" * 16)
    assert refused.has_error() and "session record" in refused.reason and str(path) in refused.reason
    assert training.calls == 1 and path.read_text() == truncated  # left for the operator, not rewritten
    path.write_text("")
    assert _train(server, training, 1, b"A" * 16).has_error()  # emptied: still refused, not reset
    assert path.read_text() == ""
