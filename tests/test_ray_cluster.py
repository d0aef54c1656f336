"""`simulation.ray_address`: a real two-node Ray cluster on loopback, started by the tests.

The head and the worker each offer one CPU and a resource of their own, and every client
asks for one CPU, so Flower's actor pool holds one actor per node and both must run clients.
The worker keeps no Fashion-MNIST (its ``ray start`` ran with FEDGUARD_DATA_ROOT pointing
at an empty folder); digits ships with scikit-learn, so every node has it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from fedguard.simulations.cluster import NODE_DATA_ROOT_ENV, PLACEMENT_FILE, ClusterError, join_cluster, read_placement
from tests.cli_support import FEDGUARD, fedguard
from tests.ray_cluster_support import LoopbackCluster, loopback_cluster

pytestmark = pytest.mark.simulation

NODE_ID = re.compile(r"node ([0-9a-f]{56}) \(")


@pytest.fixture(scope="module")
def empty_data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("no-fashion-mnist-here")


@pytest.fixture(scope="module")
def cluster(empty_data_root):
    with loopback_cluster(worker_env={NODE_DATA_ROOT_ENV: str(empty_data_root)}) as started:
        yield started


def _nodes_listed(run_dir: Path) -> set[str]:
    lines = [json.loads(line) for line in (run_dir / PLACEMENT_FILE).read_text().splitlines()]
    return {node for line in lines if line.get("event") == "nodes" for node in line["nodes"]}


def test_two_node_cluster_runs_clients_on_both_and_keeps_state_on_the_driver(cluster: LoopbackCluster, tmp_path):
    run_dir = tmp_path / "cluster-run"
    fedguard(
        "simulate", "dataset=digits", "model=logreg", "privacy=sample_dp", "simulation=tiny",
        "simulation.num_clients=2", "simulation.rounds=2", "simulation.client_resources.num_cpus=1",
        "train.max_steps=5", f"simulation.ray_address={cluster.address}", "progress=false",
        f"hydra.run.dir={run_dir}", timeout=300,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds"
    by_node = summary["cluster"]["client_calls_by_node"]
    nodes = _nodes_listed(run_dir)
    assert len(nodes) == 2 and set(by_node) == nodes, (by_node, nodes)  # both nodes ran clients
    assert all(counts["ok"] > 0 and counts["failed"] == 0 for counts in by_node.values())
    # Each site's state came back to the driver whichever node trained it: one signed ledger line
    # per round it trained, in one chain under the run directory.
    trained = Counter(record["partition"] for record in read_placement(run_dir) if record["message_type"] == "train")
    assert sum(trained.values()) == 4
    for partition, rounds in trained.items():
        ledgers = list((run_dir / "client-state" / f"partition-{partition}" / "ledger").glob("*.jsonl"))
        assert len(ledgers) == 1 and len(ledgers[0].read_text().splitlines()) == rounds
        assert (run_dir / "client-state" / f"partition-{partition}" / "ledger.key").is_file()
    audit = subprocess.run([*FEDGUARD, "audit", str(run_dir), "--json", "--no-report"],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]


def test_worker_without_the_data_stops_the_run_naming_the_node(cluster: LoopbackCluster, empty_data_root, tmp_path):
    """What `fedguard simulate` runs before the engine (it prints the error and exits 2), in this process."""
    import ray

    dataset_yaml = (Path(__file__).parents[1] / "conf" / "dataset" / "fashion_mnist.yaml").read_text()
    try:
        with pytest.raises(ClusterError) as stopped:
            join_cluster(cluster.address, {}, dataset_yaml, tmp_path, tmp_path / "client-state")
    finally:
        ray.shutdown()
    message = str(stopped.value)
    named = NODE_ID.findall(message)
    assert len(named) == 1, message  # the worker, not the head, which has the data
    assert "1 of 2 nodes" in message and "Fashion-MNIST" in message and str(empty_data_root) in message
    assert not (tmp_path / PLACEMENT_FILE).exists()  # stopped before anything was placed
