"""The benchmark's process-tree memory probe sees memory held by a child, not just the root."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fedguard.simulations.process_memory import TreeMemoryPeak, descendants

MIB = 1024**2
HELD_MIB = 200
# The root starts a child that touches HELD_MIB of fresh memory and holds it until killed.
CHILD = f"import time; b = bytearray({HELD_MIB} * {MIB}); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
ROOT = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {CHILD!r}]).wait()"
WAIT_SECONDS = 30
POLL_SECONDS = 0.1


@pytest.mark.deployment  # starts a separate process
def test_peak_counts_a_childs_memory():
    root = subprocess.Popen([sys.executable, "-c", ROOT])
    probe = TreeMemoryPeak(root.pid)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and probe.peak_pss < HELD_MIB * MIB:
            probe.sample()
            time.sleep(POLL_SECONDS)
        children = descendants(root.pid) - {root.pid}
        assert len(children) == 1
    finally:
        for pid in descendants(root.pid) - {root.pid}:
            subprocess.run(["kill", str(pid)], check=False)
        root.wait(timeout=WAIT_SECONDS)
    assert probe.peak_processes == 2
    assert probe.peak_pss >= HELD_MIB * MIB  # the root alone holds a few MiB
    assert probe.peak_rss >= probe.peak_pss
