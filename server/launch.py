"""``fedguard server`` and ``fedguard register``: a SuperLink that only speaks TLS and only admits registered sites.

fedguard does not add a network layer: it starts Flower's own SuperLink with the flags that
make it safe (TLS from ``fedguard certs``, SuperNode authentication on, no runtime package
installs) on loopback, Debian's nginx in front of it showing sites only the Fleet API
(server/proxy.py), and talks to its Control API through Flower's own CLI from this host.
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
from fedguard.server.proxy import (
    PROXY_DIR,
    ProxyError,
    ProxySettings,
    certificate_dns_name,
    proxy_command,
    stop_stale_proxy,
)
from fedguard.server.supervise import supervise
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
# The SuperLink itself (all its APIs, the Control API included) listens on loopback only.
DEFAULT_SUPERLINK = "127.0.0.1:9093"
SUPERLINK_DB = "superlink.db"
CONNECTION_NAME = "fedguard"
PROXY_NAME = "proxy (nginx)"
FLOWER_CONFIG_FILE = "config.toml"


def superlink_command(certs_dir: Path, listen: str, state_dir: Path) -> list[str]:
    """The SuperLink invocation: TLS files, node authentication, a persistent state database."""
    host, port = split_host_port(listen)
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"--superlink {listen}: the SuperLink listens on loopback only (sites reach it through --listen)")
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
        description="Start the federation's SuperLink (TLS, SuperNode authentication) on loopback, behind nginx that "
        "shows sites only the Fleet API. Runs submitted with `fedguard run` write their results under STATE_DIR/runs/.",
    )
    parser.add_argument("--certs", type=Path, default=Path(DEFAULT_CERTS_DIR), help="directory from `fedguard certs`")
    parser.add_argument("--listen", default=DEFAULT_LISTEN,
                        help=f"public HOST:PORT sites connect to (nginx; default {DEFAULT_LISTEN})")
    parser.add_argument("--superlink", default=DEFAULT_SUPERLINK,
                        help=f"loopback HOST:PORT of the SuperLink itself: the Control API for `fedguard register/run` "
                        f"on this host or through an SSH tunnel (default {DEFAULT_SUPERLINK})")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_SERVER_DIR), help="SuperLink state and run directories")
    args = parser.parse_args(argv)
    certs = args.certs.resolve()
    state_dir = args.state_dir.resolve()
    try:
        check_certificate_files(certs / CA_CERT_FILE, certs / SERVER_CERT_FILE, certs / SERVER_KEY_FILE)
        command = superlink_command(certs, args.superlink, state_dir)
        proxy = ProxySettings(
            listen=args.listen, upstream=args.superlink, upstream_name=certificate_dns_name(certs / SERVER_CERT_FILE),
            certificate=certs / SERVER_CERT_FILE, certificate_key=certs / SERVER_KEY_FILE,
            ca_certificate=certs / CA_CERT_FILE, state_dir=state_dir / PROXY_DIR,
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        if stale := stop_stale_proxy(proxy.state_dir):
            print(f"fedguard server: stopped the previous run's nginx left behind (pids {stale})", file=sys.stderr, flush=True)
        nginx = proxy_command(proxy)
    except (KeyMaterialError, ProxyError, ValueError) as err:
        print(f"fedguard server: {err}", file=sys.stderr)
        return 1
    print(f"fedguard server: sites connect to https://{args.listen} (nginx: Fleet API only; logs in "
          f"{proxy.state_dir}); SuperLink and its Control API on https://{args.superlink}; runs under "
          f"{state_dir / RUNS_DIR}", flush=True)
    # Flower keeps installed app bundles under FLWR_HOME; ServerApp processes inherit the working
    # directory, so run directories land in the state dir too.
    os.environ["FLWR_HOME"] = str(state_dir / "flwr")
    # The server's ledger signing key (server/privacy_ledger.py) stays in the state dir too.
    os.environ[FEDGUARD_HOME_ENV] = str(state_dir)
    os.chdir(state_dir)
    return supervise({"SuperLink": command, PROXY_NAME: nginx}, proxy.state_dir, groups=frozenset({PROXY_NAME}))


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
