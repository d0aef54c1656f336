"""Running the ``fedguard`` command as a user does: a subprocess of this Python."""

from __future__ import annotations

import os
import subprocess
import sys

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]


def fedguard(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``fedguard ARGS``; it must exit 0 (the failure shows its output's tail)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*FEDGUARD, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"fedguard {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc
