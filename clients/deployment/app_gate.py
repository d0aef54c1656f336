"""A site's task launcher: hands each ClientApp task of its SuperNode to the signature check.

``fedguard client`` starts the SuperNode with ``--isolation process``, so the SuperNode runs no
app code itself and starts no launcher of its own; this loop takes that launcher's place (what
``flower-superexec`` does for Flower's subprocess isolation: acquire a task from the SuperNode's
runtime API, start one process for it with the task's token), except that the process it starts
is fedguard's verified_clientapp, which runs the ClientApp only from an app a trusted publisher
signed. It acquires ClientApp tasks only, and stops when the SuperNode (its parent) goes away.
"""

from __future__ import annotations

import argparse
import logging
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
# Flower's own launcher polls every second; a message waits at most this long before its process starts.
POLL_SECONDS = 0.5


def task_command(runtime_api_address: str, token: str, trusted_file: Path, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "fedguard.clients.deployment.verified_clientapp",
            "--runtime-api-address", runtime_api_address, "--token", token,
            "--trusted-publishers", str(trusted_file), "--parent-pid", str(parent_pid), "--launched-at", repr(time.time())]


def serve(runtime_api_address: str, trusted_file: Path, parent_pid: int) -> None:
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # loopback only: the SuperNode's runtime API binds 127.0.0.1
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    children: list[subprocess.Popen] = []
    try:
        while True:
            children = [child for child in children if child.poll() is None]
            try:
                answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.HTTPError as err:  # the SuperNode is still starting, or restarting
                logger.warning("SuperNode runtime API at %s: %s", runtime_api_address, err)
                time.sleep(POLL_SECONDS)
                continue
            if answer.HasField("task") and answer.token:
                logger.info("run %d: task %d", answer.task.run_id, answer.task.task_id)
                children.append(subprocess.Popen(task_command(runtime_api_address, answer.token, trusted_file, parent_pid)))
                continue  # more may be waiting
            time.sleep(POLL_SECONDS)
    finally:
        client.close()
        for child in children:
            child.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard.clients.deployment.app_gate")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--trusted-publishers", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode's; the gate stops with it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API call (2 a second) otherwise
    start_parent_process_monitor(args.parent_pid)
    try:
        serve(args.runtime_api_address, args.trusted_publishers, args.parent_pid)
    except KeyboardInterrupt:  # the parent monitor raises SIGINT when the SuperNode is gone
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
