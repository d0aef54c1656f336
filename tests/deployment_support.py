"""What the deployment tests share: waiting for a `fedguard run` and finding its run directory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from fedguard.simulations.local_federation import Federation, stop_process

RUN_TIMEOUT = 600


def finish(fed: Federation, run: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> Path:
    """Wait for a submitted run, check that it succeeded and return its run directory on the server."""
    try:
        run.wait(timeout=timeout)
    finally:
        stop_process(run)
    log = (fed.root / "run.log").read_text(errors="replace")
    assert run.returncode == 0, log[-5000:]
    # `fedguard run` names the run directory, relative to the server's state dir.
    run_dir = fed.server_dir / re.findall(r"results on the server under (\S+)", log)[-1]
    assert (run_dir / "summary.json").is_file(), log[-5000:]
    return run_dir
