"""Issue #21, "a newcomer's first hour": settings that silently did nothing, run directories
that mixed two runs, and mistakes that surfaced only after Ray had started.

Most checks call the pure functions in-process; the CLI tests fail before the engine starts,
and all but one run the CLI's ``main`` in this process. Only the tests marked ``simulation`` train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedguard.conf import ConfigError, compose_config
from fedguard.conf.mode_keys import (
    PRIVACY_KEYS_BY_MODE,
    SECURE_AGG_KEYS_BY_MODE,
    ChosenModes,
    keys_from_overrides,
    unused_key_error,
)

FEDGUARD = [sys.executable, "-m", "fedguard.simulations.cli"]
CONF = Path(__file__).resolve().parents[1] / "conf"


def fedguard(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``fedguard ARGS`` as a user runs it: a new process (its imports, exit code and streams)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*FEDGUARD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def fedguard_here(capsys, monkeypatch, tmp_path):
    """``fedguard ARGS`` through the same ``main`` in this process, from ``tmp_path``.

    The refusals happen before Hydra or Ray start, so the in-process call sees exactly what
    a new process would, without paying the ~5 s of imports per call; one test per refusal
    kind still goes through a real process (``fedguard`` above).
    """
    from fedguard.simulations.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["fedguard", *args], code, out.out, out.err)

    return run


# -- 1. privacy keys the chosen mode ignores -------------------------------------------------------
@pytest.mark.parametrize(
    ("modes", "key", "expected"),
    [
        (ChosenModes("none", "off"), "privacy.target_epsilon",
         "privacy.target_epsilon has no effect with privacy=none; did you mean privacy=sample_dp"),
        (ChosenModes("none", "off"), "privacy.delta", "privacy.delta has no effect with privacy=none"),
        (ChosenModes("sample_dp", "off"), "privacy.client_noise_multiplier",
         "has no effect with privacy=sample_dp; did you mean privacy=sample_and_client_dp"),
        (ChosenModes("client_dp", "off"), "privacy.noise_multiplier", "privacy.client_noise_multiplier"),
        (ChosenModes("client_dp", "off"), "privacy.max_grad_norm", "privacy=sample_and_client_dp"),
        (ChosenModes("client_dp", "off", "fixed"), "privacy.adaptive_clipping.learning_rate",
         "has no effect with privacy.client_clipping=fixed; did you mean privacy.client_clipping=adaptive?"),
        (ChosenModes("sample_dp", "off"), "privacy.adaptive_clipping.target_quantile", "privacy.client_clipping=adaptive"),
        (ChosenModes("sample_dp", "off"), "secure_agg.threshold",
         "secure_agg.threshold has no effect with secure_agg=off; did you mean secure_agg=secaggplus?"),
    ],
)
def test_a_key_the_mode_ignores_is_refused(modes, key, expected):
    message = unused_key_error(modes, [key])
    assert message is not None and expected in message


@pytest.mark.parametrize(
    ("modes", "keys"),
    [
        (ChosenModes("sample_dp", "off"), ["privacy.target_epsilon", "privacy.delta", "privacy.mode"]),
        (ChosenModes("client_dp", "secaggplus", "adaptive"),
         ["privacy.adaptive_clipping.clipped_count_stddev", "privacy.noise", "secure_agg.clip_range"]),
        (ChosenModes("sample_and_client_dp", "off"), ["privacy.noise_multiplier", "privacy.client_noise_multiplier"]),
        (ChosenModes("none", "off"), ["privacy.mode", "secure_agg.mode", "train.learning_rate", "seed"]),
    ],
)
def test_keys_the_mode_reads_pass(modes, keys):
    assert unused_key_error(modes, keys) is None


def test_every_offending_key_is_named_in_one_message():
    message = unused_key_error(ChosenModes("none", "off"), ["privacy.target_epsilon", "secure_agg.threshold"])
    assert message is not None and "privacy.target_epsilon" in message and "secure_agg.threshold" in message


def test_keys_from_overrides_skips_group_choices_and_hydra():
    overrides = ["privacy=sample_dp", "+privacy.delta=1e-6", "++secure_agg.threshold=3", "~privacy.noise",
                 "hydra.run.dir=x", "seed=1", "privacy.adaptive_clipping.learning_rate=0.1"]
    assert keys_from_overrides(overrides) == [
        "privacy.delta", "secure_agg.threshold", "privacy.adaptive_clipping.learning_rate"
    ]


@pytest.mark.parametrize(("group", "table"), [("privacy", PRIVACY_KEYS_BY_MODE), ("secure_agg", SECURE_AGG_KEYS_BY_MODE)])
def test_the_table_knows_every_key_each_yaml_sets(group, table):
    """A key added to a mode's YAML but not to the table would be refused for that mode."""
    for path in sorted((CONF / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert set(values) <= table[values["mode"]], f"{path.name}: {set(values) - table[values['mode']]}"


def test_compose_config_refuses_privacy_keys_without_the_mode():
    with pytest.raises(ConfigError, match="privacy.target_epsilon has no effect with privacy=none"):
        compose_config(["privacy.target_epsilon=3"])
    with pytest.raises(ConfigError, match="secure_agg=secaggplus"):
        compose_config(["secure_agg.neighbours=3"])
    assert compose_config(["privacy=sample_dp", "privacy.target_epsilon=3"]).privacy.target_epsilon == 3


def test_summary_table_always_has_a_privacy_row(tmp_path):
    from rich.console import Console

    from fedguard.server.run_record import RunRecorder

    recorder = RunRecorder(tmp_path, "seed: 1\n", total_rounds=1, show_progress=False)
    recorder.console = Console(record=True, width=200, file=open(os.devnull, "w"))
    recorder.finish({"clients": {"total": 5, "per_round": 5}, "privacy_mode": "none"})
    text = recorder.console.export_text()
    assert "privacy" in text and "none: no differential privacy" in text


# -- 2. one run per directory ----------------------------------------------------------------------
def test_run_dir_with_results_is_refused_unless_overwritten(tmp_path):
    from fedguard.server.run_record import clear_results, existing_results
    from fedguard.simulations.preflight import check_run_dir

    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert existing_results(tmp_path) == ["metrics.jsonl", "checkpoints"]
    with pytest.raises(ConfigError, match="already holds a run's results"):
        check_run_dir(compose_config([]), tmp_path)
    check_run_dir(compose_config(["overwrite=true"]), tmp_path)  # allowed
    assert clear_results(tmp_path) == ["metrics.jsonl", "checkpoints"]
    assert existing_results(tmp_path) == [] and (tmp_path / "notes.txt").exists()


def test_a_resumed_run_logs_into_its_own_directory():
    from fedguard.simulations.preflight import resume_overrides, split_args

    args = split_args(["--check", "resume=/runs/a", "seed=1"])
    assert args.check_only and args.overrides == ["resume=/runs/a", "seed=1"] and "--check" not in args.hydra_argv
    cfg = compose_config(["resume=/runs/a"])
    assert resume_overrides(args, cfg) == ["hydra.run.dir=/runs/a", "hydra.output_subdir=.hydra-resume"]
    chosen = split_args(["resume=/runs/a", "hydra.run.dir=/elsewhere"])
    assert resume_overrides(chosen, cfg) == []  # the user's choice stands (load_resume_point checks it)


def test_round_one_is_reported_apart_from_the_later_rounds(tmp_path):
    from rich.console import Console

    from fedguard.server.run_record import RoundRecord, RunRecorder

    recorder = RunRecorder(tmp_path, "seed: 1\n", total_rounds=3, show_progress=False)
    recorder.console = Console(record=True, file=open(os.devnull, "w"))
    for number, seconds in enumerate([9.0, 1.0, 2.0], start=1):
        recorder.record_round(RoundRecord(number, 0.5, 0.9, 0.4, seconds, 5, 5, 0))
    summary = recorder.finish({"clients": {"total": 5, "per_round": 5}})
    assert summary["mean_round_seconds"] == 4.0 and summary["mean_round_seconds_after_first"] == 1.5


# -- 3. errors before start-up, through the CLI ----------------------------------------------------
def _one_line_refusal(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.deployment  # starts a separate process
def test_cli_refuses_privacy_key_without_mode_before_anything_runs(tmp_path):
    proc = fedguard("simulate", "privacy.target_epsilon=3", cwd=tmp_path)
    _one_line_refusal(proc, "privacy.target_epsilon has no effect with privacy=none", "privacy=sample_dp")
    assert not (tmp_path / "outputs").exists()  # no empty outputs/<time>/ folder either


def test_cli_suggests_the_key_a_typo_meant(tmp_path, fedguard_here):
    proc = fedguard_here("simulate", "train.learning_rat=0.1")
    _one_line_refusal(proc, "did you mean train.learning_rate?")
    assert "+train.learning_rat" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_cli_checks_data_files_before_the_engine(tmp_path, fedguard_here):
    proc = fedguard_here("simulate", "dataset=fashion_mnist", "model=cnn", "dataset.root=/nonexistent")
    _one_line_refusal(proc, "/nonexistent does not exist")
    assert "starting the engine" not in proc.stdout + proc.stderr and not (tmp_path / "outputs").exists()


def test_cli_refuses_a_run_dir_holding_results(tmp_path, fedguard_here):
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    proc = fedguard_here("simulate", f"hydra.run.dir={used}")
    _one_line_refusal(proc, "already holds a run's results", "overwrite=true", "resume=")


def test_cli_check_runs_the_checks_without_training(tmp_path, fedguard_here):
    ok = fedguard_here("simulate", "--check", "privacy=sample_dp", "privacy.target_epsilon=2")
    assert ok.returncode == 0 and "config OK" in ok.stdout, ok.stderr
    assert not (tmp_path / "outputs").exists()
    bad = fedguard_here("simulate", "--check", "privacy.delta=2")
    _one_line_refusal(bad, "privacy.delta has no effect with privacy=none")


# -- 4. console -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_fedguard_and_its_engines(flag, tmp_path, fedguard_here):
    proc = fedguard_here(flag)
    assert proc.returncode == 0
    for name in ("fedguard", "flwr", "opacus", "torch"):
        assert name in proc.stdout


# -- the same through a real run ---------------------------------------------------------------------
@pytest.mark.simulation
def test_second_run_into_the_same_dir_is_refused_then_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    common = ["simulation.rounds=1", "progress=false", f"hydra.run.dir={run_dir}"]
    first = fedguard("simulate", *common, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "starting the engine: 5 clients, dataset digits" in first.stderr
    assert "none: no differential privacy" in first.stderr  # the summary table's privacy row
    again = fedguard("simulate", *common, cwd=tmp_path)
    _one_line_refusal(again, "already holds a run's results")
    replaced = fedguard("simulate", *common, "overwrite=true", cwd=tmp_path, timeout=600)
    assert replaced.returncode == 0, replaced.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1]  # not [1, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy_mode"] == "none" and summary["engine_overhead_seconds"] > 0


@pytest.mark.deployment  # starts a separate process
def test_client_without_ca_is_told_to_ask_the_server_operator(tmp_path):
    """A site cannot make the federation's CA: `fedguard certs` would make a second, useless one."""
    from fedguard.clients.deployment.key_commands import keys_main

    assert keys_main(["--out", str(tmp_path / "keys")]) == 0
    proc = fedguard("client", "--server", "127.0.0.1:9092", "--ca", str(tmp_path / "missing.crt"),
                    "--key", str(tmp_path / "keys" / "node_key"), "--partition-id", "0", "--num-partitions", "3",
                    cwd=tmp_path)
    assert proc.returncode == 1 and "missing TLS file" in proc.stderr
    assert "server operator" in proc.stderr and "`fedguard certs`" not in proc.stderr


@pytest.mark.simulation
def test_ctrl_c_stops_keeps_the_record_and_says_how_to_resume(tmp_path):
    import signal
    import time

    from fedguard.server.run_state import read_resume_point

    run_dir = tmp_path / "run"
    # A terminal's Ctrl-C: SIGINT at its default in the child even when this test runs in a
    # background job (a non-interactive shell starts those with SIGINT ignored, and Python then
    # keeps ignoring it), so the test checks fedguard, not how pytest was started.
    proc = subprocess.Popen(
        [*FEDGUARD, "simulate", "simulation.rounds=200", "progress=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    completed = read_resume_point(run_dir).run_state.completed_round
    assert completed >= 1 and len(metrics.read_text().splitlines()) >= completed
    assert f"interrupted after round {completed}; continue with: fedguard simulate" in stderr
    assert f"resume={run_dir}" in stderr and "Traceback" not in stderr
