"""A real Ray cluster on loopback for tests: a head and workers, each its own `ray start --block`.

Each node runs in its own session (process group) with its own --temp-dir, so stopping it
kills exactly its processes. Never `ray stop`: that ends every Ray on the machine, other
people's included.
"""

from __future__ import annotations

import json
import os
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
START_SECONDS = 90.0


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

    def wait_for_nodes(self, count: int) -> None:
        """Until the cluster reports ``count`` alive nodes (``ray status`` from this venv)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a Ray node exited early ({node.returncode}); see {self.temp_dirs}")
            status = subprocess.run([RAY, "status", f"--address={self.address}"], capture_output=True, text=True)
            if status.returncode == 0 and _active_nodes(status.stdout) >= count:
                return
            time.sleep(1.0)
        raise TimeoutError(f"the loopback Ray cluster did not reach {count} nodes in {START_SECONDS:.0f} s")

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


def _active_nodes(status_text: str) -> int:
    """The node lines under "Active:" in `ray status`."""
    lines = status_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Active:")
    except StopIteration:
        return 0
    count = 0
    for line in lines[start + 1:]:
        if not line.strip().startswith("1 node_"):
            break
        count += 1
    return count


@contextmanager
def loopback_cluster(worker_env: dict[str, str] | None = None) -> Iterator[LoopbackCluster]:
    """A head (resource head_site) and one worker (resource worker_site), one CPU each."""
    cluster = LoopbackCluster(address=f"127.0.0.1:{free_port()}")
    try:
        cluster.add_node(head=True, resources={"head_site": 1})
        cluster.wait_for_nodes(1)
        cluster.add_node(head=False, resources={"worker_site": 1}, env=worker_env)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()
