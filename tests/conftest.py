"""Shared fixtures. Simulations here run on loopback-free in-process Ray; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The server's ledger signing key lives in $FEDGUARD_HOME; keep the tests' keys out of ~/.fedguard.
os.environ.setdefault("FEDGUARD_HOME", tempfile.mkdtemp(prefix="fedguard-home-"))


@pytest.fixture(scope="session")
def compose():
    from conf import compose_config

    return compose_config
