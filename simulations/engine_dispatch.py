"""Hand a round's messages to the simulation engine's workers in O(messages), not O(nodes x messages).

Flower 1.41's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) feeds its
workers from a thread that, every 0.1 s, asks the in-memory LinkState for the next message
of *every* registered node; each of those asks scans every stored message. At 10,000
virtual clients with 100 messages in flight that is a million message checks per sweep,
all under the LinkState's lock and the GIL: the driver spends its time looking for work
for nodes that have none, and rounds slow down in proportion to the population (profiled
with py-spy on a 10,000-client run: the sweep thread held the GIL nearly all the time).

``dispatch_in_flight`` keeps Flower's own delivery path (``LinkState.get_message_ins``:
its expiry and federation checks, and marking the message delivered) but asks only for
the nodes that have an undelivered message, found by one pass over the stored messages.
The same messages reach the same workers; what changes is that a sweep costs O(M^2) for M
messages in flight (M is the cohort, ~100) instead of O(N x M).

It replaces the module-level ``add_messages_to_queue`` that ``run_api`` starts as a thread,
for the duration of one ``launch``: a private function of the pinned Flower version,
covered by the simulation tests (every simulation goes through it) and by
tests/test_engine_dispatch.py against Flower's real in-memory LinkState.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

# How often the engine's feeder looks for new messages (Flower's own interval).
SWEEP_SECONDS = 0.1


def nodes_with_undelivered(state: Any, nodes: dict[int, int] | set[int]) -> list[int]:
    """Destination nodes (among ``nodes``) of messages not yet handed out, in storage order."""
    with state.lock:
        waiting = [
            message.metadata.dst_node_id
            for message in list(state.message_ins_store.values())
            if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
        ]
    return list(dict.fromkeys(waiting))


def dispatch_in_flight(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for Flower's ``add_messages_to_queue``: same messages, only nodes that have one are asked."""
    while not f_stop.is_set():
        for node_id in nodes_with_undelivered(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(SWEEP_SECONDS)


@contextmanager
def sparse_dispatch() -> Iterator[None]:
    """Run Flower's simulation engine with ``dispatch_in_flight`` as its feeder, then restore Flower's."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = dispatch_in_flight
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
