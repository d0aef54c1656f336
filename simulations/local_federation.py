"""A whole federation of real processes on loopback: `fedguard server`, `register`, `client`, `run`.

Used by the deployment tests and `fedguard bench deployment`. Every process starts in its
own session so that stopping it stops its children too (SuperExec, ServerApp and ClientApp
processes); `Federation.close` stops everything, and callers use it in a `finally`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]
LOOPBACK = "127.0.0.1"
STOP_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout} s")


def fedguard(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDGUARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the whole session, then make sure it is gone."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=STOP_GRACE_SECONDS)


def site_threads(num_sites: int, cores: int | None = None) -> int:
    """torch threads for each of ``num_sites`` sites sharing this machine: its share of the cores.

    Why: torch's default is every core for every process, so three loopback sites on two cores
    ran six compute threads that spun against each other. A digits train task with sample-level
    DP took 0.13-0.16 s of CPU with one thread and 0.63-0.87 s with two (same process, runs
    alternated, load 30; `fedguard bench deployment`, README). The simulation it is compared
    with gives each virtual client one CPU (simulation.client_resources.num_cpus)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    return max(1, (cores or os.cpu_count() or 1) // num_sites)


def site_thread_environment(num_sites: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a loopback site starts with: OMP_NUM_THREADS (which torch reads when it is
    imported) set to its share of the cores, unless the caller's environment already sets it."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", str(site_threads(num_sites)))
    return env


@dataclass
class Federation:
    root: Path
    port: int = field(default_factory=free_port)  # nginx: the only address sites are given
    control_port: int = field(default_factory=free_port)  # the SuperLink on loopback: the operator's Control API
    server: subprocess.Popen | None = None
    clients: dict[int, subprocess.Popen] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def control_address(self) -> str:
        return f"{LOOPBACK}:{self.control_port}"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def ca_cert(self) -> Path:
        return self.server_dir / "certs" / "ca.crt"

    def site_dir(self, partition: int) -> Path:
        return self.root / f"site{partition}"

    def spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [*FEDGUARD, *args], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.processes.append(proc)
        return proc

    def make_certs(self) -> None:
        done = fedguard("certs", "--out", str(self.ca_cert.parent), "--host", LOOPBACK, "--host", "localhost", cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"fedguard certs failed: {done.stderr}")

    @property
    def publisher_dir(self) -> Path:
        return self.root / "publisher"

    @property
    def trusted_publishers(self) -> Path:
        return self.root / "trusted_publishers.yaml"

    @property
    def app_signature(self) -> Path:
        return self.publisher_dir / "fedguard-app.sig"

    def make_publisher(self, key_id: str = "loopback-publisher") -> None:
        """The app publisher's key and its signature of this source tree (README: `fedguard publisher
        key`, `fedguard publisher sign`), and the trusted-publishers file every site gets."""
        done = fedguard("publisher", "key", "--out", str(self.publisher_dir), "--id", key_id, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"fedguard publisher key failed: {done.stderr}")
        self.trusted_publishers.write_text(done.stdout, encoding="utf-8")
        done = fedguard("publisher", "sign", "--key", str(self.publisher_dir / "app_publisher_key"),
                        "--out", str(self.app_signature), cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"fedguard publisher sign failed: {done.stderr}")

    def make_site_keys(self, partition: int) -> Path:
        keys = self.site_dir(partition) / "keys"
        done = fedguard("keys", "--out", str(keys), cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"fedguard keys failed: {done.stderr}")
        self.distribute_secagg_roster()
        return keys / "node_key"

    def distribute_secagg_roster(self) -> None:
        """Every site made so far gets its secure-aggregation identity key and the roster of all of
        them: the operator's out-of-band step, done with the README's commands (``fedguard roster
        identity`` per site, ``fedguard roster make``, the file copied into each site's state dir)."""
        sites = sorted(site for site in self.root.glob("site*") if site.is_dir())
        entries = []
        for site in sites:
            done = fedguard("roster", "identity", "--state-dir", str(site), "--name", site.name, cwd=self.root)
            if done.returncode != 0:
                raise RuntimeError(f"fedguard roster identity failed: {done.stderr}")
            entries.append(done.stdout.strip())
        roster = self.root / "roster.json"
        done = fedguard("roster", "make", "--out", str(roster), *entries, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"fedguard roster make failed: {done.stderr}")
        for site in sites:
            shutil.copyfile(roster, site / "secagg" / "roster.json")

    def start_server(self, timeout: float = 60) -> None:
        self.server = self.spawn(
            ["server", "--certs", str(self.ca_cert.parent), "--listen", self.address, "--superlink", self.control_address,
             "--state-dir", str(self.server_dir)],
            "server.log",
        )
        wait_for_port(self.port, timeout)
        wait_for_port(self.control_port, timeout)

    def stop_server(self, sig: int = signal.SIGKILL) -> None:
        if self.server is not None:
            stop_process(self.server, sig)

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        return fedguard("register", str(public_key), "--superlink", self.control_address, "--ca", str(self.ca_cert), cwd=self.root)

    def start_client(self, partition: int, num_partitions: int, *extra: str, key: Path | None = None) -> subprocess.Popen:
        key = key or self.site_dir(partition) / "keys" / "node_key"
        proc = self.spawn(
            [
                "client", "--server", self.address, "--ca", str(self.ca_cert), "--key", str(key),
                "--trusted-publishers", str(self.trusted_publishers),
                "--partition-id", str(partition), "--num-partitions", str(num_partitions),
                "--state-dir", str(self.site_dir(partition)), "--runtime-port", str(free_port()), *extra,
            ],
            f"client{partition}.log",
            env=site_thread_environment(num_partitions),
        )
        self.clients[partition] = proc
        return proc

    def connected_nodes(self) -> int:
        """SuperNodes the SuperLink reports online (via Flower's CLI, over TLS)."""
        from fedguard.server.launch import CONNECTION_NAME, flower_cli_home
        from fedguard.clients.deployment.flower_tools import flower_executable

        with flower_cli_home(self.control_address, self.ca_cert) as env:
            listing = subprocess.run(
                [flower_executable("flwr"), "supernode", "list", CONNECTION_NAME, "--format", "json"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )
        try:
            nodes = json.loads(listing.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected_nodes() >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout} s; see {self.root}/client*.log")

    def submit(self, *overrides: str, timeout: float = 600, signed: bool = True) -> subprocess.Popen:
        """`fedguard run` in the background (its output in run.log), with the publisher's signature
        unless ``signed`` is False (make_publisher first)."""
        signature = [f"deployment.app_signature={self.app_signature}"] if signed else []
        args = ["run", f"deployment.superlink={self.control_address}", f"deployment.ca_cert={self.ca_cert}", "progress=false",
                *signature, *overrides]
        return self.spawn(args, "run.log")

    def run_dirs(self) -> list[Path]:
        runs = self.server_dir / "runs"
        return sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime) if runs.exists() else []

    def close(self) -> None:
        from fedguard.server.proxy import stop_stale_proxy

        for proc in reversed(self.processes):
            stop_process(proc)
        # nginx runs in its own process group (fedguard server stops it on SIGTERM); after a
        # server killed with SIGKILL and not restarted, it would be left holding its port.
        stop_stale_proxy(self.server_dir / "proxy")
