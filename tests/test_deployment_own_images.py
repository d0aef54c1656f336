"""Three sites with their own Fashion-MNIST image folders (PNG files, different sizes and class
mixes) over the real deployment harness (TLS, registered keys, SecAgg+ roster, signed app):
federated preprocessing of the pixel statistics, sample-level DP and SecAgg+, audit passes.

Each site is started with ``fedguard client --data FOLDER`` and nothing else about its data;
the images contract comes from the run config and each site pins it on first use. Kept small
(130 images, one round, two DP-SGD steps a site): what is tested is the path, not accuracy
(``fedguard bench own-files --kind images`` measures that).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deployment_support import finish, own_files_federation

from fedguard.simulations.example_sites import FASHION_MNIST_DIR, write_image_sites

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (README setup)"),
]

SITES = 3
SIZES = (60, 40, 30)


@pytest.fixture(scope="module")
def image_federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-images-federation")
    data = write_image_sites(root / "data", sizes=SIZES)
    with own_files_federation(root / "fed", data) as fed:
        yield fed, data


def test_three_image_folder_sites_preprocess_together_then_train_with_dp_and_secagg(image_federation):
    fed, data = image_federation
    counts = [sum(1 for _ in site.rglob("*.png")) for site in data]
    assert counts == list(SIZES)
    # The sites' class mixes differ: the third never saw some classes (no folder for them).
    assert len({tuple(sorted(p.name for p in site.iterdir())) for site in data}) > 1
    run = fed.submit(
        "dataset=images", "model=cnn", f"simulation.num_clients={SITES}", "simulation.rounds=1", "train.max_steps=2",
        "dataset.preprocessing=federated", "privacy=sample_dp", "secure_agg=secaggplus", "secure_agg.threshold=2",
        "deployment.wait_for_clients=120", "simulation.round_timeout=150",
    )
    run_dir = finish(fed, run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds", summary
    assert summary["central_evaluation"].startswith("none"), summary  # quality from the sites' held-out splits
    pre = summary["preprocessing"]
    assert pre["sites"] == SITES and not pre["failures"] and pre["seconds"] > 0
    pixels = pre["statistics"]["pixels"]
    # Noisy at epsilon 0.5 on sums over 27-54 training images a site (test_own_images_simulation.py
    # gives the spread); exact sums are tested without noise in test_federated_preprocessing.py.
    assert 0.0 < pixels["mean"] < 1.0 and 0.025 <= pixels["std"] <= 0.5, pixels
    # Saved with the model: the final checkpoint's config carries the statistics every site used.
    from fedguard.conf.run_config import config_from_yaml
    from fedguard.server.checkpoint import CHECKPOINT_DIR, FINAL_NAME, read_checkpoint

    checkpoint = read_checkpoint(run_dir / CHECKPOINT_DIR / FINAL_NAME)
    saved = config_from_yaml(checkpoint["config_yaml"]).dataset.statistics
    assert saved["pixels"]["mean"] == pytest.approx(pixels["mean"])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["clients_replied"] == SITES
    for site in range(SITES):
        # One statistics release on each site's own ledger, and the contract pinned on first use.
        lines = [json.loads(x) for f in (fed.site_dir(site) / "ledger").glob("*.jsonl") for x in f.read_text().splitlines()]
        assert [e["kind"] for e in lines].count("preprocessing_release") == 1
        assert list(fed.site_dir(site).rglob("contract-pin.json")), f"site {site} pinned no contract"
        assert list(fed.site_dir(site).rglob("secagg/sessions.json")), f"site {site} entered no SecAgg+ session"
    audit = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "audit", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    clients = json.loads(audit.stdout)["clients"]
    assert len(clients) == SITES and all(c["status"] == "ok" for c in clients.values()), clients
    # The audit counts the statistics release as one more step than training took.
    for report in rounds[0]["privacy"]:
        assert clients[str(report["partition-id"])]["steps"] == report["steps_total"] + 1
