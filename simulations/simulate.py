"""``fedguard simulate``: a Flower simulation (Ray backend) driven by the Hydra config in conf/."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fedguard.clients.wire import protocol
from fedguard.conf import validate_config
from fedguard.conf.plans import secagg_risk_line
from fedguard.conf.run_config import config_to_yaml
from fedguard.conf.schema import ConfigError
from fedguard.server.checkpoint import CheckpointError
from fedguard.server.noise_check import swamped_update_warning
from fedguard.server.run_record import SUMMARY_FILE, clear_results, write_json_atomic
from fedguard.simulations.cluster import ClusterError
from fedguard.simulations.planned_privacy import planned_sample_dp_line
from fedguard.simulations.preflight import check_data, check_resources, check_run_dir, fail

logger = logging.getLogger(__name__)

CLIENT_STATE_DIR = "client-state"

# Ray's notice about a future change: clients with num_gpus=0 are still hidden from GPUs,
# which is what fedguard relies on (check_resources says how to give clients a GPU share).
warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")


# Modules whose UserWarnings (RDP order choices, dp_accounting's convergence notes) are
# library noise on a user's console; shown again with log_level=DEBUG.
LIBRARY_NOISE_MODULES = (
    "opacus.accountants.analysis.rdp",
    "dp_accounting.rdp.rdp_privacy_accountant",
    "dp_accounting.pld.pld_privacy_accountant",
)


def configure_logging(level: str) -> None:
    """One console line per record: Flower's own console handler would repeat what
    Hydra's job logging (console + <run dir>/simulate.log) already prints."""
    logging.getLogger().setLevel(level)
    flower_logger = logging.getLogger("flwr")
    flower_logger.setLevel(level)
    for handler in list(flower_logger.handlers):
        flower_logger.removeHandler(handler)
    flower_logger.propagate = True
    if level != "DEBUG":
        for module in LIBRARY_NOISE_MODULES:  # accountants' numeric notes: not the user's business
            warnings.filterwarnings("ignore", category=UserWarning, module=module)


def backend_config(cfg: DictConfig) -> dict[str, Any]:
    """Ray settings: per-client resources (fractional GPUs allowed) and, optionally, a cluster."""
    init_args: dict[str, Any] = {}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    return {
        "client_resources": {
            "num_cpus": float(cfg.simulation.client_resources.num_cpus),
            "num_gpus": float(cfg.simulation.client_resources.num_gpus),
        },
        "init_args": init_args,
    }


def quiet_workers(log_level: str) -> dict[str, str]:
    """Keep library noise off the console in the engine's workers (they inherit this process's
    environment): Flower's shutdown notices ("Manually terminating ClientAppActor") through
    FLWR_LOG_LEVEL, which its console handler reads at import, and the accountants' numeric
    notes through PYTHONWARNINGS. Errors still show; log_level=DEBUG shows everything.

    Returns the variables set, for a cluster's workers (which inherit their node's environment,
    not the driver's: simulations/cluster.py passes them in the job's runtime_env)."""
    if log_level == "DEBUG":
        return {}
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    os.environ["FEDGUARD_QUIET_FLOWER"] = "1"  # read by fedguard.clients.app in each worker
    ignores = [f"ignore::UserWarning:{module}" for module in LIBRARY_NOISE_MODULES]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), *ignores]))
    return {key: os.environ[key] for key in ("FLWR_LOG_LEVEL", "FEDGUARD_QUIET_FLOWER", "PYTHONWARNINGS")}


def config_to_yaml_dataset(cfg: DictConfig) -> str:
    """The dataset section alone, for the per-node data check on a cluster."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg.dataset, resolve=True)


def launch(
    server_app: ServerApp, client_app: ClientApp, num_clients: int, backend: dict[str, Any], context: Context
) -> None:
    """Start Flower's simulation engine with a ServerApp Context that carries the run config.

    Flower 1.41's public `run_simulation` takes no run config; `_run_simulation` is the
    same engine with a Context argument. Pinned Flower version, covered by the tests.
    """
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedguard.simulations.engine_dispatch import sparse_dispatch

    with sparse_dispatch():  # the engine's feeder asks only nodes with a message (10,000 clients: see the module)
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend,
            server_app_context=context,
            verbose_logging=logging.getLogger().level <= logging.DEBUG,
        )


def run_simulation(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run fedguard's ServerApp and ClientApp in Flower's simulation engine; returns summary.json.

    The resolved config travels in the run config exactly as `flwr run` carries it on
    real sites, so simulation exercises the deployment code path.
    """
    from fedguard.clients.app import SIMULATION_ROSTER, build_client_app
    from fedguard.clients.secagg_identity import provision_rosters
    from fedguard.server.app import app as server_app
    from fedguard.server.app import load_resume_point

    check_resources(cfg)
    load_resume_point(cfg, run_dir)  # fail here, not inside the engine, if it cannot resume
    run_config = {
        protocol.RUN_CONFIG_FEDGUARD: config_to_yaml(cfg),
        protocol.RUN_CONFIG_RUN_DIR: str(run_dir),
    }
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    worker_env = quiet_workers(str(cfg.log_level))
    outer_mods = ()
    if cfg.simulation.ray_address:
        # Every node is checked (fedguard, data) before any round; the state stays on this machine.
        from fedguard.simulations.cluster import join_cluster

        outer_mods = (join_cluster(str(cfg.simulation.ray_address), worker_env, config_to_yaml_dataset(cfg),
                                   run_dir, run_dir / CLIENT_STATE_DIR),)
    # Virtual sites keep their privacy state and ledgers beside the run, so `resume=` works here too.
    site_data = [str(Path(p).resolve()) for p in cfg.simulation.site_data] if cfg.simulation.site_data else None
    custom_model = str(cfg.model.target) if cfg.model.name == "custom" else None
    client_app = build_client_app(site_state_root=run_dir / CLIENT_STATE_DIR, site_data=site_data,
                                  custom_model=custom_model, outer_mods=outer_mods,
                                  collusion_fraction=cfg.simulation.get("site_collusion_fraction"))
    if cfg.secure_agg.mode != "off":
        # The out-of-band step of a real federation, done per run: each virtual site's identity
        # key in its state dir, and the roster of all of them, which the sites pin.
        state_root = run_dir / CLIENT_STATE_DIR
        provision_rosters({f"partition-{i}": state_root / f"partition-{i}" for i in range(int(cfg.simulation.num_clients))},
                          shared_roster=state_root / SIMULATION_ROSTER)
    # Ray takes seconds to start; say what is starting so a silent terminal is not a hang.
    print(
        f"fedguard: starting the engine: {cfg.simulation.num_clients} clients, dataset {cfg.dataset.name}, "
        f"privacy {cfg.privacy.mode}; results in {run_dir}",
        file=sys.stderr,
        flush=True,
    )
    if (risk := secagg_risk_line(cfg)) is not None:
        print(f"fedguard: {risk}", file=sys.stderr, flush=True)
    if (planned := planned_sample_dp_line(cfg)) is not None:
        print(f"fedguard: {planned}", file=sys.stderr, flush=True)
    launched = time.perf_counter()
    try:
        launch(server_app, client_app, int(cfg.simulation.num_clients), backend_config(cfg), context)
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    engine_seconds = time.perf_counter() - launched
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    # Ray's start and shutdown happen outside the ServerApp's wall_seconds; record them apart.
    summary["engine_overhead_seconds"] = max(0.0, engine_seconds - float(summary.get("wall_seconds", 0.0)))
    if cfg.simulation.ray_address:
        from fedguard.simulations.cluster import placement_summary

        summary["cluster"] = {"address": str(cfg.simulation.ray_address), **placement_summary(run_dir)}
    write_json_atomic(summary_path, summary)
    return summary


# Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130
# How long a Ctrl-C waits for a checkpoint that is being written.
CHECKPOINT_GRACE_SECONDS = 10.0


class Interrupted(Exception):
    """Ctrl-C stopped the engine; what was recorded (metrics, ledger, checkpoints) stays."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def interrupted_message(run_dir: Path, overrides: list[str]) -> str:
    """Where an interrupted run stands and the command that continues it (its own overrides + resume=)."""
    from fedguard.server.checkpoint import CheckpointError
    from fedguard.server.run_state import read_resume_point

    try:
        completed = read_resume_point(run_dir).run_state.completed_round
    except CheckpointError:
        return f"interrupted before round 1 completed; nothing to resume in {run_dir}"
    kept = [o for o in overrides if not o.lstrip("+").startswith(("hydra.", "resume=", "overwrite="))]
    command = " ".join(shlex.quote(arg) for arg in [*kept, f"resume={run_dir}"])
    return f"interrupted after round {completed}; continue with: fedguard simulate {command}"


def stop_after_interrupt(run_dir: Path, overrides: list[str]) -> None:
    """Stop the engine, keep what was recorded, say how to continue; exits with status 130.

    Why os._exit: Flower's ServerApp runs on a non-daemon thread that would wait out the round
    timeout for clients the stopped engine no longer runs. Everything it records (metrics,
    ledger, checkpoints) is written atomically and fsync'ed per round, so ending here is a
    crash that `resume=` is built for; only a checkpoint still being written is waited for.
    """
    deadline = time.monotonic() + CHECKPOINT_GRACE_SECONDS
    while any((run_dir / "checkpoints").glob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"fedguard: {interrupted_message(run_dir, overrides)}", file=sys.stderr, flush=True)
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - the engine may be half-started; exiting ends its processes anyway
        logger.debug("ray.shutdown failed after Ctrl-C", exc_info=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(INTERRUPTED_EXIT)


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """One run per directory: refuse earlier results, or clear them under overwrite=true.

    Why: a second run in the same directory would append to metrics.jsonl and replace
    checkpoints, leaving a record that belongs to neither run. `resume=` continues one.
    """
    check_run_dir(cfg, run_dir)
    if cfg.overwrite and not cfg.resume and (removed := clear_results(run_dir)):
        logger.warning("overwrite=true: removed the earlier run's %s from %s", ", ".join(removed), run_dir)


@hydra.main(version_base="1.3", config_path="pkg://fedguard.conf", config_name="config")
def simulate(cfg: DictConfig) -> float:
    configure_logging(cfg.log_level)
    run_dir = Path(cfg.resume) if cfg.resume else Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        validate_config(cfg, overrides)
        check_data(cfg)  # again for sweeps (-m), whose jobs the CLI does not check
        if HydraConfig.get().mode == RunMode.MULTIRUN and (warning := swamped_update_warning(cfg)):
            logger.warning("%s", warning)  # a single run's CLI printed it already
        prepare_run_dir(cfg, run_dir)
        summary = run_simulation(cfg, run_dir)
    except ConfigError as err:
        raise SystemExit(fail(f"bad config: {err}")) from None
    except ClusterError as err:
        raise SystemExit(fail(f"cannot run on the cluster: {err}")) from None
    except CheckpointError as err:
        raise SystemExit(fail(f"cannot resume: {err}")) from None
    except Interrupted as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop_after_interrupt(stop.run_dir, overrides)
    accuracy = summary.get("final", {}).get("accuracy")
    return float("nan") if accuracy is None else float(accuracy)
