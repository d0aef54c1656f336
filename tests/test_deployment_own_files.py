"""Three sites with their own CSV files over the real deployment harness (TLS, registered keys,
SecAgg+ roster, signed app): federated preprocessing, sample-level DP, SecAgg+, audit passes.

The sites differ in size and label mix (the wine set cut by simulations/example_sites.py);
each is started with ``fedguard client --data`` and nothing else about its data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from deployment_support import finish, own_files_federation

from fedguard.simulations.example_sites import CSV_NAME, write_sites

pytestmark = pytest.mark.deployment

SITES = 3


@pytest.fixture(scope="module")
def csv_federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-files-federation")
    data = write_sites(root / "data")
    with own_files_federation(root / "fed", data) as fed:
        yield fed, data


def test_three_csv_sites_preprocess_together_then_train_with_dp_and_secagg(csv_federation):
    fed, data = csv_federation
    sizes = [len(pd.read_csv(d / CSV_NAME)) for d in data]
    assert len(set(sizes)) == SITES
    run = fed.submit(
        "dataset=tabular", "model=mlp", f"simulation.num_clients={SITES}", "simulation.rounds=1",
        "dataset.preprocessing=federated", "privacy=sample_dp", "secure_agg=secaggplus", "secure_agg.threshold=2",
        "deployment.wait_for_clients=120", "simulation.round_timeout=150",
    )
    run_dir = finish(fed, run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds", summary
    pre = summary["preprocessing"]
    assert pre["sites"] == SITES and not pre["failures"] and pre["seconds"] > 0
    features = pre["statistics"]["features"]
    assert set(features) >= {"alcohol", "proline"} and all(f["std"] > 0 for f in features.values())
    # Saved with the model: the final checkpoint's config carries the statistics every site used.
    from fedguard.conf.run_config import config_from_yaml
    from fedguard.server.checkpoint import CHECKPOINT_DIR, FINAL_NAME, read_checkpoint

    checkpoint = read_checkpoint(run_dir / CHECKPOINT_DIR / FINAL_NAME)
    saved = config_from_yaml(checkpoint["config_yaml"]).dataset.statistics
    assert saved["features"]["alcohol"]["mean"] == pytest.approx(features["alcohol"]["mean"])
    # Every site released once, on its own signed ledger, and then trained under SecAgg+.
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["clients_replied"] == SITES
    for site in range(SITES):
        lines = [json.loads(x) for f in (fed.site_dir(site) / "ledger").glob("*.jsonl") for x in f.read_text().splitlines()]
        assert [e["kind"] for e in lines].count("preprocessing_release") == 1
    audit = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "audit", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    clients = json.loads(audit.stdout)["clients"]
    assert len(clients) == SITES
    # The audit counts the preprocessing release as one more step than training took.
    for report in rounds[0]["privacy"]:
        assert clients[str(report["partition-id"])]["steps"] == report["steps_total"] + 1
