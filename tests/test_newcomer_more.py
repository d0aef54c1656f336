"""Issue #21, "a newcomer's first hour", items 6-7: a client-level DP run whose noise swamps its
update, `fedguard run` against a SuperLink that is not there, the audit's epsilon plot, and
`flwr run .` in a checkout.

Every test here stops before an engine starts (about a second each, most in-process).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]


def fedguard(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FEDGUARD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- 6c. `fedguard run` against an unreachable SuperLink ---------------------------------------------
@pytest.mark.deployment  # starts a separate process
def test_run_against_an_unreachable_superlink_names_the_key_and_address(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked before the SuperLink answers\n")
    address = f"127.0.0.1:{free_port()}"
    proc = fedguard("run", f"deployment.superlink={address}", f"deployment.ca_cert={ca}", cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert f"deployment.superlink={address}" in proc.stderr, proc.stderr


# -- 6d. the audit's epsilon-per-client plot ---------------------------------------------------------
def _legend_labels(fig) -> list[str]:
    (ax,) = fig.axes
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _round_ticks_are_integers(fig) -> bool:
    (ax,) = fig.axes
    ticks = ax.get_xticks()
    return len(ticks) > 0 and all(float(t).is_integer() for t in ticks)


def test_epsilon_plot_labels_the_budget_and_ticks_whole_rounds(tmp_path):
    import matplotlib.pyplot as plt
    from fedguard.privacy.audit import run_audit
    from fedguard.privacy.audit.synthetic import build_synthetic_run
    from fedguard.simulations.audit_report import epsilon_figure

    build_synthetic_run(tmp_path, clients=3, rounds=3, client_budget=50.0)
    result = run_audit(tmp_path, tmp_path / "keys", with_pld=False)
    fig = epsilon_figure(result.spend.clients)
    try:
        labels = _legend_labels(fig)
        assert "budget ε = 50" in labels, labels
        assert _round_ticks_are_integers(fig), fig.axes[0].get_xticks()
        assert {"client 0", "client 1", "client 2"} <= set(labels), labels
    finally:
        plt.close(fig)


def _client(name: str, epsilons: list[float], budget: float | None):
    from fedguard.privacy.audit.spend import SpendAudit, TimelinePoint

    timeline = [TimelinePoint(round=r, reported=e, recomputed=e) for r, e in enumerate(epsilons, start=1)]
    return SpendAudit(name=name, rounds=len(epsilons), epsilon_reported=epsilons[-1], budget=budget, timeline=timeline)


def test_epsilon_plot_legend_survives_many_and_overlapping_clients():
    import matplotlib.pyplot as plt
    from fedguard.simulations.audit_report import MAX_LABELLED_CLIENTS, epsilon_figure

    # Twelve clients on six trajectories (pairs overlap exactly), two budgets, over 7 rounds.
    clients = {
        str(i): _client(str(i), [(i // 2 + 1) * 0.1 * r for r in range(1, 8)], 4.0 if i < 6 else 8.0)
        for i in range(12)
    }
    fig = epsilon_figure(clients)
    try:
        (ax,) = fig.axes
        labels = _legend_labels(fig)
        assert "clients 0, 1" in labels and "clients 10, 11" in labels, labels
        assert any(label.startswith("budget ε = 4 (clients 0, 1, 2, 3 and 2 more)") for label in labels), labels
        assert any(label.startswith("budget ε = 8") for label in labels), labels
        styles = {(line.get_linestyle(), line.get_marker()) for line in ax.get_lines() if not line.get_label().startswith("budget")}
        assert len(styles) == 6  # every trajectory drawn its own way
        assert _round_ticks_are_integers(fig)
        # The legend sits outside the axes: it cannot cover a line.
        assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1
    finally:
        plt.close(fig)

    crowd = {str(i): _client(str(i), [0.01 * (i + 1) * r for r in range(1, 4)], None) for i in range(MAX_LABELLED_CLIENTS + 5)}
    fig = epsilon_figure(crowd)
    try:
        labels = _legend_labels(fig)
        assert labels == [f"{MAX_LABELLED_CLIENTS + 5} clients (one thin line each)", "max over clients"], labels
        assert _round_ticks_are_integers(fig)
    finally:
        plt.close(fig)


# -- 6a. client-level DP noise that swamps the update ------------------------------------------------
def test_noise_to_signal_is_sigma_root_d_over_cohort():
    from fedguard.privacy.client_dp_accounting import ClientDpPlan, CohortPlan
    from fedguard.privacy.client_dp_noise import cohort_for_signal, update_signal

    plan = ClientDpPlan(CohortPlan("poisson", 100, 0.5, 50), rounds=10, delta=1e-5, clip_norm=1.0, noise_multiplier=2.0)
    signal = update_signal(plan, parameters=10_000)
    assert signal.noise_to_signal == 2.0 * 100 / 50 and signal.swamped
    assert cohort_for_signal(plan, 10_000) == 200  # n >= sigma sqrt(d), sigma fixed
    assert not update_signal(plan, parameters=400).swamped  # 2 x 20 / 50 = 0.8


def test_adaptive_clipping_cohort_accounts_for_the_count_share():
    from fedguard.privacy.client_dp_accounting import (
        DEFAULT_COUNT_STDDEV_PER_CLIENT,
        ClientDpPlan,
        CohortPlan,
    )
    from fedguard.privacy.client_dp_noise import NoiseSplit, cohort_for_signal

    plan = ClientDpPlan(CohortPlan("poisson", 5, 1.0, 5), rounds=10, delta=1e-5, clip_norm=1.0, noise_multiplier=1.0,
                        adaptive=True)
    n = cohort_for_signal(plan, 10_000)
    update = lambda m: NoiseSplit.of(1.0, m * DEFAULT_COUNT_STDDEV_PER_CLIENT).update_sigma  # noqa: E731
    assert update(n) * 100 / n <= 1 < update(n - 1) * 100 / (n - 1)  # the first cohort that fits, not sigma's bound
    assert n > 100


def test_default_client_dp_warns_with_the_numbers_and_the_cohort_it_needs():
    from fedguard.conf import compose_config
    from fedguard.conf.plans import client_dp_plan
    from fedguard.privacy.client_dp_accounting import planned_noise_multiplier
    from fedguard.server.noise_check import (
        model_parameter_count,
        swamped_update_warning,
    )

    cfg = compose_config(["privacy=client_dp"])  # 5 clients, all of them each round, mlp on digits
    d = model_parameter_count(cfg)
    assert d == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    sigma = planned_noise_multiplier(client_dp_plan(cfg))
    warning = swamped_update_warning(cfg)
    assert warning is not None and "swamp" in warning
    assert f"{sigma * d ** 0.5 / 5:.3g} x the clip norm" in warning, warning
    needed = int(-(-sigma * d ** 0.5 // 1))  # at rate 1 the calibrated sigma does not move with the population
    assert f">= {needed:,} clients" in warning and f"simulation.num_clients={needed}" in warning, warning


def test_no_warning_where_the_cohort_is_large_enough_or_client_dp_is_off():
    from fedguard.conf import compose_config
    from fedguard.server.noise_check import swamped_update_warning

    assert swamped_update_warning(compose_config([])) is None
    assert swamped_update_warning(compose_config(["privacy=sample_dp"])) is None
    large = ["privacy=client_dp", "model=logreg", "simulation.num_clients=100", "simulation.fraction_train=0.5",
             "privacy.client_target_epsilon=null", "privacy.client_noise_multiplier=1.0"]
    assert swamped_update_warning(compose_config(large)) is None  # 1 x sqrt(650) / 50 = 0.51


@pytest.mark.deployment  # starts a separate process
def test_cli_check_prints_the_swamp_warning_once(tmp_path):
    proc = fedguard("simulate", "privacy=client_dp", "--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("noise will swamp the update") == 1, proc.stderr


# -- 7. `flwr run .` in a checkout ---------------------------------------------------------------------
def test_bare_flwr_run_is_told_apart_from_fedguard_runs(tmp_path):
    from fedguard.server.flower_cli_guard import bare_flwr_run

    flwr = "/venv/bin/flwr"
    config_file = tmp_path / "run.toml"
    config_file.write_text('fedguard-config = "seed: 1"\nrun-dir = ""\n')
    assert bare_flwr_run([flwr, "run", "."])
    assert bare_flwr_run([flwr, "run"])
    assert bare_flwr_run([flwr, "run", ".", "local", "-c", "num-server-rounds=3", "--stream"])
    assert not bare_flwr_run([flwr, "run", "/src/fedguard", "fedguard", "--run-config", str(config_file)])  # fedguard run
    assert not bare_flwr_run([flwr, "run", ".", "--run-config=fedguard-config='seed: 1'"])
    assert not bare_flwr_run([flwr, "run", "@flwrlabs/other-app"])
    assert not bare_flwr_run([flwr, "ls"])
    assert not bare_flwr_run(["/venv/bin/flwr-serverapp", "run"])
    assert not bare_flwr_run(["pytest", "run"])


@pytest.mark.deployment  # starts a separate process
def test_flwr_run_in_the_checkout_refuses_before_starting_a_superlink(tmp_path):
    """Flower's own CLI, as a user types it. Made safe even if the refusal regressed: a
    private Flower home and local-SuperLink port, and no `flower-superlink` on PATH, so
    Flower could neither start a SuperLink nor reach anyone else's."""
    flwr = Path(sys.executable).with_name("flwr")
    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": "/usr/bin:/bin",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(flwr), "run", "."], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "fedguard simulate" in output and "fedguard run" in output, output
    assert "Starting local SuperLink" not in output, output
    assert not (home / "local-superlink").exists() and not (home / "runtime-envs").exists()
