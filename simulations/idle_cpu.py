"""What a deployed federation costs while no run is going: CPU per process kind (Linux /proc).

Why: every part of Flower's deployment engine asks for work by polling over HTTP, and on a
one-machine bench (`fedguard bench deployment`) those polls share the cores with the sites'
training and with the object transfers of a round. Measured under load (2 cores, 3 sites): an
idle federation used about 0.4 of a core; the SuperLink spent ~13 ms of CPU per SuperNode poll
(--poll-interval 0.25: 12 polls a second), and each task-launcher poll (app_gate.POLL_SECONDS
0.1: 30 a second) cost ~6 ms in the launcher and the SuperNode together. This module measures
that per kind of process, so a change to any poll can be judged in CPU seconds, which the
machine's load barely moves, rather than in round wall time, which it does. A task process
forked by a launcher carries the launcher's command line and counts as one: measure with no run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from fedguard.simulations.process_cpu import process_cpu_seconds
from fedguard.simulations.process_memory import PROC, descendants

# A substring of a process's command line -> the part of the federation it is (first match wins).
PROCESS_KINDS: tuple[tuple[str, str], ...] = (
    ("flower-superlink", "superlink"),
    ("flower-superexec", "superexec"),
    ("fedguard.clients.deployment.app_gate", "task_launcher"),
    ("fedguard.clients.deployment.supernode_poll", "supernode"),
    ("nginx", "proxy"),
)


def process_kind(cmdline: str) -> str | None:
    """The federation part a command line belongs to; ``None`` for anything else (the CLI that
    started it, a task process, a shell)."""
    return next((kind for marker, kind in PROCESS_KINDS if marker in cmdline), None)


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_by_process(roots: Iterable[int]) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for every federation process under ``roots``."""
    found: dict[int, tuple[str, float]] = {}
    for root in roots:
        for pid in descendants(root):
            kind = process_kind(_cmdline(pid))
            seconds = process_cpu_seconds(pid) if kind else None
            if kind and seconds is not None:
                found[pid] = (kind, seconds)
    return found


def cores_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  seconds: float) -> dict[str, float]:
    """Mean cores each kind used between two ``cpu_by_process`` samples ``seconds`` apart; a
    process that started in between counts from zero, one that ended is not counted."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    used: dict[str, float] = defaultdict(float)
    for pid, (kind, cpu) in after.items():
        used[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    return {kind: round(value / seconds, 4) for kind, value in sorted(used.items())}


def wait_for_lines(logs: Iterable[Path], text: str, timeout: float) -> None:
    """Until every log holds ``text`` (e.g. each task launcher's warm-up line)."""
    logs = list(logs)
    deadline = time.monotonic() + timeout
    while not all(text in (log.read_text(errors="replace") if log.exists() else "") for log in logs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in every one of {', '.join(map(str, logs))} after {timeout} s")
        time.sleep(0.5)


def idle_cores(roots: Iterable[int], seconds: float) -> dict[str, float]:
    """Cores per kind over ``seconds`` of whatever the federation does meanwhile (nothing, if no run)."""
    roots = list(roots)
    before, started = cpu_by_process(roots), time.monotonic()
    time.sleep(seconds)
    after = cpu_by_process(roots)
    return cores_by_kind(before, after, time.monotonic() - started)
