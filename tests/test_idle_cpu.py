"""`fedguard bench deployment --idle-cpu` (simulations/idle_cpu.py): which process is which part
of a federation, and the cores each part used between two samples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedguard.simulations.idle_cpu import cores_by_kind, idle_cores, process_kind


def test_command_lines_map_to_the_parts_of_a_federation():
    venv = "/srv/fedguard/.venv/bin/python3.11"
    assert process_kind(f"{venv} {venv[:-10]}flower-superlink --ssl-ca-certfile ca.crt --port 9093") == "superlink"
    assert process_kind(f"{venv} {venv[:-10]}flower-superexec --plugin-type serverapp") == "superexec"
    assert process_kind(f"{venv} -P -m fedguard.clients.deployment.supernode_poll 0.25 -- --superlink x") == "supernode"
    assert process_kind(f"{venv} -P -m fedguard.clients.deployment.app_gate --runtime-api-address 127.0.0.1:1") == "task_launcher"
    assert process_kind("nginx: worker process") == "proxy"
    assert process_kind(f"{venv} -m fedguard.simulations.cli client --server 127.0.0.1:9092") is None
    assert process_kind("") is None


def test_cores_per_kind_between_two_samples():
    before = {10: ("superlink", 5.0), 11: ("supernode", 1.0), 12: ("supernode", 2.0), 13: ("proxy", 0.5)}
    # 13 ended (not counted), 14 started in between (counted from zero)
    after = {10: ("superlink", 7.0), 11: ("supernode", 1.5), 12: ("supernode", 3.5), 14: ("supernode", 1.0)}
    assert cores_by_kind(before, after, 10.0) == {"superlink": 0.2, "supernode": 0.3}
    with pytest.raises(ValueError, match="seconds"):
        cores_by_kind(before, after, 0.0)


def test_a_busy_process_shows_and_an_idle_one_does_not():
    """Real processes: one spinning, one asleep, each named like a federation part on its command line."""
    busy = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass", "flower-superlink"])
    idle = subprocess.Popen([sys.executable, "-S", "-c", "import time; print('asleep', flush=True); time.sleep(60)", "nginx"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline().strip() == "asleep"  # its start-up is over before the window opens
        cores = idle_cores([busy.pid, idle.pid], 0.4)
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
        idle.stdout.close()
    assert cores["superlink"] > 0.05  # even on 2 loaded cores a spinning process gets some
    assert cores.get("proxy", 0.0) < 0.02
