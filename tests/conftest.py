"""Shared fixtures. Simulations here run on loopback-free in-process Ray; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def compose():
    from conf import compose_config

    return compose_config
