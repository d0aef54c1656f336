"""The simulation engine's feeder: the same messages as Flower's own, asking only nodes that have one.

Against Flower's real in-memory LinkState and InMemoryGrid, set up as flwr.simulation does.
"""

from __future__ import annotations

import threading
from queue import Queue

import pytest

from flwr.app import ConfigRecord, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedguard.simulations.engine_dispatch import dispatch_in_flight, nodes_with_undelivered, sparse_dispatch


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """flwr.simulation sets this process-wide identity before it pushes messages; restored after."""
    for name in ("_task_id", "_run_id", "_node_id"):  # saved, and put back by monkeypatch
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name, None), raising=False)
    TaskIdentity.task_id, TaskIdentity.node_id = 1, SUPERLINK_NODE_ID


def _engine_state(num_nodes: int, cohort: list[int]):
    """A LinkState with ``num_nodes`` registered nodes and one train message pushed to each of ``cohort``."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.run_id = run.run_id
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = vce_api._register_nodes(num_nodes, factory)
    node_ids = list(nodes)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    messages = [grid.create_message(RecordDict({"c": ConfigRecord({"i": i})}), "train", node_ids[i], "1") for i in cohort]
    grid.push_messages(messages)
    return state, nodes, [node_ids[i] for i in cohort]


def _one_sweep(feeder, state, nodes) -> list[int]:
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=feeder, args=(state, queue, nodes, stop))
    thread.start()
    stop.set()  # the feeder finishes the sweep it is in, then sees the stop
    thread.join(10)
    delivered = []
    while not queue.empty():
        delivered.append(queue.get().metadata.dst_node_id)
    return delivered


def test_only_nodes_with_a_message_are_asked_and_each_message_goes_out_once():
    state, nodes, cohort = _engine_state(2000, cohort=[5, 17, 1999, 640])
    assert sorted(nodes_with_undelivered(state, nodes)) == sorted(cohort)
    assert sorted(_one_sweep(dispatch_in_flight, state, nodes)) == sorted(cohort)
    assert nodes_with_undelivered(state, nodes) == []  # Flower marked them delivered
    assert _one_sweep(dispatch_in_flight, state, nodes) == []


def test_same_messages_as_flowers_own_feeder():
    positions = list(range(0, 300, 7))
    state, nodes, cohort = _engine_state(300, cohort=positions)
    ours = [list(nodes).index(node) for node in _one_sweep(dispatch_in_flight, state, nodes)]
    state, nodes, cohort = _engine_state(300, cohort=positions)  # node ids are random: compare registration order
    theirs = [list(nodes).index(node) for node in _one_sweep(vce_api.add_messages_to_queue, state, nodes)]
    assert sorted(ours) == sorted(theirs) == positions


def test_flowers_feeder_is_restored_after_a_launch():
    original = vce_api.add_messages_to_queue
    with sparse_dispatch():
        assert vce_api.add_messages_to_queue is dispatch_in_flight
    assert vce_api.add_messages_to_queue is original
