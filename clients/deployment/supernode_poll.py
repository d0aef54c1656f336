"""A site's SuperNode with a shorter idle poll: Flower 1.41's, run in-process, one sleep swapped.

Where the time went (`fedguard bench deployment`, README): Flower 1.41's SuperNode asks the
SuperLink for a message and, finding none, sleeps a fixed 3 s (``time.sleep(3)`` in
``flwr.supernode.start_client_internal.start_client_internal``), and waits for its ClientApp's
reply in 0.5 s steps (``_push_messages``). Every message of a round (train, each SecAgg+ stage)
therefore reached a site up to 3 s late, and the server waits for the last site. Flower 1.41
offers no setting for either (``flower-supernode --help``; the loop takes no interval), and its
``flwr-clientapp`` serves one task per process.

So this module is fedguard's one patch of Flower's behaviour, kept here and nowhere else: it
runs Flower's own ``flower-supernode`` entry point, unchanged, after replacing the ``time``
module *that one Flower module* sees with a clock whose ``sleep`` shortens exactly those two
waits (3 s -> the site's ``--poll-interval``, 0.5 s -> REPLY_CHECK_SECONDS). Nothing else in the
process, and nothing the SuperNode sends, changes. It is pinned to the exact Flower version whose
source was read (FLOWER_VERSION): under any other version the SuperNode runs unpatched, with the
3 s poll and a warning, and tests/test_supernode_poll.py fails until this module is re-checked.

The same pin covers the one other change, to Flower's object pulls (``install_short_object_pull``):
the retry backoff for an object announced but not yet uploaded, in the SuperNode's loop module
and in the ServerApp's deployment grid (server/app.py installs it there). Both are a wrapper around
the ``pull_objects`` name of that one module, passing Flower's own function shorter backoffs.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

logger = logging.getLogger("fedguard.site")

FLOWER_VERSION = "1.41.0"
PATCHED_MODULE = "flwr.supernode.start_client_internal"
# The two waits of that module this shortens, as written in Flower 1.41.0's source.
FLOWER_IDLE_SLEEP = 3
FLOWER_REPLY_CHECK_SLEEP = 0.5
# The SuperNode checks its own in-memory state for the ClientApp's reply this often (no network).
REPLY_CHECK_SECONDS = 0.05
DEFAULT_POLL_SECONDS = 0.25
# Flower's object pulls retry an object that is announced but not yet uploaded after 1 s, then
# 2, 4, ... (capped at 10; flwr/supercore/constant.py PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP),
# with no setting. A message is visible to its receiver as soon as the sender's push-messages
# request lands, before the sender has pushed the message's objects, so a receiver that polls
# promptly (the SuperNode for the server's messages, the ServerApp for the sites' replies) finds
# some missing and sleeps a second or more for an upload of tens of milliseconds. A kept bench run
# (`fedguard bench deployment --keep`, README) showed 27 such "not yet" answers (the proxy log's
# 2-byte pull-object replies) for 15 train messages: 1-3 s of each message. Retries here start at
# 50 ms and stay under 0.5 s, as the site's task processes already pull from their SuperNode
# (clients/deployment/verified_clientapp.py).
OBJECT_PULL_BACKOFF = (0.05, 0.5)
SERVERAPP_PULL_MODULE = "flwr.superlink.grid.http_grid"
SHORT_PULL_MODULES = (PATCHED_MODULE, SERVERAPP_PULL_MODULE)
# Below this a site would ask the SuperLink more than 20 times a second for nothing; above it,
# Flower's own 3 s.
POLL_RANGE = (0.05, 3.0)


class PollClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop module only."""

    def __init__(self, poll_seconds: float, reply_check_seconds: float = REPLY_CHECK_SECONDS) -> None:
        self.poll_seconds = poll_seconds
        self.reply_check_seconds = reply_check_seconds

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = self.poll_seconds
        elif seconds == FLOWER_REPLY_CHECK_SLEEP:
            seconds = self.reply_check_seconds
        time.sleep(seconds)

    def __getattr__(self, name: str):  # time.time(), time.monotonic(), ... unchanged
        return getattr(time, name)


def check_poll_seconds(value: float) -> float:
    low, high = POLL_RANGE
    if not low <= value <= high:
        raise ValueError(f"poll-interval must be between {low} and {high} seconds, got {value}")
    return value


def _pinned_flower(what: str, instead: str) -> bool:
    """True under the Flower version whose source this module was written against; otherwise a
    warning that says what runs instead, and the caller leaves Flower unchanged."""
    installed = version("flwr")
    if installed != FLOWER_VERSION:
        logger.warning("Flower %s is not the %s whose %s fedguard shortens; %s as Flower does",
                       installed, FLOWER_VERSION, what, instead)
        return False
    return True


def install_poll_clock(poll_seconds: float) -> bool:
    """Swap the clock of Flower's SuperNode loop module; False (and Flower's 3 s) on another Flower version."""
    if not _pinned_flower("SuperNode loop", "polling every 3 s"):
        return False
    module = sys.modules.get(PATCHED_MODULE) or __import__(PATCHED_MODULE, fromlist=["start_client_internal"])
    module.time = PollClock(check_poll_seconds(poll_seconds))
    return True


def short_backoff(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``pull_objects`` with OBJECT_PULL_BACKOFF unless the caller names its own backoff."""
    if getattr(pull_objects, "fedguard_short_backoff", False):
        return pull_objects
    initial, cap = OBJECT_PULL_BACKOFF

    @functools.wraps(pull_objects)
    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", cap)
        return pull_objects(*args, **kwargs)

    pull.fedguard_short_backoff = True  # type: ignore[attr-defined]
    return pull


def install_short_object_pull(module_name: str) -> bool:
    """Give one of SHORT_PULL_MODULES the short object-pull backoff; False (Flower's 1 s, 2 s, ...)
    on another Flower version."""
    if module_name not in SHORT_PULL_MODULES:
        raise ValueError(f"{module_name} is not a module whose object pulls fedguard shortens: {SHORT_PULL_MODULES}")
    if not _pinned_flower("object pulls", "retrying after 1 s"):
        return False
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=["pull_objects"])
    module.pull_objects = short_backoff(module.pull_objects)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m fedguard.clients.deployment.supernode_poll POLL_SECONDS -- FLOWER_SUPERNODE_ARGS...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] != "--":
        print("usage: supernode_poll POLL_SECONDS -- FLOWER_SUPERNODE_ARGS...", file=sys.stderr)
        return 2
    # Its own warning only: a root handler would also print every record Flower's logger passes on
    # (the runtime API's DEBUG line per request, several a second).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    install_poll_clock(float(argv[0]))
    install_short_object_pull(PATCHED_MODULE)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[2:]]  # Flower's entry point parses sys.argv
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
