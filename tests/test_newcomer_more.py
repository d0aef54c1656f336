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
