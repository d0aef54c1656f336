"""What the deployment tests share: a federation of sites on their own files, waiting for a
`fedguard run` and finding its run directory."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def own_files_federation(root: Path, site_data: list[Path]) -> Iterator[Federation]:
    """A TLS server and one registered SuperNode per entry of ``site_data``, each started with
    ``fedguard client --data`` on its own files and nothing else about them; every process is
    stopped on the way out, also when the start fails half-way."""
    fed = Federation(root)
    fed.root.mkdir()
    try:
        fed.make_certs()
        fed.make_publisher()
        fed.start_server()
        for site in range(len(site_data)):
            key = fed.make_site_keys(site)
            registered = fed.register(key.with_suffix(".pub"))
            assert registered.returncode == 0, registered.stderr
        for site, data in enumerate(site_data):
            fed.start_client(site, len(site_data), "--data", str(data))
        fed.wait_for_nodes(len(site_data))
        yield fed
    finally:
        fed.close()
