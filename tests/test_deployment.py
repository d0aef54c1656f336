"""Separate sites on loopback: `fedguard server`, `register`, `client` and `run` as real OS processes.

One SuperLink (TLS + SuperNode authentication) and three registered SuperNodes, trusting the
loopback app publisher, serve the module; every run is signed unless a test says otherwise, and
each test adds what it needs (an unsigned or modified app, an unregistered site, a killed site,
a killed server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedguard.clients.deployment.app_signing import APP_DIR, RUN_CONFIG_APP_SIGNATURE
from fedguard.clients.deployment.verified_clientapp import REFUSAL_PREFIX
from fedguard.privacy.accounting import compute_epsilon
from fedguard.server.checkpoint import CHECKPOINT_DIR, LATEST_NAME, read_checkpoint
from fedguard.clients.deployment.flower_tools import environment_with_flower, flower_executable
from deployment_support import RUN_TIMEOUT, finish

from fedguard.simulations.local_federation import Federation, free_port, stop_process

pytestmark = pytest.mark.deployment

SITES = 3
# Small and fast: logistic regression on digits, a few local steps per round.
# A site may lose a reply when the server dies under it (Flower drops a stale run's messages), so
# rounds wait at most 90 s for stragglers instead of the default ten minutes (a normal round: ~35 s,
# a ClientApp process per message on 2 cores).
FAST_RUN = ("dataset=digits", "model=logreg", f"simulation.num_clients={SITES}", "train.max_steps=4",
            "deployment.wait_for_clients=120", "simulation.round_timeout=90")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        fed.make_certs()
        fed.make_publisher()
        fed.start_server()
        for site in range(SITES):
            key = fed.make_site_keys(site)
            registered = fed.register(key.with_suffix(".pub"))
            assert registered.returncode == 0, registered.stderr
            assert "registered" in registered.stdout
        for site in range(SITES):
            fed.start_client(site, SITES)
        fed.wait_for_nodes(SITES)
        yield fed
    finally:
        fed.close()


def test_files_are_private(federation):
    for path in (federation.server_dir / "certs" / "ca.key", federation.server_dir / "certs" / "server.key",
                 federation.site_dir(0) / "keys" / "node_key"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    again = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "certs", "--out", str(federation.ca_cert.parent), "--host", "127.0.0.1"],
        capture_output=True, text=True, check=False,
    )
    assert again.returncode != 0 and "--force" in again.stderr


def test_dp_and_secure_aggregation_across_sites(federation):
    run = federation.submit(
        "dataset=digits", "model=mlp", f"simulation.num_clients={SITES}", "simulation.rounds=2",
        "train.learning_rate=0.2", "privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
        "secure_agg=secaggplus", "secure_agg.threshold=2",
    )
    run_dir = finish(federation, run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds" and summary["rounds"] == 2
    assert summary["secure_aggregation"] == "secaggplus"
    # 10 classes: chance is 0.1; the same config in simulation reaches 0.725 after 2 rounds.
    assert summary["final"]["accuracy"] > 0.5
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_replied"] for r in rounds] == [SITES, SITES]
    reports = rounds[-1]["privacy"]
    assert sorted(r["partition-id"] for r in reports) == list(range(SITES))
    for report in reports:
        pid = report["partition-id"]
        steps = [r["steps_round"] for line in rounds for r in line["privacy"] if r["partition-id"] == pid]
        assert len(steps) == 2 and report["steps_total"] == sum(steps) > 0
        history = [(report["noise_multiplier"], report["sample_rate"], report["steps_total"])]
        assert report["epsilon"] == pytest.approx(compute_epsilon(history, report["delta"], "rdp").epsilon)
    # Every site signed its spend on its own disk, and the server's ledger audits clean.
    for site in range(SITES):
        assert list((federation.site_dir(site) / "ledger").glob("*.jsonl")), f"site {site} kept no ledger"
    audit = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "audit", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    assert len(json.loads(audit.stdout)["clients"]) == SITES


def _site_logs(fed: Federation) -> list[str]:
    return [(fed.root / f"client{site}.log").read_text(errors="replace") for site in range(SITES)]


def _wait_for_refusals(fed: Federation, run_id: int, timeout: float = 120) -> list[str]:
    """Each site's refusal line for ``run_id``."""
    pattern = re.compile(rf"{REFUSAL_PREFIX} {run_id} \(.*")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [pattern.search(log) for log in _site_logs(fed)]
        if all(lines):
            return [line.group(0) for line in lines]
        time.sleep(1)
    raise AssertionError(f"not every site refused run {run_id}; see {fed.root}/client*.log")


def test_unsigned_run_is_refused_by_every_site(federation):
    run = federation.submit(*FAST_RUN, "simulation.rounds=1", signed=False)
    try:
        run.wait(timeout=300)
    finally:
        stop_process(run)
    log = (federation.root / "run.log").read_text(errors="replace")
    run_id = int(re.findall(r"run (\d+) started", log)[-1])
    for line in _wait_for_refusals(federation, run_id):
        assert "unsigned" in line
    # The ServerApp learned why: each site's refusal reached it as the reply to its message.
    assert log.count(f"{REFUSAL_PREFIX} {run_id}") >= SITES, log[-4000:]
    assert "no usable training replies" in log


def _modified_app(root: Path) -> Path:
    """fedguard's tree with one line added to the ClientApp after the publisher signed it."""
    copy = root / "modified-app"
    shutil.copytree(APP_DIR, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "outputs", "multirun", "fedguard-*"))
    app = copy / "clients" / "app.py"
    app.write_text(app.read_text() + "\nEXFILTRATE = True  # added after signing\n")
    return copy


def test_app_modified_after_signing_is_refused(federation):
    from fedguard.conf import compose_config
    from fedguard.conf.run_config import config_to_yaml
    from fedguard.server.launch import CONNECTION_NAME, flower_cli_home
    from fedguard.server.submit import run_config_toml

    modified = _modified_app(federation.root)
    cfg = compose_config([*FAST_RUN, "simulation.rounds=1", "progress=false"])
    run_config = federation.root / "modified-run.toml"
    signature = federation.app_signature.read_text().strip()
    run_config.write_text(run_config_toml(config_to_yaml(cfg), "", signature))
    assert RUN_CONFIG_APP_SIGNATURE in run_config.read_text()
    with flower_cli_home(federation.control_address, federation.ca_cert) as env:  # the operator's loopback
        started = subprocess.run(
            [flower_executable("flwr"), "run", str(modified), CONNECTION_NAME, "--run-config", str(run_config),
             "--format", "json"], env=env, capture_output=True, text=True, timeout=300, check=False)
        answer = json.loads(started.stdout)
        assert answer.get("success"), started.stdout + started.stderr
        run_id = int(answer["run-id"])
        for line in _wait_for_refusals(federation, run_id):
            assert "modified after signing" in line
        server_log = ""
        deadline = time.monotonic() + 120
        while "no usable training replies" not in server_log and time.monotonic() < deadline:
            time.sleep(2)
            server_log = subprocess.run([flower_executable("flwr"), "log", str(run_id), CONNECTION_NAME],
                                        env=env, capture_output=True, text=True, timeout=60, check=False).stdout
    assert server_log.count(f"{REFUSAL_PREFIX} {run_id}") >= SITES, server_log[-4000:]
    # Nothing of the modified FAB was unpacked on any site (the check comes before the install).
    # In module order a signed run came first (test_dp_and_secure_aggregation_across_sites): each
    # site holds that app's unpacked FAB, and not this one.
    fab_hash = answer["fab-hash"]
    for site in range(SITES):
        apps = federation.site_dir(site) / "flwr" / "apps"
        installed = [path.name for path in apps.iterdir()] if apps.exists() else []
        assert not any(fab_hash in name for name in installed), installed


def test_only_the_fleet_api_faces_the_sites(federation):
    """On the public address nginx forwards the Fleet API and /health only; Control and runtime
    paths are refused there, logged, and never reach the SuperLink. The operator's Control API
    on the SuperLink's loopback address works (the harness registers and lists sites through it)."""
    import httpx

    denied_log = federation.server_dir / "proxy" / "denied.log"
    earlier = len(denied_log.read_text().splitlines()) if denied_log.exists() else 0
    with httpx.Client(base_url=f"https://{federation.address}", verify=str(federation.ca_cert), timeout=30) as public:
        assert public.get("/health").status_code == 200
        refused = {path: public.post(path, content=b"\x00").status_code
                   for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                                "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input")}
        assert set(refused.values()) == {403}, refused
        assert public.get("/docs").status_code == 404 and public.get("/openapi.json").status_code == 404
    denied = denied_log.read_text().splitlines()[earlier:]
    for path in refused:
        (line,) = [entry for entry in denied if f"POST {path} " in entry]
        assert " 403 " in line and "upstream=-" in line  # nginx never opened a connection to the SuperLink
    server_log = (federation.root / "server.log").read_text(errors="replace")
    assert f"Uvicorn running on https://{federation.control_address}" in server_log
    assert federation.connected_nodes() == SITES


def test_unregistered_site_is_refused(federation):
    key = federation.make_site_keys(SITES)  # a site whose key nobody registered
    proc = federation.start_client(SITES, SITES + 1, "--max-wait", "15", key=key)
    proc.wait(timeout=120)
    log = (federation.root / f"client{SITES}.log").read_text(errors="replace")
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in log or "could not establish a connection" in log


def test_plaintext_site_is_refused(federation):
    """A SuperNode without TLS cannot talk to the SuperLink (which only speaks HTTPS)."""
    log_path = federation.root / "plaintext.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [flower_executable("flower-supernode"), "--insecure", "--superlink", federation.address, "--port", str(free_port()),
             "--max-wait-time", "10", "--node-config", "partition-id=0 num-partitions=3"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment_with_flower(),
        )
        try:
            proc.wait(timeout=120)
        finally:
            stop_process(proc)  # its SuperExec child too
    assert proc.returncode != 0
    assert "could not establish a connection" in log_path.read_text(errors="replace")


def test_client_without_ca_or_key_fails_clearly(federation, tmp_path):
    no_ca = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "client", "--server", federation.address, "--ca", str(tmp_path / "missing.crt"),
         "--key", str(federation.site_dir(0) / "keys" / "node_key"), "--partition-id", "0", "--num-partitions", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert no_ca.returncode == 1 and "missing TLS file" in no_ca.stderr
    bad_partition = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "client", "--server", federation.address, "--ca", str(federation.ca_cert),
         "--key", str(federation.site_dir(0) / "keys" / "node_key"), "--partition-id", "3", "--num-partitions", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert bad_partition.returncode == 1 and "partition-id" in bad_partition.stderr
    untrusting = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "client", "--server", federation.address, "--ca", str(federation.ca_cert),
         "--key", str(federation.site_dir(0) / "keys" / "node_key"), "--partition-id", "0", "--num-partitions", "3"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert untrusting.returncode == 1 and "--trusted-publishers" in untrusting.stderr


def _wait_for_checkpoint(fed: Federation, completed_round: int, known: list[Path], timeout: float = RUN_TIMEOUT) -> Path:
    """The new run's directory (not one in ``known``) once it has checkpointed ``completed_round``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run_dir in set(fed.run_dirs()) - set(known):
            latest = run_dir / CHECKPOINT_DIR / LATEST_NAME
            if latest.is_file() and read_checkpoint(latest)["round"] >= completed_round:
                return run_dir
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint of round {completed_round} after {timeout} s")


def test_proxy_death_is_noticed_and_state_survives(federation):
    """nginx killed: `fedguard server` says so, stops the SuperLink and exits non-zero; restarted
    with the same state dir, the registered sites and earlier runs are all still there."""
    runs_before = federation.run_dirs()
    assert runs_before, "earlier tests left no run directory"
    pid = int((federation.server_dir / "proxy" / "nginx.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert federation.server.wait(timeout=60) == 3
    log = (federation.root / "server.log").read_text(errors="replace")
    assert "the proxy (nginx) exited" in log and "Restart `fedguard server` with the same --state-dir" in log
    federation.start_server()
    federation.wait_for_nodes(SITES)  # the same registered keys: nothing re-registered
    assert federation.run_dirs() == runs_before


RESUMED_ROUND_TIMEOUT = 180


def test_server_crash_and_resume_keeps_privacy_accounting_exact(federation):
    rounds = 3
    # After the SuperLink restarts, SuperNodes come back on their reconnect backoff (seen: ~50 s on
    # a loaded 2-core machine) while the SuperLink's saved state already lists them; the first
    # resumed round must outlast that, or its messages expire before any site pulls them.
    fast = [o for o in FAST_RUN if not o.startswith("simulation.round_timeout=")]
    overrides = (*fast, f"simulation.round_timeout={RESUMED_ROUND_TIMEOUT}", f"simulation.rounds={rounds}",
                 "privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0")
    known = federation.run_dirs()
    first = federation.submit(*overrides)
    run_dir = _wait_for_checkpoint(federation, 1, known)
    federation.stop_server()  # SIGKILL to the SuperLink and its ServerApp: a crash
    stop_process(first)
    federation.start_server()
    federation.wait_for_nodes(SITES)
    resumed_round = read_checkpoint(run_dir / CHECKPOINT_DIR / LATEST_NAME)["round"]
    second = federation.submit(*overrides, f"resume=runs/{run_dir.name}")
    finish(federation, second)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds"
    assert summary["resumed_after_round"] == resumed_round >= 1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, rounds + 1))
    # Exactly `rounds` rounds of spend per site, as an uninterrupted run: none lost, none doubled.
    steps_per_round = 4
    for report in lines[-1]["privacy"]:
        assert report["steps_total"] == rounds * steps_per_round
        assert report["rounds_participated"] == rounds
        this_run = (report["noise_multiplier"], report["sample_rate"], rounds * steps_per_round)
        # The site's epsilon covers every run on its data (earlier tests in this module trained on
        # the same files): this run's steps composed after the other lineages' spend it recorded.
        prior = _other_runs_on_the_data(federation.site_dir(int(report["partition-id"])), this_run)
        expected = compute_epsilon([*prior, this_run], report["delta"], "rdp").epsilon
        assert report["epsilon"] == pytest.approx(expected)
    for site in range(SITES):
        saved = list((federation.site_dir(site) / "privacy").glob("*.json"))
        assert saved, f"site {site} kept no privacy state"


def _other_runs_on_the_data(site_dir: Path, this_run: tuple) -> list[tuple[float, float, int]]:
    """Every (sigma, q, steps) the site recorded on its data, less one lineage equal to ``this_run``."""
    (record_file,) = (site_dir / "privacy" / "data").glob("*.json")
    lineages = json.loads(record_file.read_text())["lineages"].values()
    histories = [list(zip(rec["sigma"], rec["rate"], rec["steps"])) for rec in lineages]
    mine = [h for h in histories if len(h) == 1 and h[0][2] == this_run[2] and h[0][0] == pytest.approx(this_run[0])]
    assert mine, f"this run's spend is missing from {record_file}"
    histories.remove(mine[0])
    return [(float(s), float(q), int(n)) for history in histories for s, q, n in history]


HUNG_ROUND_TIMEOUT = 60  # a ClientApp process per message: ~40 s a round for 3 sites on 2 cores


def test_hung_site_does_not_hang_the_server(federation):
    """A SuperNode frozen (SIGSTOP, whole process group) mid-run: its rounds close at the round timeout."""
    known = federation.run_dirs()
    overrides = [o for o in FAST_RUN if not o.startswith("simulation.round_timeout=")]
    run = federation.submit(*overrides, "simulation.rounds=2", f"simulation.round_timeout={HUNG_ROUND_TIMEOUT}")
    _wait_for_checkpoint(federation, 1, known)
    hung = federation.clients[0]
    os.killpg(hung.pid, signal.SIGSTOP)
    try:
        run_dir = finish(federation, run)
    finally:
        os.killpg(hung.pid, signal.SIGCONT)
        # Thawed, the SuperNode first works through the frozen run's stale message (CI saw its
        # next run's replies arrive 78 s into 60 s rounds). Restart it, as a site's admin restarts
        # a hung service (same key, same state dir), so the next test starts from a sound federation.
        stop_process(hung)
        federation.start_client(0, SITES)
        federation.wait_for_nodes(SITES)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds" and summary["rounds"] == 2
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["clients_replied"] == SITES - 1 and last["clients_failed"] == 1
    assert last["round_seconds"] < 2 * HUNG_ROUND_TIMEOUT


def test_killed_site_does_not_hang_the_server(federation):
    known = federation.run_dirs()
    run = federation.submit(*FAST_RUN, "simulation.rounds=2")
    _wait_for_checkpoint(federation, 1, known)
    stop_process(federation.clients[SITES - 1])  # one site goes away mid-run
    run_dir = finish(federation, run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"] == "completed all rounds" and summary["rounds"] == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["clients_replied"] == SITES - 1
