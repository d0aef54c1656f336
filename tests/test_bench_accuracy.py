"""``fedguard bench accuracy --from-runs``: tuning is scored on validation only, fairly across stopped runs."""

from __future__ import annotations

import json
from pathlib import Path

from fedguard.simulations.bench_accuracy import collect_runs


def _run(folder: Path, validation: list[float], test: list[float]) -> None:
    folder.mkdir(parents=True)
    lines = [{"round": r + 1, "federated_eval_accuracy": v, "test_accuracy": t, "round_seconds": 1.0}
             for r, (v, t) in enumerate(zip(validation, test, strict=True))]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_stopped_tuning_runs_are_compared_at_the_round_all_reached_on_validation_only(tmp_path):
    # The one-epoch run got further (round 4) and its last score beats the other's last; the test
    # accuracy would also favour it. Scored at round 2, the round both reached, three epochs wins.
    _run(tmp_path / "tune-b1024-lr4-c0.1-e1", [0.60, 0.70, 0.80, 0.90], [0.99, 0.99, 0.99, 0.99])
    _run(tmp_path / "tune-b1024-lr4-c0.1-e3", [0.75, 0.85], [0.10, 0.10])
    tuning = collect_runs(tmp_path, 3.0)["tuning"]
    assert tuning["chosen"] == "b1024-lr4-c0.1-e3"
    e1 = tuning["candidates"]["b1024-lr4-c0.1-e1"]
    assert (e1["scored_at_round"], e1["validation_accuracy"], e1["incomplete"]) == (2, 0.70, True)
    assert e1["validation_accuracy_each_round"] == [0.60, 0.70, 0.80, 0.90]
    assert tuning["candidates"]["b1024-lr4-c0.1-e3"]["settings"]["train.local_epochs"] == 3
    assert "test_accuracy" not in json.dumps(tuning)
