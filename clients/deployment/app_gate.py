"""A site's task launcher: hands each ClientApp task of its SuperNode to the signature check.

``fedguard client`` starts the SuperNode with ``--isolation process``, so the SuperNode runs no
app code itself and starts no launcher of its own; this loop takes that launcher's place (what
``flower-superexec`` does for Flower's subprocess isolation: acquire a task from the SuperNode's
runtime API, start one process for it with the task's token), except that the process it starts
runs fedguard's verified_clientapp, which runs the ClientApp only from an app a trusted publisher
signed. It acquires ClientApp tasks only, and stops when the SuperNode (its parent) goes away.

Why a warm fork per task (`fedguard bench deployment`, README): a fresh interpreter per message
spent most of a deployed round importing torch, Opacus, scikit-learn and fedguard again for every
message (train and each SecAgg+ stage). Flower 1.41 has no long-running ClientApp to reuse (its
``flwr-clientapp`` serves one task and exits). So this launcher imports the site's *installed*
fedguard ClientApp modules once (WARM_MODULES; never code from a run's FAB) and forks a child per
task: each task still runs in its own process, which pulls its own input, checks this task's FAB
signature against the trusted-publishers file as read now, and only then unpacks and loads the
app; nothing a task does reaches the launcher or the next task, as before. The launcher itself
never runs a model (a fork after torch starts its thread pools would be unsafe), and never loads
a FAB. ``--launch spawn`` keeps the one-interpreter-per-task launch (for a platform without fork).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

logger = logging.getLogger("fedguard.site")
# Flower's own launcher polls every second; the runtime API is this site's loopback, so a short
# interval costs little and a message waits at most this long before its task starts.
POLL_SECONDS = 0.1
LAUNCH_MODES = ("fork", "spawn")
# Logged once the warm imports are done (`fedguard bench deployment --idle-cpu` waits for it).
WARM_LOG_LINE = "task modules imported"
# The site's own installed modules a task needs (the ClientApp and what it imports on first use:
# DP-SGD, secure aggregation, the built-in data sets and partitioners); imported once, before the first task.
WARM_MODULES = (
    "fedguard.clients.deployment.verified_clientapp",
    "fedguard.clients.app",
    "fedguard.clients.private_training",
    "fedguard.clients.dp_steps",
    "fedguard.clients.bookkeeping",
    "fedguard.clients.secure_aggregation",
    "fedguard.privacy.accounting",
    "opacus",
    "sklearn.datasets",
    "sklearn.model_selection",
    "flwr_datasets.partitioner",
    "datasets",
)


def task_command(runtime_api_address: str, token: str, trusted_file: Path, parent_pid: int) -> list[str]:
    return [sys.executable, "-P", "-m", "fedguard.clients.deployment.verified_clientapp",
            "--runtime-api-address", runtime_api_address, "--token", token,
            "--trusted-publishers", str(trusted_file), "--parent-pid", str(parent_pid), "--launched-at", repr(time.time())]


def warm_up(modules: tuple[str, ...] = WARM_MODULES) -> float:
    """Import the task modules once; returns the seconds it took. A module that fails to import is
    logged and left to fail again, with its real error, in the task that needs it."""
    started = time.monotonic()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - the task reports it where it matters
            logger.warning("could not import %s ahead of tasks: %s", name, err)
    return time.monotonic() - started


def fork_task(runtime_api_address: str, token: str, trusted_file: Path, parent_pid: int) -> int:
    """Start one task in a forked child of this (warm) launcher; returns the child's pid."""
    launched_at = time.time()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns into the launcher's loop
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        start_parent_process_monitor(parent_pid)  # threads do not survive fork: watch the SuperNode again
        from fedguard.clients.deployment.verified_clientapp import run_task

        code = run_task(runtime_api_address, token, trusted_file, launched_at)
    except BaseException:  # noqa: BLE001 - report and leave; the reply was pushed by run_task if it could be
        logger.exception("task process failed")
    finally:
        logging.shutdown()
        os._exit(code)  # no atexit, no cleanup of the launcher's copied state (its connections)


class Tasks:
    """The launcher's running task processes, reaped as they end and stopped with it."""

    def __init__(self) -> None:
        self.forked: set[int] = set()
        self.spawned: list[subprocess.Popen] = []

    def reap(self) -> None:
        for pid in list(self.forked):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.forked.discard(pid)
        self.spawned = [child for child in self.spawned if child.poll() is None]

    def stop(self) -> None:
        for pid in self.forked:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for child in self.spawned:
            child.terminate()


def serve(runtime_api_address: str, trusted_file: Path, parent_pid: int, launch: str = "fork") -> None:
    if launch not in LAUNCH_MODES:
        raise ValueError(f"launch must be one of {', '.join(LAUNCH_MODES)}, got {launch!r}")
    if launch == "fork":
        logger.info("%s in %.1f s; each task runs in a forked process", WARM_LOG_LINE, warm_up())
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # loopback only: the SuperNode's runtime API binds 127.0.0.1
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    tasks = Tasks()
    try:
        while True:
            tasks.reap()
            try:
                answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError as err:  # the SuperNode is still starting, or restarting
                logger.warning("SuperNode runtime API at %s: %s", runtime_api_address, err)
                time.sleep(0.5)
                continue
            if answer.HasField("task") and answer.token:
                logger.info("run %d: task %d", answer.task.run_id, answer.task.task_id)
                if launch == "fork":
                    tasks.forked.add(fork_task(runtime_api_address, answer.token, trusted_file, parent_pid))
                else:
                    tasks.spawned.append(subprocess.Popen(task_command(runtime_api_address, answer.token,
                                                                       trusted_file, parent_pid)))
                continue  # more may be waiting
            time.sleep(POLL_SECONDS)
    finally:
        client.close()
        tasks.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard.clients.deployment.app_gate")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--trusted-publishers", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode's; the gate stops with it")
    parser.add_argument("--launch", choices=LAUNCH_MODES, default="fork",
                        help="fork: each task in a fork of this warm launcher; spawn: a fresh interpreter per task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API call (2 a second) otherwise
    # The parent monitor stops this launcher by raising SIGINT: it must not be ignored, as it is in
    # a process started from a non-interactive shell's background job (nohup, `&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    start_parent_process_monitor(args.parent_pid)
    try:
        serve(args.runtime_api_address, args.trusted_publishers, args.parent_pid, args.launch)
    except KeyboardInterrupt:  # the parent monitor raises SIGINT when the SuperNode is gone
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
