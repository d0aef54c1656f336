"""Issue #21, "a newcomer's first hour", items 6-7: a client-level DP run whose noise swamps its
update, `fedguard run` against a SuperLink that is not there, the audit's epsilon plot, and
`flwr run .` in a checkout.

Every test here stops before an engine starts (about a second each, most in-process).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]


def fedguard(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FEDGUARD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- 6c. `fedguard run` against an unreachable SuperLink ---------------------------------------------
def test_run_against_an_unreachable_superlink_names_the_key_and_address(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked before the SuperLink answers\n")
    address = f"127.0.0.1:{free_port()}"
    proc = fedguard("run", f"deployment.superlink={address}", f"deployment.ca_cert={ca}", cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert f"deployment.superlink={address}" in proc.stderr, proc.stderr
