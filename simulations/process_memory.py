"""Peak memory of a whole process tree (a simulation's driver, Ray's daemons and workers).

A simulation's memory is spread over many processes, so one process's max RSS (what
``time -v`` reports) understates it. This samples every descendant of a root process
from /proc and keeps the peak of the *sum*: PSS (proportional set size, each shared
page split among the processes that map it, so Ray's shared object store is counted
once) and RSS (shared pages counted in every process: an upper bound). Linux only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
KIB = 1024
# Seconds between samples: memory that lives shorter than this can be missed.
DEFAULT_INTERVAL = 0.5


def stat_after_name(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 2, in parentheses, which
    may hold spaces): the state first; ``None`` once the process is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _parent_of(pid: int) -> int | None:
    fields = stat_after_name(pid)
    return None if fields is None else int(fields[1])  # ppid follows the state


def descendants(root: int) -> set[int]:
    """``root`` and every process below it, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (parent := _parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    tree, frontier = {root}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in bytes; (0, 0) once it is gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(" ")
            if name in values:
                values[name] = int(rest.split()[0]) * KIB
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values["Pss:"], values["Rss:"]


@dataclass
class TreeMemoryPeak:
    """Samples a process tree in a background thread until ``stop``."""

    root: int
    interval: float = DEFAULT_INTERVAL
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = descendants(self.root)
        totals = [_rollup(pid) for pid in pids]
        self.peak_pss = max(self.peak_pss, sum(p for p, _ in totals))
        self.peak_rss = max(self.peak_rss, sum(r for _, r in totals))
        self.peak_processes = max(self.peak_processes, len(pids))
        self.samples += 1

    def start(self) -> TreeMemoryPeak:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=loop, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
