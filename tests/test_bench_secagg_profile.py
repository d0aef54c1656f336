"""`fedguard bench secagg-profile` runs one real SecAgg+ round in-process and charges CPU time to each stage."""

from __future__ import annotations

import json

import pytest


@pytest.mark.simulation  # a whole protocol round for 4 sites and the bench's imports: over a second
def test_the_profile_bench_runs_a_complete_round_and_names_every_stage(tmp_path, capsys):
    from fedguard.simulations.bench import main

    assert main(["secagg-profile", "--clients", "4", "--parameters", "5000", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "secagg-profile.json").read_text())
    (cell,) = result["cells"]
    assert cell["clients"] == 4 and cell["contributors"] == 4  # every site's input is in the sum
    assert set(cell["cpu_seconds_by_client_stage"]) == {"train+advertise", "cohort", "share", "mask", "consistency",
                                                         "unmask"}
    assert cell["cpu_seconds_total"] >= sum(cell["cpu_seconds_by_client_stage"].values()) - 1e-3
    assert cell["hot_functions"] and "| server and the rest |" in capsys.readouterr().out
