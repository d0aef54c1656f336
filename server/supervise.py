"""``fedguard server``'s two processes (SuperLink, nginx) live and die together, loudly.

Why: with the SuperLink on loopback, a dead proxy means no site can reach the federation while
the SuperLink looks healthy; a dead SuperLink leaves a proxy answering 502. Either way the
operator must hear it at once and a service manager must see a failure (non-zero exit; the
README's systemd unit restarts on failure). The SuperLink is stopped with SIGTERM, so its state
database (superlink.db) and the run directories are left as they were: a restart with the same
``--state-dir`` continues with the same registered sites and runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from fedguard.clients.deployment.flower_tools import environment_with_flower

logger = logging.getLogger(__name__)

# Exit status when one of the processes died on its own (a service manager restarts on it).
DIED = 3
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 15.0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _stop(processes: dict[str, subprocess.Popen], groups: set[str]) -> None:
    """SIGTERM, then SIGKILL after the grace period. A process in ``groups`` is signalled with its
    whole process group: nginx's workers outlive a killed master and keep the port otherwise."""
    for name, proc in processes.items():
        if name in groups:
            _signal_group(proc.pid, signal.SIGTERM)
        elif proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for name, proc in processes.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if name in groups:
            _signal_group(proc.pid, signal.SIGKILL)  # workers left behind by a master that died


def supervise(commands: dict[str, list[str]], proxy_logs: Path, groups: frozenset[str] = frozenset()) -> int:
    """Start every command; return 0 after SIGTERM/SIGINT stopped them all, DIED when one exited on its own.

    Commands named in ``groups`` start in a process group of their own, stopped as a whole."""
    stopping = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            processes[name] = subprocess.Popen(command, env=environment_with_flower(),
                                               process_group=0 if name in groups else None)
        while not stopping:
            for name, proc in processes.items():
                if (code := proc.poll()) is not None:
                    others = ", ".join(other for other in processes if other != name)
                    print(
                        f"fedguard server: the {name} exited (status {code}); sites cannot reach the federation. "
                        f"Stopping the {others}; the SuperLink's state (superlink.db) and run directories are kept. "
                        f"Proxy logs: {proxy_logs}. Restart `fedguard server` with the same --state-dir.",
                        file=sys.stderr, flush=True,
                    )
                    return DIED
            time.sleep(POLL_SECONDS)
        print("fedguard server: stopping (signal)", file=sys.stderr, flush=True)
        return 0
    finally:
        _stop(processes, set(groups))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
