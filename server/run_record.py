"""What a run leaves behind in its directory, and what the terminal shows while it runs.

``metrics.jsonl`` gets one fsync'ed line per round (so a crash loses at most the round
in flight), ``summary.json`` is written at the end, and a rich progress bar tracks rounds.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedguard.conf.run_config import cached_config_from_yaml
from fedguard.privacy.sample_dp_claim import sample_dp_claim

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
# What marks a directory as holding a run's results (checkpoints: server/checkpoint.py's CHECKPOINT_DIR).
# The summary table's privacy row per privacy.mode.
PRIVACY_ROW_TEXT = {
    "none": "none: no differential privacy, updates may reveal individual records",
    "sample_dp": "sample_dp: DP-SGD on every client (record level)",
    "client_dp": "client_dp: DP-FedAvg (whole-client level)",
    "sample_and_client_dp": "sample_and_client_dp: DP-SGD on clients and DP-FedAvg at the server",
}
RESULT_MARKERS = (METRICS_FILE, SUMMARY_FILE, "checkpoints")
# Everything a run writes that a second run must not mix with: the markers, the ledger and its
# keys (server/privacy_ledger.py), the virtual sites' state (simulations/simulate.py), the config.
RUN_OUTPUTS = (*RESULT_MARKERS, "ledger.jsonl", "keys", "client-state", CONFIG_FILE)


def existing_results(run_dir: Path) -> list[str]:
    """Names of result files/folders already in ``run_dir`` (empty when it is free to use)."""
    return [name for name in RESULT_MARKERS if (run_dir / name).exists()]


def clear_results(run_dir: Path) -> list[str]:
    """Remove a previous run's outputs from ``run_dir`` (``overwrite=true``); returns what went.

    Only fedguard's own outputs are removed, never other files a user keeps there; the old
    virtual sites' state goes too, so the new run's privacy accounting starts from zero, as in
    a fresh directory.
    """
    import shutil

    removed = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


@dataclass(frozen=True)
class RoundRecord:
    round: int
    test_loss: float
    test_accuracy: float
    train_loss: float | None
    round_seconds: float
    clients_sampled: int
    clients_replied: int
    clients_failed: int
    clients_refused: int = 0
    # Replies dropped before aggregation as malformed (NaN, wrong shapes, bad counts); also in clients_failed.
    clients_rejected: int = 0
    federated_eval_loss: float | None = None
    federated_eval_accuracy: float | None = None
    # One privacy report per replying client (sample-level DP): epsilon so far, delta,
    # noise multiplier, sample rate, steps this round and in total, accountant, refused.
    privacy: list[dict[str, Any]] = field(default_factory=list)
    # Client-level DP (DP-FedAvg) of this round: clip norm, noise std of the released sum,
    # cohort size, survivors, the federation's epsilon so far; with adaptive clipping also
    # sigma_update, sigma_b, the noisy count and fraction within C, and the next C; None when off.
    client_dp: dict[str, Any] | None = None


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON; write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(_json_safe(record), sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunRecorder:
    """Writes the run directory and drives the console; one instance per run."""

    def __init__(self, run_dir: Path, config_yaml: str, total_rounds: int, show_progress: bool) -> None:
        self.run_dir = run_dir
        self.config_yaml = config_yaml
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        self.metrics_path = self.run_dir / METRICS_FILE
        self.rounds: list[RoundRecord] = []
        self.client_privacy: dict[int, dict[str, Any]] = {}  # partition id -> latest report
        self.started = time.perf_counter()
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        if show_progress:
            self._progress = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("accuracy -", total=total_rounds)

    def resume_after(self, completed_round: int) -> None:
        """Continue a crashed run's record: keep its rounds up to the checkpointed one.

        metrics.jsonl is fsync'ed before the round's checkpoint is written, so after a crash
        it may hold one round the checkpoint lacks; that round is run again, so its old line goes.
        """
        kept: list[dict[str, Any]] = []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines() if self.metrics_path.exists() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break  # the last line, cut short by the crash
                raise
            if int(entry["round"]) <= completed_round:
                kept.append(entry)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        for entry in kept:
            record = RoundRecord(**entry)
            self.rounds.append(record)
            for report in record.privacy:
                self.client_privacy[int(report["partition-id"])] = report
        if self._progress is not None:
            self._progress.update(self._task, completed=len(kept))

    def record_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        for report in record.privacy:
            self.client_privacy[int(report["partition-id"])] = report
        append_jsonl(self.metrics_path, asdict(record))
        if self._progress is not None:
            self._progress.update(
                self._task, advance=1, description=f"accuracy {record.test_accuracy:.4f}  loss {record.test_loss:.4f}"
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json and print the summary table; returns what was written."""
        self.close()
        summary = {"wall_seconds": time.perf_counter() - self.started, "rounds": len(self.rounds), **summary}
        if self.rounds:
            last = self.rounds[-1]
            summary["final"] = {
                "accuracy": last.test_accuracy,
                "loss": last.test_loss,
                "train_loss": last.train_loss,
                "federated_eval_accuracy": last.federated_eval_accuracy,
            }
            summary["mean_round_seconds"] = sum(r.round_seconds for r in self.rounds) / len(self.rounds)
            # Round 1 also pays for the engine's workers starting (Ray starts them on the first
            # messages), so its time says little about the rounds after it.
            later = [r.round_seconds for r in self.rounds[1:]]
            summary["mean_round_seconds_after_first"] = sum(later) / len(later) if later else None
        if self.client_privacy:
            summary["privacy"] = {**summary.get("privacy", {}), **self._privacy_summary()}
        write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        self._print_table(summary)
        return summary

    def _privacy_summary(self) -> dict[str, Any]:
        keys = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps_total", "rounds_participated", "accountant")
        table = {
            str(pid): {key: report[key] for key in keys} | {"refused": bool(report["refused"])}
            for pid, report in sorted(self.client_privacy.items())
        }
        epsilons = [report["epsilon"] for report in self.client_privacy.values()]
        release = bool(cached_config_from_yaml(self.config_yaml).privacy.release_unaccounted_metrics)
        return {
            "clients": table, "max_epsilon": max(epsilons), "mean_epsilon": sum(epsilons) / len(epsilons),
            **sample_dp_claim(release),
        }

    def _print_table(self, summary: dict[str, Any]) -> None:
        table = Table(title="fedguard run summary", show_header=False)
        table.add_column("what", no_wrap=True)
        table.add_column("value", overflow="fold")  # wrap long values (a run directory path), never cut them
        final = summary.get("final", {})
        rows = [
            ("run directory", str(self.run_dir)),
            ("stopped because", str(summary.get("stop_reason", "-"))),
            ("rounds", str(summary["rounds"])),
            ("clients (total / per round)", f"{summary['clients']['total']} / {summary['clients']['per_round']}"),
            ("final test accuracy", f"{final.get('accuracy', float('nan')):.4f}"),
            ("final test loss", f"{final.get('loss', float('nan')):.4f}"),
            ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ]
        privacy = summary.get("privacy", {})
        # Always a privacy row: a run without DP must say so, not just omit the epsilon.
        mode = str(summary.get("privacy_mode", "none"))
        rows.append(("privacy", PRIVACY_ROW_TEXT.get(mode, mode)))
        federation = privacy.get("federation")
        if isinstance(federation, dict) and "epsilon" in federation:
            rows.extend(_client_level_rows(federation))
        if "max_epsilon" in privacy:
            delta = next(iter(privacy["clients"].values()))["delta"]
            rows.append(
                ("sample-level epsilon (max / mean)", f"{privacy['max_epsilon']:.3f} / {privacy['mean_epsilon']:.3f}"
                 f"  at delta {delta:g}, {privacy.get('neighbouring_relation', '?')}, dataset sizes public; per "
                 "training record, against anyone who sees a site's updates or the models (README: privacy model)")
            )
            if privacy.get("unaccounted_releases"):
                rows.append(("sent without any epsilon", ", ".join(privacy["unaccounted_releases"])))
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)


# How the console names client-level DP's observers (summary.json's epsilon_by_observer keys).
OBSERVER_WORDS = {
    "model_users_and_other_sites": "against users of the models and other sites",
    "knows_cohorts": "against anyone who knows the cohorts (run directory, broken TLS)",
    "server_operator": "against the server operator",
}


def _client_level_rows(federation: dict[str, Any]) -> list[tuple[str, str]]:
    """One row per observer: a client-level epsilon is only true against the party it names."""
    delta = federation.get("delta", float("nan"))
    by_observer = federation.get("epsilon_by_observer") or {"model_users_and_other_sites": federation["epsilon"]}
    rows = []
    for observer, epsilon in by_observer.items():
        figure = "none holds (it sees updates before the noise)" if epsilon is None else f"{epsilon:.3f}  at delta {delta:g}"
        rows.append((f"client-level epsilon, {OBSERVER_WORDS.get(observer, observer)}", figure))
    return rows

