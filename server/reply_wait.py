"""How the ServerApp waits for replies: one helper, its poll interval from the config.

Flower 1.41's deployment grid (``flwr/superlink/grid/http_grid.py``, ``send_and_receive``)
sleeps a fixed 3 s between pulls and has no setting for it; its simulation grid sleeps 0.1 s.
A reply that lands just after a pull therefore waits up to 3 s on the SuperLink, once per
message wave: the training message, the evaluation message, federated preprocessing, and (were
they sent that way) each SecAgg+ stage. ``fedguard bench deployment`` put that at a large share
of a deployed round's waiting. Every wait of the ServerApp goes through ``send_and_collect``
instead, with the same semantics (push all, pull until each message is answered or the timeout
passes) and the interval in our hands: ``simulation.reply_poll_interval`` for the round's
messages (``PromptGrid``), ``secure_agg.stage_poll_interval`` for the SecAgg+ stages.

Each pull is one request to the SuperLink on the server's loopback; a short interval costs a few
requests a second of that process's CPU, which the validation range (conf/validation.py) bounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedguard.server.grid_wrapper import DelegatingGrid

# One line per wave of messages on the run's log, beside the sites' task timing lines
# (`fedguard bench deployment --keep`): when the wave was pushed, when its replies arrived. Through
# Flower's logger: a deployed ServerApp's log (`flwr log`) carries its INFO lines, not fedguard's.
WAVE_TIMING_PREFIX = "fedguard wave timing"

# Seconds between pulls for a round's replies when no config says otherwise (Flower's deployment
# grid: 3 s; its simulation grid: 0.1 s).
DEFAULT_REPLY_POLL_INTERVAL = 0.05


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float, poll_interval: float) -> list[Message]:
    """``Grid.send_and_receive`` with the poll interval in our hands.

    Push all, then pull until every message is answered or ``timeout`` seconds pass; returns the
    replies that arrived (a silent client's message simply has none).
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
    clock = {"start": time.time()}
    pending = set(grid.push_messages(messages))
    clock["pushed"] = time.time()
    sent = len(pending)
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    arrivals: list[float] = []
    pulls = 0
    while pending:
        arrived = list(grid.pull_messages(pending))
        pulls += 1
        replies.extend(arrived)
        arrivals.extend([round(time.time() - clock["start"], 4)] * len(arrived))
        pending -= {reply.metadata.reply_to_message_id for reply in arrived}
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        time.sleep(min(poll_interval, remaining))
    log(INFO, "%s %s", WAVE_TIMING_PREFIX, json.dumps({
        "start": round(clock["start"], 4), "push_s": round(clock["pushed"] - clock["start"], 4),
        "sent": sent, "replies_at_s": arrivals, "pulls": pulls}))
    return replies


class PromptGrid(DelegatingGrid):
    """A Grid whose ``send_and_receive`` is ``send_and_collect`` at a chosen interval.

    The ServerApp wraps its grid in this once, so the round loop, the strategies' exchanges and
    federated preprocessing all wait the same way without each knowing the interval.
    """

    def __init__(self, inner: Grid, poll_interval: float) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
        super().__init__(inner)
        self.poll_interval = poll_interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Flower's grids treat timeout=None as "wait for every reply"; so does this one.
        return send_and_collect(self, messages, float("inf") if timeout is None else timeout, self.poll_interval)
