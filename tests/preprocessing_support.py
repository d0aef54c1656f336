"""A loopback grid that hands messages to fedguard's real ClientApp (all mods) in this process,
one Context per site, so the server's preprocessing stage and the sites' answers run unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from fedguard.clients.app import app as client_app


class LoopbackGrid:
    """Sites ``node -> node config``; messages go to the ClientApp in turn, replies come back."""

    def __init__(self, sites: dict[int, dict]) -> None:
        self.sites = sites
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict(config), state=RecordDict(), run_config={})
            for node, config in sites.items()
        }
        self.sent: list[Message] = []
        self._outbox: dict[str, list[Message]] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_src_node_id"] = 1
            self.sent.append(message)
            reply = self.deliver(message)
            if reply is not None:
                replies.append(reply)
        return replies

    def deliver(self, message: Message) -> Message | None:
        """The site's answer (None: the site does not answer, as a dropped-out site)."""
        return client_app(message, self.contexts[message.metadata.dst_node_id])

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """The SecAgg+ stages' path (server/secure_aggregation.py::send_and_collect): answered at once."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            self._outbox[message.metadata.message_id] = self.send_and_receive([message])
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [reply for i in list(message_ids) for reply in self._outbox.pop(i, [])]


def wine_sites(root: Path, state: bool = True, budget: float | None = None) -> dict[int, dict]:
    """The three example wine sites' node configs (own CSV file, state dir)."""
    from fedguard.simulations.example_sites import write_sites

    sites = {}
    for i, directory in enumerate(write_sites(root / "files")):
        config: dict = {"partition-id": i, "data": str(directory)}
        if state:
            config["state-dir"] = str(root / f"state-{i}")
        if budget is not None:
            config["epsilon-budget"] = budget
        sites[100 + i] = config
    return sites
