"""What a reviewer reads: a console table, ``report.md`` and two PNG plots."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; audits run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedguard.privacy.audit.recompute import PLD_VALUE_DISCRETIZATION, RDP_ORDERS  # noqa: E402
from fedguard.privacy.audit.runner import AuditResult, ExitCode  # noqa: E402
from fedguard.privacy.audit.spend import OK, SpendAudit, client_sort_key  # noqa: E402

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
EPSILON_PLOT = "epsilon_per_client.png"
ACCURACY_PLOT = "accuracy_vs_epsilon.png"
# Beyond this many distinct trajectories the plot draws thin translucent lines plus the maximum.
MAX_LABELLED_CLIENTS = 10
# A legend entry for clients sharing one trajectory names this many, then "and N more".
MAX_NAMES_PER_ENTRY = 4
# Distinct per trajectory, so lines that cross or touch stay apart in print and for colour-blind readers.
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "<")
# Matplotlib's tab10 without red: red is the budget line's colour.
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
BUDGET_COLOUR = "tab:red"
FIGURE_SIZE = (7.0, 4.5)
FIGURE_DPI = 120
CROWD_ALPHA = 0.15


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _rows(result: AuditResult) -> list[tuple[str, SpendAudit]]:
    rows = [(f"client {name}", audit) for name, audit in result.spend.clients.items()]
    if result.spend.federation is not None:
        rows.append(("federation (client-level)", result.spend.federation))
    return rows


def print_table(result: AuditResult, console: Console) -> None:
    table = Table(title=f"fedguard audit: {result.ledger_path}")
    for column in ("party", "rounds", "steps", "acct", "ε reported", "ε recomputed", "ε PLD", "budget", "status"):
        table.add_column(column, justify="left" if column in ("party", "status") else "right")
    for label, audit in _rows(result):
        style = "green" if audit.status == OK else "bold red"
        table.add_row(
            label,
            str(audit.rounds),
            str(audit.steps),
            audit.accountant,
            _num(audit.epsilon_reported),
            _num(audit.epsilon_same_method),
            _num(audit.epsilon_pld),
            _num(audit.budget),
            f"[{style}]{audit.status}[/]",
        )
    console.print(table)
    problem = result.verification.problem
    integrity = "intact" if problem is None else f"[bold red]BROKEN[/] at {problem.describe()}"
    console.print(f"ledger: {result.verification.entries_verified}/{result.verification.entries_total} entries verified; {integrity}")
    for finding in result.run_findings:
        console.print(f"[red]finding:[/] {finding}")
    style = "bold green" if result.exit_code == ExitCode.OK else "bold red"
    console.print(f"[{style}]{result.verdict}[/] (exit code {int(result.exit_code)})")


def _markdown_table(result: AuditResult) -> list[str]:
    lines = [
        "| party | rounds | steps | refusals | accountant | δ | ε reported | ε recomputed (same method) | ε PLD | budget | status |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, audit in _rows(result):
        delta = "-" if audit.delta is None else f"{audit.delta:g}"
        lines.append(
            f"| {label} | {audit.rounds} | {audit.steps} | {audit.refusals} | {audit.accountant} | {delta} | "
            f"{_num(audit.epsilon_reported)} | {_num(audit.epsilon_same_method)} | {_num(audit.epsilon_pld)} | "
            f"{_num(audit.budget)} | {audit.status} |"
        )
    return lines


def write_report(result: AuditResult, out_dir: Path, plots: list[str]) -> Path:
    """``report.md`` for a data protection officer: what was checked, under which assumptions, verdict."""
    verification = result.verification
    problem = verification.problem
    run = result.spend.run
    lines = [
        "# Privacy audit report",
        "",
        f"**Verdict: {result.verdict}** (exit code {int(result.exit_code)})",
        "",
        "## What was verified",
        "",
        f"- Ledger `{result.ledger_path}` (id `{verification.ledger_id}`): "
        f"{verification.entries_verified} of {verification.entries_total} entries verified, "
        f"{verification.embedded_entries} of them client-signed entries countersigned by the server.",
        "- Every line is canonical JSON; each entry holds the SHA-256 of the previous line (hash chain) "
        "and an Ed25519 signature of the party that spent the privacy, checked against the key registry "
        f"`{result.keys_source}`, which binds each key to one party.",
        f"- Integrity: **{'intact' if problem is None else 'BROKEN at ' + problem.describe()}**.",
    ]
    if not result.finished:
        lines.append(
            "- No `run_finished` entry: the run is still going or crashed, or entries were cut off the end "
            "(a hash chain cannot show a missing tail)."
        )
    if result.keys_from_run_dir:
        lines.append(
            "- **Caution:** the public keys were taken from the run directory itself. That proves the ledger is "
            "consistent with those keys, not that the keys belong to the named parties; pass `--keys` with a "
            "registry obtained independently."
        )
    if run:
        lines.append(f"- Run `{run.get('run_id')}`, config SHA-256 `{run.get('config_hash')}`.")
    lines += [
        "",
        "## Accounting and its assumptions",
        "",
        "- Each epsilon is recomputed from the recorded mechanism parameters with Google's `dp_accounting`, "
        "independently of the Opacus accountant used in the run.",
        "- Sample level (per client): DP-SGD as a Poisson-subsampled Gaussian mechanism with add/remove-one-record "
        "neighbours, composed over every step of every round the client trained in. Runs that reported RDP "
        f"are checked against dp_accounting RDP (orders {RDP_ORDERS[0]}..{RDP_ORDERS[-1]}, Opacus's grid) at "
        "every event; runs that reported PRV against a privacy-loss-distribution (PLD) figure of the final history.",
        f"- PLD is the tight reference (pessimistic discretisation {PLD_VALUE_DISCRETIZATION:g}). RDP is an upper "
        "bound and is typically larger.",
        "- Client level (federation): one Gaussian release of the clipped sum per round; Poisson cohorts as above "
        "with add/remove-one client; fixed-size cohorts as sampling without replacement under replace-one-client "
        "neighbours (the relation for which that bound is proven). The noise multiplier used is the smaller of the "
        "stated one and noise std / clip norm; with adaptive clipping, the smaller of the stated one and the one "
        "Gaussian that the update sum (noise std / clip norm) and the clip count (noise std σ_b, sensitivity 1/2) "
        "amount to together, (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Theorem 1).",
        "- Assumed, not checkable from the ledger: that sampling really was Poisson (or fixed) as recorded, that "
        "gradients were clipped at the recorded norm, and that no release happened without a ledger entry.",
        f"- A mismatch is flagged when the recomputation exceeds the reported epsilon by more than "
        f"{result.tolerance:.1%} (relative).",
        "",
        "## Per-client spend",
        "",
        *_markdown_table(result),
        "",
    ]
    problems = [(label, audit) for label, audit in _rows(result) if audit.mismatches]
    if problems or result.run_findings:
        lines += ["## Findings", ""]
        lines += [f"- {label}: {message}" for label, audit in problems for message in audit.mismatches]
        lines += [f"- {finding}" for finding in result.run_findings]
        lines.append("")
    federation = result.spend.federation
    lines += ["## Federation (client-level DP)", ""]
    if federation is None:
        lines.append("No client-level releases were recorded: the run did not use client-level DP.")
    else:
        lines.append(
            f"{federation.rounds} releases; ε reported {_num(federation.epsilon_reported)}, recomputed "
            f"{_num(federation.epsilon_same_method)} at δ {federation.delta:g}; budget {_num(federation.budget)}; "
            f"{federation.assumptions}; status **{federation.status}**."
        )
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _names(names: list[str]) -> str:
    """"client 3" or "clients 0, 1, 2, 3 and 5 more": a legend entry stays one short line."""
    if len(names) == 1:
        return f"client {names[0]}"
    shown = ", ".join(names[:MAX_NAMES_PER_ENTRY])
    rest = len(names) - MAX_NAMES_PER_ENTRY
    return f"clients {shown}" + (f" and {rest} more" if rest > 0 else "")


def _trajectories(clients: dict[str, SpendAudit]) -> list[tuple[list[str], list[int], list[float]]]:
    """Clients grouped by identical epsilon trajectories (names, rounds, epsilons), in client order.

    Why: clients with the same data size and schedule spend exactly the same epsilon, so their
    lines lie on top of each other and only the last one drawn would be visible; one line per
    distinct trajectory, labelled with every client on it, shows all of them.
    """
    groups: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for name in sorted(clients, key=client_sort_key):
        key = tuple((point.round, round(point.reported, 12)) for point in clients[name].timeline)
        groups.setdefault(key, []).append(name)
    return [(names, [r for r, _ in key], [e for _, e in key]) for key, names in groups.items()]


def epsilon_figure(clients: dict[str, SpendAudit]) -> Figure | None:
    """Cumulative sample-level epsilon per client by round, with each budget as a labelled line.

    Integer round ticks (rounds are whole), one distinct style per trajectory, and the legend
    outside the axes so it never hides a line. Beyond MAX_LABELLED_CLIENTS distinct
    trajectories the clients are thin translucent lines with their maximum drawn on top.
    None when no client spent anything.
    """
    if not clients:
        return None
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    trajectories = _trajectories(clients)
    crowded = len(trajectories) > MAX_LABELLED_CLIENTS
    if crowded:
        by_round: dict[int, float] = {}
        for index, (names, rounds, values) in enumerate(trajectories):
            label = f"{len(clients)} clients (one thin line each)" if index == 0 else None
            ax.plot(rounds, values, color="tab:blue", alpha=CROWD_ALPHA, linewidth=0.8, label=label)
            for round_number, value in zip(rounds, values):
                by_round[round_number] = max(by_round.get(round_number, 0.0), value)
        top = sorted(by_round)
        ax.plot(top, [by_round[r] for r in top], color="tab:blue", linewidth=1.8, label="max over clients")
    else:
        for index, (names, rounds, values) in enumerate(trajectories):
            ax.plot(
                rounds, values, label=_names(names), color=COLOURS[index % len(COLOURS)],
                linestyle=LINE_STYLES[index % len(LINE_STYLES)], marker=MARKERS[index % len(MARKERS)],
            )
    budgets: dict[float, list[str]] = {}
    for name in sorted(clients, key=client_sort_key):
        if clients[name].budget is not None:
            budgets.setdefault(float(clients[name].budget), []).append(name)
    for budget, names in sorted(budgets.items()):
        whose = "" if len(budgets) == 1 else f" ({_names(names)})"
        ax.axhline(budget, color=BUDGET_COLOUR, linestyle="--", linewidth=1, label=f"budget ε = {budget:g}{whose}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (reported)")
    ax.set_title(f"Sample-level ε per client ({len(clients)} client{'s' if len(clients) != 1 else ''})")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_epsilon(result: AuditResult, out_dir: Path) -> Path | None:
    """epsilon_per_client.png from :func:`epsilon_figure`; None when no client spent anything."""
    fig = epsilon_figure(result.spend.clients)
    if fig is None:
        return None
    path = out_dir / EPSILON_PLOT
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")  # keeps the legend outside the axes in the file
    plt.close(fig)
    return path


def plot_accuracy(result: AuditResult, out_dir: Path) -> Path | None:
    """Test accuracy against the largest client epsilon reached by each round."""
    if not result.accuracy_by_round or not result.spend.clients:
        return None
    by_round: dict[int, float] = {}
    for audit in result.spend.clients.values():
        for point in audit.timeline:
            by_round[point.round] = max(by_round.get(point.round, 0.0), point.reported)
    rounds = sorted(r for r in result.accuracy_by_round if r in by_round)
    if not rounds:
        return None
    running, epsilons = 0.0, []
    for round_number in rounds:
        running = max(running, by_round[round_number])
        epsilons.append(running)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ax.plot(epsilons, [result.accuracy_by_round[r] for r in rounds], marker="o")
    ax.set_xlabel("max client ε so far (sample level)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs privacy spent")
    path = out_dir / ACCURACY_PLOT
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def write_outputs(result: AuditResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [path for path in (plot_epsilon(result, out_dir), plot_accuracy(result, out_dir)) if path is not None]
    report = write_report(result, out_dir, [path.name for path in plots])
    return [report, *plots]
