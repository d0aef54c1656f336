"""The ServerApp waits for replies at the config's interval (server/reply_wait.py), not at the
grid's own fixed sleep (3 s in Flower 1.41's deployment grid)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedguard.conf import ConfigError, compose_config
from fedguard.server import reply_wait
from fedguard.server.reply_wait import PromptGrid, send_and_collect


class _LateGrid:
    """Answers every pushed message on the n-th pull; counts pulls and what else was asked of it."""

    def __init__(self, answer_on_pull: int | None) -> None:
        self.answer_on_pull, self.pulls, self.own_waits = answer_on_pull, 0, 0

    def push_messages(self, messages):
        return [f"id-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.answer_on_pull is None or self.pulls < self.answer_on_pull:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in message_ids]

    def send_and_receive(self, messages, *, timeout=None):  # Flower's own wait: must not be used
        self.own_waits += 1
        raise AssertionError("the grid's own send_and_receive (a fixed sleep) was used")

    def get_node_ids(self):
        return [1, 2]


def test_prompt_grid_waits_at_its_interval_not_the_inner_grids(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(reply_wait.time, "sleep", sleeps.append)
    inner = _LateGrid(answer_on_pull=5)
    replies = list(PromptGrid(inner, 0.05).send_and_receive([object(), object(), object()], timeout=30.0))
    assert len(replies) == 3 and inner.pulls == 5 and inner.own_waits == 0
    assert sleeps == [0.05] * 4


def test_no_timeout_waits_for_every_reply_and_a_timeout_gives_up(monkeypatch):
    monkeypatch.setattr(reply_wait.time, "sleep", lambda seconds: None)
    patient = _LateGrid(answer_on_pull=40)
    assert len(list(PromptGrid(patient, 0.01).send_and_receive([object()], timeout=None))) == 1
    assert patient.pulls == 40

    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(reply_wait.time, "monotonic", lambda: next(clock))
    silent = _LateGrid(answer_on_pull=None)
    assert send_and_collect(silent, [object()], timeout=4.0, poll_interval=0.01) == []
    assert silent.pulls == 4  # gave up once the timeout passed


def test_each_wave_leaves_a_timing_line_on_the_run_log(monkeypatch, caplog):
    """The line `fedguard bench deployment --keep` lays beside the sites' task timings: how long the
    push took, and when (seconds after the wave started) each reply arrived."""
    import json
    import logging

    monkeypatch.setattr(reply_wait.time, "sleep", lambda seconds: None)
    with caplog.at_level(logging.INFO, logger="flwr"):  # a deployed ServerApp's log carries Flower's logger's lines
        send_and_collect(_LateGrid(answer_on_pull=3), [object(), object()], timeout=30.0, poll_interval=0.01)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(reply_wait.WAVE_TIMING_PREFIX)]
    assert len(lines) == 1
    wave = json.loads(lines[0][len(reply_wait.WAVE_TIMING_PREFIX):])
    assert wave["sent"] == 2 and wave["pulls"] == 3 and len(wave["replies_at_s"]) == 2
    assert wave["push_s"] >= 0 and all(seconds >= wave["push_s"] for seconds in wave["replies_at_s"])


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_a_non_positive_interval_is_refused(interval):
    with pytest.raises(ValueError, match="poll_interval"):
        PromptGrid(_LateGrid(1), interval)
    with pytest.raises(ValueError, match="poll_interval"):
        send_and_collect(_LateGrid(1), [object()], timeout=1.0, poll_interval=interval)


def test_reply_poll_interval_is_a_checked_config_key():
    from omegaconf import open_dict

    from fedguard.conf.validation import validate_config

    cfg = compose_config([])
    assert cfg.simulation.reply_poll_interval == pytest.approx(reply_wait.DEFAULT_REPLY_POLL_INTERVAL)
    with pytest.raises(ConfigError, match=r"simulation\.reply_poll_interval=0(\.0)? is out of range; it must be >= 0.001 and <= 3.0"):
        compose_config(["simulation.reply_poll_interval=0"])  # from the command line, as a user sets it
    for bad in (5.0, float("nan")):
        with open_dict(cfg):
            cfg.simulation.reply_poll_interval = bad
        with pytest.raises(ConfigError, match=r"simulation\.reply_poll_interval=.*(must be|not a number)"):
            validate_config(cfg)


@pytest.mark.simulation  # builds the server's model, layers and run directory (~14 s under load 7)
def test_the_server_app_hands_the_round_loop_and_preprocessing_a_prompt_grid(monkeypatch, tmp_path):
    """run_server wraps whatever grid Flower gives it, with the config's interval, before any wait."""
    from fedguard.server import app

    seen = {}

    class Reached(Exception):
        pass

    def capture(grid, *args, **kwargs):
        seen["grid"] = grid
        raise Reached

    monkeypatch.setattr(app, "run_federation", capture)
    cfg = compose_config(["dataset=digits", "model=logreg", "simulation.num_clients=2", "simulation.rounds=1",
                          "simulation.reply_poll_interval=0.02", "progress=false"])
    inner = _LateGrid(answer_on_pull=1)
    with pytest.raises(Reached):
        app.run_server(inner, cfg, tmp_path / "run")
    assert isinstance(seen["grid"], PromptGrid) and seen["grid"].poll_interval == pytest.approx(0.02)
    assert seen["grid"].get_node_ids() == [1, 2]


@pytest.mark.simulation  # imports the ServerApp (torch, Opacus, the strategies): 12.5 s under load 12
def test_only_a_deployed_server_app_shortens_its_object_pulls(monkeypatch, tmp_path):
    """run_server gives Flower's deployment grid the short retry for replies' objects
    (clients/deployment/supernode_poll.py) before anything waits, and leaves other grids alone."""
    from flwr.superlink.grid import HttpGrid

    from fedguard.clients.deployment.supernode_poll import SERVERAPP_PULL_MODULE
    from fedguard.server import app

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    installed: list[str] = []
    monkeypatch.setattr(app, "install_short_object_pull", installed.append)
    monkeypatch.setattr(app, "PromptGrid", stop)  # the line after the install: nothing else runs
    cfg = compose_config([])
    for grid, expected in ((_LateGrid(1), []), (HttpGrid.__new__(HttpGrid), [SERVERAPP_PULL_MODULE])):
        installed.clear()
        with pytest.raises(Reached):
            app.run_server(grid, cfg, tmp_path / "run")
        assert installed == expected
