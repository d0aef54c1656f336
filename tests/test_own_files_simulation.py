"""`fedguard simulate` rehearsing a federation on sites' own files: three CSV files of different
sizes and label mixes, the team's own model from a module outside the project, and a site
whose file breaks the contract (the run goes on; summary.json names the site's reason)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pandas as pd
import pytest

from fedguard.simulations.example_sites import CSV_NAME, write_sites
from tests.cli_support import FEDGUARD

pytestmark = pytest.mark.simulation

TEAM_MODEL = textwrap.dedent(
    """
    from torch import nn

    def build(input_shape, num_classes, width=32):
        return nn.Sequential(nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_classes))
    """
)


def _simulate(tmp_path, sites, *overrides, pythonpath=None):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:  # the team's module is importable on the "server" and every "site" (Ray workers inherit it)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
    args = ["simulate", "dataset=tabular", "simulation=tiny", f"simulation.num_clients={len(sites)}",
            f"simulation.site_data=[{','.join(str(s) for s in sites)}]", "evaluate.fraction_clients=1.0",
            "progress=false", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run([*FEDGUARD, *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"fedguard {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rounds


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One engine start for both checks (Ray's start is most of a run's time): the three wine
    sites, plus a fourth whose copy of site 1's file has one category the contract lacks."""
    tmp_path = tmp_path_factory.mktemp("own-files")
    sites = write_sites(tmp_path / "data")
    broken = tmp_path / "data" / "site-3"
    broken.mkdir()
    frame = pd.read_csv(sites[1] / CSV_NAME)
    frame.loc[6, "colour"] = "ultraviolet"
    frame.to_csv(broken / CSV_NAME, index=False)
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "wine_team_model.py").write_text(TEAM_MODEL)
    summary, rounds = _simulate(tmp_path, [*sites, broken], "model=custom", "model.target=wine_team_model:build",
                                "+model.kwargs.width=24", "simulation.rounds=3", pythonpath=tmp_path / "team")
    return sites, broken, summary, rounds


def test_three_csv_sites_train_the_teams_own_model(federation):
    sites, _broken, summary, rounds = federation
    sizes = [len(pd.read_csv(s / CSV_NAME)) for s in sites]
    mixes = [set(pd.read_csv(s / CSV_NAME).cultivar) for s in sites]
    assert len(set(sizes)) == 3 and "class_0" not in mixes[2]
    assert summary["rounds"] == 3 and all(r["clients_replied"] == 3 for r in rounds)
    assert summary["model"] == "custom" and summary["model_parameters"] == 15 * 24 + 24 + 24 * 3 + 3
    assert summary["central_evaluation"].startswith("none: the server holds no test data")
    # the sites' held-out rows: three well-separated cultivars, chance is 1/3
    assert summary["final"]["federated_eval_accuracy"] >= 0.8, rounds
    assert rounds[-1]["federated_eval_loss"] < rounds[0]["federated_eval_loss"]


def test_a_site_whose_file_breaks_the_contract_is_named_and_the_run_goes_on(federation):
    _sites, broken, summary, rounds = federation
    assert all(r["clients_failed"] == 1 for r in rounds)
    (reason,) = summary["client_failures"].values()
    assert reason.startswith("LocalDataError") and f"{CSV_NAME}: column 'colour' holds a" in reason
    assert "ultraviolet" not in reason and "row" not in reason  # the reason, not the data or which record
