"""``fedguard run [hydra overrides]``: submit a run to a SuperLink with ``flwr run``, over TLS.

The config is composed and validated here, with the same overrides ``fedguard simulate``
takes, and travels in the run config as ``fedguard-config``: the ServerApp and every
ClientApp read exactly what was validated on the submitting machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedguard.clients.wire import protocol
from fedguard.conf.run_address import split_host_port
from fedguard.conf.run_config import config_to_yaml
from fedguard.conf.schema import ConfigError
from fedguard.clients.deployment.app_signing import (
    APP_DIR,
    RUN_CONFIG_APP_SIGNATURE,
    AppSignature,
    AppSignatureError,
    build_app_fab,
)
from fedguard.clients.deployment.key_material import KeyMaterialError
from fedguard.server.noise_check import swamped_update_warning
from fedguard.server.launch import CONNECTION_NAME, RUNS_DIR, flower_cli_home
from fedguard.clients.deployment.flower_tools import flower_executable

logger = logging.getLogger(__name__)

# Run states as Flower's SuperLink reports them (`flwr ls`).
FINISHED = "finished"
FINISHED_COMPLETED = "finished:completed"
# After the log stream ends, how long to wait for the SuperLink to mark the run finished.
STATUS_WAIT_SECONDS = 120.0
STATUS_POLL_SECONDS = 2.0
# How long the reachability probe waits for the SuperLink to accept a TCP connection.
PROBE_TIMEOUT_SECONDS = 5.0

USAGE = """usage: fedguard run [hydra overrides]

Submits a run to the SuperLink's Control API at deployment.superlink (TLS, CA deployment.ca_cert; loopback
on the server host, or an SSH tunnel to it: ssh -N -L 9093:127.0.0.1:9093 server.example.org), e.g.
  fedguard run deployment.superlink=127.0.0.1:9093 deployment.ca_cert=ca.crt deployment.app_signature=fedguard-app.sig \\
      dataset=digits simulation.num_clients=3 simulation.rounds=5 privacy=sample_dp
Continue a crashed run (a run directory on the server, relative to its state dir):
  fedguard run <same overrides> resume=runs/run-<id>
"""


def run_config_toml(config_yaml: str, run_dir: str, app_signature: str = "") -> str:
    """A --run-config file: TOML basic strings take JSON's escapes, so json.dumps quotes them safely."""
    return (
        f"{protocol.RUN_CONFIG_FEDGUARD} = {json.dumps(config_yaml)}\n"
        f"{protocol.RUN_CONFIG_RUN_DIR} = {json.dumps(run_dir)}\n"
        f"{RUN_CONFIG_APP_SIGNATURE} = {json.dumps(app_signature)}\n"
    )


def read_app_signature(path: str | None) -> str:
    """The signature text to ship, checked against the FAB `flwr run` will build from APP_DIR.

    Why check here: every site would refuse a signature of another tree (a file edited since
    signing, a different checkout) with the same message; the submitter learns it in seconds,
    before a run is started, with the key to fix. An empty string: unsigned (sites refuse it).
    """
    if not path:
        logger.warning("deployment.app_signature is not set: sites refuse unsigned apps")
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise AppSignatureError(f"deployment.app_signature={path}: {err.strerror or err}") from None
    try:
        signature = AppSignature.from_json(text)
    except AppSignatureError as err:
        raise AppSignatureError(f"deployment.app_signature={path}: {err}") from None
    built = hashlib.sha256(build_app_fab(APP_DIR)).hexdigest()
    if built != signature.fab_sha256:
        raise AppSignatureError(
            f"deployment.app_signature={path} signs another version of the app (FAB sha256 {signature.fab_sha256[:16]}...) "
            f"than the source tree {APP_DIR} (FAB sha256 {built[:16]}...); ask the publisher to sign this tree "
            "(`fedguard publisher sign`), or submit from the tree it signed"
        )
    return text


class SuperLinkUnreachable(RuntimeError):
    """Nothing accepts connections at deployment.superlink; the message names the key and the address."""


def check_reachable(superlink: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """Open (and close) one TCP connection to the SuperLink before ``flwr run`` is started.

    Why: Flower's CLI reports an unreachable SuperLink in its own words (an "unavailable"
    connection error) after its retries, naming neither fedguard's key nor the address the
    user gave, so a typo in ``deployment.superlink`` or a SuperLink that is not running looks
    like a Flower bug. A plain TCP connect says which, in a second; TLS is Flower's business.
    """
    host, port = split_host_port(superlink)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            logger.debug("SuperLink at %s accepts connections", superlink)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err) or type(err).__name__)
        raise SuperLinkUnreachable(
            f"cannot reach the SuperLink at deployment.superlink={superlink} ({reason}); start it there with "
            f"`fedguard server`, or set deployment.superlink=HOST:PORT to the address it listens on"
        ) from None


def run_main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return 0
    from fedguard.conf import compose_config

    try:
        cfg = compose_config(argv)
    except ConfigError as err:
        print(f"fedguard run: bad config: {err}", file=sys.stderr)
        return 2
    if warning := swamped_update_warning(cfg):
        print(f"fedguard run: warning: {warning}", file=sys.stderr, flush=True)
    if not (APP_DIR / "pyproject.toml").is_file():
        print(f"fedguard run: {APP_DIR} is not fedguard's source tree; install fedguard with `pip install -e`", file=sys.stderr)
        return 2
    run_dir = str(cfg.resume or "")
    superlink = str(cfg.deployment.superlink)
    try:
        with flower_cli_home(superlink, Path(cfg.deployment.ca_cert)) as env, \
                tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8") as run_config:
            check_reachable(superlink)  # after the local checks (address, CA file) in flower_cli_home
            app_signature = read_app_signature(cfg.deployment.app_signature)
            run_config.write(run_config_toml(config_to_yaml(cfg), run_dir, app_signature))
            run_config.flush()
            run_id = _start_run(env, run_config.name)
            if run_id is None:
                print(f"fedguard run: the run was not started on the SuperLink at deployment.superlink={superlink}",
                      file=sys.stderr)
                return 1
            print(f"fedguard run: run {run_id} started; results on the server under "
                  f"{run_dir or f'{RUNS_DIR}/run-{run_id}'} (relative to its --state-dir)", flush=True)
            if not cfg.deployment.stream:
                return 0  # submitted; follow it with `flwr log`
            subprocess.run([_flwr(), "log", str(run_id), CONNECTION_NAME, "--stream"], env=env, check=False)
            return _final_status(env, run_id)
    except (KeyMaterialError, ValueError) as err:  # AppSignatureError is a ValueError
        print(f"fedguard run: {err}", file=sys.stderr)
        return 2
    except SuperLinkUnreachable as err:
        print(f"fedguard run: {err}", file=sys.stderr)
        return 1


def _flwr() -> str:
    return flower_executable("flwr")


def _flwr_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = subprocess.run([_flwr(), *args, "--format", "json"], env=env, capture_output=True, text=True, check=False)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        detail = str(answer.get("error-message") or proc.stderr or proc.stdout).strip()
        print(f"fedguard run: `flwr {args[0]}` failed: {detail}", file=sys.stderr)
        return {}
    return answer


def _start_run(env: dict[str, str], run_config_path: str) -> int | None:
    answer = _flwr_json(env, "run", str(APP_DIR), CONNECTION_NAME, "--run-config", run_config_path)
    return int(answer["run-id"]) if answer.get("run-id") else None


def _final_status(env: dict[str, str], run_id: int) -> int:
    """0 only when the SuperLink reports the run finished:completed (a failed ServerApp is a failure)."""
    deadline = time.monotonic() + STATUS_WAIT_SECONDS
    status = "unknown"
    while time.monotonic() < deadline:
        runs = _flwr_json(env, "ls", CONNECTION_NAME, "--run-id", str(run_id)).get("runs", [])
        status = str(runs[0].get("status", "unknown")) if runs else "unknown"
        if status.startswith(FINISHED):
            break
        time.sleep(STATUS_POLL_SECONDS)
    if status == FINISHED_COMPLETED:
        print(f"fedguard run: run {run_id} {status}", flush=True)
        return 0
    print(f"fedguard run: run {run_id} ended as {status}; see its log above (or `flwr log {run_id}`)", file=sys.stderr)
    return 1
