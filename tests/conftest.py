"""Shared fixtures. Simulations here run on loopback-free in-process Ray; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

INNER_LOOP_MARKERS = frozenset({"not simulation and not deployment", "not deployment and not simulation"})

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The server's ledger signing key lives in $FEDGUARD_HOME; keep the tests' keys out of ~/.fedguard.
os.environ.setdefault("FEDGUARD_HOME", tempfile.mkdtemp(prefix="fedguard-home-"))
# The scattering front end's feature cache (clients/scattering.py) too.
os.environ.setdefault("FEDGUARD_CACHE_DIR", tempfile.mkdtemp(prefix="fedguard-cache-"))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Spread the inner loop over every core when pytest-xdist is installed.

    `pytest -m "not simulation and not deployment"` is the loop a developer runs after each edit; its ~500
    tests are independent, CPU-bound and safe to run side by side, so one worker per core halves its time.
    The full suite stays in one process: its Ray simulations and SuperLink/SuperNode federations size
    their timeouts for a machine they have to themselves. `-n N` on the command line wins, and
    FEDGUARD_TEST_WORKERS=0 turns the spreading off (for `--pdb`, say).
    """
    if not hasattr(config.option, "numprocesses") or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # xdist not installed, or already inside a worker
    if config.option.numprocesses is not None or config.getoption("usepdb", False):
        return
    if " ".join((config.option.markexpr or "").split()) not in INNER_LOOP_MARKERS:
        return
    workers = int(os.environ.get("FEDGUARD_TEST_WORKERS", len(os.sched_getaffinity(0))))
    if workers > 1:
        config.option.numprocesses = workers


@pytest.fixture(scope="session")
def compose():
    from fedguard.conf import compose_config

    return compose_config


@pytest.fixture(scope="module")
def flower_task_identity():
    """Messages built outside a running app need the run/task/node identity Flower sets there."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_run_id", "_task_id", "_node_id"):
            patch.setattr(TaskIdentity, name, 1)
        yield
