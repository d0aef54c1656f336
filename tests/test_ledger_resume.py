"""The privacy ledger of a real run, a crash mid-run, `resume=`, and `fedguard audit` on the result.

A simulation with sample-level DP is killed (SIGKILL, the whole process group) after its
first checkpoint, resumed from its run directory, and audited: the chain must be intact
across the crash, and every site's spend exactly that of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedguard.privacy.accounting import compute_epsilon
from fedguard.privacy.ledger import LEDGER_FILE, read_ledger
from fedguard.server.checkpoint import CHECKPOINT_DIR, LATEST_NAME, read_checkpoint

pytestmark = pytest.mark.simulation

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]
ROUNDS = 3
RUN = (
    "dataset=digits", "model=mlp", "simulation.num_clients=3", f"simulation.rounds={ROUNDS}",
    "privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "progress=false",
)
AUDIT_OK, AUDIT_TAMPERED = 0, 3


def audit(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDGUARD, "audit", str(run_dir), "--json"], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    first = subprocess.Popen(
        [*FEDGUARD, "simulate", *RUN, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    latest = run_dir / CHECKPOINT_DIR / LATEST_NAME
    try:
        deadline = time.monotonic() + 600
        while not (latest.is_file() and read_checkpoint(latest)["round"] >= 1):
            assert first.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: no clean shutdown of anything
        first.wait(timeout=60)
    assert read_checkpoint(latest)["round"] < ROUNDS, "the run finished before it could be killed"
    (run_dir.parent / AT_CRASH).write_text(json.dumps(_site_counts_at_crash(run_dir)))
    resumed = subprocess.run(
        [*FEDGUARD, "simulate", *RUN, f"resume={run_dir}", f"hydra.run.dir={run_dir}/resume-log"],
        capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return run_dir


AT_CRASH = "site-counts-at-crash.json"


def _site_counts_at_crash(run_dir: Path) -> dict[str, dict[str, int]]:
    """Each virtual site's own counts as the kill left them: rounds in its budget state (written
    first) and trainings in its own ledger (written next, before the reply leaves the site)."""
    counts = {}
    for site in sorted((run_dir / "client-state").glob("partition-*")):
        states = list((site / "privacy").glob("*.json"))
        ledgers = list((site / "ledger").glob("*.jsonl"))
        budget_rounds = json.loads(states[0].read_text())["rounds_participated"] if states else 0
        ledger_rounds = len(ledgers[0].read_text().splitlines()) if ledgers else 0
        counts[site.name.removeprefix("partition-")] = {"budget": budget_rounds, "ledger": ledger_rounds}
    return counts


def test_resumed_run_completes_every_round_once(resumed_run):
    summary = json.loads((resumed_run / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds"
    assert 1 <= summary["resumed_after_round"] < ROUNDS
    rounds = [json.loads(line)["round"] for line in (resumed_run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, ROUNDS + 1))


def test_privacy_spend_equals_an_uninterrupted_run_but_for_a_training_the_kill_caught(resumed_run):
    summary = json.loads((resumed_run / "summary.json").read_text())
    clients = summary["privacy"]["clients"]
    assert sorted(clients) == ["0", "1", "2"]
    at_crash = json.loads((resumed_run.parent / AT_CRASH).read_text())
    for site, report in clients.items():
        # A site writes its budget state, then its ledger entry, then its reply cache, and only then
        # replies. The kill can land between the first two writes: that training never left the
        # site, yet its own budget keeps it (never less than spent) while its ledger, like the
        # federation's, has it once. At most one training per site can be in that window.
        in_flight = at_crash.get(site, {"budget": 0, "ledger": 0})
        unreleased = in_flight["budget"] - in_flight["ledger"]
        assert unreleased in (0, 1), in_flight
        assert report["rounds_participated"] == ROUNDS + unreleased
        steps_per_round = report["steps_total"] // report["rounds_participated"]
        assert report["steps_total"] == report["rounds_participated"] * steps_per_round
        history = [(report["noise_multiplier"], report["sample_rate"], report["steps_total"])]
        assert report["epsilon"] == pytest.approx(compute_epsilon(history, report["delta"], "rdp").epsilon)


def test_ledger_continues_across_the_crash_and_audits_clean(resumed_run):
    entries = read_ledger(resumed_run / LEDGER_FILE)
    kinds = [entry["kind"] for entry in entries]
    assert kinds[0] == "run_started" and "run_resumed" in kinds and kinds[-1] == "run_finished"
    trainings = [e["body"]["entry"] for e in entries if e["kind"] == "client_entry"]
    per_client: dict[str, list[int]] = {}
    for entry in trainings:
        per_client.setdefault(entry["party"], []).append(entry["body"]["round"])
    assert per_client == {f"client:{pid}": list(range(1, ROUNDS + 1)) for pid in range(3)}
    result = audit(resumed_run)
    assert result.returncode == AUDIT_OK, result.stdout[-3000:] + result.stderr[-2000:]


def test_audit_names_a_tampered_entry(resumed_run, tmp_path):
    tampered = tmp_path / "run"
    subprocess.run(["cp", "-r", str(resumed_run), str(tampered)], check=True)
    ledger = tampered / LEDGER_FILE
    lines = ledger.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if '"steps":' in line)
    lines[target] = lines[target].replace('"steps":', '"steps":1', 1)  # 14 steps become 114
    ledger.write_text("\n".join(lines) + "\n")
    result = audit(tampered)
    assert result.returncode == AUDIT_TAMPERED
    first_problem = json.loads(result.stdout)["integrity"]["first_problem"]
    assert first_problem["line"] == target + 1
