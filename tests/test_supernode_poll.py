"""fedguard's one patch of Flower (clients/deployment/supernode_poll.py): pinned, and only the two waits.

These tests fail loudly when Flower changes: the patch replaces the clock of one Flower module and
shortens two sleeps by their exact values, which only the pinned version's source was read for.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
from importlib.metadata import version

import pytest

from fedguard.clients.deployment import supernode_poll
from fedguard.clients.deployment.supernode_poll import (
    FLOWER_VERSION,
    PATCHED_MODULE,
    REPLY_CHECK_SECONDS,
    PollClock,
    check_poll_seconds,
    install_poll_clock,
)


def test_flower_is_the_version_the_patch_was_written_for():
    assert version("flwr") == FLOWER_VERSION, (
        f"flwr {version('flwr')} is installed but clients/deployment/supernode_poll.py patches the SuperNode "
        f"loop of flwr {FLOWER_VERSION}: read the new flwr/supernode/start_client_internal.py, re-check the "
        "two sleeps it shortens (or drop the patch if Flower now has a poll setting), then update FLOWER_VERSION"
    )


@pytest.mark.deployment  # imports Flower's SuperNode (about 3 s)
def test_the_two_shortened_waits_are_where_the_patch_expects_them():
    module = sys.modules.get(PATCHED_MODULE) or __import__(PATCHED_MODULE, fromlist=["x"])
    assert module.time is time or isinstance(module.time, PollClock)
    assert re.search(r"^import time$", inspect.getsource(module), re.M), "the loop module no longer imports time"
    loop = inspect.getsource(module.start_client_internal)
    # The idle wait after an empty pull: the one 3 s sleep, right after `if run_id is None`.
    assert loop.count("time.sleep(") == 1 and re.search(r"if run_id is None:\s+#[^\n]*\n\s+time\.sleep\(3\)", loop)
    # The reply waits: local state checks, the only other sleeps in the module.
    push = inspect.getsource(module._push_messages)
    assert push.count("time.sleep(0.5)") == 2
    assert inspect.getsource(module).count("time.sleep(") == 3


def test_the_clock_shortens_exactly_the_two_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = PollClock(0.25)
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(1.7)
    assert slept == [0.25, REPLY_CHECK_SECONDS, 1.7]
    assert clock.time() == pytest.approx(time.time(), abs=1.0) and clock.monotonic is time.monotonic


@pytest.mark.deployment  # imports Flower's SuperNode (about 3 s)
def test_installing_changes_only_the_flower_loop_module(monkeypatch):
    module = __import__(PATCHED_MODULE, fromlist=["x"])
    monkeypatch.setattr(module, "time", module.time)  # restored after the test
    assert install_poll_clock(0.2) is True
    assert isinstance(module.time, PollClock) and module.time.poll_seconds == 0.2
    assert sys.modules["time"] is time and not isinstance(time.sleep, PollClock)


@pytest.mark.deployment  # imports Flower's SuperNode (about 3 s)
def test_another_flower_version_runs_unpatched(monkeypatch, caplog):
    module = __import__(PATCHED_MODULE, fromlist=["x"])
    monkeypatch.setattr(module, "time", time)
    monkeypatch.setattr(supernode_poll, "version", lambda _name: "9.9.9")
    assert install_poll_clock(0.2) is False
    assert module.time is time and "polling every 3 s" in caplog.text


@pytest.mark.parametrize("seconds", [0.0, 0.01, 3.5, float("nan")])
def test_a_poll_interval_out_of_range_is_refused(seconds):
    with pytest.raises(ValueError, match="poll-interval must be between 0.05 and 3.0"):
        check_poll_seconds(seconds)


def test_fedguard_client_names_the_bad_poll_interval(tmp_path, capsys):
    from fedguard.clients.launch import client_main

    code = client_main(["--server", "127.0.0.1:1", "--ca", str(tmp_path / "ca.crt"), "--partition-id", "0",
                        "--num-partitions", "2", "--poll-interval", "0.001", "--state-dir", str(tmp_path / "s")])
    assert code == 1 and "poll-interval must be between 0.05 and 3.0 seconds, got 0.001" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# The object-pull backoff (install_short_object_pull): Flower retries an announced object that is
# not uploaded yet after 1 s, 2 s, ...; a deployed round waited that out on most of its messages.


def _pulled_once_missing(pull) -> tuple[float, int]:
    """Flower's real pull_objects (through ``pull``) of one object that is missing on the first try:
    seconds taken and tries made."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    tries = []

    def pull_object(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert pull(["obj"], pull_object_fn=pull_object) == {"obj": b"content"}
    return time.monotonic() - started, len(tries)


def test_a_missing_object_is_retried_within_a_fraction_of_a_second():
    from flwr.supercore.inflatable import inflatable_utils

    # Flower's own first retry comes after 1 s +-20%; this fails if the wrapper passes nothing on.
    seconds, tries = _pulled_once_missing(supernode_poll.short_backoff(inflatable_utils.pull_objects))
    assert tries == 2 and seconds < 0.75


def test_the_wrapper_keeps_a_callers_own_backoff_and_wraps_once():
    seen: list[dict] = []

    def pull_objects(ids, pull_object_fn, **kwargs):
        seen.append(kwargs)
        return {}

    short = supernode_poll.short_backoff(pull_objects)
    assert supernode_poll.short_backoff(short) is short
    short([], pull_object_fn=None)
    short([], pull_object_fn=None, initial_backoff=2.0)
    assert seen == [{"initial_backoff": 0.05, "backoff_cap": 0.5}, {"initial_backoff": 2.0, "backoff_cap": 0.5}]


@pytest.mark.deployment  # imports Flower's SuperNode (about 3 s)
@pytest.mark.parametrize("module_name", supernode_poll.SHORT_PULL_MODULES)
def test_both_patched_modules_pull_through_the_name_the_patch_wraps(monkeypatch, module_name):
    module = __import__(module_name, fromlist=["x"])
    source = inspect.getsource(module)
    # Flower's own function, imported by name, called once without a backoff of its own.
    assert re.search(r"^\s+pull_objects,$", source, re.M) and source.count("pull_objects(") == 1
    assert "initial_backoff" not in source and "backoff_cap" not in source
    monkeypatch.setattr(module, "pull_objects", module.pull_objects)  # restored after the test
    assert supernode_poll.install_short_object_pull(module_name) is True
    assert module.pull_objects.fedguard_short_backoff is True


def test_only_the_listed_modules_and_the_pinned_version_are_patched(monkeypatch, caplog):
    with pytest.raises(ValueError, match="not a module whose object pulls fedguard shortens"):
        supernode_poll.install_short_object_pull("flwr.common")
    monkeypatch.setattr(supernode_poll, "version", lambda _name: "9.9.9")
    assert supernode_poll.install_short_object_pull(supernode_poll.SERVERAPP_PULL_MODULE) is False
    assert "retrying after 1 s as Flower does" in caplog.text
