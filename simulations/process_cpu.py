"""CPU seconds a whole process tree spends between two progress marks (Linux /proc).

Why: on a shared machine a round's wall time measures the other jobs as much as the
round (this development machine's 2 cores run four engineers' tests). The CPU time of
the simulation's own processes (driver, Ray's daemons and workers) is far less
sensitive to that load, so ``fedguard bench secagg`` reports it beside the wall time.

A background thread samples the tree every ``interval`` seconds: the user + system
time of every descendant of the root (each process counted at the most it was seen
at, so one that exits keeps its last sample) and a caller's progress counter (rounds
completed). The CPU of rounds ``first``..``last`` is the difference between the first
samples that saw each count; a process that starts and exits between two samples, and
the CPU after a process's last sample, are missed. The sampler's own scans are taken
out (its thread's CPU time), since the driver is in the tree.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedguard.simulations.process_memory import descendants, stat_after_name

DEFAULT_INTERVAL = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/<pid>/stat after the ')' that closes the command name: utime is the 14th
# field of the line, i.e. index 11 of what follows the name; stime is next.
UTIME_AFTER_NAME = 11


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far; ``None`` once it is gone."""
    fields = stat_after_name(pid)
    if fields is None:
        return None
    return (int(fields[UTIME_AFTER_NAME]) + int(fields[UTIME_AFTER_NAME + 1])) / CLOCK_TICKS


@dataclass
class TreeCpuSampler:
    """Samples the tree under ``root`` with ``progress()`` until ``stop``; see the module docstring."""

    root: int
    progress: Callable[[], int]
    interval: float = DEFAULT_INTERVAL
    # progress count -> tree CPU seconds at the first sample that saw it
    cpu_at: dict[int, float] = field(default_factory=dict)
    _seen: dict[int, float] = field(default_factory=dict)
    _own: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        started = time.thread_time()
        for pid in descendants(self.root):
            seconds = process_cpu_seconds(pid)
            if seconds is not None:
                self._seen[pid] = max(seconds, self._seen.get(pid, 0.0))
        count = self.progress()
        self._own += time.thread_time() - started
        total = sum(self._seen.values()) - self._own
        for done in range(count + 1):  # counts passed between two samples get the later one
            self.cpu_at.setdefault(done, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeCpuSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="tree-cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def cpu_between(self, first: int, last: int) -> float | None:
        """CPU seconds from the first sample that saw ``first`` rounds done to the first that saw ``last``
        (None when either count was never seen: the run was too short for the interval)."""
        if first not in self.cpu_at or last not in self.cpu_at:
            return None
        return self.cpu_at[last] - self.cpu_at[first]
