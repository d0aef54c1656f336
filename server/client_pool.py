"""Which clients the server may still sample.

Flower's strategies sample from ``grid.get_node_ids()``; wrapping the grid lets any
strategy skip clients that refused for budget without changing the strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class ExcludingGrid(Grid):
    """A Grid that hides excluded nodes from sampling and passes everything else through."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner
        self.excluded: dict[int, str] = {}  # node id -> why it is no longer sampled

    def exclude(self, node_id: int, reason: str) -> None:
        self.excluded[node_id] = reason

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._inner.get_node_ids() if node not in self.excluded]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)
