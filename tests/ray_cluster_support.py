"""A real Ray cluster on loopback for tests: a head and workers, each its own `ray start --block`.

Each node runs in its own session (process group) with its own --temp-dir, so stopping it
kills exactly its processes. Never `ray stop`: that ends every Ray on the machine, other
people's included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

RAY = str(Path(sys.executable).with_name("ray"))
# Ray's floor is ~75 MB; the machine is shared, so each node keeps its object store small.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
START_SECONDS = 120.0
# What `ray start --block` prints once the node's runtime is up.
STARTED_MARK = "Ray runtime started."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LoopbackCluster:
    address: str
    nodes: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)

    def add_node(self, *, head: bool, resources: dict[str, float], env: dict[str, str] | None = None) -> None:
        temp_dir = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")  # Ray's socket paths must stay short
        self.temp_dirs.append(temp_dir)
        where = [f"--port={self.address.rsplit(':', 1)[1]}", "--head", "--include-dashboard=false"] if head \
            else [f"--address={self.address}"]
        command = [
            RAY, "start", "--block", *where, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--resources={json.dumps(resources)}", "--disable-usage-stats",
        ]
        with open(Path(temp_dir) / "ray-start.log", "w") as log:
            self.nodes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env={**os.environ, **(env or {})}))

    def wait_started(self) -> None:
        """Until the last node's `ray start` says its runtime started (its raylet joined the cluster)."""
        log = Path(self.temp_dirs[-1]) / "ray-start.log"
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.nodes[-1].poll() is not None:
                raise RuntimeError(f"a Ray node exited early ({self.nodes[-1].returncode}): {log.read_text()[-2000:]}")
            if STARTED_MARK in log.read_text():
                return
            time.sleep(0.5)
        raise TimeoutError(f"the loopback Ray node did not start in {START_SECONDS:.0f} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            try:  # workers the raylet spawned share its process group
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def loopback_cluster(worker_env: dict[str, str] | None = None) -> Iterator[LoopbackCluster]:
    """A head (resource head_site) and one worker (resource worker_site), one CPU each."""
    cluster = LoopbackCluster(address=f"127.0.0.1:{free_port()}")
    try:
        cluster.add_node(head=True, resources={"head_site": 1})
        cluster.wait_started()
        cluster.add_node(head=False, resources={"worker_site": 1}, env=worker_env)
        cluster.wait_started()
        yield cluster
    finally:
        cluster.stop()
