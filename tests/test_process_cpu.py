"""bench secagg's CPU figure: the process tree's CPU between two progress marks (simulations/process_cpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedguard.simulations.process_cpu import CLOCK_TICKS, TreeCpuSampler

TICK = 1 / CLOCK_TICKS
BURN_SECONDS = 0.1


def _burn(seconds: float) -> float:
    """Spin this thread for ``seconds`` of its own CPU time; returns the process CPU time it took."""
    started, thread_started = time.process_time(), time.thread_time()
    while time.thread_time() - thread_started < seconds:
        pass
    return time.process_time() - started


def test_cpu_between_marks_is_the_tree_cpu_spent_between_them() -> None:
    progress = {"rounds": 0}
    sampler = TreeCpuSampler(os.getpid(), lambda: progress["rounds"])
    sampler.sample()
    spent = _burn(BURN_SECONDS)
    progress["rounds"] = 2  # two rounds finish between samples: both get the later sample
    sampler.sample()
    measured = sampler.cpu_between(0, 2)
    assert measured is not None
    assert abs(measured - spent) <= 3 * TICK + 0.02, (measured, spent)
    assert sampler.cpu_between(0, 1) == measured
    assert sampler.cpu_between(2, 3) is None  # never seen


@pytest.mark.deployment  # starts a Python process: over a second on a loaded machine
def test_a_child_that_exits_keeps_its_cpu() -> None:
    progress = {"rounds": 0}
    sampler = TreeCpuSampler(os.getpid(), lambda: progress["rounds"])
    sampler.sample()
    code = f"import time\nt=time.process_time()\nwhile time.process_time()-t<{BURN_SECONDS}: pass\ntime.sleep(0.2)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        while True:  # sample the child while it lives, as the background thread would
            sampler.sample()
            if child.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    progress["rounds"] = 1
    sampler.sample()
    measured = sampler.cpu_between(0, 1)
    assert measured is not None and measured >= BURN_SECONDS - 2 * TICK, measured
