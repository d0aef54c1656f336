"""Which clients the server may still sample.

Flower's strategies sample from ``grid.get_node_ids()``; wrapping the grid lets any
strategy skip clients that refused for budget without changing the strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.serverapp import Grid

from fedguard.server.grid_wrapper import DelegatingGrid


class ExcludingGrid(DelegatingGrid):
    """A Grid that hides excluded nodes from sampling and passes everything else through."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.excluded: dict[int, str] = {}  # node id -> why it is no longer sampled

    def exclude(self, node_id: int, reason: str) -> None:
        self.excluded[node_id] = reason

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._inner.get_node_ids() if node not in self.excluded]
