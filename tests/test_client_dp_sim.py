"""Client-level DP end to end: a tiny digits simulation under privacy=client_dp.

One run serves most tests: Poisson cohorts (q = 0.8 of 5 clients), a fixed noise
multiplier, and a client_max_epsilon between the epsilon of 2 and of 3 rounds, so the
run must stop cleanly before round 3. The audit must then confirm the ledger. Two short
SecAgg+ runs check distributed noise, one of them with adaptive clipping.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import dp_accounting
import pytest

from fedguard.privacy.audit import ExitCode, recompute, run_audit
from fedguard.privacy.client_dp_accounting import Release, epsilon_of
from tests.cli_support import FEDGUARD, fedguard

SIGMA, CLIP, RATE, CLIENTS, DELTA = 0.8, 0.5, 0.8, 5, 1e-5
PLANNED_ROUNDS = 3

pytestmark = pytest.mark.simulation


def _epsilon_after(rounds: int) -> float:
    return epsilon_of([Release(SIGMA, RATE, CLIENTS, 4)] * rounds, "poisson", DELTA)


MAX_EPSILON = (_epsilon_after(2) + _epsilon_after(3)) / 2


@pytest.fixture(scope="module")
def client_dp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("client_dp") / "run"
    fedguard(
        "simulate", "dataset=digits", "model=mlp", "simulation=tiny", "privacy=client_dp", "progress=false",
        f"simulation.rounds={PLANNED_ROUNDS}", f"simulation.fraction_train={RATE}",
        "privacy.client_target_epsilon=null", f"privacy.client_noise_multiplier={SIGMA}",
        f"privacy.client_clip_norm={CLIP}", f"privacy.client_max_epsilon={MAX_EPSILON}", f"privacy.delta={DELTA}",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_run_stops_before_exceeding_client_max_epsilon(client_dp_run):
    summary = json.loads((client_dp_run / "summary.json").read_text())
    assert summary["rounds"] == 2 < PLANNED_ROUNDS
    assert "client_max_epsilon" in summary["stop_reason"]
    assert summary["privacy"]["federation"]["epsilon"] <= MAX_EPSILON


def test_federation_epsilon_equals_recomputation_from_recorded_history(client_dp_run):
    federation = json.loads((client_dp_run / "summary.json").read_text())["privacy"]["federation"]
    rounds = _rounds(client_dp_run)
    history = [(r["client_dp"]["noise_multiplier"], r["client_dp"]["sample_rate"], 1) for r in rounds]
    independent = recompute.rdp_epsilon(recompute.merge(history), federation["delta"])  # dp_accounting, not Opacus
    assert federation["epsilon"] == pytest.approx(independent, rel=recompute.DEFAULT_TOLERANCE)
    assert federation["rounds"] == len(rounds)
    assert (federation["sampling"], federation["sample_rate"], federation["noise_multiplier"]) == ("poisson", RATE, SIGMA)
    assert rounds[-1]["client_dp"]["epsilon"] == federation["epsilon"]


def test_every_round_records_the_released_noise_and_cohort(client_dp_run):
    for record in _rounds(client_dp_run):
        dp = record["client_dp"]
        assert dp["clip_norm"] == CLIP and dp["noise_std"] == pytest.approx(SIGMA * CLIP)
        assert 0 <= dp["survivors"] <= dp["cohort_size"] <= CLIENTS
        assert dp["expected_cohort"] == pytest.approx(RATE * CLIENTS)


def test_audit_confirms_the_client_dp_ledger(client_dp_run):
    proc = subprocess.run(
        [*FEDGUARD, "audit", str(client_dp_run), "--json", "--no-report"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    federation = json.loads(proc.stdout)["federation"]
    assert federation["status"] == "ok" and federation["mismatches"] == []
    assert federation["rounds"] == 2 and federation["budget"] == pytest.approx(MAX_EPSILON)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("client_dp_distributed") / "run"
    fedguard(
        "simulate", "dataset=digits", "model=mlp", "simulation=tiny", "privacy=client_dp", "progress=false",
        "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus", "secure_agg.clip_range=8", "simulation.rounds=2",
        "simulation.fraction_train=1.0", "privacy.client_target_epsilon=null", f"privacy.client_noise_multiplier={SIGMA}",
        f"privacy.client_clip_norm={CLIP}", f"hydra.run.dir={run_dir}",
    )
    return run_dir


def test_distributed_noise_under_secure_aggregation_is_accounted_and_audited(distributed_run):
    for record in _rounds(distributed_run):
        dp = record["client_dp"]
        assert dp["noise"] == "distributed" and dp["cohort_size"] == CLIENTS
        # the noise that really reached the sum: sigma * sqrt(survivors / expected cohort)
        assert dp["noise_multiplier"] == pytest.approx(SIGMA * (dp["survivors"] / CLIENTS) ** 0.5)
        assert dp["noise_std"] == pytest.approx(dp["noise_multiplier"] * CLIP)
    proc = subprocess.run(
        [*FEDGUARD, "audit", str(distributed_run), "--json", "--no-report"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["federation"]["status"] == "ok"


# Adaptive clipping under distributed noise: the clip indicators ride masked in SecAgg+.
COUNT_STD, QUANTILE, LEARNING_RATE, CLIP_RANGE = 1.0, 0.5, 0.2, 8.0


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("client_dp_adaptive") / "run"
    fedguard(
        "simulate", "dataset=digits", "model=mlp", "simulation=tiny", "privacy=client_dp", "progress=false",
        "privacy.client_clipping=adaptive", f"privacy.adaptive_clipping.clipped_count_stddev={COUNT_STD}",
        "privacy.noise=distributed", "privacy.client_sampling=fixed", "secure_agg=secaggplus", f"secure_agg.clip_range={CLIP_RANGE}", "simulation.rounds=3",
        "simulation.fraction_train=1.0", "privacy.client_target_epsilon=null", f"privacy.client_noise_multiplier={SIGMA}",
        f"privacy.client_clip_norm={CLIP}", f"hydra.run.dir={run_dir}",
    )
    return run_dir


def test_adaptive_clipping_under_secure_aggregation_moves_c_and_accounts_the_count(adaptive_run):
    update_sigma = (SIGMA**-2 - (2 * COUNT_STD) ** -2) ** -0.5  # Andrew et al. 2021, Theorem 1
    ceiling = CLIP_RANGE / (1 + 8 * update_sigma / CLIENTS**0.5)  # C whose noised update the clamp cannot cut
    rounds, clip = _rounds(adaptive_run), CLIP
    # Fixed-size cohorts (distributed noise needs them): replace-one neighbours, so the sensitivity is 2C.
    accountant = dp_accounting.rdp.RdpAccountant(
        orders=recompute.RDP_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    for record in rounds:
        dp = record["client_dp"]
        assert dp["clipping"] == "adaptive" and dp["clip_norm"] == pytest.approx(clip)  # C0, then what the rule gave
        kept = (dp["survivors"] / CLIENTS) ** 0.5  # the noise shares that reached the sums
        assert dp["update_noise_multiplier"] == pytest.approx(update_sigma * kept)
        assert dp["count_noise_std"] == pytest.approx(COUNT_STD * kept)
        assert dp["noise_multiplier"] == pytest.approx(SIGMA * kept)
        assert dp["noise_std"] == pytest.approx(dp["update_noise_multiplier"] * dp["clip_norm"])
        assert 0 <= dp["unclipped_fraction"] <= 1
        clip = min(ceiling, clip * math.exp(-LEARNING_RATE * (dp["unclipped_fraction"] - QUANTILE)))
        assert dp["next_clip_norm"] == pytest.approx(clip)
        sigma = (dp["update_noise_multiplier"] ** -2 + (2 * dp["count_noise_std"]) ** -2) ** -0.5
        replace_one = dp_accounting.GaussianDpEvent(sigma / 2)
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(CLIENTS, dp["cohort_size"], replace_one))
    federation = json.loads((adaptive_run / "summary.json").read_text())["privacy"]["federation"]
    assert (federation["clipping"], federation["rounds"], federation["clip_norm"]) == ("adaptive", 3, pytest.approx(clip))
    assert federation["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA), rel=recompute.DEFAULT_TOLERANCE)


def test_audit_confirms_an_adaptive_run_and_fails_on_a_tampered_sigma(adaptive_run, tmp_path):
    proc = subprocess.run([*FEDGUARD, "audit", str(adaptive_run), "--json", "--no-report"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    federation = json.loads(proc.stdout)["federation"]
    assert federation["status"] == "ok" and "adaptive clipping" in federation["assumptions"]
    tampered = Path(shutil.copytree(adaptive_run, tmp_path / "run"))
    lines = (tampered / "ledger.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"client_dp_release"' in line)
    entry = json.loads(lines[index])
    entry["body"]["noise_multiplier"] *= 2  # claim twice the noise that was added
    lines[index] = json.dumps(entry, sort_keys=True)
    (tampered / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    assert run_audit(tampered, tampered / "keys", with_pld=False).exit_code == ExitCode.INTEGRITY


# One client a round expected (the fewest the config allows): a cohort is empty with probability
# 0.8^5 = 0.33 per round, so 25 rounds hold at least one empty round except with probability 5e-5.
EMPTY_RATE, EMPTY_CLIENTS, EMPTY_ROUNDS = 0.2, 5, 25


def test_empty_poisson_cohorts_still_release_noise_and_are_accounted(tmp_path):
    """DP-FedAvg's round happens whoever is drawn: an empty cohort gets a noise-only release, on the ledger."""
    run_dir = tmp_path / "run"
    fedguard(
        "simulate", "dataset=digits", "model=logreg", "simulation=tiny", "privacy=client_dp", "progress=false",
        f"simulation.num_clients={EMPTY_CLIENTS}", f"simulation.rounds={EMPTY_ROUNDS}",
        f"simulation.fraction_train={EMPTY_RATE}", "simulation.min_clients_per_round=1", "train.max_steps=2",
        "privacy.client_target_epsilon=null",
        f"privacy.client_noise_multiplier={SIGMA}", f"privacy.client_clip_norm={CLIP}", f"hydra.run.dir={run_dir}",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds" and summary["rounds"] == EMPTY_ROUNDS
    releases = [r["client_dp"] for r in _rounds(run_dir)]
    assert len(releases) == EMPTY_ROUNDS and any(r["cohort_size"] == 0 for r in releases)
    for release in releases:
        assert release["noise_std"] == pytest.approx(SIGMA * CLIP) and release["sample_rate"] == EMPTY_RATE
    proc = subprocess.run([*FEDGUARD, "audit", str(run_dir), "--json", "--no-report"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["federation"]["rounds"] == EMPTY_ROUNDS
