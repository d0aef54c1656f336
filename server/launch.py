"""``fedguard server`` and ``fedguard register``: a SuperLink that only speaks TLS and only admits registered sites.

fedguard does not add a network layer: it starts Flower's own SuperLink with the flags that
make it safe (TLS from ``fedguard certs``, SuperNode authentication on, no runtime package
installs) and talks to its Control API through Flower's own CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedguard.conf.run_address import split_host_port
from fedguard.clients.deployment.key_commands import DEFAULT_CERTS_DIR
from fedguard.server.privacy_ledger import FEDGUARD_HOME_ENV
from fedguard.clients.deployment.flower_tools import environment_with_flower, flower_executable
from fedguard.clients.deployment.key_material import (
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    KeyMaterialError,
    check_certificate_files,
)

DEFAULT_SERVER_DIR = "fedguard-server"
# Under `fedguard server`, a run without an explicit run-dir lands in <state dir>/runs/run-<id>.
RUNS_DIR = "runs"
DEFAULT_LISTEN = "0.0.0.0:9092"
DEFAULT_SUPERLINK = "127.0.0.1:9092"
SUPERLINK_DB = "superlink.db"
CONNECTION_NAME = "fedguard"
FLOWER_CONFIG_FILE = "config.toml"


def superlink_command(certs_dir: Path, listen: str, state_dir: Path) -> list[str]:
    """The SuperLink invocation: TLS files, node authentication, a persistent state database."""
    host, port = split_host_port(listen)
    certs_dir = certs_dir.resolve()
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs_dir / CA_CERT_FILE),
        "--ssl-certfile", str(certs_dir / SERVER_CERT_FILE),
        "--ssl-keyfile", str(certs_dir / SERVER_KEY_FILE),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str((state_dir / SUPERLINK_DB).resolve()),
        "--host", host,
        "--port", str(port),
    ]


def server_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard server",
        description="Start the federation's SuperLink with TLS and SuperNode authentication. Runs submitted with "
        "`fedguard run` write their results under STATE_DIR/runs/.",
    )
    parser.add_argument("--certs", type=Path, default=Path(DEFAULT_CERTS_DIR), help="directory from `fedguard certs`")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_SERVER_DIR), help="SuperLink state and run directories")
    args = parser.parse_args(argv)
    certs = args.certs
    try:
        check_certificate_files(certs / CA_CERT_FILE, certs / SERVER_CERT_FILE, certs / SERVER_KEY_FILE)
        command = superlink_command(certs, args.listen, args.state_dir)
    except (KeyMaterialError, ValueError) as err:
        print(f"fedguard server: {err}", file=sys.stderr)
        return 1
    args.state_dir.mkdir(parents=True, exist_ok=True)
    print(f"fedguard server: SuperLink on https://{args.listen}, runs under {args.state_dir / 'runs'}", flush=True)
    # Flower keeps installed app bundles under FLWR_HOME; ServerApp processes inherit the working
    # directory, so run directories land in the state dir too.
    os.environ["FLWR_HOME"] = str((args.state_dir / "flwr").resolve())
    # The server's ledger signing key (server/privacy_ledger.py) stays in the state dir too.
    os.environ[FEDGUARD_HOME_ENV] = str(args.state_dir.resolve())
    os.chdir(args.state_dir)
    os.execve(command[0], command, environment_with_flower())


@contextmanager
def flower_cli_home(superlink: str, ca_cert: Path) -> Iterator[dict[str, str]]:
    """A throwaway Flower CLI home whose one connection is this SuperLink over TLS; yields the env to use."""
    split_host_port(superlink)
    check_certificate_files(ca_cert)
    with tempfile.TemporaryDirectory(prefix="fedguard-flwr-") as home:
        config = (
            f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f"address = {json.dumps(superlink)}\n"
            f"root-certificates = {json.dumps(str(ca_cert.resolve()))}\n"
        )
        Path(home, FLOWER_CONFIG_FILE).write_text(config, encoding="utf-8")
        yield {**environment_with_flower(), "FLWR_HOME": home}


def register_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedguard register",
        description="Register a client site's public key (from `fedguard keys`) with the SuperLink; "
        "only registered sites may join.",
    )
    parser.add_argument("public_key", type=Path, help="the site's node_key.pub")
    parser.add_argument("--superlink", default=DEFAULT_SUPERLINK, help=f"HOST:PORT (default {DEFAULT_SUPERLINK})")
    parser.add_argument("--ca", type=Path, default=Path(DEFAULT_CERTS_DIR) / CA_CERT_FILE, help="the federation's CA certificate")
    args = parser.parse_args(argv)
    try:
        with flower_cli_home(args.superlink, args.ca) as env:
            command = [flower_executable("flwr"), "supernode", "register", str(args.public_key), CONNECTION_NAME,
                       "--format", "json"]
            proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    except (KeyMaterialError, ValueError) as err:
        print(f"fedguard register: {err}", file=sys.stderr)
        return 1
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success"):
        detail = (answer.get("error-message") or proc.stderr or proc.stdout).strip()
        print(f"fedguard register: the SuperLink refused {args.public_key}: {detail}", file=sys.stderr)
        return 1
    print(f"registered {args.public_key} as node {answer['node-id']}")
    return 0
