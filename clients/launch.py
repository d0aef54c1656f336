"""``fedguard client``: join a federation from a site, as a Flower SuperNode over TLS with its own key.

The site's settings become the SuperNode's node config, checked here with the same schema
the ClientApp reads (clients/site.py), so a typo fails now, on this site, not mid-run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedguard.clients.site import (
    CONTRACT_KEY,
    CUSTOM_MODELS_KEY,
    DATA_KEY,
    DATA_ROOT_KEY,
    DEVICE_KEY,
    EPSILON_BUDGET_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    PIN_FIRST_USE,
    STATE_DIR_KEY,
    SiteConfigError,
    read_site_settings,
)
from fedguard.clients.contract_pin import contract_from_file
from fedguard.clients.deployment.app_signing import AppSignatureError, read_trusted_publishers
from fedguard.clients.deployment.site_file import SiteFileError, site_file_defaults
from fedguard.clients.deployment.key_commands import DEFAULT_KEYS_DIR
from fedguard.clients.deployment.key_material import NODE_PRIVATE_KEY_FILE, KeyMaterialError, check_certificate_files, check_node_private_key
from fedguard.clients.deployment.flower_tools import environment_with_flower
from fedguard.clients.deployment.supernode_poll import DEFAULT_POLL_SECONDS, POLL_RANGE, check_poll_seconds
from fedguard.clients.deployment.app_gate import LAUNCH_MODES

DEFAULT_SITE_DIR = "fedguard-site"
# --contract any: accept whatever contract a run carries (the behaviour before pins).
ACCEPT_ANY_CONTRACT = "any"
SITE_CA_HINT = (
    "ask the server operator for the federation's ca.crt (fedguard-server/certs/ca.crt on the server site) "
    "and pass its path with --ca; a site does not create it"
)
REQUIRED_SETTINGS = ("server", "ca", "partition-id")  # --num-partitions: unless --data
TRUSTED_PUBLISHERS_HINT = (
    "a site runs only apps signed by a publisher it trusts: pass --trusted-publishers FILE, a YAML file with the "
    "line `fedguard publisher key` printed for the federation's app publisher (check it with them out of band)"
)
# The SuperNode's local API (ClientApp processes talk to it); one free port per SuperNode on a host.
DEFAULT_RUNTIME_PORT = 9094
# How long a SuperNode keeps retrying an unreachable SuperLink before it gives up (seconds).
DEFAULT_MAX_WAIT = 600.0


def node_config_text(settings: dict[str, Any]) -> str:
    """Flower's --node-config syntax: space-separated key=TOML-value pairs (strings quoted)."""
    parts = []
    for key, value in settings.items():
        if value is None:
            continue
        rendered = json.dumps(value) if isinstance(value, str) else repr(value)
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def supernode_command(args: argparse.Namespace, node_config: str) -> list[str]:
    """Flower's flower-supernode, run through fedguard's poll-interval patch (supernode_poll.py)."""
    return [
        sys.executable, "-P", "-m", "fedguard.clients.deployment.supernode_poll", repr(args.poll_interval), "--",
        "--superlink", args.server,
        "--root-certificates", str(args.ca.resolve()),
        "--auth-supernode-private-key", str(args.key.resolve()),
        "--node-config", node_config,
        "--host", "127.0.0.1",
        "--port", str(args.runtime_port),
        "--max-wait-time", str(args.max_wait),
        # The SuperNode runs no app code and starts no launcher itself: fedguard's app gate
        # (started by client_main) launches each ClientApp task, after the signature check.
        "--isolation", "process",
    ]


def runtime_api_address(args: argparse.Namespace) -> str:
    return f"127.0.0.1:{args.runtime_port}"


def start_app_gate(args: argparse.Namespace) -> None:
    """The site's task launcher (clients/deployment/app_gate.py), watching this process: after the
    exec below this PID is the SuperNode's, so the gate stops when the SuperNode does."""
    subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [sys.executable, "-P", "-m", "fedguard.clients.deployment.app_gate", "--runtime-api-address", runtime_api_address(args),
         "--trusted-publishers", str(args.trusted_publishers.resolve()), "--parent-pid", str(os.getpid()),
         "--launch", args.task_launch],
        env=environment_with_flower(),
    )


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedguard client",
        description="Join the federation at --server as this site (Flower SuperNode, TLS, authenticated by its key).",
    )
    parser.add_argument("--config", type=Path,
                        help="a site YAML file with these settings (keys as the options: server, ca, key, "
                        "trusted-publishers, partition-id, ...); flags given here override it")
    parser.add_argument("--server", help="the SuperLink's HOST:PORT")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, default=Path(DEFAULT_KEYS_DIR) / NODE_PRIVATE_KEY_FILE,
                        help="this site's private key from `fedguard keys`")
    parser.add_argument("--trusted-publishers", type=Path,
                        help="YAML of the app publishers whose signed apps this site runs (key id: \"ssh-ed25519 ...\", "
                        "lines from `fedguard publisher key`); any other run is refused")
    parser.add_argument("--partition-id", type=int,
                        help="this site's number (0-based): its partition of a built-in dataset, and its name in "
                             "the privacy ledger; unique per site")
    parser.add_argument("--num-partitions", type=int,
                        help="how many partitions a built-in dataset is split in (not needed with --data)")
    parser.add_argument("--data", type=Path,
                        help="this site's own data (CSV, Parquet, .npz, an image folder or a saved `datasets` "
                             "directory), checked against the run's data contract (dataset=tabular / images)")
    parser.add_argument("--contract", metavar=f"FILE|{PIN_FIRST_USE}|{ACCEPT_ANY_CONTRACT}",
                        help="the data contract this site accepts: a YAML file (the agreed dataset config or its "
                             f"contract), {PIN_FIRST_USE} (pin the first run's contract in --state-dir; the default "
                             f"with --data) or {ACCEPT_ANY_CONTRACT}; a run with another contract is refused")
    parser.add_argument("--custom-model", action="append", default=[], metavar="PACKAGE.MODULE:FACTORY",
                        help="a team model (model=custom) this site agrees to import and call; repeat for several. "
                             "Runs naming any other model.target are refused")
    parser.add_argument("--data-root", type=Path, help="where this site's dataset files are (default: the dataset's own path)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the run's device on this site")
    parser.add_argument("--epsilon-budget", type=float, help="this site's own sample-level epsilon budget")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_SITE_DIR),
                        help="where this site keeps its privacy state across server restarts")
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
                        help=f"local port of the SuperNode's own API (default {DEFAULT_RUNTIME_PORT})")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT,
                        help="seconds to keep retrying an unreachable server before giving up")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_SECONDS,
                        help=f"seconds between asks for the server's next message when there is none "
                             f"({POLL_RANGE[0]}-{POLL_RANGE[1]}; default {DEFAULT_POLL_SECONDS}, Flower's own: 3)")
    parser.add_argument("--task-launch", choices=LAUNCH_MODES, default="fork",
                        help="fork: each ClientApp task in a fork of a launcher that imported the ClientApp once "
                             "(default); spawn: a fresh Python per task (slower; for platforms without fork)")
    return parser


def parse_client_args(argv: list[str]) -> argparse.Namespace:
    """The flags, over the --config file's settings (same conversions and choices); raises SiteFileError."""
    parser = client_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**site_file_defaults(parser, args.config, excluded={"config"}))
        args = parser.parse_args(argv)  # flags on the command line win over the file
    if missing := [name for name in REQUIRED_SETTINGS if getattr(args, name.replace("-", "_")) is None]:
        parser.error(f"missing {', '.join('--' + name for name in missing)} (or the same keys in --config FILE)")
    if args.data is None and args.num_partitions is None:
        parser.error("--num-partitions is required unless the site trains on its own files (--data PATH)")
    return args


def _contract_setting(args: argparse.Namespace) -> str | None:
    """The node config's ``contract``: a site with its own files pins on first use unless told otherwise."""
    chosen = args.contract or (PIN_FIRST_USE if args.data is not None else None)
    if chosen in (None, ACCEPT_ANY_CONTRACT, PIN_FIRST_USE):
        return None if chosen == ACCEPT_ANY_CONTRACT else chosen
    return str(Path(chosen).resolve())


def client_main(argv: list[str]) -> int:
    try:
        args = parse_client_args(argv)
    except SiteFileError as err:
        print(f"fedguard client: {err}", file=sys.stderr)
        return 1
    if args.data is not None and not args.data.exists():
        print(f"fedguard client: --data {args.data}: no such file or directory", file=sys.stderr)
        return 1
    settings = {
        PARTITION_ID_KEY: args.partition_id,
        NUM_PARTITIONS_KEY: args.num_partitions,
        DATA_KEY: str(args.data.resolve()) if args.data else None,
        CONTRACT_KEY: _contract_setting(args),
        CUSTOM_MODELS_KEY: " ".join(args.custom_model) or None,
        DATA_ROOT_KEY: str(args.data_root.resolve()) if args.data_root else None,
        DEVICE_KEY: args.device,
        EPSILON_BUDGET_KEY: args.epsilon_budget,
        STATE_DIR_KEY: str(args.state_dir.resolve()),
    }
    try:
        check_poll_seconds(args.poll_interval)
    except ValueError as err:
        print(f"fedguard client: {err}", file=sys.stderr)
        return 1
    try:
        read_site_settings({k: v for k, v in settings.items() if v is not None})
        if settings[CONTRACT_KEY] not in (None, PIN_FIRST_USE):
            contract_from_file(Path(settings[CONTRACT_KEY]))  # a typo in the pin file fails now
        # The CA is the server operator's (fedguard certs runs on the server site only).
        check_certificate_files(args.ca, hint=SITE_CA_HINT)
        check_node_private_key(args.key)
        if args.trusted_publishers is None:
            raise AppSignatureError(TRUSTED_PUBLISHERS_HINT)
        publishers = read_trusted_publishers(args.trusted_publishers)
    except (SiteConfigError, KeyMaterialError, AppSignatureError) as err:
        print(f"fedguard client: {err}", file=sys.stderr)
        return 1
    args.state_dir.mkdir(parents=True, exist_ok=True)
    command = supernode_command(args, node_config_text(settings))
    what = f"its own data {args.data}" if args.data else f"partition {args.partition_id}/{args.num_partitions}"
    print(f"fedguard client: site {args.partition_id} ({what}) joining https://{args.server}", flush=True)
    # The SuperNode keeps its Flower files (installed app bundles) in this site's state dir.
    os.environ["FLWR_HOME"] = str((args.state_dir / "flwr").resolve())
    print(f"fedguard client: runs only apps signed by {', '.join(sorted(publishers))} ({args.trusted_publishers})", flush=True)
    start_app_gate(args)
    os.execve(command[0], command, environment_with_flower())
