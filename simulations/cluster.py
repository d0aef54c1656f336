"""``simulation.ray_address``: run a simulation's virtual clients on an existing Ray cluster.

What each node needs, and how it is checked before any round (``check_nodes``):

- the same fedguard install as the driver (same version): a node that cannot import it,
  or has another version, stops the run with an error naming the node;
- the data where its clients read it: ``dataset.root``, or the node's own folder when its
  ``ray start`` ran with ``FEDGUARD_DATA_ROOT`` set (a node that keeps the data elsewhere);
  checked on each node with the same file check the driver uses;
- nothing else: the run directory lives only on the driver.

Where a virtual site's privacy state lives (its accountant, signed ledger, ledger key,
replay cache, data-spend record): on the driver, under ``<run dir>/client-state``, the
same place as in a one-machine run. A client placed on another node fetches its site's
directory from a keeper actor pinned to the driver's node, trains against a node-local
copy, and ships every file that changed back to the keeper, which writes each one
atomically and fsync'ed, in the order a crash needs (accountant, ledger, replay), before
the reply leaves the client. Why this design and not "ship the state inside the reply":
the site's ledger key must not travel to the server inside a message, a site may be
sampled on a different node each round (so node-local state would fork its accountant
and its hash chain), and ``resume=`` and ``fedguard audit`` then read one directory
whatever node ran a client. Clients on the driver's node use the directory in place.

Every client call also records where it ran (``cluster-placement.jsonl`` in the run
directory: partition, node id, node address, whether it succeeded), and an error reply
from a client names the node it ran on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import ray
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable, Mod
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedguard.clients.app import SIMULATION_ROSTER
from fedguard.clients.site import DATA_ROOT_KEY, PARTITION_ID_KEY, SECAGG_ROSTER_KEY, STATE_DIR_KEY

logger = logging.getLogger(__name__)

# Set in the environment of `ray start` on a node that keeps the data in another folder.
NODE_DATA_ROOT_ENV = "FEDGUARD_DATA_ROOT"
PLACEMENT_FILE = "cluster-placement.jsonl"
# How long the driver waits for each node's check before naming it as not answering.
NODE_CHECK_SECONDS = 120.0
# Order in which shipped-back state is written: the accountant before the ledger before the
# replay cache, as clients/app.py writes them (a crash in between never loses a spend).
WRITE_ORDER = ("privacy/", "ledger/", "ledger.key", "replay/")
# Files that are per-process (locks) or half-written (tmp): never shipped.
SKIPPED_SUFFIXES = (".lock", ".tmp")


class ClusterError(RuntimeError):
    """A node of the cluster cannot run this simulation's clients; the message names it."""


def fedguard_version() -> str:
    try:
        return version("fedguard")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class NodeCheck:
    """What one node reported (or why it could not)."""

    node_id: str
    address: str
    problem: str | None

    def line(self) -> str:
        return f"node {self.node_id} ({self.address}): {self.problem or 'ok'}"


def node_data_root(configured: str | None) -> str | None:
    """The data folder clients on this node read: the node's own, else the run's ``dataset.root``."""
    return os.environ.get(NODE_DATA_ROOT_ENV) or configured


def _probe(dataset_yaml: str) -> tuple[str, str | None]:
    """Runs on one node: fedguard's version there and what is wrong with its data (None: fine)."""
    from omegaconf import OmegaConf

    from fedguard.clients.datasets import DatasetError, check_dataset_files

    dataset_cfg = OmegaConf.create(dataset_yaml)
    dataset_cfg.root = node_data_root(dataset_cfg.get("root"))
    try:
        check_dataset_files(dataset_cfg)
    except DatasetError as err:
        return fedguard_version(), f"{err} ({NODE_DATA_ROOT_ENV}={os.environ.get(NODE_DATA_ROOT_ENV)!r} there)"
    return fedguard_version(), None


def check_nodes(dataset_yaml: str, timeout: float = NODE_CHECK_SECONDS) -> list[NodeCheck]:
    """Run the node check on every alive node of the connected cluster, each pinned to its node."""
    probe = ray.remote(num_cpus=0)(_probe)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    pending = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(dataset_yaml):
            node for node in nodes
    }
    done, not_done = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
    checks: list[NodeCheck] = []
    ours = fedguard_version()
    for ref in done:
        node = pending[ref]
        try:
            theirs, problem = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - any failure to run the probe there is the node's problem
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            problem = f"cannot run fedguard there (is the same fedguard installed in Ray's Python?): {first}"
        else:
            if problem is None and theirs != ours:
                problem = f"fedguard {theirs} installed there, the driver runs {ours}"
        checks.append(NodeCheck(node["NodeID"], node.get("NodeManagerAddress", "?"), problem))
    for ref in not_done:
        ray.cancel(ref, force=True)
        node = pending[ref]
        checks.append(NodeCheck(node["NodeID"], node.get("NodeManagerAddress", "?"),
                                f"did not answer the node check within {timeout:.0f} s"))
    return sorted(checks, key=lambda check: check.node_id)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES)
    }


def _write_rank(relative: str) -> int:
    return next((rank for rank, prefix in enumerate(WRITE_ORDER) if relative.startswith(prefix)), len(WRITE_ORDER))


class SiteStateKeeper:
    """Driver-side owner of the virtual sites' state directories (a Ray actor on the driver's node)."""

    def __init__(self, state_root: str, placement_path: str) -> None:
        self.state_root = Path(state_root)
        self.placement_path = Path(placement_path)

    def _site_dir(self, partition: str) -> Path:
        if not partition.isdigit():
            raise ValueError(f"partition id {partition!r} is not a number")
        return self.state_root / f"partition-{partition}"

    def fetch(self, partition: str) -> dict[str, bytes]:
        """The site's files (none yet for a site that never trained: state is created lazily)."""
        folder = self._site_dir(partition)
        files = {} if not folder.is_dir() else {
            relative: (folder / relative).read_bytes() for relative in _digests(folder)
        }
        roster = self.state_root / SIMULATION_ROSTER
        if roster.is_file():
            files[f"../{SIMULATION_ROSTER}"] = roster.read_bytes()
        return files

    def store(self, partition: str, files: dict[str, bytes]) -> None:
        """Write what a client changed, each file atomically and durably, accountant first."""
        folder = self._site_dir(partition)
        for relative in sorted(files, key=lambda name: (_write_rank(name), name)):
            target = (folder / relative).resolve()
            if folder.resolve() not in target.parents:
                raise ValueError(f"refusing to write {relative!r} outside {folder}")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "wb") as handle:
                handle.write(files[relative])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)

    def placed(self, record: dict[str, Any]) -> None:
        with open(self.placement_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def start_keeper(state_root: Path, run_dir: Path) -> Any:
    """The keeper actor, pinned to the driver's node (where the run directory is)."""
    driver_node = ray.get_runtime_context().get_node_id()
    keeper_class = ray.remote(num_cpus=0, max_concurrency=1)(SiteStateKeeper)
    return keeper_class.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=False)
    ).remote(str(state_root), str(run_dir / PLACEMENT_FILE))


def cluster_site_mod(keeper: Any, driver_node: str) -> Mod:
    """Front mod of every client call on a cluster: node-level data root, state via the keeper,
    where it ran, and the node's name on any error it returns."""

    def on_cluster(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        here = ray.get_runtime_context().get_node_id()
        address = ray.util.get_node_ip_address()
        partition = str(context.node_config.get(PARTITION_ID_KEY, "?"))
        added: list[str] = []
        if (own_root := os.environ.get(NODE_DATA_ROOT_ENV)) and DATA_ROOT_KEY not in context.node_config:
            context.node_config[DATA_ROOT_KEY] = own_root
            added.append(DATA_ROOT_KEY)
        local: Path | None = None
        try:
            if here != driver_node:
                local = Path(tempfile.mkdtemp(prefix=f"fedguard-site-{partition}-"))
                site_dir = local / "site"
                site_dir.mkdir()
                for relative, data in ray.get(keeper.fetch.remote(partition)).items():
                    path = (site_dir / relative)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                before = _digests(site_dir)
                for key, value in ((STATE_DIR_KEY, str(site_dir)), (SECAGG_ROSTER_KEY, str(local / SIMULATION_ROSTER))):
                    if key not in context.node_config:
                        context.node_config[key] = value
                        added.append(key)
            reply = call_next(msg, context)
            if local is not None:
                after = _digests(site_dir)
                changed = {name: (site_dir / name).read_bytes() for name, digest in after.items() if before.get(name) != digest}
                if changed:
                    ray.get(keeper.store.remote(partition, changed))  # durable on the driver before the reply leaves
        except Exception as err:
            ray.get(keeper.placed.remote(_placement(partition, msg, here, address, ok=False)))
            raise RuntimeError(f"on Ray node {here} ({address}): {type(err).__name__}: {err}") from err
        finally:
            for key in added:  # the Context goes back to the driver: node-local paths stay here
                context.node_config.pop(key, None)
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
        ray.get(keeper.placed.remote(_placement(partition, msg, here, address, ok=not reply.has_error())))
        if reply.has_error():
            reason = f"on Ray node {here} ({address}): {reply.error.reason}"
            logger.error("partition %s %s", partition, reason)
            return Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
        return reply

    return on_cluster


def _placement(partition: str, msg: Message, node: str, address: str, ok: bool) -> dict[str, Any]:
    return {"event": "client", "partition": partition, "message_type": msg.metadata.message_type, "group": msg.metadata.group_id,
            "node": node, "address": address, "ok": ok, "time": time.time()}


def read_placement(run_dir: Path) -> list[dict[str, Any]]:
    """The client calls recorded in the run directory, in the order they finished."""
    path = run_dir / PLACEMENT_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [record for record in records if record.get("event") == "client"]


def placement_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json's ``cluster``: client calls per node (succeeded, failed)."""
    by_node: dict[str, dict[str, int]] = {}
    for record in read_placement(run_dir):
        counts = by_node.setdefault(record["node"], {"ok": 0, "failed": 0})
        counts["ok" if record["ok"] else "failed"] += 1
    return {"client_calls_by_node": by_node}


def join_cluster(address: str, env_vars: dict[str, str], dataset_yaml: str, run_dir: Path, state_root: Path) -> Mod:
    """Connect to the cluster, check every node, start the keeper; returns the clients' front mod.

    Flower's RayBackend calls ``ray.init`` only when Ray is not yet initialised, so the engine
    then reuses this connection (and shuts it down when the run ends)."""
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": env_vars})
    checks = check_nodes(dataset_yaml)
    for check in checks:
        logger.info("cluster %s", check.line())
    if bad := [check for check in checks if check.problem]:
        ray.shutdown()
        raise ClusterError(
            f"{len(bad)} of {len(checks)} nodes of the Ray cluster at {address} cannot run this simulation's "
            "clients: " + "; ".join(check.line() for check in bad)
        )
    keeper = start_keeper(state_root, run_dir)
    ray.get(keeper.placed.remote({"event": "nodes", "nodes": [check.node_id for check in checks], "time": time.time()}))
    return cluster_site_mod(keeper, ray.get_runtime_context().get_node_id())
