"""Shared fixtures. Simulations here run on loopback-free in-process Ray; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The server's ledger signing key lives in $FEDGUARD_HOME; keep the tests' keys out of ~/.fedguard.
os.environ.setdefault("FEDGUARD_HOME", tempfile.mkdtemp(prefix="fedguard-home-"))
# The scattering front end's feature cache (clients/scattering.py) too.
os.environ.setdefault("FEDGUARD_CACHE_DIR", tempfile.mkdtemp(prefix="fedguard-cache-"))


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
